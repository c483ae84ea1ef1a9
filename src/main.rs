//! The `credproxy` binary: parse arguments, hand over to [`credproxy::cli`].

/// mimalloc instead of glibc's malloc: a request allocates a few small,
/// short-lived buffers (header maps, the credential's edits), and glibc's
/// `malloc`/`free` pair cost about three times mimalloc's per allocation
/// (callgrind, the load bench).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    credproxy::cli::main()
}
