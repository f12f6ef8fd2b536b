//! An operation's life: registered, its payload checked, then staged (or resumed) on
//! a thread of its own with the changing `Agent`, its progress kept in the registry
//! and broadcast, and maybe a reboot at the end.

use std::sync::Arc;
use std::time::Duration;

use super::ops::Ops;
use super::ops::{Begin, OpEventKind, OpOutcome, OpProgress, OpResult, Operation, Phase};
use super::target::{precheck, Target};
use super::{intent, Daemon, DaemonError};
use crate::policy::RebootStrategy;
use crate::state::State;
use crate::update::{attempt_id, error_chain, Progress, UpdateError};

/// What [`Daemon::begin`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub operation_id: String,
    /// The same target was already running under this id.
    pub already_running: bool,
}

impl Daemon {
    /// Starts (or resumes) an operation on its own thread.
    fn spawn_operation(
        self: &Arc<Self>,
        id: String,
        (url, head): (String, Option<(u64, Vec<u8>)>),
        allow_downgrade: bool,
        reboot_now: bool,
        resume: bool,
    ) {
        let d = Arc::clone(self);
        self.ops.staging_started(&id);
        std::thread::Builder::new()
            .name(format!("update {id}"))
            .spawn(move || {
                run_operation(&d, &id, (&url, head), allow_downgrade, reboot_now, resume)
            })
            .map(drop)
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the update thread"));
    }

    /// Starts an update of `target` (StartUpdate, and the unattended loop): idempotent
    /// for the same target, BUSY for another while one runs.
    pub async fn begin(
        self: &Arc<Self>,
        target: Target,
        allow_downgrade: bool,
        strategy: RebootStrategy,
        caller: &str,
    ) -> Result<Started, DaemonError> {
        let key = format!("{} downgrade={}", target.key, allow_downgrade);
        let snapshot = Operation {
            phase: Phase::Opening,
            version: target.version.clone().unwrap_or_default(),
            source: target.urls.last().cloned().unwrap_or_default(),
            reboot: strategy,
            started: Some(crate::timefmt::now_system()),
            ..Default::default()
        };
        // An interrupted staging of the same payload keeps its id (and resumes).
        let id = match self.reader.state() {
            Ok(State::Staging(s)) if target.urls.contains(&s.url) => s.attempt,
            _ => attempt_id(),
        };
        let id = match self.ops.begin(&key, id, snapshot) {
            Begin::Started { id } => id,
            Begin::AlreadyRunning { id } => {
                return Ok(Started {
                    operation_id: id,
                    already_running: true,
                })
            }
            Begin::Busy { id, version } => {
                return Err(DaemonError::Busy {
                    operation: id,
                    version,
                })
            }
        };
        // The operation is registered: from here on it runs to its end on a task of
        // its own, whether or not the caller waits for the answer (a caller that went
        // away must not leave an operation that never ends and makes every later
        // StartUpdate BUSY).
        let d = Arc::clone(self);
        let caller = caller.to_owned();
        tokio::spawn(async move {
            d.open_operation(id, target, allow_downgrade, strategy, &caller)
                .await
        })
        .await
        .map_err(|_| DaemonError::Worker)?
    }

