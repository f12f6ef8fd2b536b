//! The unattended loop: checks the followed channel on its interval, stages what the
//! node's wave allows, and reboots staged releases as the strategy says (at once, in a
//! maintenance window, with a FleetLock slot, or never). Every decision comes from
//! `policy::decide`; this file gathers facts, acts, and publishes what it knows for
//! status and metrics.
//!
//! It sleeps until the next thing it has to do (a check, a window, a retry), and wakes
//! early when an operation ends, so an idle node stays idle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rand::Rng as _;
use tokio::sync::broadcast::error::RecvError;

use super::pb;
use super::service::{Service, Target};
use crate::fleetlock::{self, FleetLockError};
use crate::metrics::AutoFacts;
use crate::policy::decide::{self, Held, Offer, RebootDecision, UpdateDecision};
use crate::policy::{RebootStrategy, Settings};
use crate::state::State;
use crate::update::error_chain;

/// FleetLock from this agent's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Not released since the agent started: it may be held from before a reboot.
    Unknown,
    Held,
    Released,
}

/// What the loop knows, shared with status and metrics.
#[derive(Debug, Clone)]
pub struct View {
    pub facts: AutoFacts,
    pub next_check: Option<Timestamp>,
    pub last_error: String,
    pub next_step: String,
    pub offered: Option<String>,
    pub wave_start: Option<Timestamp>,
    pub held: Option<Held>,
    pub lock: Option<Lock>,
}

pub struct Auto {
    pub settings: Settings,
    position: f64,
    lock: Option<fleetlock::Client>,
    view: Mutex<View>,
    /// Wakes the loop (a new operation, a state change made over the API).
    pub wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Auto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auto")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineIdError {
    #[error("reading the machine id {path} (auto.machine_id)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Nodes sharing an id would share a FleetLock slot (the lock is recursive per
    /// id) and a wave; an id that changes at every boot would strand a slot.
    #[error("the machine id in {path} (auto.machine_id) is {found:?}, not a committed id of 32 hex digits; run systemd-machine-id-setup --commit (or give each node its own id) before enabling unattended updates")]
    Invalid {
        path: std::path::PathBuf,
        found: String,
    },
}

/// Reads and checks the machine id.
fn machine_id(path: &std::path::Path) -> Result<String, MachineIdError> {
    let text = std::fs::read_to_string(path).map_err(|source| MachineIdError::Read {
        path: path.to_owned(),
        source,
    })?;
    let id = text.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.bytes().all(|b| b == b'0')
    {
        return Err(MachineIdError::Invalid {
            path: path.to_owned(),
            found: id.chars().take(40).collect(),
        });
    }
    Ok(id.to_ascii_lowercase())
}

/// The loop's clock. Test builds (the `failpoints` feature) can shift it with
/// `UPDATE_AGENT_TEST_CLOCK_OFFSET_SECS`, so an end-to-end test can stand inside or
/// outside a window or a wave without waiting for one; releases cannot.
pub fn now() -> Timestamp {
    let t = Timestamp::now();
    #[cfg(feature = "failpoints")]
    if let Some(off) = std::env::var("UPDATE_AGENT_TEST_CLOCK_OFFSET_SECS")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        return t + SignedDuration::from_secs(off);
    }
    t
}

fn ts(t: Timestamp) -> prost_types::Timestamp {
    super::status::ts(secs(t))
}

fn secs(t: Timestamp) -> u64 {
    u64::try_from(t.as_second()).unwrap_or(0)
}

