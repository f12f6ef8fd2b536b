//! `updatectl`: the command line. Parsing lives here so `main` stays a few lines.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bundle;

/// Exit codes, documented in `updatectl --help` and the README.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_REJECTED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "updatectl",
    version,
    about = "Control and publish A/B updates for immutable Linux hosts",
    after_help = "Exit codes:\n  0  success\n  1  failure (I/O, a missing or unreadable file, ...)\n  \
                  2  usage error (bad arguments)\n  3  payload rejected (untrusted or bad signature, \
                  expired, malformed manifest, hash mismatch)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make, inspect and check release payloads (for publishers).
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bundle(cmd) => bundle::run(cmd),
    }
}

/// The exit code for an error: 3 when a payload was rejected on its merits.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    use crate::apply::ApplyError;
    use crate::payload::PayloadError;
    let rejected = err.chain().any(|e| {
        matches!(
            e.downcast_ref::<PayloadError>(),
            Some(
                PayloadError::Trust { .. }
                    | PayloadError::Manifest { .. }
                    | PayloadError::BadMagic { .. }
                    | PayloadError::BadHeader { .. }
                    | PayloadError::WrongLength { .. }
                    | PayloadError::BadSignatureBlock { .. }
            )
        ) || matches!(
            e.downcast_ref::<ApplyError>(),
            Some(
                ApplyError::OpHashMismatch { .. }
                    | ApplyError::TargetHashMismatch { .. }
                    | ApplyError::Decompress { .. }
                    | ApplyError::WrongLength { .. }
            )
        ) || e.downcast_ref::<bundle::Rejected>().is_some()
    });
    ExitCode::from(if rejected {
        EXIT_REJECTED
    } else {
        EXIT_FAILURE
    })
}
