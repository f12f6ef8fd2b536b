//! `update-agent`: the on-node daemon. Parse, run, print the error chain once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use update_agent::config::{self, Config};
use update_agent::postboot::BootOutcome;
use update_agent::update::{Agent, Progress};

#[derive(Debug, Parser)]
#[command(
    name = "update-agent",
    version,
    about = "A/B update agent for immutable Linux hosts"
)]
struct Cli {
    /// Main configuration file; drop-ins are read from FILE.d/*.toml.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: serve the gRPC API on the Unix socket (and TCP with mutual TLS
    /// when configured), resume an interrupted update, run updates asked for.
    Serve,
    /// Stage a release into the inactive slot and arm the bootloader to try it.
    /// Re-running with the same URL resumes an interrupted staging.
    Stage {
        /// Payload URL (https://, http://, file://) or path.
        url: String,
        /// Accept a release older than the running one.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Finish whatever an interrupted run left (run at every start).
    Resume,
    /// Drop a staging, staged or armed release (its slot is marked unbootable).
    Cancel,
    /// At every boot: find out what happened across the reboot; on a trial boot run
    /// the health checks, then commit, or roll back and reboot into the old slot.
    BootCheck,
    /// Commit the running trial release without waiting for health checks.
    MarkGood,
    /// Point the bootloader back at the previous, known-good release (reboot to finish).
    Rollback,
    /// Show the agent's state, the bootloader's and the slots.
    Status,
    /// Write the man page update-agent.8 into DIR (packages generate it at build time,
    /// so it never drifts from the options).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    update_agent::logging::init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A daemon's page lives in section 8 (system administration).
fn write_man(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::Man::new(cmd)
        .section("8")
        .generate_to(dir)
        .with_context(|| format!("writing the man page into {}", dir.display()))?;
    Ok(())
}

fn print_outcome(o: &BootOutcome) {
    match o {
        BootOutcome::Normal => println!("normal boot: nothing pending"),
        BootOutcome::Committed { version, slot } => {
            println!("committed: {version} on slot {slot} is the default now")
        }
        BootOutcome::RollingBack {
            version,
            to,
            reason,
            checks,
        } => {
            println!("rolling back from {version} to slot {to}: {reason}");
            for c in checks {
                println!("  {} {}", if c.ok { "ok  " } else { "FAIL" }, c.summary());
            }
        }
        BootOutcome::RolledBack {
            version,
            slot,
            reason,
        } => {
            println!("rolled back: {version} was abandoned, slot {slot} runs; because {reason}")
        }
    }
}

fn reboot(cmd: &[String]) -> anyhow::Result<()> {
    println!("rebooting into the old slot: {}", cmd.join(" "));
    update_agent::health::reboot(cmd).with_context(|| format!("running {}", cmd.join(" ")))
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    // One thread serves every call; agent work runs on threads of its own, so a long
    // update or health check never delays a status call.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let daemon = std::sync::Arc::new(
            update_agent::daemon::Daemon::new(cfg).context("starting the daemon")?,
        );
        let policy = update_agent::api::access::Policy::new(&daemon.cfg.api)
            .context("starting the daemon")?;
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
            tracing::info!("stopping; an update in progress resumes at the next start");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        };
        update_agent::api::server::serve(daemon, policy, shutdown, |at| {
            tracing::info!(socket = at, "serving the update API");
            update_agent::api::server::notify_ready(at);
        })
        .await
        .context("serving the API")
    })?;
    // An update thread may still be writing: its progress is checkpointed, and ending
    // the process here is the same as the power cuts the resume path is built for.
    std::process::exit(0);
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Before the configuration is loaded: a package build has none.
    if let Command::Man { dir } = &cli.command {
        return write_man(dir);
    }
    let cfg =
        Config::load(&cli.config).with_context(|| format!("loading {}", cli.config.display()))?;
    if let Command::Serve = cli.command {
        return serve(cfg);
    }
    let mut agent = Agent::new(cfg).context("starting the agent")?;
    // SIGTERM/SIGINT cancel cleanly: the slot stays unbootable, the state says cancelled.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&cancel))
            .context("installing signal handlers")?;
    }
    let mut lines = ProgressLines::new();
    let mut report = |p: Progress| lines.print(p);
    match cli.command {
        // Returned above, before the one-shot commands set up their own agent.
        Command::Serve | Command::Man { .. } => {}
        Command::Stage {
            url,
            allow_downgrade,
        } => {
            agent.stage(&url, allow_downgrade, Some(&cancel), &mut report)?;
        }
        Command::Resume => agent.resume(Some(&cancel), &mut report)?,
        Command::BootCheck => boot_check(&mut agent)?,
        Command::MarkGood => print_outcome(&agent.mark_good()?),
        Command::Rollback => {
            print_outcome(&agent.rollback()?);
            println!("reboot to finish the rollback");
        }
        Command::Cancel => {
            let slot = agent.cancel()?;
            println!("cancelled: slot {slot} is marked unbootable");
        }
        Command::Status => {
            let state = agent.state()?;
            let boot = agent.boot().status()?;
            let doc = serde_json::json!({
                "booted": agent.layout.booted,
                "slots": { "a": agent.layout.a, "b": agent.layout.b },
                "state": state,
                "boot": boot,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// `boot-check`: what happened across the reboot, acted on; a failed trial reboots
/// into the old slot (if configured) and fails the unit.
fn boot_check(agent: &mut Agent) -> anyhow::Result<()> {
    let health = agent.cfg.health.clone();
    let outcome = agent.after_boot(&|| update_agent::health::run_all(&health))?;
    print_outcome(&outcome);
    if let BootOutcome::RollingBack { .. } = outcome {
        if health.reboot_on_failure {
            reboot(&health.reboot_command)?;
        } else {
            println!("reboot into the old slot to finish the rollback (reboot_on_failure is off)");
        }
        // Fail the unit: boot-complete.target must not be reached, or
        // systemd-bless-boot would bless the very entry being rolled back.
        anyhow::bail!("trial boot failed its health checks; rolling back");
    }
    mark_boot_checked();
    Ok(())
}

/// Leaves `boot-checked` in the unit's runtime directory (systemd sets
/// RUNTIME_DIRECTORY; a run by hand has none): this boot is judged, so
/// systemd-bless-boot (skipped by our drop-in when the file exists) has nothing left to
/// do. A failure only lets systemd-bless-boot run: logged, not fatal.
fn mark_boot_checked() {
    let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") else {
        return;
    };
    // Several directories are separated by ':'; ours is the only one.
    let path = std::path::Path::new(&dir).join("boot-checked");
    if let Err(e) = std::fs::write(&path, b"judged by update-agent boot-check\n") {
        tracing::warn!(path = %path.display(), error = %e, "cannot mark this boot as judged; systemd-bless-boot may act on it too");
    }
}

/// A staging's progress as lines on stdout, stamped with the seconds since the start.
struct ProgressLines {
    t0: std::time::Instant,
    /// The operations done at the last progress line, and when it was printed.
    last_line: (usize, std::time::Instant),
}

impl ProgressLines {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Self {
            t0: now,
            last_line: (usize::MAX, now),
        }
    }

    fn ts(&self) -> String {
        format!("[{:7.2}s]", self.t0.elapsed().as_secs_f64())
    }

    fn print(&mut self, p: Progress) {
        match p {
            Progress::Opened {
                version,
                delta,
                ops,
                bytes,
                resumed_at,
            } => {
                let kind = if delta { "delta" } else { "full payload" };
                if resumed_at > 0 {
                    println!(
                        "resuming {kind} {version} at operation {resumed_at} of {ops} ({bytes} bytes)"
                    );
                } else {
                    println!("staging {kind} {version}: {ops} operations, {bytes} bytes");
                }
            }
            Progress::Op {
                done,
                total,
                bytes_done,
                bytes_fetched,
                in_flight,
            } => {
                // A line every 4 operations, and every 5 s while a large frame downloads.
                let (last_done, last_at) = self.last_line;
                if done == total
                    || (done % 4 == 0 && done != last_done)
                    || last_at.elapsed().as_secs() >= 5
                {
                    self.last_line = (done, std::time::Instant::now());
                    println!("{} {done}/{total} operations, {bytes_done} bytes written, {bytes_fetched} fetched (+{in_flight} of the operations in flight)", self.ts());
                }
            }
            Progress::Verifying => println!("{} verifying the whole slot", self.ts()),
            Progress::Armed {
                slot,
                version,
                tries,
            } => {
                println!(
                    "{} armed: slot {slot} holds {version}; the bootloader will try it {tries} times",
                    self.ts()
                )
            }
        }
    }
}
