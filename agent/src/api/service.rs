//! The `updateagent.v1.UpdateAgent` service: checks access, then reads status or
//! hands changes to the operation runner.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::access::{Need, Policy};
use super::ops::{Begin, Ops};
use super::pb::update_event::Kind;
use super::status::{self, Reader};
use super::{pb, ApiError};
use crate::config::Config;
use crate::policy::RebootStrategy;
use crate::state::State;
use crate::update::{attempt_id, error_chain, Agent, Progress, UpdateError};

/// Everything the service works with.
pub struct Daemon {
    pub cfg: Config,
    pub reader: Reader,
    /// The handle that changes things; held by one operation at a time.
    agent: Arc<Mutex<Agent>>,
    /// A second handle for payload checks, shared without a lock: checks only read,
    /// so a slow or hung one never holds up another call (a reader must not be able
    /// to stall the daemon).
    checker: Arc<Agent>,
    /// Checks running at once (each holds a blocking thread until its fetch ends).
    checks: Arc<tokio::sync::Semaphore>,
    /// WatchUpdate streams open, in all and per peer.
    pub(super) watchers: Arc<super::limits::Watchers>,
    pub ops: Arc<Ops>,
    policy: Policy,
    /// Unattended patching, when `[auto]` asks for any of it.
    pub auto: Option<Arc<super::auto::Auto>>,
    textfile: Mutex<()>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// The resolved target of StartUpdate or CheckForUpdate.
#[derive(Debug, Clone)]
pub struct Target {
    /// Identifies "the same target" for idempotency.
    key: String,
    /// Payload locations to try in order (a delta for this node first, when known).
    urls: Vec<String>,
    /// Set when a version was asked for: not finding it is NOT_FOUND.
    version: Option<String>,
    /// A channel to read first (it names the version and the payloads): the channel's
    /// name and the release directory's URL.
    channel: Option<(String, String)>,
}

impl Target {
    /// A release a channel named, with its payload URLs already chosen.
    pub fn for_release(channel: &str, urls: Vec<String>, version: &str) -> Self {
        Self {
            key: format!("channel {channel}"),
            urls,
            version: Some(version.to_owned()),
            channel: None,
        }
    }
}

impl Daemon {
    pub fn new(cfg: Config) -> Result<Self, super::server::ServeError> {
        use super::server::ServeError;
        let agent = Agent::new(cfg.clone()).map_err(ServeError::Agent)?;
        let checker = Agent::new(cfg.clone()).map_err(ServeError::Agent)?;
        let reader = Reader::new(cfg.clone(), agent.layout.clone()).map_err(ServeError::Agent)?;
        let policy = Policy::new(&cfg.api).map_err(ServeError::Access)?;
        Ok(Self {
            reader,
            agent: Arc::new(Mutex::new(agent)),
            checker: Arc::new(checker),
            checks: Arc::new(tokio::sync::Semaphore::new(cfg.api.limits.max_checks)),
            watchers: Arc::new(super::limits::Watchers::new(
                cfg.api.limits.max_watchers,
                cfg.api.limits.max_watchers_per_peer,
            )),
            ops: Arc::new(Ops::new()),
            policy,
            auto: super::auto::Auto::new(&cfg)?.map(Arc::new),
            textfile: Mutex::new(()),
            cfg,
        })
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

    /// Who may do what.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Tells the unattended loop the state changed under it (cancel, rollback, ...).
    pub fn poke(&self) {
        if let Some(a) = &self.auto {
            a.wake.notify_one();
        }
    }

    /// Status, as GetStatus answers it.
    pub fn status(&self) -> Result<pb::Status, ApiError> {
        let auto = self.auto.as_ref().map(|a| a.status(super::auto::now()));
        Ok(self.reader.status(self.ops.current_or_armed(), auto)?)
    }

    /// The Prometheus text of this node now.
    pub fn metrics(&self) -> Result<String, ApiError> {
        let state = self.reader.state()?;
        let history = self.reader.history()?;
        let running = crate::update::running_version(&self.cfg.os_release);
        let now = super::auto::now();
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

    fn resolve(&self, field: &'static str, source: Source) -> Result<Target, ApiError> {
        match source {
            // The node's own channel (agent.toml auto.channel), where it has a release
            // server to read it from.
            Source::None if self.cfg.releases.url.is_some() => {
                self.resolve(field, Source::Channel(self.cfg.auto.channel.clone()))
            }
            Source::None => Err(ApiError::InvalidArgument {
                field: "source",
                why: "name a channel, a version, a url or a path (this node has no [releases] url, so no channel of its own)".into(),
            }),
            Source::Channel(name) => {
                if !crate::channel::valid_name(&name) {
                    return Err(ApiError::InvalidArgument {
                        field: "channel",
                        why: format!("{name:?} is not a channel name (letters, digits, . _ -)"),
                    });
                }
                let Some(base) = self.cfg.releases.url.clone() else {
                    return Err(ApiError::InvalidArgument {
                        field: "channel",
                        why: "this node has no release server (agent.toml [releases] url); give a url instead".into(),
                    });
                };
                Ok(Target {
                    key: format!("channel {name}"),
                    urls: Vec::new(),
                    version: None,
                    channel: Some((name, base)),
                })
            }
            Source::Url(u) if u.trim().is_empty() => Err(ApiError::InvalidArgument {
                field: "url",
                why: "is empty".into(),
            }),
            Source::Url(u) => {
                if !(u.starts_with("http://")
                    || u.starts_with("https://")
                    || u.starts_with("file://"))
                {
                    return Err(ApiError::InvalidArgument {
                        field: "url",
                        why: format!("{u:?} is not an http://, https:// or file:// URL"),
                    });
                }
                Ok(Target {
                    key: format!("url {u}"),
                    urls: vec![u],
                    version: None,
                    channel: None,
                })
            }
            Source::Path(p) => {
                if !p.starts_with('/') {
                    return Err(ApiError::InvalidArgument {
                        field: "path",
                        why: format!("{p:?} is not an absolute path on the node"),
                    });
                }
                Ok(Target {
                    key: format!("path {p}"),
                    urls: vec![p],
                    version: None,
                    channel: None,
                })
            }
            Source::Version(v) => {
                if v.is_empty() || v.contains('/') || v.chars().any(char::is_whitespace) {
                    return Err(ApiError::InvalidArgument {
                        field,
                        why: format!("{v:?} is not a release version"),
                    });
                }
                let Some(base) = self.cfg.releases.url.as_deref() else {
                    return Err(ApiError::InvalidArgument {
                        field,
                        why: "this node has no release server (agent.toml [releases] url); give a url instead".into(),
                    });
                };
                let base = base.trim_end_matches('/');
                let mut urls = Vec::new();
                // The delta built from the image this node runs, when the agent knows
                // which image that is (it records every image it writes and verifies).
                if let Some(h) = self.booted_image() {
                    if let Some(short) = h.get(..16) {
                        urls.push(format!("{base}/{v}.from-{short}.uap"));
                    }
                }
                urls.push(format!("{base}/{v}.full.uap"));
                Ok(Target {
                    key: format!("version {v}"),
                    urls,
                    version: Some(v),
                    channel: None,
                })
            }
        }
    }

    /// Runs a payload or channel check on a blocking thread, at most
    /// `api.limits.max_checks` at once and for at most `check_timeout_secs`: past the
    /// deadline the caller is answered and the thread ends with its fetch's timeouts.
    async fn checked<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Agent) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let limit = self.cfg.api.limits.max_checks;
        let permit =
            Arc::clone(&self.checks)
                .try_acquire_owned()
                .map_err(|_| ApiError::TooMany {
                    what: "payload checks",
                    limit,
                    key: "api.limits.max_checks",
                })?;
        let checker = Arc::clone(&self.checker);
        let secs = self.cfg.api.limits.check_timeout_secs;
        let work = blocking(move || {
            let _permit = permit;
            f(&checker)
        });
        tokio::time::timeout(Duration::from_secs(secs), work)
            .await
            .map_err(|_| ApiError::CheckTimeout { secs })?
    }

