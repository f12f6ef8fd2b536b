//! The unattended loop: checks the followed channel on its interval, stages what the
//! node's wave allows, and reboots staged releases as the strategy says (at once, in a
//! maintenance window, with a FleetLock slot, or never). Every decision comes from
//! `policy::decide`; this file gathers facts, acts, and publishes what it knows for
//! status and metrics.
//!
//! It sleeps until the next thing it has to do (a check, a window, a retry), and wakes
//! early when an operation ends, so an idle node stays idle.

use std::sync::Mutex;
use std::time::Duration;

#[cfg(feature = "failpoints")]
use jiff::SignedDuration;
use jiff::Timestamp;

use super::error::{MachineIdError, StartError};
use crate::fleetlock;
use crate::metrics::AutoFacts;
use crate::policy::decide::Held;
use crate::policy::{RebootStrategy, Settings};

mod gate;
mod turn;
pub use turn::run;

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
    /// Why the rollout is halted on this node (an alert, no answer), if it is.
    pub halted: Option<String>,
    /// When a committed release's soak gives the FleetLock slot back.
    pub soak_until: Option<Timestamp>,
}

pub struct Auto {
    pub settings: std::sync::Arc<Settings>,
    position: f64,
    lock: Option<fleetlock::Client>,
    halt: Option<crate::halt::Client>,
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
    // The one wall clock; a time jiff cannot hold (past the year 9999) never comes.
    let t = Timestamp::try_from(crate::timefmt::now_system()).unwrap_or(Timestamp::UNIX_EPOCH);
    #[cfg(feature = "failpoints")]
    if let Some(off) = std::env::var("UPDATE_AGENT_TEST_CLOCK_OFFSET_SECS")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
    {
        return t + SignedDuration::from_secs(off);
    }
    t
}

/// Runs blocking work (HTTP, disk) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

fn secs(t: Timestamp) -> u64 {
    u64::try_from(t.as_second()).unwrap_or(0)
}

/// What the loop shows in status.
#[derive(Debug, Clone)]
pub struct AutoStatus {
    pub enabled: bool,
    pub channel: String,
    pub reboot: RebootStrategy,
    /// Seconds since the epoch.
    pub last_check: Option<u64>,
    pub last_check_error: String,
    pub next_check: Option<Timestamp>,
    pub next_step: String,
    pub offered_version: Option<String>,
    pub wave_start: Option<Timestamp>,
    pub held: Option<Held>,
    /// The window open now, else the next one.
    pub window: Option<crate::policy::window::Span>,
    pub in_window: bool,
    /// The windows' time zone; empty without windows.
    pub time_zone: String,
    pub lock: Option<Lock>,
    /// What halts the rollout ("" when nothing does).
    pub halted_by: String,
    pub soak_until: Option<Timestamp>,
}

impl Auto {
    /// `None` when `[auto]` asks for nothing: not enabled, no windows, no FleetLock.
    pub fn new(cfg: &crate::config::Config) -> Result<Option<Self>, StartError> {
        let a = &cfg.auto;
        let settings = a.settings(cfg.releases.url.as_deref())?;
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
                    halted: settings.halt.as_ref().map(|_| false),
                    ..AutoFacts::default()
                },
                next_check: None,
                last_error: String::new(),
                next_step: "starting".into(),
                offered: None,
                wave_start: None,
                held: None,
                lock: lock.as_ref().map(|_| Lock::Unknown),
                halted: None,
                soak_until: None,
            }),
            lock,
            halt: settings
                .halt
                .as_ref()
                .map(|h| crate::halt::Client::new(&h.prometheus, h.timeout)),
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

    /// What status shows of the loop.
    pub fn status(&self, now: Timestamp) -> AutoStatus {
        let v = self.view();
        let w = &self.settings.windows;
        let open = w.current(now);
        AutoStatus {
            enabled: self.settings.enabled,
            channel: self.settings.channel.clone(),
            reboot: self.settings.reboot,
            last_check: v.facts.last_check.map(|(at, _)| at),
            last_check_error: v.last_error,
            next_check: v.next_check,
            next_step: v.next_step,
            offered_version: v.offered,
            wave_start: v.wave_start,
            held: v.held,
            window: open.or_else(|| w.next(now)),
            in_window: open.is_some(),
            time_zone: if w.is_empty() {
                String::new()
            } else {
                w.time_zone()
            },
            lock: v.lock,
            halted_by: v.halted.unwrap_or_default(),
            soak_until: v.soak_until,
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
