//! The `credproxy` binary: parse arguments, hand over to [`credproxy::cli`].

fn main() -> std::process::ExitCode {
    credproxy::cli::main()
}