    /// Opens and checks the first payload of `target` that exists (blocking).
    fn precheck(
        agent: &Agent,
        target: &Target,
        allow_downgrade: bool,
    ) -> Result<crate::update::Checked, ApiError> {
        let mut target = target.clone();
        if let Some((name, base)) = &target.channel {
            let c = agent.open_channel(base, name)?;
            target.urls = c.urls(base, agent.booted_image_sha256().as_deref());
            target.version = Some(c.version);
        }
        let mut last = None;
        for url in &target.urls {
            match agent.check(url, allow_downgrade) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    let not_found = ApiError::from(e);
                    if not_found.code().0 != tonic::Code::NotFound {
                        return Err(not_found);
                    }
                    last = Some(not_found);
                }
            }
        }
        match (last, &target.version) {
            (Some(ApiError::Update(e)), Some(v)) => Err(ApiError::VersionNotFound {
                version: v.clone(),
                url: target.urls.last().cloned().unwrap_or_default(),
                source: Box::new(e),
            }),
            (Some(e), _) => Err(e),
            (None, _) => Err(ApiError::Worker),
        }
    }
}

enum Source {
    None,
    Channel(String),
    Version(String),
    Url(String),
    Path(String),
}

fn start_source(s: Option<pb::start_update_request::Source>) -> Source {
    use pb::start_update_request::Source as S;
    match s {
        None => Source::None,
        Some(S::Channel(c)) => Source::Channel(c),
        Some(S::Version(v)) => Source::Version(v),
        Some(S::Url(u)) => Source::Url(u),
        Some(S::Path(p)) => Source::Path(p),
    }
}

