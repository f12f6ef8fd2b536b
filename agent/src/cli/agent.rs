//! `updatectl` verbs that talk to the daemon over its API: status, check, update,
//! watch, cancel, reboot, rollback, mark-good, history.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use tokio_stream::StreamExt as _;

use super::render;
use crate::api::client::{self, Client, TlsFiles};
use crate::api::pb;

/// Where the agent is.
#[derive(Debug, Clone, Args)]
pub struct Connect {
    /// The agent's Unix socket.
    #[arg(long, global = true, help_heading = "Connection", env = "UPDATECTL_SOCKET", default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Talk to a remote agent over TCP with mutual TLS instead (https://HOST:PORT).
    #[arg(long, global = true, help_heading = "Connection", env = "UPDATECTL_ADDRESS", requires_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub address: Option<String>,
    /// CA certificate that signed the agent's server certificate (PEM).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "UPDATECTL_TLS_CA"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "UPDATECTL_TLS_CERT"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        env = "UPDATECTL_TLS_KEY"
    )]
    pub tls_key: Option<PathBuf>,
    /// Name expected in the agent's certificate (default: the address's host).
    #[arg(long, global = true, help_heading = "Connection")]
    pub tls_server_name: Option<String>,
    /// Seconds to wait for a remote agent to answer the connection (TCP, TLS).
    #[arg(long, global = true, help_heading = "Connection", env = "UPDATECTL_CONNECT_TIMEOUT", default_value_t = 10.0, value_parser = positive_secs)]
    pub connect_timeout: f64,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