impl Auto {
    /// `None` when `[auto]` asks for nothing: not enabled, no windows, no FleetLock.
    pub fn new(cfg: &crate::config::Config) -> Result<Option<Self>, super::server::ServeError> {
        use super::server::ServeError;
        let a = &cfg.auto;
        let settings =
            Settings::new(a, cfg.releases.url.as_deref()).map_err(ServeError::Settings)?;
        if !settings.enabled && settings.windows.is_empty() && a.fleetlock.url.is_none() {
            return Ok(None);
        }
        // The identity matters for the wave and the FleetLock id; windows alone (for
        // IN_WINDOW updates) do not need it.
        let machine_id = if settings.enabled || a.fleetlock.url.is_some() {
            machine_id(&a.machine_id)?
        } else {
            String::new()
        };
        let lock = a.fleetlock.url.as_deref().map(|url| {
            fleetlock::Client::new(
                url,
                &a.fleetlock.group,
                fleetlock::node_id(&machine_id),
                cfg.fetch.request_timeout().min(Duration::from_secs(30)),
            )
        });
        Ok(Some(Self {
            position: crate::policy::wave::position(&machine_id),
            view: Mutex::new(View {
                facts: AutoFacts {
                    lock_held: lock.as_ref().map(|_| true),
                    ..AutoFacts::default()
                },
                next_check: None,
                last_error: String::new(),
                next_step: "starting".into(),
                offered: None,
                wave_start: None,
                held: None,
                lock: lock.as_ref().map(|_| Lock::Unknown),
            }),
            lock,
            settings,
            wake: tokio::sync::Notify::new(),
        }))
    }

    pub fn has_lock(&self) -> bool {
        self.lock.is_some()
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The status message.
    pub fn status(&self, now: Timestamp) -> pb::Auto {
        let v = self.view();
        let w = &self.settings.windows;
        let open = w.current(now);
        let window = open.or_else(|| w.next(now));
        pb::Auto {
            enabled: self.settings.enabled,
            channel: self.settings.channel.clone(),
            reboot: self.settings.reboot.name().to_owned(),
            last_check: v.facts.last_check.map(|(at, _)| super::status::ts(at)),
            last_check_error: v.last_error,
            next_check: v.next_check.map(ts),
            next_step: v.next_step,
            offered_version: v.offered.unwrap_or_default(),
            wave_start: v.wave_start.map(ts),
            held_version: v
                .held
                .as_ref()
                .map(|h| h.version.clone())
                .unwrap_or_default(),
            held_reason: v.held.map(|h| h.reason).unwrap_or_default(),
            window_start: window.map(|s| ts(s.start)),
            window_end: window.map(|s| ts(s.end)),
            in_window: open.is_some(),
            time_zone: if w.is_empty() {
                String::new()
            } else {
                w.time_zone()
            },
            fleetlock: match v.lock {
                None => "",
                Some(Lock::Unknown) => "unknown",
                Some(Lock::Held) => "held",
                Some(Lock::Released) => "released",
            }
            .to_owned(),
        }
    }

    /// Facts for metrics.
    pub fn facts(&self, now: Timestamp) -> AutoFacts {
        let v = self.view();
        AutoFacts {
            next_window: self.settings.windows.next(now).map(|s| secs(s.start)),
            ..v.facts
        }
    }
}

/// Runs blocking work (HTTP, disk) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

fn random() -> f64 {
    rand::thread_rng().gen::<f64>()
}

/// The loop's memory between turns.
struct Turn {
    next_check: Timestamp,
    check_failures: u32,
    lock_failures: u32,
    lock_retry: Timestamp,
    reboot_failures: u32,
    reboot_retry: Timestamp,
    /// The attempt this process asked to reboot for (a reboot command returns before
    /// the node goes down; never ask twice while it is going down).
    rebooted_for: Option<String>,
    /// A held release already reported (the event fires once per release).
    reported_held: Option<String>,
}

pub async fn run(svc: Service, auto: Arc<Auto>) {
    let now = now();
    let first = decide::next_check(
        now,
        SignedDuration::ZERO,
        auto.settings.jitter.min(SignedDuration::from_mins(5)),
        random(),
    );
    let mut t = Turn {
        next_check: first,
        check_failures: 0,
        lock_failures: 0,
        lock_retry: now,
        reboot_failures: 0,
        reboot_retry: now,
        rebooted_for: None,
        reported_held: None,
    };
    let mut events = svc.0.ops.subscribe();
    loop {
        let wake_at = turn(&svc, &auto, &mut t).await;
        let d = Arc::clone(&svc.0);
        let _ = blocking(move || d.write_textfile()).await;
        let now = self::now();
        // Sleep on the monotonic clock but look again at least every 10 minutes, so a
        // wall-clock jump (NTP after boot) cannot make a window or a check late.
        let sleep = wake_at.duration_since(now).clamp(
            SignedDuration::from_millis(50),
            SignedDuration::from_mins(10),
        );
        let sleep = Duration::try_from(sleep).unwrap_or(Duration::from_secs(1));
        let deadline = tokio::time::Instant::now() + sleep;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                () = auto.wake.notified() => break,
                ev = events.recv() => match ev {
                    // Only an operation's end changes what to do; progress does not.
                    Ok(e) if !matches!(e.kind, Some(pb::update_event::Kind::Result(_))) => {}
                    Ok(_) | Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => {
                        tokio::time::sleep_until(deadline).await;
                        break;
                    }
                },
            }
        }
    }
}