fn check_source(s: Option<pb::check_for_update_request::Source>) -> Source {
    use pb::check_for_update_request::Source as S;
    match s {
        None => Source::None,
        Some(S::Channel(c)) => Source::Channel(c),
        Some(S::Version(v)) => Source::Version(v),
        Some(S::Url(u)) => Source::Url(u),
    }
}

/// Runs blocking agent work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::Worker)?
}

/// The tonic service (cheap to clone: one shared daemon).
#[derive(Debug, Clone)]
pub struct Service(pub Arc<Daemon>);

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::UpdateEvent, Status>> + Send>>;

impl Service {
    /// Starts (or resumes) an operation on its own thread.
    fn spawn_operation(
        &self,
        id: String,
        url: String,
        allow_downgrade: bool,
        reboot: pb::RebootPolicy,
        resume: bool,
    ) {
        let d = Arc::clone(&self.0);
        self.0.ops.staging_started(&id);
        std::thread::Builder::new()
            .name(format!("update {id}"))
            .spawn(move || run_operation(&d, &id, &url, allow_downgrade, reboot, resume))
            .map(drop)
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the update thread"));
    }

    /// Starts an update of `target` (StartUpdate, and the unattended loop): idempotent
    /// for the same target, BUSY for another while one runs.
    pub async fn begin(
        &self,
        target: Target,
        allow_downgrade: bool,
        strategy: RebootStrategy,
        caller: &str,
    ) -> Result<pb::StartUpdateResponse, ApiError> {
        let reboot = super::intent::policy(strategy);
        let key = format!("{} downgrade={}", target.key, allow_downgrade);
        let snapshot = pb::Operation {
            phase: pb::Phase::Opening as i32,
            version: target.version.clone().unwrap_or_default(),
            source: target.urls.last().cloned().unwrap_or_default(),
            reboot: reboot as i32,
            started: Some(status::now()),
            ..Default::default()
        };
        // An interrupted staging of the same payload keeps its id (and resumes).
        let id = match self.0.reader.state() {
            Ok(State::Staging(s)) if target.urls.contains(&s.url) => s.attempt,
            _ => attempt_id(),
        };
        let id = match self.0.ops.begin(&key, id, snapshot) {
            Begin::Started { id } => id,
            Begin::AlreadyRunning { id } => {
                return Ok(pb::StartUpdateResponse {
                    operation_id: id,
                    already_running: true,
                })
            }
            Begin::Busy { id, version } => {
                return Err(ApiError::Busy {
                    operation: id,
                    version,
                })
            }
        };
        // The operation is registered: from here on it runs to its end on a task of
        // its own, whether or not the caller waits for the answer (a caller that went
        // away must not leave an operation that never ends and makes every later
        // StartUpdate BUSY).
        let svc = self.clone();
        let caller = caller.to_owned();
        tokio::spawn(async move {
            svc.open_operation(id, target, allow_downgrade, strategy, &caller)
                .await
        })
        .await
        .map_err(|_| ApiError::Worker)?
    }