/// A call the agent answered with an error: code, stable reason, and its message.
#[derive(Debug, thiserror::Error)]
#[error("{message}{hint}")]
pub struct CallError {
    pub code: tonic::Code,
    pub reason: String,
    pub message: String,
    hint: &'static str,
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        use tonic_types::StatusExt as _;
        let reason = s
            .get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default();
        let hint = match (s.code(), reason.as_str()) {
            (_, "BUSY") => {
                " (follow it with `updatectl watch`, or stop it with `updatectl cancel`)"
            }
            (tonic::Code::Unavailable, _) => " (is update-agent.service running?)",
            (tonic::Code::Unimplemented, _) => "",
            _ => "",
        };
        let message = if s.message().is_empty() {
            format!("the agent answered {:?}", s.code())
        } else {
            s.message().to_owned()
        };
        Self {
            code: s.code(),
            reason,
            message,
            hint,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Reboot {
    /// Stage and arm only; reboot yourself (or `updatectl reboot`).
    Never,
    /// Reboot as soon as the release is armed.
    Now,
    /// Reboot inside the next maintenance window.
    Window,
}

/// Where the release comes from; none: the node's own channel (agent.toml
/// `auto.channel`, read from `[releases] url`).
#[derive(Debug, Clone, Args)]
#[group(required = false, multiple = false)]
pub struct Source {
    /// A release version from the node's release server (agent.toml [releases] url).
    #[arg(long)]
    pub version: Option<String>,
    /// A channel to follow.
    #[arg(long)]
    pub channel: Option<String>,
    /// A payload URL.
    #[arg(long)]
    pub url: Option<String>,
    /// A payload file on this node.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// What runs, what is next, and how the last update went (and why).
    Status {
        /// The versioned JSON document (schema updatectl.status.v1) instead.
        #[arg(long)]
        json: bool,
    },
    /// Ask whether a newer release is available (nothing is downloaded but its head).
    Check {
        #[command(flatten)]
        source: Source,
    },
    /// Stage a release into the inactive slot and arm it for the next boot.
    Update {
        #[command(flatten)]
        source: Source,
        /// When to reboot into it.
        #[arg(long, value_enum, default_value = "never")]
        reboot: Reboot,
        /// Accept a release older than the running one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Follow the update to its end; exit non-zero if it fails.
        #[arg(long)]
        wait: bool,
    },
    /// Follow the running update (or the next one) to its end.
    Watch {
        /// An operation id (from `update`); default: the running one.
        operation: Option<String>,
    },
    /// Stop the running update, or drop a staged or armed release.
    Cancel,
    /// Reboot the node into the armed release (or to finish a rollback).
    Reboot {
        /// Reboot even when nothing is armed.
        #[arg(long)]
        force: bool,
        /// Straight into the armed release's kernel (kexec), skipping the firmware
        /// and the bootloader; falls back to a firmware reboot, saying why.
        #[arg(long, conflicts_with = "firmware")]
        kexec: bool,
        /// Through the firmware and the bootloader (default: agent.toml [boot] reboot).
        #[arg(long)]
        firmware: bool,
    },
    /// Go back to the previous, known-good release (takes effect at the next boot).
    Rollback,
    /// Commit the running trial release now, without waiting for health checks.
    MarkGood,
    /// Past updates, newest first.
    History {
        #[arg(long)]
        json: bool,
        /// At most this many entries.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

async fn connect(c: &Connect) -> anyhow::Result<Client> {
    Ok(match &c.address {
        Some(addr) => {
            let files = TlsFiles {
                ca: c.tls_ca.clone().unwrap_or_default(),
                cert: c.tls_cert.clone().unwrap_or_default(),
                key: c.tls_key.clone().unwrap_or_default(),
                server_name: c.tls_server_name.clone(),
            };
            client::tls(
                addr,
                &files,
                std::time::Duration::from_secs_f64(c.connect_timeout),
            )
            .await?
        }
        None => client::unix(&c.socket).await?,
    })
}

pub fn run(cmd: AgentCommand, c: &Connect) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(cmd, c))
}

/// `None`: the node's own channel (the agent resolves it).
fn source_of(s: Source) -> anyhow::Result<Option<pb::start_update_request::Source>> {
    use pb::start_update_request::Source as S;
    Ok(Some(match s {
        Source {
            version: Some(v), ..
        } => S::Version(v),
        Source {
            channel: Some(c), ..
        } => S::Channel(c),
        Source { url: Some(u), .. } => S::Url(u),
        Source { file: Some(f), .. } => {
            // The agent reads the file itself, so it needs the absolute path.
            let abs =
                std::path::absolute(&f).with_context(|| format!("resolving {}", f.display()))?;
            S::Path(abs.display().to_string())
        }
        _ => return Ok(None),
    }))
}

async fn run_async(cmd: AgentCommand, c: &Connect) -> anyhow::Result<()> {
    let mut cl = connect(c).await?;
    match cmd {
        AgentCommand::Status { json } => status(&mut cl, json).await?,
        AgentCommand::Check { source } => check(&mut cl, source).await?,
        AgentCommand::Update {
            source,
            reboot,
            allow_downgrade,
            wait,
        } => update(&mut cl, source, reboot, allow_downgrade, wait).await?,
        AgentCommand::Watch { operation } => {
            watch(&mut cl, operation.as_deref().unwrap_or_default()).await?;
        }
        AgentCommand::Cancel => {
            let r = cl
                .cancel(pb::CancelRequest {})
                .await
                .map_err(CallError::from)?
                .into_inner();
            println!("cancelled: slot {} is marked unbootable", r.slot);
        }
        AgentCommand::Reboot {
            force,
            kexec,
            firmware,
        } => {
            let method = match (kexec, firmware) {
                (true, _) => pb::RebootMethod::Kexec,
                (_, true) => pb::RebootMethod::Firmware,
                _ => pb::RebootMethod::Unspecified,
            };
            let r = cl
                .reboot(pb::RebootRequest {
                    force,
                    method: method as i32,
                })
                .await
                .map_err(CallError::from)?
                .into_inner();
            println!("{}", render::rebooting(&r));
        }
        AgentCommand::Rollback => {
            let r = cl
                .rollback(pb::RollbackRequest {})
                .await
                .map_err(CallError::from)?
                .into_inner();
            println!(
                "rolling back: slot {} ({}) boots next; reboot to finish (updatectl reboot)",
                r.slot, r.version
            );
        }
        AgentCommand::MarkGood => {
            let r = cl
                .mark_good(pb::MarkGoodRequest {})
                .await
                .map_err(CallError::from)?
                .into_inner();
            println!(
                "committed: {} on slot {} is the default now",
                r.version, r.slot
            );
        }
        AgentCommand::History { json, limit } => history(&mut cl, json, limit).await?,
    }
    Ok(())
}

/// `updatectl status`: the summary, or the versioned JSON.
async fn status(cl: &mut Client, json: bool) -> anyhow::Result<()> {
    let s = cl
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(CallError::from)?
        .into_inner();
    print!(
        "{}",
        if json {
            render::status_json(&s)
        } else {
            render::status_text(&s)
        }
    );
    Ok(())
}

/// `updatectl check`: whether an update is offered and what it would download.
async fn check(cl: &mut Client, source: Source) -> anyhow::Result<()> {
    use pb::check_for_update_request::Source as C;
    use pb::start_update_request::Source as S;
    let src = source_of(source)?.map(|s| match s {
        S::Version(v) => C::Version(v),
        S::Channel(ch) => C::Channel(ch),
        S::Url(u) => C::Url(u),
        S::Path(p) => C::Url(format!("file://{p}")),
    });
    let r = cl
        .check_for_update(pb::CheckForUpdateRequest { source: src })
        .await
        .map_err(CallError::from)?
        .into_inner();
    let kind = if r.delta { "delta" } else { "full payload" };
    if r.available {
        println!(
            "{} is available (running {}): {kind}, at most {} to download",
            r.version,
            r.running_version,
            render::bytes(r.download_bytes)
        );
    } else {
        println!("no update: {}", r.reason);
    }
    Ok(())
}

/// `updatectl update`: starts (or joins) an operation, and follows it if asked.
async fn update(
    cl: &mut Client,
    source: Source,
    reboot: Reboot,
    allow_downgrade: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let r = cl
        .start_update(pb::StartUpdateRequest {
            source: source_of(source)?,
            reboot: match reboot {
                Reboot::Never => pb::RebootPolicy::Never,
                Reboot::Now => pb::RebootPolicy::Immediate,
                Reboot::Window => pb::RebootPolicy::InWindow,
            } as i32,
            allow_downgrade,
        })
        .await
        .map_err(CallError::from)?
        .into_inner();
    if r.already_running {
        println!("already running as operation {}", r.operation_id);
    } else {
        println!("started operation {}", r.operation_id);
    }
    if wait {
        watch(cl, &r.operation_id).await?;
    } else {
        println!("follow it with: updatectl watch {}", r.operation_id);
    }
    Ok(())
}

/// `updatectl history`: up to `limit` entries, fetched page by page.
async fn history(cl: &mut Client, json: bool, limit: u32) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    let mut token = String::new();
    while (entries.len() as u32) < limit {
        let r = cl
            .list_history(pb::ListHistoryRequest {
                page_size: (limit - entries.len() as u32).min(200),
                page_token: token,
            })
            .await
            .map_err(CallError::from)?
            .into_inner();
        entries.extend(r.entries);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    print!(
        "{}",
        if json {
            render::history_json(&entries)
        } else {
            render::history_text(&entries)
        }
    );
    Ok(())
}

/// An update that ended without a staged release.
#[derive(Debug, thiserror::Error)]
#[error("update {version} {outcome}: {reason}")]
pub struct UpdateFailed {
    pub version: String,
    pub outcome: &'static str,
    pub reason: String,
}

/// Follows an operation: a progress bar on a terminal, plain lines otherwise.
async fn watch(cl: &mut Client, id: &str) -> anyhow::Result<()> {
    let mut stream = cl
        .watch_update(pb::WatchUpdateRequest {
            operation_id: id.to_owned(),
        })
        .await
        .map_err(CallError::from)?
        .into_inner();
    if id.is_empty() {
        println!("waiting for an update to start…");
    }
    let bar = std::io::stdout().is_terminal().then(progress_bar);
    let mut version = String::new();
    let mut last_pct = u64::MAX;
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(CallError::from)?;
        let Some(kind) = ev.kind else { continue };
        use pb::update_event::Kind;
        match kind {
            Kind::Snapshot(op) => {
                version = op.version.clone();
                show_snapshot(bar.as_ref(), &op);
            }
            Kind::Phase(p) => match &bar {
                Some(b) => b.set_message(render::phase(p)),
                None => println!("phase: {}", render::phase(p)),
            },
            Kind::Progress(p) => show_progress(bar.as_ref(), &p, &mut last_pct),
            Kind::Warning(w) => match &bar {
                Some(b) => b.println(format!("warning: {w}")),
                None => println!("warning: {w}"),
            },
            Kind::Result(r) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return ended(r, version);
            }
        }
    }
    anyhow::bail!("the agent closed the event stream before the update ended (did it restart?)")
}

