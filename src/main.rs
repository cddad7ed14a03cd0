//! `backstop`: the command line. Everything else is library code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    backstop::cli::main(backstop::cli::Cli::parse())
}