/// One look at the node; returns when to look again.
async fn turn(svc: &Service, auto: &Arc<Auto>, t: &mut Turn) -> Timestamp {
    let now = now();
    // Only deadlines of things that can happen count: a check that cannot run now
    // (unattended updates off, an update in progress) must not make the loop spin.
    let mut wake = now + SignedDuration::from_mins(10);
    let state = match svc.0.reader.state() {
        Ok(s) => s,
        Err(e) => {
            auto.set(|v| {
                v.next_step = format!("cannot read the agent's state: {}", error_chain(&e))
            });
            return now + SignedDuration::from_secs(60);
        }
    };
    let running_op = svc.0.ops.current().is_some();
    let booted = svc.0.reader.layout().booted;

    // Release the FleetLock slot whenever nothing waits for a reboot: after a commit,
    // after a rollback, and at every start (it may be held from before the reboot).
    let pending_reboot = matches!(state, State::Armed { .. } | State::RollingBack { .. });
    if !pending_reboot {
        if let Some(w) = release_lock(auto, t, now).await {
            wake = wake.min(w);
        }
    }

    match &state {
        // Booted into the trial but not judged: the health gate's to decide, never a
        // reason to reboot again (that would spend the bootloader's tries).
        State::Armed { staged, .. } if staged.slot == booted => {
            auto.set(|v| {
                v.facts.waiting_since = None;
                v.next_step = format!(
                    "{} is on trial; waiting for the health gate (update-agent boot-check)",
                    staged.version
                );
            });
        }
        State::Armed { staged, .. } if !running_op => {
            auto.set(|v| {
                v.facts.waiting_since.get_or_insert(secs(now));
            });
            if let Some(w) = reboot_turn(svc, auto, t, staged, now).await {
                wake = wake.min(w);
            }
        }
        _ => auto.set(|v| v.facts.waiting_since = None),
    }

    let idle = !running_op
        && !matches!(
            state,
            State::Staging(_) | State::Staged(_) | State::Armed { .. } | State::RollingBack { .. }
        );
    let checking = auto.settings.enabled && idle;
    if checking {
        if now >= t.next_check {
            if let Some(w) = check_turn(svc, auto, t, now).await {
                wake = wake.min(w);
            }
        }
        wake = wake.min(t.next_check);
    } else if matches!(state, State::RollingBack { .. }) {
        auto.set(|v| v.next_step = "a rollback waits for its reboot".into());
    } else if auto.settings.enabled && !idle && !matches!(state, State::Armed { .. }) {
        auto.set(|v| v.next_step = format!("an update is in progress ({})", state.name()));
    } else if !auto.settings.enabled && !matches!(state, State::Armed { .. }) {
        auto.set(|v| {
            v.next_step = "unattended updates are off (auto.enabled = false)".into();
        });
    }
    // A next check is shown only when one can run.
    auto.set(|v| v.next_check = checking.then_some(t.next_check));
    wake
}