    /// The rest of [`begin`](Self::begin) for a registered operation: check the
    /// payload, then start the staging thread, or end the operation as failed.
    async fn open_operation(
        self: &Arc<Self>,
        id: String,
        target: Target,
        allow_downgrade: bool,
        strategy: RebootStrategy,
        caller: &str,
    ) -> Result<Started, DaemonError> {
        let t = target.clone();
        let allow = allow_downgrade;
        let checked = self.checked(move |agent| precheck(agent, &t, allow)).await;
        let cancelled = self
            .ops
            .cancel_flag(&id)
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst));
        let ended = |outcome, reason| OpResult {
            outcome,
            version: target.version.clone().unwrap_or_default(),
            from_version: String::new(),
            reason,
            at: crate::timefmt::now_system(),
            bytes_fetched: 0,
        };
        let checked = match checked {
            Ok(_) if cancelled => {
                self.ops.finish(
                    &id,
                    ended(
                        OpOutcome::Cancelled,
                        "cancelled before the payload was opened".into(),
                    ),
                );
                return Ok(Started {
                    operation_id: id,
                    already_running: false,
                });
            }
            Ok(c) => c,
            Err(e) => {
                // Watchers (and a Cancel waiting for the end) learn how it ended too.
                self.ops
                    .finish(&id, ended(OpOutcome::Failed, error_chain(&e)));
                return Err(e);
            }
        };
        crate::emit!(tracing::Level::INFO, crate::events::UPDATE_STARTED, update_agent_attempt = %id, update_agent_release = %checked.version, update_agent_caller = %caller, update_agent_url = %checked.url, "update to {} started by {caller}", checked.version);
        self.ops.update(
            &id,
            |s| {
                s.version = checked.version.clone();
                s.source = checked.url.clone();
                s.delta = checked.delta;
            },
            None,
        );
        // Kept on disk so a restarted daemon still reboots this release as asked.
        if let Err((path, e)) = intent::save(&self.cfg.state_dir, &id, strategy) {
            tracing::warn!(path = %path.display(), error = %e, "reboot intent not saved; after a restart the configured strategy applies");
        }
        let reboot_now = strategy == RebootStrategy::Immediate;
        // The checked head goes with it: staging does not fetch it again.
        self.spawn_operation(
            id.clone(),
            (checked.url, checked.head),
            allow,
            reboot_now,
            false,
        );
        Ok(Started {
            operation_id: id,
            already_running: false,
        })
    }

    /// At start: an interrupted staging, or a staged release not yet armed, carries on
    /// as an operation of its own.
    pub fn resume_interrupted(self: &Arc<Self>) {
        let (id, url, version) = match self.reader.state() {
            Ok(State::Staging(s)) => (s.attempt, s.url, s.version),
            Ok(State::Staged(s)) => (s.attempt, String::new(), s.version),
            _ => return,
        };
        // The reboot its starter asked for (unknown: leave it to a person).
        let strategy = intent::load(&self.cfg.state_dir, &id).unwrap_or(RebootStrategy::Never);
        let snapshot = Operation {
            phase: Phase::Opening,
            version,
            source: url.clone(),
            reboot: strategy,
            started: Some(crate::timefmt::now_system()),
            ..Default::default()
        };
        let key = format!("url {url}");
        if let Begin::Started { id } = self.ops.begin(&key, id, snapshot) {
            tracing::info!(attempt = %id, reboot = strategy.name(), "resuming the interrupted update");
            // Windows and FleetLock are the unattended loop's to honour once armed.
            let now = strategy == RebootStrategy::Immediate;
            self.spawn_operation(id, (url, None), true, now, true);
        }
    }
}

/// The body of an operation's thread: stage (or resume), report, maybe reboot.
fn run_operation(
    d: &Daemon,
    id: &str,
    (url, head): (&str, Option<(u64, Vec<u8>)>),
    allow_downgrade: bool,
    reboot: bool,
    resume: bool,
) {
    let ops = &d.ops;
    let Some(cancel) = ops.cancel_flag(id) else {
        return;
    };
    let mut reporter = Reporter {
        ops,
        id,
        last_progress: std::time::Instant::now(),
    };
    let mut on = |p: Progress| reporter.report(p);
    let (result, from_version) = {
        let mut agent = d.agent.lock().unwrap_or_else(|p| p.into_inner());
        let from = agent.running_version();
        let r = if resume {
            agent.resume(Some(&cancel), &mut on)
        } else {
            agent.stage_as(id, url, head, allow_downgrade, Some(&cancel), &mut on)
        };
        (r, from)
    };
    let snap = ops.find(id).map(|(s, _)| s).unwrap_or_default();
    let (res, reboot_now) = outcome(&snap, from_version, &result, reboot);
    if reboot_now {
        ops.update(
            id,
            |s| s.phase = Phase::Rebooting,
            Some(OpEventKind::Phase(Phase::Rebooting)),
        );
    }
    tracing::info!(attempt = %id, outcome = ?res.outcome, reason = %res.reason, "operation ended");
    if result.is_ok() {
        crate::emit!(tracing::Level::INFO, crate::events::UPDATE_STAGED, update_agent_attempt = %id, update_agent_release = %res.version, "{} is staged and armed for the next boot", res.version);
    }
    ops.finish(id, res);
    d.write_textfile();
    if reboot_now {
        crate::emit!(tracing::Level::WARN, crate::events::REBOOTING, update_agent_attempt = %id, update_agent_release = %snap.version, "rebooting into {}", snap.version);
        if let Err(e) = d.reboot_configured() {
            tracing::error!(error = %error_chain(&e), "reboot after staging failed; reboot the node to try the release");
        }
    }
}