    /// The rest of [`begin`](Self::begin) for a registered operation: check the
    /// payload, then start the staging thread, or end the operation as failed.
    async fn open_operation(
        &self,
        id: String,
        target: Target,
        allow_downgrade: bool,
        strategy: RebootStrategy,
        caller: &str,
    ) -> Result<pb::StartUpdateResponse, ApiError> {
        let reboot = super::intent::policy(strategy);
        let t = target.clone();
        let allow = allow_downgrade;
        let checked = self
            .0
            .checked(move |agent| Daemon::precheck(agent, &t, allow))
            .await;
        let cancelled = self
            .0
            .ops
            .cancel_flag(&id)
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst));
        let checked = match checked {
            Ok(_) if cancelled => {
                self.0.ops.finish(
                    &id,
                    pb::Result {
                        outcome: pb::Outcome::Cancelled as i32,
                        version: target.version.clone().unwrap_or_default(),
                        reason: "cancelled before the payload was opened".into(),
                        at: Some(status::now()),
                        ..Default::default()
                    },
                );
                return Ok(pb::StartUpdateResponse {
                    operation_id: id,
                    already_running: false,
                });
            }
            Ok(c) => c,
            Err(e) => {
                // Watchers (and a Cancel waiting for the end) learn how it ended too.
                self.0.ops.finish(
                    &id,
                    pb::Result {
                        outcome: pb::Outcome::Failed as i32,
                        version: target.version.clone().unwrap_or_default(),
                        reason: error_chain(&e),
                        at: Some(status::now()),
                        ..Default::default()
                    },
                );
                return Err(e);
            }
        };
        crate::emit!(tracing::Level::INFO, crate::events::UPDATE_STARTED, update_agent_attempt = %id, update_agent_release = %checked.version, update_agent_caller = %caller, update_agent_url = %checked.url, "update to {} started by {caller}", checked.version);
        self.0.ops.update(
            &id,
            |s| {
                s.version = checked.version.clone();
                s.source = checked.url.clone();
                s.delta = checked.delta;
            },
            None,
        );
        // Kept on disk so a restarted daemon still reboots this release as asked.
        if let Err((path, e)) = super::intent::save(&self.0.cfg.state_dir, &id, strategy) {
            tracing::warn!(path = %path.display(), error = %e, "reboot intent not saved; after a restart the configured strategy applies");
        }
        self.spawn_operation(id.clone(), checked.url, allow, reboot, false);
        Ok(pb::StartUpdateResponse {
            operation_id: id,
            already_running: false,
        })
    }

    /// At start: an interrupted staging, or a staged release not yet armed, carries on
    /// as an operation of its own.
    pub fn resume_interrupted(&self) {
        let (id, url, version) = match self.0.reader.state() {
            Ok(State::Staging(s)) => (s.attempt, s.url, s.version),
            Ok(State::Staged(s)) => (s.attempt, String::new(), s.version),
            _ => return,
        };
        // The reboot its starter asked for (unknown: leave it to a person).
        let strategy =
            super::intent::load(&self.0.cfg.state_dir, &id).unwrap_or(RebootStrategy::Never);
        let snapshot = pb::Operation {
            phase: pb::Phase::Opening as i32,
            version,
            source: url.clone(),
            reboot: super::intent::policy(strategy) as i32,
            started: Some(status::now()),
            ..Default::default()
        };
        let key = format!("url {url}");
        if let Begin::Started { id } = self.0.ops.begin(&key, id, snapshot) {
            tracing::info!(attempt = %id, reboot = strategy.name(), "resuming the interrupted update");
            // Windows and FleetLock are the unattended loop's to honour once armed.
            let now = if strategy == RebootStrategy::Immediate {
                pb::RebootPolicy::Immediate
            } else {
                pb::RebootPolicy::Never
            };
            self.spawn_operation(id, url, true, now, true);
        }
    }
}

