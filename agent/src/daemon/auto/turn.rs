//! The loop itself: one turn gathers facts, asks `policy::decide` and acts; then it
//! sleeps until its next deadline or until an operation ends.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rand::Rng as _;
use tokio::sync::broadcast::error::RecvError;

use super::gate::{halted, not_halted, soaking};
use super::{blocking, now, secs, Auto, Lock};
use crate::channel::Channel;
use crate::daemon::ops::OpEventKind;
use crate::daemon::target::Target;
use crate::daemon::Daemon;
use crate::fleetlock::FleetLockError;
use crate::history::Entry;
use crate::policy::decide::{self, Offer, RebootDecision, UpdateDecision};
use crate::policy::RebootStrategy;
use crate::state::State;
use crate::update::error_chain;

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

pub async fn run(d: Arc<Daemon>, auto: Arc<Auto>) {
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
    let mut events = d.ops.subscribe();
    loop {
        let wake_at = turn(&d, &auto, &mut t).await;
        let d2 = Arc::clone(&d);
        let _ = blocking(move || d2.write_textfile()).await;
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
                    Ok(e) if !matches!(e.kind, OpEventKind::Result(_)) => {}
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
async fn turn(d: &Arc<Daemon>, auto: &Arc<Auto>, t: &mut Turn) -> Timestamp {
    let now = now();
    // Only deadlines of things that can happen count: a check that cannot run now
    // (unattended updates off, an update in progress) must not make the loop spin.
    let mut wake = now + SignedDuration::from_mins(10);
    let state = match d.reader.state() {
        Ok(s) => s,
        Err(e) => {
            auto.set(|v| {
                v.next_step = format!("cannot read the agent's state: {}", error_chain(&e))
            });
            return now + SignedDuration::from_secs(60);
        }
    };
    let running_op = d.ops.current().is_some();
    let booted = d.reader.layout().booted;

    // Release the FleetLock slot whenever nothing waits for a reboot: after a commit,
    // after a rollback, and at every start (it may be held from before the reboot).
    // A committed release keeps its slot while it soaks (auto.fleetlock.soak).
    let pending_reboot = matches!(state, State::Armed { .. } | State::RollingBack { .. });
    let soak = match &state {
        State::Committed { version, at, .. }
            if auto.has_lock() && auto.view().lock != Some(Lock::Released) =>
        {
            soaking(auto, version, *at, now)
        }
        _ => soaking(auto, "", 0, now),
    };
    if let Some(w) = soak {
        wake = wake.min(w);
    } else if !pending_reboot {
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
            if let Some(w) = reboot_turn(d, auto, t, staged, now).await {
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
            if let Some(w) = check_turn(d, auto, t, now).await {
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
    // While soaking, its line wins over the check's: it says when the slot goes back.
    if let (Some(_), State::Committed { version, at, .. }) = (soak, &state) {
        soaking(auto, version, *at, now);
    }
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
    d: &Arc<Daemon>,
    auto: &Arc<Auto>,
    t: &mut Turn,
    staged: &crate::state::Staged,
    now: Timestamp,
) -> Option<Timestamp> {
    if t.rebooted_for.as_deref() == Some(staged.attempt.as_str()) {
        return None;
    }
    // An IMMEDIATE operation of this process rebooted by itself.
    let ran_here = d.ops.find(&staged.attempt).map(|(s, _)| s.reboot);
    if ran_here == Some(RebootStrategy::Immediate) {
        return None;
    }
    // What the update's starter asked for, kept on disk across restarts (an operator's
    // NEVER stays never; an IN_WINDOW update follows the windows even with unattended
    // updates off). Unknown (an older agent staged it): the configured strategy.
    let strategy = crate::daemon::intent::load(&d.cfg.state_dir, &staged.attempt).unwrap_or(
        if auto.settings.enabled {
            auto.settings.reboot
        } else {
            RebootStrategy::Never
        },
    );
    let v = &staged.version;
    let decision = decide::reboot(now, strategy, &auto.settings.windows);
    if !matches!(decision, RebootDecision::Now | RebootDecision::Lock) {
        not_halted(auto);
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
        RebootDecision::Now => {
            if let Some(at) = halted(auto, &format!("rebooting into {v}"), now).await {
                return Some(at);
            }
            reboot(d, auto, t, staged, now).await
        }
        RebootDecision::Lock => lock_and_reboot(d, auto, t, staged, now).await,
    }
}

/// Takes a FleetLock slot (unless the fleet's alerts halt the rollout), then reboots.
async fn lock_and_reboot(
    d: &Arc<Daemon>,
    auto: &Arc<Auto>,
    t: &mut Turn,
    staged: &crate::state::Staged,
    now: Timestamp,
) -> Option<Timestamp> {
    let v = &staged.version;
    let client = auto.lock.clone()?;
    if now < t.lock_retry {
        return Some(t.lock_retry);
    }
    // Asked before the slot is taken, so a halted node never sits on one.
    if let Some(at) = halted(auto, &format!("rebooting into {v}"), now).await {
        release_lock(auto, t, now).await;
        return Some(at);
    }
    auto.set(|s| s.next_step = format!("{v} is staged; asking FleetLock for a reboot slot"));
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
            let still = matches!(d.reader.state(), Ok(State::Armed { staged: s, .. }) if s.attempt == staged.attempt);
            if !still || d.ops.current().is_some() {
                tracing::info!(attempt = %staged.attempt, "the release changed while FleetLock answered; not rebooting");
                return release_lock(auto, t, now).await;
            }
            reboot(d, auto, t, staged, now).await
        }
        other => {
            lock_failed(auto, t, now, other.and_then(Result::err), "pre-reboot");
            Some(t.lock_retry)
        }
    }
}

/// Reboots into the staged release. A reboot command that fails gives the FleetLock
/// slot back (the node is not going down) and is retried with backoff.
async fn reboot(
    d: &Arc<Daemon>,
    auto: &Auto,
    t: &mut Turn,
    staged: &crate::state::Staged,
    now: Timestamp,
) -> Option<Timestamp> {
    t.rebooted_for = Some(staged.attempt.clone());
    let v = &staged.version;
    crate::emit!(tracing::Level::WARN, crate::events::REBOOTING, update_agent_release = %v, update_agent_slot = %staged.slot, update_agent_attempt = %staged.attempt, "rebooting into {v} on slot {}", staged.slot);
    auto.set(|s| s.next_step = format!("rebooting into {v}"));
    let d2 = Arc::clone(d);
    let result = blocking(move || d2.reboot_configured()).await;
    let why = match result {
        Some(Ok(_)) => {
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
    d: &Arc<Daemon>,
    auto: &Arc<Auto>,
    t: &mut Turn,
    now: Timestamp,
) -> Option<Timestamp> {
    let s = &auto.settings;
    let base = d.cfg.releases.url.clone().unwrap_or_default();
    let (channel, history) = read_facts(d, auto, t, now, &base).await?;
    t.check_failures = 0;
    t.next_check = decide::next_check(now, s.interval, s.jitter, random());
    let held = decide::held(&history, &channel.version);
    let running = crate::update::running_version(&d.cfg.os_release);
    let offer = Offer {
        version: &channel.version,
        published: channel.rollout_start(),
        waves: &channel.waves,
    };
    let decision = decide::update(now, &offer, running.as_deref(), held, auto.position);
    if decision != UpdateDecision::Start {
        not_halted(auto);
    }
    let v = channel.version.clone();
    auto.set(|view| {
        view.facts.last_check = Some((secs(now), true));
        view.facts.checks_ok += 1;
        view.last_error.clear();
        view.offered = Some(v.clone());
        view.held = None;
        view.wave_start = None;
    });
    act(d, auto, t, decision, &channel, &base).await
}

/// The channel (from `base`) and the history a check decides on; `None` when either
/// cannot be read, reported as a failed check.
async fn read_facts(
    d: &Arc<Daemon>,
    auto: &Auto,
    t: &mut Turn,
    now: Timestamp,
    base: &str,
) -> Option<(Channel, Vec<Entry>)> {
    let dc = Arc::clone(d);
    let (n, b) = (auto.settings.channel.clone(), base.to_owned());
    let opened = blocking(move || dc.open_channel(&b, &n)).await;
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
    match d.reader.history() {
        Ok(h) => Some((channel, h)),
        Err(e) => {
            check_failed(auto, t, now, &error_chain(&e));
            None
        }
    }
}

/// What a check decided, done: the view says what is next; a release whose time has
/// come is started through `Daemon::begin`. Returns when to look again, if sooner
/// than the next check.
async fn act(
    d: &Arc<Daemon>,
    auto: &Auto,
    t: &mut Turn,
    decision: UpdateDecision,
    channel: &Channel,
    base: &str,
) -> Option<Timestamp> {
    let s = &auto.settings;
    let name = &s.channel;
    let v = channel.version.clone();
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
            if let Some(at) = halted(auto, &format!("staging {v}"), now()).await {
                t.next_check = t.next_check.min(at);
                return Some(at);
            }
            let urls = channel.urls(base, d.booted_image().as_deref());
            let target = Target::for_release(name, urls, &v);
            match d.begin(target, false, s.reboot, "auto").await {
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
