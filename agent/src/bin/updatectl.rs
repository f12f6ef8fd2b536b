//! `updatectl`: parse, run, print the error chain once.

use std::process::ExitCode;

use clap::Parser;
use update_agent::cli;

fn main() -> ExitCode {
    restore_sigpipe();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Colour only when a person is looking.
            let prefix = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                "\x1b[1;31merror:\x1b[0m"
            } else {
                "error:"
            };
            eprintln!("{prefix} {}", cli::one_line(&e));
            cli::exit_code(&e)
        }
    }
}

/// Rust ignores SIGPIPE, which turns `updatectl ... | head` into a panic on the next
/// print; a command-line tool should end quietly like any other.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is
    // a valid disposition for SIGPIPE.
    unsafe {
        nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_DFL);
    }
}
