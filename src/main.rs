//! The regproxy binary: everything lives in the library; see `regproxy::cli`.

fn main() -> anyhow::Result<()> {
    regproxy::cli::main()
}
