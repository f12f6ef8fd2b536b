//! The daemon, free of any transport: one operation at a time (begin, cancel,
//! rollback, mark-good, reboot), events to subscribe to, status, the unattended
//! loop. `api/` serves it over gRPC; `bin/update-agent.rs` starts it.
//!
//! ```text
//! Daemon ─┬─ reads: status::Reader (state.json, history.json, the bootloader),
//! │          lock-free: never waits for a running update
//! ├─ changes: ops::Ops registers the operation (one at a time), target.rs resolves
//! │           and prechecks the payload, operation.rs stages it on a thread of its
//! │           own holding the changing Agent → snapshot + broadcast of OpEvents
//! └─ auto/: the unattended loop (a task), intent.rs: each attempt's reboot strategy
//! ```

pub mod auto;
pub mod error;
pub mod intent;
pub mod operation;
pub mod ops;
pub mod status;
pub mod target;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

pub use error::{DaemonError, StartError};
pub use operation::Started;
pub use ops::{OpEvent, OpEventKind, OpOutcome, OpProgress, OpResult, Operation, Phase};
pub use target::{CheckOutcome, Source, Target};

use crate::config::Config;
use crate::history::Entry;
use crate::kexec::{KexecOs, LinuxKexec};
use crate::policy::RebootStrategy;
use crate::postboot::BootOutcome;
use crate::reboot_method::RebootMethod;
use crate::slots::{Slot, SlotLayout};
use crate::state::State;
use crate::update::{error_chain, Agent, UpdateError};
use ops::Ops;
use status::Reader;

/// Everything the daemon works with.
pub struct Daemon {
    pub cfg: Config,
    reader: Reader,
    /// The handle that changes things; held by one operation at a time.
    agent: Arc<Mutex<Agent>>,
    /// The system calls and commands of a reboot (kexec or firmware).
    kexec_os: Arc<dyn KexecOs>,
    /// A second handle for payload checks, shared without a lock: checks only read,
    /// so a slow or hung one never holds up another call (a reader must not be able
    /// to stall the daemon).
    checker: Arc<Agent>,
    /// Checks running at once (each holds a blocking thread until its fetch ends).
    checks: Arc<tokio::sync::Semaphore>,
    ops: Arc<Ops>,
    /// Unattended patching, when `[auto]` asks for any of it.
    auto: Option<Arc<auto::Auto>>,
    textfile: Mutex<()>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// What a manual rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    /// The slot the node goes back to at its next boot, when a reboot is needed.
    pub slot: Option<Slot>,
    /// The release rolled back to, when a committed update was undone.
    pub version: Option<String>,
}

impl Daemon {
    pub fn new(cfg: Config) -> Result<Self, StartError> {
        let agent = Agent::new(cfg.clone()).map_err(StartError::Agent)?;
        let checker = Agent::new(cfg.clone())
            .map_err(StartError::Agent)?
            .sharing_trust_with(&agent);
        let reader = Reader::new(cfg.clone(), agent.layout.clone()).map_err(StartError::Agent)?;
        Ok(Self {
            reader,
            agent: Arc::new(Mutex::new(agent)),
            checker: Arc::new(checker),
            checks: Arc::new(tokio::sync::Semaphore::new(cfg.api.limits.max_checks)),
            ops: Arc::new(Ops::new()),
            auto: auto::Auto::new(&cfg)?.map(Arc::new),
            textfile: Mutex::new(()),
            kexec_os: Arc::new(LinuxKexec {
                systemctl: cfg.health.systemctl.clone(),
                manager_socket: crate::kexec::PRIVATE_SOCKET.into(),
                reboot_command: cfg.health.reboot_command.clone(),
            }),
            cfg,
        })
    }

    /// Runs what a starting daemon owes: resumes an interrupted operation, writes the
    /// metrics textfile, and starts the unattended loop (a task on this runtime).
    pub fn start(self: &Arc<Self>) {
        self.resume_interrupted();
        self.write_textfile();
        if let Some(auto) = &self.auto {
            tokio::spawn(auto::run(Arc::clone(self), Arc::clone(auto)));
        }
    }

    pub fn layout(&self) -> &SlotLayout {
        self.reader.layout()
    }

