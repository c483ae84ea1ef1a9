//! The `credproxy` binary: parse arguments, hand over to [`credproxy::cli`].

/// mimalloc instead of glibc's malloc: a request allocates a few small,
/// short-lived buffers (header maps, the credential's edits), and glibc's
/// `malloc`/`free` pair cost about three times mimalloc's per allocation
/// (callgrind, the load bench).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // mimalloc commits its arenas up front; where transparent huge pages
    // are `always` (Debian's default) every touched 2 MiB of them is then
    // resident: the load bench's peak RSS went 21 -> 32 MiB for the
    // sidecar and 21 -> 86 MiB with the access log on. Without huge pages
    // for this process it is glibc's figure again. Before any thread starts.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    credproxy::cli::main()
}