/// How the staging ended, as the registry keeps it, and whether to reboot now (only
/// after a staging that armed the slot, when the operation asked for it).
fn outcome(
    snap: &Operation,
    from_version: Option<String>,
    result: &Result<(), UpdateError>,
    reboot: bool,
) -> (OpResult, bool) {
    let mut res = OpResult {
        outcome: OpOutcome::Armed,
        version: snap.version.clone(),
        from_version: from_version.unwrap_or_default(),
        reason: String::new(),
        at: crate::timefmt::now_system(),
        bytes_fetched: snap.bytes_fetched,
    };
    let reboot_now = match result {
        Ok(()) => reboot,
        Err(UpdateError::Apply(crate::apply::ApplyError::Cancelled { .. })) => {
            res.outcome = OpOutcome::Cancelled;
            res.reason = "cancelled".into();
            false
        }
        Err(e) => {
            res.outcome = OpOutcome::Failed;
            res.reason = error_chain(e);
            false
        }
    };
    if reboot_now {
        res.reason = "rebooting into the trial slot".into();
    }
    (res, reboot_now)
}

/// The staging's progress into the operation's snapshot and its watchers.
struct Reporter<'a> {
    ops: &'a Ops,
    id: &'a str,
    /// When watchers last got a progress event.
    last_progress: std::time::Instant,
}

impl Reporter<'_> {
    fn report(&mut self, p: Progress) {
        let (ops, id) = (self.ops, self.id);
        match p {
            Progress::Opened {
                version,
                delta,
                ops: n,
                bytes,
                ..
            } => ops.update(
                id,
                |s| {
                    s.phase = Phase::Writing;
                    s.version = version;
                    s.delta = delta;
                    s.ops_total = u32::try_from(n).unwrap_or(u32::MAX);
                    s.bytes_total = bytes;
                },
                Some(OpEventKind::Phase(Phase::Writing)),
            ),
            Progress::Op {
                done,
                total,
                bytes_done,
                bytes_fetched,
                in_flight,
            } => self.op_done(
                done,
                total,
                bytes_done,
                bytes_fetched + in_flight,
                in_flight,
            ),
            Progress::Verifying => ops.update(
                id,
                |s| s.phase = Phase::Verifying,
                Some(OpEventKind::Phase(Phase::Verifying)),
            ),
            Progress::Armed { .. } => ops.update(
                id,
                |s| s.phase = Phase::Armed,
                Some(OpEventKind::Phase(Phase::Armed)),
            ),
        }
    }

    /// An operation written: `bytes_fetched` counts the bytes in flight too.
    fn op_done(
        &mut self,
        done: usize,
        total: usize,
        bytes_done: u64,
        bytes_fetched: u64,
        in_flight: u64,
    ) {
        // Every operation updates the snapshot; watchers get at most ten a second.
        let emit = done == total || self.last_progress.elapsed() >= Duration::from_millis(100);
        if emit {
            self.last_progress = std::time::Instant::now();
        }
        let mut out = OpProgress {
            bytes_done,
            bytes_total: 0,
            bytes_fetched,
            ops_done: u32::try_from(done).unwrap_or(u32::MAX),
            ops_total: u32::try_from(total).unwrap_or(u32::MAX),
            in_flight_bytes: in_flight,
        };
        self.ops.update(
            self.id,
            |s| {
                s.bytes_done = bytes_done;
                s.bytes_fetched = bytes_fetched;
                s.ops_done = out.ops_done;
                s.ops_total = out.ops_total;
                out.bytes_total = s.bytes_total;
            },
            None,
        );
        if emit {
            self.ops
                .update(self.id, |_| {}, Some(OpEventKind::Progress(out)));
        }
    }
}