/// The body of an operation's thread: stage (or resume), report, maybe reboot.
fn run_operation(
    d: &Daemon,
    id: &str,
    url: &str,
    allow_downgrade: bool,
    reboot: pb::RebootPolicy,
    resume: bool,
) {
    let ops = &d.ops;
    let Some(cancel) = ops.cancel_flag(id) else {
        return;
    };
    let mut last_progress = std::time::Instant::now();
    let mut on = |p: Progress| match p {
        Progress::Opened {
            version,
            delta,
            ops: n,
            bytes,
            ..
        } => ops.update(
            id,
            |s| {
                s.phase = pb::Phase::Writing as i32;
                s.version = version;
                s.delta = delta;
                s.ops_total = u32::try_from(n).unwrap_or(u32::MAX);
                s.bytes_total = bytes;
            },
            Some(Kind::Phase(pb::Phase::Writing as i32)),
        ),
        Progress::Op {
            done,
            total,
            bytes_done,
            bytes_fetched,
            in_flight,
        } => {
            // Every operation updates the snapshot; watchers get at most ten a second.
            let emit = done == total || last_progress.elapsed() >= Duration::from_millis(100);
            if emit {
                last_progress = std::time::Instant::now();
            }
            let bytes_fetched = bytes_fetched + in_flight;
            let progress = pb::Progress {
                bytes_done,
                bytes_total: 0,
                bytes_fetched,
                ops_done: u32::try_from(done).unwrap_or(u32::MAX),
                ops_total: u32::try_from(total).unwrap_or(u32::MAX),
                in_flight_bytes: in_flight,
            };
            let mut out = progress;
            ops.update(
                id,
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
                ops.update(id, |_| {}, Some(Kind::Progress(out)));
            }
        }
        Progress::Verifying => ops.update(
            id,
            |s| s.phase = pb::Phase::Verifying as i32,
            Some(Kind::Phase(pb::Phase::Verifying as i32)),
        ),
        Progress::Armed { .. } => ops.update(
            id,
            |s| s.phase = pb::Phase::Armed as i32,
            Some(Kind::Phase(pb::Phase::Armed as i32)),
        ),
    };
    let (result, from_version) = {
        let mut agent = d.agent.lock().unwrap_or_else(|p| p.into_inner());
        let from = agent.running_version();
        let r = if resume {
            agent.resume(Some(&cancel), &mut on)
        } else {
            agent.stage_as(id, url, allow_downgrade, Some(&cancel), &mut on)
        };
        (r, from)
    };
    let snap = ops.find(id).map(|(s, _)| s).unwrap_or_default();
    let mut res = pb::Result {
        outcome: pb::Outcome::Armed as i32,
        version: snap.version.clone(),
        from_version: from_version.unwrap_or_default(),
        reason: String::new(),
        at: Some(status::now()),
        bytes_fetched: snap.bytes_fetched,
    };
    let reboot_now = match &result {
        Ok(()) => reboot == pb::RebootPolicy::Immediate,
        Err(UpdateError::Apply(crate::apply::ApplyError::Cancelled { .. })) => {
            res.outcome = pb::Outcome::Cancelled as i32;
            res.reason = "cancelled".into();
            false
        }
        Err(e) => {
            res.outcome = pb::Outcome::Failed as i32;
            res.reason = error_chain(e);
            false
        }
    };
    if reboot_now {
        ops.update(
            id,
            |s| s.phase = pb::Phase::Rebooting as i32,
            Some(Kind::Phase(pb::Phase::Rebooting as i32)),
        );
        res.reason = "rebooting into the trial slot".into();
    }
    tracing::info!(attempt = %id, outcome = res.outcome, reason = %res.reason, "operation ended");
    if result.is_ok() {
        crate::emit!(tracing::Level::INFO, crate::events::UPDATE_STAGED, update_agent_attempt = %id, update_agent_release = %res.version, "{} is staged and armed for the next boot", res.version);
    }
    ops.finish(id, res);
    d.write_textfile();
    if reboot_now {
        crate::emit!(tracing::Level::WARN, crate::events::REBOOTING, update_agent_attempt = %id, update_agent_release = %snap.version, "rebooting into {}", snap.version);
        if let Err(e) = run_reboot(&d.cfg.health.reboot_command) {
            tracing::error!(error = %error_chain(&e), "reboot after staging failed; reboot the node to try the release");
        }
    }
}