/// The bar of a terminal: phase, bytes written of all, speed, time left.
fn progress_bar() -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b
}

/// The operation as the stream starts: a line, and the bar set to where it is.
fn show_snapshot(bar: Option<&indicatif::ProgressBar>, op: &pb::Operation) {
    let line = format!(
        "operation {} · {} · {}",
        op.id,
        if op.version.is_empty() {
            "?"
        } else {
            &op.version
        },
        render::phase(op.phase)
    );
    match bar {
        Some(b) => {
            b.println(line);
            b.set_length(op.bytes_total);
            b.set_position(op.bytes_done);
            b.set_message(render::phase(op.phase));
        }
        None => println!("{line}"),
    }
}

/// Progress moves the bar; without one, a line at the start, every 10 points and
/// at the last operation (`last_pct`: the last printed, `u64::MAX` before any).
fn show_progress(bar: Option<&indicatif::ProgressBar>, p: &pb::Progress, last_pct: &mut u64) {
    match bar {
        Some(b) => {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
        }
        None => {
            let pct = p.bytes_done.saturating_mul(100) / p.bytes_total.max(1);
            if *last_pct == u64::MAX || pct >= *last_pct + 10 || p.ops_done == p.ops_total {
                *last_pct = pct;
                println!(
                    "progress: {pct}% · {} of {} written · {} fetched · operation {}/{}",
                    render::bytes(p.bytes_done),
                    render::bytes(p.bytes_total),
                    render::bytes(p.bytes_fetched),
                    p.ops_done,
                    p.ops_total
                );
            }
        }
    }
}

/// The operation's end: its line, and an error unless a release was staged or
/// committed (`version` from the snapshot, when the result names none).
fn ended(r: pb::Result, version: String) -> anyhow::Result<()> {
    let o = pb::Outcome::try_from(r.outcome).unwrap_or_default();
    println!("{}", render::result_line(&r));
    match o {
        pb::Outcome::Armed | pb::Outcome::Committed => Ok(()),
        _ => Err(UpdateFailed {
            version: if r.version.is_empty() {
                version
            } else {
                r.version
            },
            outcome: render::outcome(r.outcome),
            reason: r.reason,
        }
        .into()),
    }
}
