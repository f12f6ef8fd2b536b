//! `updatectl`: parse, run, print the error chain once.

use std::process::ExitCode;

use clap::Parser;
use update_agent::cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            cli::exit_code(&e)
        }
    }
}
