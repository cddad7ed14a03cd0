//! `backstop`: the command line. Everything else is library code.

use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates and frees
/// many small buffers (headers, bodies, hyper's internals) and glibc's malloc
/// spent about 6 % of the proxy's CPU on them, with periodic consolidation
/// pauses (measured with perf under load; see bench/RESULTS.md).
///
/// It comes in as `malloc` itself (the crate's `override` feature), under
/// Rust's `System` allocator, rather than as `mimalloc::MiMalloc`: that one
/// sends every allocation through `mi_malloc_aligned`, whose fast path ends
/// at 1 KiB, and over-allocates for larger sizes that are not a power of two
/// — such as each request's boxed future (~6 KiB). `System` calls `malloc`
/// whenever the alignment allows, which is nearly always (callgrind: 19.2k →
/// 18.9k instructions per proxied request). The C libraries (SQLite,
/// librdkafka) allocate from mimalloc too.
#[global_allocator]
static ALLOCATOR: std::alloc::System = std::alloc::System;

// Linked for its `malloc`, which nothing here names.
use mimalloc as _;

fn main() -> std::process::ExitCode {
    backstop::cli::main(backstop::cli::Cli::parse())
}
