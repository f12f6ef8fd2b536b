//! `updatectl`: the command line. Parsing lives here so `main` stays a few lines.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod agent;
pub mod bundle;
pub mod publish;
pub mod rebuild;
pub mod render;
pub mod root;
pub mod sign;

/// Exit codes, documented in `updatectl --help` and the README.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_REJECTED: u8 = 3;
pub const EXIT_UNREACHABLE: u8 = 4;
pub const EXIT_REFUSED: u8 = 5;

const EXIT_HELP: &str = "Exit codes:
  0  success
  1  failure (I/O, a missing file, an update that failed or was cancelled)
  2  usage error (bad arguments, or the agent named a bad request field)
  3  payload rejected (untrusted or bad signature, expired, malformed, hash
     mismatch, not for this node, a downgrade)
  4  the agent cannot be reached (not running, no access to its socket, TLS)
  5  the agent refused (permission denied, another update running, wrong state,
     release not found)";

#[derive(Debug, Parser)]
#[command(
    name = "updatectl",
    version,
    about = "Control and publish A/B updates for immutable Linux hosts",
    after_help = EXIT_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub connect: agent::Connect,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Agent(agent::AgentCommand),
    /// Make, inspect and check release payloads (for publishers).
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        shell: clap_complete::Shell,
        /// The command name to complete (default: the name this was run as).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Write man pages for updatectl and each subcommand into DIR (for packagers).
    #[command(name = "man")]
    Man {
        dir: std::path::PathBuf,
        /// The installed name the pages are for (default: the name this was run as).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(cmd) => agent::run(cmd, &cli.connect),
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Completions { shell, name } => {
            let name = installed_name(name);
            let mut cmd = command_named(&name);
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir, name } => {
            use anyhow::Context as _;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let cmd = command_named(&installed_name(name));
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            Ok(())
        }
    }
}

/// The name the CLI is installed as: packages install it as `update-agentctl` where
/// systemd's own `updatectl` may live (systemd >= 257), so man pages, their file
/// names and completion functions must say the name people type. Without `--name`,
/// the name this was run as.
fn installed_name(name: Option<String>) -> String {
    name.or_else(|| {
        let argv0 = std::env::args_os().next()?;
        let file = std::path::Path::new(&argv0)
            .file_name()?
            .to_str()?
            .to_owned();
        Some(file)
    })
    .unwrap_or_else(|| "updatectl".to_owned())
}

/// The command tree under another name (page titles, `NAME-SUB.1` files, usage lines).
fn command_named(name: &str) -> clap::Command {
    <Cli as clap::CommandFactory>::command()
        .name(name.to_owned())
        .bin_name(name.to_owned())
}

/// The error and its causes in one line, each said once (transport errors repeat
/// their cause in their own message).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
    }
    parts.join(": ")
}

/// The exit code for an error: 3 when a payload was rejected on its merits.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    use crate::apply::ApplyError;
    use crate::payload::PayloadError;
    if err.chain().any(|e| {
        e.downcast_ref::<crate::api::client::ConnectError>()
            .is_some()
    }) {
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    if let Some(c) = err
        .chain()
        .find_map(|e| e.downcast_ref::<agent::CallError>())
    {
        use tonic::Code;
        return ExitCode::from(match (c.code, c.reason.as_str()) {
            (_, "REJECTED") => EXIT_REJECTED,
            (Code::InvalidArgument, _) => EXIT_USAGE,
            (Code::Unavailable, _) => EXIT_UNREACHABLE,
            (
                Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::NotFound
                | Code::Unimplemented,
                _,
            ) => EXIT_REFUSED,
            _ => EXIT_FAILURE,
        });
    }
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
                    | ApplyError::VerityRootMismatch { .. }
                    | ApplyError::Decompress { .. }
                    | ApplyError::WrongLength { .. }
            )
        ) || e.downcast_ref::<rebuild::Rejected>().is_some()
    });
    ExitCode::from(if rejected {
        EXIT_REJECTED
    } else {
        EXIT_FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packages install the CLI as `update-agentctl`: every page, its file name and
    /// its usage lines must say that name, never systemd's `updatectl`.
    #[test]
    fn man_pages_follow_the_installed_name() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        clap_mangen::generate_to(command_named("update-agentctl"), dir.path())?;
        let mut names: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        assert!(names.contains(&"update-agentctl.1".to_owned()));
        assert!(names.contains(&"update-agentctl-status.1".to_owned()));
        assert!(names.iter().all(|n| n.starts_with("update-agentctl")));
        let page = std::fs::read_to_string(dir.path().join("update-agentctl-status.1"))?;
        assert!(page.contains("\\fBupdate\\-agentctl status\\fR"), "{page}");
        Ok(())
    }

    #[test]
    fn completions_follow_the_installed_name() {
        let mut out = Vec::new();
        let mut cmd = command_named("update-agentctl");
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut cmd,
            "update-agentctl",
            &mut out,
        );
        let script = String::from_utf8_lossy(&out);
        assert!(script.contains("-o default update-agentctl"), "{script}");
        assert!(!script.contains("-o default updatectl"));
    }
}