/// Releases this node's FleetLock slot unless the view says it is released; returns
/// when to retry after a failure.
async fn release_lock(auto: &Auto, t: &mut Turn, now: Timestamp) -> Option<Timestamp> {
    let client = auto.lock.clone()?;
    if auto.view().lock == Some(Lock::Released) {
        return None;
    }
    if now < t.lock_retry {
        return Some(t.lock_retry);
    }
    let group = client.group().to_owned();
    match blocking(move || client.steady_state()).await {
        Some(Ok(())) => {
            t.lock_failures = 0;
            auto.set(|v| {
                v.lock = Some(Lock::Released);
                v.facts.lock_held = Some(false);
            });
            crate::emit!(
                tracing::Level::INFO,
                crate::events::LOCK_RELEASED,
                update_agent_group = %group,
                "FleetLock: this node holds no reboot slot of group {group} (released if it held one)"
            );
            None
        }
        other => {
            lock_failed(auto, t, now, other.and_then(Result::err), "release");
            Some(t.lock_retry)
        }
    }
}

fn lock_failed(auto: &Auto, t: &mut Turn, now: Timestamp, e: Option<FleetLockError>, what: &str) {
    let why = e.map_or_else(|| "the worker thread died".to_owned(), |e| error_chain(&e));
    let delay = decide::backoff(
        t.lock_failures,
        auto.settings.fleetlock_backoff,
        auto.settings.fleetlock_max_backoff,
        random(),
    );
    t.lock_failures = t.lock_failures.saturating_add(1);
    t.lock_retry = now + delay;
    tracing::warn!(error = %why, retry_in = %format!("{delay:#}"), "FleetLock {what} failed");
    auto.set(|v| v.next_step = format!("FleetLock {what}: {why}; retrying in {delay:#}"));
}

/// A staged release is armed: reboot it when its strategy allows.
async fn reboot_turn(
    svc: &Service,
    auto: &Arc<Auto>,
    t: &mut Turn,
    staged: &crate::state::Staged,
    now: Timestamp,
) -> Option<Timestamp> {
    if t.rebooted_for.as_deref() == Some(staged.attempt.as_str()) {
        return None;
    }
    // An IMMEDIATE operation of this process rebooted by itself.
    let ran_here = svc.0.ops.find(&staged.attempt).map(|(s, _)| s.reboot);
    if ran_here == Some(pb::RebootPolicy::Immediate as i32) {
        return None;
    }
    // What the update's starter asked for, kept on disk across restarts (an operator's
    // NEVER stays never; an IN_WINDOW update follows the windows even with unattended
    // updates off). Unknown (an older agent staged it): the configured strategy.
    let strategy = super::intent::load(&svc.0.cfg.state_dir, &staged.attempt).unwrap_or(
        if auto.settings.enabled {
            auto.settings.reboot
        } else {
            RebootStrategy::Never
        },
    );
    let v = &staged.version;
    let decision = decide::reboot(now, strategy, &auto.settings.windows);
    if !matches!(decision, RebootDecision::Now | RebootDecision::Lock) {
        // Not rebooting now: a slot held from before (a restart, a closed window) goes
        // back to the group.
        release_lock(auto, t, now).await;
    }
    match decision {
        RebootDecision::Operator => {
            auto.set(|s| {
                s.next_step = format!(
                    "{v} is staged; an operator or a controller reboots (reboot strategy {})",
                    strategy.name()
                )
            });
            None
        }
        RebootDecision::WaitWindow { opens } => {
            auto.set(|s| {
                s.next_step = match opens {
                    Some(w) => format!(
                        "{v} is staged; rebooting in the window that opens at {}",
                        w.start
                    ),
                    None => format!("{v} is staged; no maintenance window ever opens"),
                }
            });
            opens.map(|w| w.start)
        }
        _ if now < t.reboot_retry => Some(t.reboot_retry),
        RebootDecision::Now => reboot(svc, auto, t, staged, now).await,
        RebootDecision::Lock => {
            let client = auto.lock.clone()?;
            if now < t.lock_retry {
                return Some(t.lock_retry);
            }
            auto.set(|s| {
                s.next_step = format!("{v} is staged; asking FleetLock for a reboot slot")
            });
            // The view says "unknown" while the call is out: a slot may be ours.
            auto.set(|s| s.lock = Some(Lock::Unknown));
            match blocking(move || client.pre_reboot()).await {
                Some(Ok(())) => {
                    t.lock_failures = 0;
                    auto.set(|s| {
                        s.lock = Some(Lock::Held);
                        s.facts.lock_held = Some(true);
                    });
                    crate::emit!(tracing::Level::INFO, crate::events::LOCK_TAKEN, update_agent_release = %v, "took a FleetLock reboot slot for {v}");
                    // The call may have taken seconds: an operator may have cancelled
                    // or rolled back meanwhile. Reboot only what is still armed.
                    let still = matches!(svc.0.reader.state(), Ok(State::Armed { staged: s, .. }) if s.attempt == staged.attempt);
                    if !still || svc.0.ops.current().is_some() {
                        tracing::info!(attempt = %staged.attempt, "the release changed while FleetLock answered; not rebooting");
                        return release_lock(auto, t, now).await;
                    }
                    reboot(svc, auto, t, staged, now).await
                }
                other => {
                    lock_failed(auto, t, now, other.and_then(Result::err), "pre-reboot");
                    Some(t.lock_retry)
                }
            }
        }
    }
}