fn run_reboot(cmd: &[String]) -> Result<(), ApiError> {
    crate::health::reboot(cmd).map_err(|source| ApiError::Reboot {
        command: cmd.to_vec(),
        source,
    })
}

#[tonic::async_trait]
impl pb::update_agent_server::UpdateAgent for Service {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        self.0.policy.check(&req, Need::Read)?;
        // Read on the runtime's thread: no lock, no network, no path a caller chose,
        // only the agent's own small files and the bootloader's block. A hop to the
        // blocking pool cost 1.2-2.3x the CPU per call and the p99 target
        // (docs/benchmarks.md, "The API under attack").
        Ok(Response::new(self.0.status()?))
    }

    async fn check_for_update(
        &self,
        req: Request<pb::CheckForUpdateRequest>,
    ) -> Result<Response<pb::CheckForUpdateResponse>, Status> {
        // Readers may ask about versions and channels of the release server; a URL
        // or a path makes the root daemon fetch or open what the caller names, which
        // is an admin's right.
        let need = match &req.get_ref().source {
            Some(pb::check_for_update_request::Source::Url(_)) => Need::Change,
            _ => Need::Read,
        };
        self.0.policy.check(&req, need).map_err(|e| match e {
            ApiError::PermissionDenied(why) if need == Need::Change => ApiError::PermissionDenied(
                format!("{why}; readers may check a version or a channel, not a url"),
            ),
            e => e,
        })?;
        let target = self
            .0
            .resolve("version", check_source(req.into_inner().source))?;
        let running = crate::update::running_version(&self.0.cfg.os_release).unwrap_or_default();
        let (checked, policy) = self
            .0
            .checked(move |agent| {
                let checked = Daemon::precheck(agent, &target, true)?;
                // The same checks StartUpdate will make, without the downgrade allowance.
                let policy = agent
                    .check(&checked.url, false)
                    .err()
                    .map(|e| error_chain(&e));
                Ok((checked, policy))
            })
            .await?;
        let newer =
            running.is_empty() || crate::version::compare(&checked.version, &running).is_gt();
        let reason = match (&policy, newer) {
            (Some(why), _) => why.clone(),
            (None, false) => format!(
                "{} is not newer than the running {running}",
                checked.version
            ),
            (None, true) => String::new(),
        };
        Ok(Response::new(pb::CheckForUpdateResponse {
            available: reason.is_empty(),
            version: checked.version,
            running_version: running,
            url: checked.url,
            delta: checked.delta,
            download_bytes: checked.download_bytes,
            reason,
        }))
    }

    async fn start_update(
        &self,
        req: Request<pb::StartUpdateRequest>,
    ) -> Result<Response<pb::StartUpdateResponse>, Status> {
        let caller = self.0.policy.check(&req, Need::Change)?;
        let r = req.into_inner();
        let reboot = match pb::RebootPolicy::try_from(r.reboot) {
            Ok(pb::RebootPolicy::Unspecified | pb::RebootPolicy::Never) => RebootStrategy::Never,
            Ok(pb::RebootPolicy::Immediate) => RebootStrategy::Immediate,
            Ok(pb::RebootPolicy::InWindow)
                if self
                    .0
                    .auto
                    .as_ref()
                    .is_some_and(|a| !a.settings.windows.is_empty()) =>
            {
                // The node's windows, and its FleetLock slot when it has one.
                if self.0.auto.as_ref().is_some_and(|a| a.has_lock()) {
                    RebootStrategy::FleetLock
                } else {
                    RebootStrategy::Window
                }
            }
            Ok(pb::RebootPolicy::InWindow) => {
                return Err(ApiError::InvalidArgument {
                    field: "reboot",
                    why: "IN_WINDOW needs maintenance windows ([[auto.windows]] in agent.toml), which this node does not have; use NEVER and reboot in your window".into(),
                }
                .into())
            }
            Err(_) => {
                return Err(ApiError::InvalidArgument {
                    field: "reboot",
                    why: format!("{} is not a RebootPolicy", r.reboot),
                }
                .into())
            }
        };
        let target = self.0.resolve("version", start_source(r.source))?;
        Ok(Response::new(
            self.begin(target, r.allow_downgrade, reboot, &caller.to_string())
                .await?,
        ))
    }

    type WatchUpdateStream = EventStream;

    async fn watch_update(
        &self,
        req: Request<pb::WatchUpdateRequest>,
    ) -> Result<Response<Self::WatchUpdateStream>, Status> {
        let caller = self.0.policy.check(&req, Need::Read)?;
        let slot = self.0.watchers.admit(&caller.peer_key())?;
        let want = req.into_inner().operation_id;
        let ops = Arc::clone(&self.0.ops);
        // Subscribe before looking, so nothing between the two is missed.
        let rx = ops.subscribe();
        let first = ops.find(&want);
        if !want.is_empty() && first.is_none() {
            return Err(ApiError::UnknownOperation(want).into());
        }
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::UpdateEvent, Status>>(64);
        tokio::spawn(async move {
            // Held until the stream ends, however it ends.
            let _slot = slot;
            // A watcher that went away ends here at once, even while nothing happens;
            // the update never notices.
            tokio::select! {
                () = forward(first, rx, &tx, &ops) => {}
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let caller = self.0.policy.check(&req, Need::Change)?;
        let slot = self.0.reader.layout().inactive().letter().to_owned();
        let mut rx = self.0.ops.subscribe();
        if let Some(id) = self.0.ops.request_cancel() {
            tracing::info!(attempt = %id, caller = %caller, "cancel requested");
            // Answer once the operation has really stopped (its slot is unbootable then).
            let wait = async {
                loop {
                    match rx.recv().await {
                        Ok(ev)
                            if ev.operation_id == id
                                && matches!(ev.kind, Some(Kind::Result(_))) =>
                        {
                            return
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            if self.0.ops.find(&id).is_some_and(|(_, r)| r.is_some()) {
                                return;
                            }
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(120), wait).await;
            self.0.poke();
            // Stopped before its staging began: no slot was touched.
            let slot = if self.0.ops.reached_staging(&id) {
                slot
            } else {
                String::new()
            };
            return Ok(Response::new(pb::CancelResponse { slot }));
        }
        let agent = Arc::clone(&self.0.agent);
        let slot = blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| ApiError::AgentBusy { what: "an update" })?;
            Ok(a.cancel()?)
        })
        .await?;
        self.0.poke();
        Ok(Response::new(pb::CancelResponse {
            slot: slot.letter().to_owned(),
        }))
    }

    async fn reboot(
        &self,
        req: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::RebootResponse>, Status> {
        let caller = self.0.policy.check(&req, Need::Change)?;
        let force = req.into_inner().force;
        let state = self.0.reader.state().map_err(ApiError::from)?;
        if !force && !matches!(state, State::Armed { .. } | State::RollingBack { .. }) {
            return Err(ApiError::NothingToReboot {
                state: state.name(),
            }
            .into());
        }
        tracing::warn!(caller = %caller, state = state.name(), "reboot requested over the API");
        let cmd = self.0.cfg.health.reboot_command.clone();
        blocking(move || run_reboot(&cmd)).await?;
        Ok(Response::new(pb::RebootResponse {}))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let caller = self.0.policy.check(&req, Need::Change)?;
        let agent = Arc::clone(&self.0.agent);
        let (outcome, before) = blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| ApiError::AgentBusy { what: "an update" })?;
            let before = a.state()?;
            Ok((a.rollback()?, before))
        })
        .await?;
        tracing::warn!(caller = %caller, ?outcome, "manual rollback");
        let version = match before {
            State::Committed {
                previous: Some((_, v)),
                ..
            } => v,
            _ => String::new(),
        };
        let slot = match outcome {
            crate::postboot::BootOutcome::RollingBack { to, .. } => to.letter().to_owned(),
            _ => String::new(),
        };
        self.0.poke();
        Ok(Response::new(pb::RollbackResponse { slot, version }))
    }

    async fn mark_good(
        &self,
        req: Request<pb::MarkGoodRequest>,
    ) -> Result<Response<pb::MarkGoodResponse>, Status> {
        let caller = self.0.policy.check(&req, Need::Change)?;
        let agent = Arc::clone(&self.0.agent);
        let outcome = blocking(move || {
            let mut a = agent
                .try_lock()
                .map_err(|_| ApiError::AgentBusy { what: "an update" })?;
            Ok(a.mark_good()?)
        })
        .await?;
        tracing::info!(caller = %caller, ?outcome, "marked good over the API");
        let (slot, version) = match outcome {
            crate::postboot::BootOutcome::Committed { version, slot } => {
                (slot.letter().to_owned(), version)
            }
            _ => (String::new(), String::new()),
        };
        self.0.poke();
        Ok(Response::new(pb::MarkGoodResponse { slot, version }))
    }

    async fn list_history(
        &self,
        req: Request<pb::ListHistoryRequest>,
    ) -> Result<Response<pb::ListHistoryResponse>, Status> {
        self.0.policy.check(&req, Need::Read)?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => 50,
            n => n.min(crate::history::MAX_ENTRIES as u32) as usize,
        };
        let start = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<usize>()
                .map_err(|_| ApiError::InvalidArgument {
                    field: "page_token",
                    why: format!("{:?} is not a token from ListHistory", r.page_token),
                })?
        };
        let mut all = self.0.reader.history().map_err(ApiError::from)?;
        all.reverse();
        let end = (start + size).min(all.len());
        let entries = all
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(status::history_entry)
            .collect();
        let next_page_token = if end < all.len() {
            end.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListHistoryResponse {
            entries,
            next_page_token,
        }))
    }
}

