//! The regproxy binary: everything lives in the library; see `regproxy::cli`.

fn main() -> std::process::ExitCode {
    regproxy::cli::main()
}