/// Reboots into the staged release. A reboot command that fails gives the FleetLock
/// slot back (the node is not going down) and is retried with backoff.
async fn reboot(
    svc: &Service,
    auto: &Auto,
    t: &mut Turn,
    staged: &crate::state::Staged,
    now: Timestamp,
) -> Option<Timestamp> {
    t.rebooted_for = Some(staged.attempt.clone());
    let v = &staged.version;
    crate::emit!(tracing::Level::WARN, crate::events::REBOOTING, update_agent_release = %v, update_agent_slot = %staged.slot, update_agent_attempt = %staged.attempt, "rebooting into {v} on slot {}", staged.slot);
    auto.set(|s| s.next_step = format!("rebooting into {v}"));
    let cmd = svc.0.cfg.health.reboot_command.clone();
    let result = blocking(move || crate::health::reboot(&cmd)).await;
    let why = match result {
        Some(Ok(())) => {
            t.reboot_failures = 0;
            return None;
        }
        Some(Err(e)) => error_chain(&e),
        None => "the worker thread died".to_owned(),
    };
    t.rebooted_for = None;
    let delay = decide::backoff(
        t.reboot_failures,
        SignedDuration::from_secs(30),
        SignedDuration::from_mins(30),
        random(),
    );
    t.reboot_failures = t.reboot_failures.saturating_add(1);
    t.reboot_retry = now + delay;
    tracing::error!(error = %why, retry_in = %format!("{delay:#}"), "reboot failed; the release stays staged");
    auto.set(|s| {
        s.next_step = format!("{v} is staged; the reboot failed ({why}); retrying in {delay:#}")
    });
    release_lock(auto, t, now).await;
    Some(t.reboot_retry)
}