    /// sha256 of the image the booted slot holds, when the agent wrote it.
    pub fn booted_image(&self) -> Option<String> {
        self.checker.booted_image_sha256()
    }

    /// Reads and checks a channel document (blocking).
    pub fn open_channel(
        &self,
        base: &str,
        name: &str,
    ) -> Result<crate::channel::Channel, UpdateError> {
        self.checker.open_channel(base, name)
    }

    /// The strategy an "in the node's window" update gets: its windows, and its
    /// FleetLock slot when it has one; `None` when the node has no windows.
    pub fn in_window_strategy(&self) -> Option<RebootStrategy> {
        let a = self
            .auto
            .as_ref()
            .filter(|a| !a.settings.windows.is_empty())?;
        Some(if a.has_lock() {
            RebootStrategy::FleetLock
        } else {
            RebootStrategy::Window
        })
    }

    /// Tells the unattended loop the state changed under it (cancel, rollback, ...).
    fn poke(&self) {
        if let Some(a) = &self.auto {
            a.wake.notify_one();
        }
    }

    /// Operation events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<OpEvent> {
        self.ops.subscribe()
    }

    /// The snapshot (and result, once finished) of the current or last operation;
    /// `id` empty means the current one.
    pub fn find(&self, id: &str) -> Option<(Operation, Option<OpResult>)> {
        self.ops.find(id)
    }

    /// The node's status now.
    pub fn status(&self) -> Result<status::Status, DaemonError> {
        let auto = self.auto.as_ref().map(|a| a.status(auto::now()));
        let mut s = self.reader.status(self.ops.current_or_armed(), auto)?;
        s.root = self.checker.root_facts();
        Ok(s)
    }

    /// Every attempt's outcome, oldest first.
    pub fn history(&self) -> Result<Vec<Entry>, DaemonError> {
        Ok(self.reader.history()?)
    }

    /// The Prometheus text of this node now.
    pub fn metrics(&self) -> Result<String, DaemonError> {
        let state = self.reader.state()?;
        let history = self.reader.history()?;
        let running = crate::update::running_version(&self.cfg.os_release);
        let now = auto::now();
        let facts = self.auto.as_ref().map(|a| a.facts(now));
        Ok(crate::metrics::render(&crate::metrics::Inputs {
            running: running.as_deref(),
            slot: self.reader.layout().booted.letter(),
            bootloader: &self.cfg.boot.backend,
            compatible: &self.cfg.compatible,
            state: state.name(),
            history: &history,
            // Bytes of an update not yet in history (running, or staged and waiting).
            op_bytes_fetched: match (&state, self.ops.current()) {
                (_, Some(o)) => o.bytes_fetched,
                (State::Staging(s), None) => s.bytes_fetched,
                (State::Staged(s) | State::Armed { staged: s, .. }, None) => s.bytes_fetched,
                _ => 0,
            },
            auto: facts.as_ref(),
            root: self.checker.root_facts(),
            now: u64::try_from(now.as_second()).unwrap_or(0),
        }))
    }

    /// Rewrites the node-exporter textfile, when one is configured.
    pub fn write_textfile(&self) {
        let Some(path) = &self.cfg.metrics.textfile else {
            return;
        };
        // The operation thread and the unattended loop both write it; one at a time
        // (they share the temporary file's name).
        let _one = self.textfile.lock().unwrap_or_else(|p| p.into_inner());
        let r = self
            .metrics()
            .map_err(|e| error_chain(&e))
            .and_then(|text| {
                crate::durable::replace(path, text.as_bytes())
                    .map_err(|(p, e)| format!("writing {}: {e}", p.display()))
            });
        if let Err(why) = r {
            tracing::warn!(error = %why, "metrics textfile not written");
        }
    }

    /// Cancels the running operation (answering once it has really stopped) or the
    /// staged release; returns the slot made unbootable, if one was touched.
    pub async fn cancel(&self, caller: &str) -> Result<Option<Slot>, DaemonError> {
        let slot = self.reader.layout().inactive();
        let mut rx = self.ops.subscribe();
        if let Some(id) = self.ops.request_cancel() {
            tracing::info!(attempt = %id, caller = %caller, "cancel requested");
            // Answer once the operation has really stopped (its slot is unbootable then).
            let wait = async {
                loop {
                    match rx.recv().await {
                        Ok(ev)
                            if ev.operation_id == id
                                && matches!(ev.kind, OpEventKind::Result(_)) =>
                        {
                            return
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            if self.ops.find(&id).is_some_and(|(_, r)| r.is_some()) {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(120), wait).await;
            self.poke();
            // Stopped before its staging began: no slot was touched.
            return Ok(self.ops.reached_staging(&id).then_some(slot));
        }
        let agent = Arc::clone(&self.agent);
        let slot = blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| DaemonError::AgentBusy { what: "an update" })?;
            Ok(a.cancel()?)
        })
        .await?;
        self.poke();
        Ok(Some(slot))
    }

    /// Reboots the node, into the armed release or back from a rollback (or anyway,
    /// with `force`).
    /// `method`: kexec or firmware (`None`: `[boot] reboot`); a kexec refused falls
    /// back to the firmware, and the answer says so.
    pub async fn reboot(
        &self,
        force: bool,
        method: Option<RebootMethod>,
        caller: &str,
    ) -> Result<Rebooted, DaemonError> {
        let state = self.reader.state()?;
        if !force && !matches!(state, State::Armed { .. } | State::RollingBack { .. }) {
            return Err(DaemonError::NothingToReboot {
                state: state.name(),
            });
        }
        let method = method.unwrap_or(self.cfg.boot.reboot);
        tracing::warn!(caller = %caller, state = state.name(), method = method.name(), "reboot requested over the API");
        let (agent, os) = (Arc::clone(&self.agent), Arc::clone(&self.kexec_os));
        blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| DaemonError::AgentBusy { what: "an update" })?;
            reboot_agent(&mut a, method, os.as_ref())
        })
        .await
    }

    /// The reboot after a staging or an unattended decision: `[boot] reboot`, waiting
    /// for the agent if a call holds it. Blocks: call it off the runtime.
    pub(crate) fn reboot_configured(&self) -> Result<Rebooted, DaemonError> {
        let mut a = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        reboot_agent(&mut a, self.cfg.boot.reboot, self.kexec_os.as_ref())
    }

    /// Rolls back by hand.
    pub async fn rollback(&self, caller: &str) -> Result<RolledBack, DaemonError> {
        let agent = Arc::clone(&self.agent);
        let (outcome, before) = blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| DaemonError::AgentBusy { what: "an update" })?;
            let before = a.state()?;
            Ok((a.rollback()?, before))
        })
        .await?;
        tracing::warn!(caller = %caller, ?outcome, "manual rollback");
        let version = match before {
            State::Committed {
                previous: Some((_, v)),
                ..
            } => Some(v),
            _ => None,
        };
        let slot = match outcome {
            BootOutcome::RollingBack { to, .. } => Some(to),
            _ => None,
        };
        self.poke();
        Ok(RolledBack { slot, version })
    }

    /// Commits the trial release by hand; returns the slot and release committed.
    pub async fn mark_good(&self, caller: &str) -> Result<Option<(Slot, String)>, DaemonError> {
        let agent = Arc::clone(&self.agent);
        let outcome = blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| DaemonError::AgentBusy { what: "an update" })?;
            Ok(a.mark_good()?)
        })
        .await?;
        tracing::info!(caller = %caller, ?outcome, "marked good over the API");
        self.poke();
        Ok(match outcome {
            BootOutcome::Committed { version, slot } => Some((slot, version)),
            _ => None,
        })
    }
}

/// Runs blocking agent work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| DaemonError::Worker)?
}

/// What a reboot request became: the method used and, when kexec was refused, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebooted {
    pub method: RebootMethod,
    pub fallback: Option<String>,
}

fn reboot_agent(
    a: &mut Agent,
    method: RebootMethod,
    os: &dyn KexecOs,
) -> Result<Rebooted, DaemonError> {
    let r = a.reboot_node(method, os).map_err(DaemonError::Reboot)?;
    Ok(Rebooted {
        method: r.method,
        fallback: r.fallback.as_ref().map(|e| error_chain(e)),
    })
}
