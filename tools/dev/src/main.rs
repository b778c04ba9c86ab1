//! The `jobhook-dev` binary; see [`jobhook_dev::cli`].

fn main() -> std::process::ExitCode {
    jobhook_dev::cli::main()
}
