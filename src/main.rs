//! `backstop`: the command line. Everything else is library code.

use clap::Parser;

/// mimalloc instead of the system allocator: the request path allocates and
/// frees many small buffers (headers, bodies, hyper's internals) and glibc's
/// malloc spent about 6 % of the proxy's CPU on them, with periodic
/// consolidation pauses (measured with perf under load; see bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    backstop::cli::main(backstop::cli::Cli::parse())
}
