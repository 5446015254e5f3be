//! The `tofy` binary: parse arguments, run, and turn any error into one
//! readable line on stderr and a non-zero exit code.

use std::process::ExitCode;

use tofy::cli::Interrupted;

fn main() -> ExitCode {
    match tofy::cli::run(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped by Ctrl-C: the shell's code for the signal, no error line.
        Err(err) if err.is::<Interrupted>() => err
            .downcast_ref::<Interrupted>()
            .map_or(ExitCode::FAILURE, |i| ExitCode::from(i.exit_code())),
        Err(err) => {
            // `{:#}` joins the whole context chain on one line.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