/// Time for a check: read the channel and decide.
async fn check_turn(
    svc: &Service,
    auto: &Arc<Auto>,
    t: &mut Turn,
    now: Timestamp,
) -> Option<Timestamp> {
    let s = &auto.settings;
    let name = s.channel.clone();
    let base = svc.0.cfg.releases.url.clone().unwrap_or_default();
    let d = Arc::clone(&svc.0);
    let (n, b) = (name.clone(), base.clone());
    let opened = blocking(move || d.open_channel(&b, &n)).await;
    let channel = match opened {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            check_failed(auto, t, now, &error_chain(&e));
            return None;
        }
        None => {
            check_failed(auto, t, now, "the worker thread died");
            return None;
        }
    };
    // Without history the agent cannot know what was rolled back here: no guessing.
    let history = match svc.0.reader.history() {
        Ok(h) => h,
        Err(e) => {
            check_failed(auto, t, now, &error_chain(&e));
            return None;
        }
    };
    t.check_failures = 0;
    t.next_check = decide::next_check(now, s.interval, s.jitter, random());
    let held = decide::held(&history, &channel.version);
    let running = crate::update::running_version(&svc.0.cfg.os_release);
    let offer = Offer {
        version: &channel.version,
        published: channel.published,
        waves: &channel.waves,
    };
    let decision = decide::update(now, &offer, running.as_deref(), held, auto.position);
    let v = channel.version.clone();
    auto.set(|view| {
        view.facts.last_check = Some((secs(now), true));
        view.facts.checks_ok += 1;
        view.last_error.clear();
        view.offered = Some(v.clone());
        view.held = None;
        view.wave_start = None;
    });
    match decision {
        UpdateDecision::UpToDate => {
            auto.set(|view| {
                view.next_step = format!(
                    "up to date with channel {name} ({v}); next check at {}",
                    t.next_check
                )
            });
            None
        }
        UpdateDecision::Held(h) => {
            if t.reported_held.as_deref() != Some(h.version.as_str()) {
                t.reported_held = Some(h.version.clone());
                crate::emit!(tracing::Level::WARN, crate::events::RELEASE_HELD, update_agent_release = %h.version, update_agent_reason = %h.reason, "channel {name} offers {}, which was rolled back or cancelled on this node; not retrying it by itself", h.version);
            }
            auto.set(|view| {
                view.next_step = format!(
                    "holding {v}: {}; waiting for a newer release or an operator",
                    h.reason
                );
                view.held = Some(h);
            });
            None
        }
        UpdateDecision::WaitWave { at } => {
            // Look again when the wave comes, not only at the next regular check.
            t.next_check = t.next_check.min(at);
            auto.set(|view| {
                view.wave_start = Some(at);
                view.next_step = format!("{v} is out; this node's wave starts at {at}");
            });
            Some(at)
        }
        UpdateDecision::Start => {
            let urls = channel.urls(&base, svc.0.booted_image().as_deref());
            let target = Target::for_release(&name, urls, &v);
            match svc.begin(target, false, s.reboot, "auto").await {
                Ok(r) => {
                    auto.set(|view| {
                        view.next_step = format!("staging {v} (operation {})", r.operation_id)
                    });
                }
                Err(e) => {
                    let why = error_chain(&e);
                    tracing::warn!(error = %why, release = %v, "unattended update did not start");
                    auto.set(|view| view.next_step = format!("{v} did not start: {why}"));
                }
            }
            None
        }
    }
}

fn check_failed(auto: &Auto, t: &mut Turn, now: Timestamp, why: &str) {
    let s = &auto.settings;
    // Retry sooner than the interval, backing off up to it.
    let delay = decide::backoff(
        t.check_failures,
        SignedDuration::from_secs(30),
        s.interval,
        random(),
    );
    t.check_failures = t.check_failures.saturating_add(1);
    t.next_check = now + delay;
    crate::emit!(tracing::Level::WARN, crate::events::CHECK_FAILED, update_agent_reason = %why, "checking channel {} failed: {why}", s.channel);
    auto.set(|v| {
        v.facts.last_check = Some((secs(now), false));
        v.facts.checks_failed += 1;
        v.last_error = why.to_owned();
        v.next_step = format!("the last check failed; retrying at {}", t.next_check);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids_must_be_committed_and_unique_looking() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("machine-id");
        let check = |text: &str| {
            std::fs::write(&p, text).expect("write");
            machine_id(&p)
        };
        assert_eq!(
            check("5F1C0FFEE0DD4E5B9C3B2A1D0E9F8A7B\n").expect("valid"),
            "5f1c0ffee0dd4e5b9c3b2a1d0e9f8a7b"
        );
        for bad in [
            "",
            "uninitialized\n",
            &"0".repeat(32),
            "5f1c0ffee0dd4e5b",
            &"g".repeat(32),
        ] {
            let e = check(bad).expect_err(bad);
            assert!(e.to_string().contains("auto.machine_id"), "{e}");
        }
        let e = machine_id(&d.path().join("missing")).expect_err("missing");
        assert!(matches!(e, MachineIdError::Read { .. }), "{e}");
    }
}
