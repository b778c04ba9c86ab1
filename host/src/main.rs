//! The `jobhook` binary; see [`jobhook::cli`].

fn main() -> std::process::ExitCode {
    jobhook::cli::main()
}
