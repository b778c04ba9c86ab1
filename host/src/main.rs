//! The `jobhook` binary; see [`jobhook::app::cli`].

fn main() -> std::process::ExitCode {
    jobhook::app::cli::main()
}