type FoundOp = Option<(pb::Operation, Option<pb::Result>)>;

/// Sends a watcher the operation's snapshot, then its events until its result.
async fn forward(
    first: FoundOp,
    mut rx: tokio::sync::broadcast::Receiver<pb::UpdateEvent>,
    tx: &tokio::sync::mpsc::Sender<Result<pb::UpdateEvent, Status>>,
    ops: &Ops,
) {
    let event = |id: &str, kind| pb::UpdateEvent {
        operation_id: id.to_owned(),
        at: Some(status::now()),
        kind: Some(kind),
    };
    let mut target = first.as_ref().map(|(s, _)| s.id.clone());
    if let Some((snap, result)) = first {
        let id = snap.id.clone();
        if tx.send(Ok(event(&id, Kind::Snapshot(snap)))).await.is_err() {
            return;
        }
        if let Some(r) = result {
            let _ = tx.send(Ok(event(&id, Kind::Result(r)))).await;
            return;
        }
    }
    loop {
        match rx.recv().await {
            Ok(ev) => {
                let id = target.get_or_insert_with(|| ev.operation_id.clone());
                if ev.operation_id != *id {
                    continue;
                }
                let terminal = matches!(ev.kind, Some(Kind::Result(_)));
                // A watcher that went away ends here; the update never notices.
                if tx.send(Ok(ev)).await.is_err() || terminal {
                    return;
                }
            }
            Err(RecvError::Lagged(_)) => {
                let Some(id) = target.clone() else { continue };
                let Some((snap, result)) = ops.find(&id) else {
                    return;
                };
                if tx.send(Ok(event(&id, Kind::Snapshot(snap)))).await.is_err() {
                    return;
                }
                if let Some(r) = result {
                    let _ = tx.send(Ok(event(&id, Kind::Result(r)))).await;
                    return;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
