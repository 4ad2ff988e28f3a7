//! `basaltctl`: command-line client for Basalt clusters. The implementation lives in
//! `basalt_client::cli` so that it is unit-tested with the library.

fn main() -> std::process::ExitCode {
    basalt_client::cli::main()
}
