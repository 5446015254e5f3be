//! The `tofy` binary: parse arguments, run, and turn any error into one
//! readable line on stderr and a non-zero exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    match tofy::cli::run(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` joins the whole context chain on one line.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
