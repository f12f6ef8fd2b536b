//! The decisions of unattended patching, as pure functions of (clock, config, channel,
//! node facts). The daemon's loop gathers the facts, asks, and acts; tests ask with
//! any clock they like.

use jiff::{SignedDuration, Timestamp};

use super::wave::{self, Wave};
use super::window::{Span, Windows};
use super::{OnError, RebootStrategy};
use crate::halt::Holding;
use crate::history::{Entry, Outcome};

/// What the followed channel offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer<'a> {
    pub version: &'a str,
    /// Seconds since the epoch.
    pub published: u64,
    pub waves: &'a [Wave],
}

/// A release this node will not start again by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub version: String,
    pub reason: String,
    /// Seconds since the epoch.
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpdateDecision {
    /// The offer is not newer than what runs.
    UpToDate,
    /// It failed on this node (health, boot, or an operator rolled it back).
    Held(Held),
    /// This node's wave has not come yet.
    WaitWave { at: Timestamp },
    /// Stage it now.
    Start,
}

/// Why this node will not start `version` by itself, from `history` (oldest first):
/// the newest rollback of it (a failed health check, a slot that never booted, an
/// operator who took it back) or the newest cancel (only people cancel). A failed
/// download is not a verdict on the release and holds nothing.
pub fn held(history: &[Entry], version: &str) -> Option<Held> {
    history
        .iter()
        .rev()
        .filter(|e| e.version == version)
        .find_map(|e| {
            let reason = match e.outcome {
                Outcome::RolledBack if e.reason.is_empty() => {
                    "it was rolled back on this node".to_owned()
                }
                Outcome::RolledBack => format!("it was rolled back on this node: {}", e.reason),
                Outcome::Cancelled => "an operator cancelled it on this node".to_owned(),
                _ => return None,
            };
            Some(Held {
                version: e.version.clone(),
                reason,
                at: e.at,
            })
        })
}

/// Whether to stage `offer` now.
pub fn update(
    now: Timestamp,
    offer: &Offer<'_>,
    running: Option<&str>,
    held: Option<Held>,
    position: f64,
) -> UpdateDecision {
    if let Some(r) = running {
        if !crate::version::compare(offer.version, r).is_gt() {
            return UpdateDecision::UpToDate;
        }
    }
    if let Some(h) = held.filter(|h| h.version == offer.version) {
        return UpdateDecision::Held(h);
    }
    let offset = wave::start_offset(offer.waves, position);
    let at = offer.published.saturating_add(offset);
    let at =
        Timestamp::from_second(i64::try_from(at).unwrap_or(i64::MAX)).unwrap_or(Timestamp::MAX);
    if now < at {
        UpdateDecision::WaitWave { at }
    } else {
        UpdateDecision::Start
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootDecision {
    /// Reboot now.
    Now,
    /// Take the FleetLock slot, then reboot.
    Lock,
    /// Wait for the window that opens next.
    WaitWindow { opens: Option<Span> },
    /// Stay staged until an operator or a controller reboots.
    Operator,
}

/// Whether a staged release may reboot the node now. Windows bound both `window` and
/// `fleetlock`; `fleetlock` without windows may reboot at any time the lock allows.
pub fn reboot(now: Timestamp, strategy: RebootStrategy, windows: &Windows) -> RebootDecision {
    let in_window = windows.is_empty() || windows.current(now).is_some();
    match strategy {
        RebootStrategy::Never => RebootDecision::Operator,
        RebootStrategy::Immediate => RebootDecision::Now,
        RebootStrategy::Window | RebootStrategy::FleetLock if !in_window => {
            RebootDecision::WaitWindow {
                opens: windows.next(now),
            }
        }
        RebootStrategy::Window => RebootDecision::Now,
        RebootStrategy::FleetLock => RebootDecision::Lock,
    }
}

/// When to check next: `interval` after `last`, plus a share `r` (in [0, 1)) of
/// `jitter`, so a fleet started together does not ask the server together.
pub fn next_check(
    last: Timestamp,
    interval: SignedDuration,
    jitter: SignedDuration,
    r: f64,
) -> Timestamp {
    let extra = SignedDuration::try_from_secs_f64(jitter.as_secs_f64() * r.clamp(0.0, 1.0))
        .unwrap_or(SignedDuration::ZERO);
    last.saturating_add(interval)
        .and_then(|t| t.saturating_add(extra))
        .unwrap_or(Timestamp::MAX)
}

/// Exponential backoff for a failing call: `base * 2^attempt`, at most `max`, less a
/// random share `r` of up to a half so retries of many nodes spread out.
pub fn backoff(attempt: u32, base: SignedDuration, max: SignedDuration, r: f64) -> SignedDuration {
    let full = base
        .checked_mul(1i32 << attempt.min(20))
        .unwrap_or(max)
        .min(max);
    let cut = full.as_secs_f64() * 0.5 * r.clamp(0.0, 1.0);
    full.checked_sub(SignedDuration::try_from_secs_f64(cut).unwrap_or(SignedDuration::ZERO))
        .unwrap_or(full)
}

/// What the fleet's alerts say about starting a staging or a reboot now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Nothing matching fires.
    Open,
    /// Prometheus could not be asked, and `on_error = "proceed"` says go on.
    OpenUnasked { why: String },
    /// A matching alert fires.
    Alert(Holding),
    /// Prometheus could not be asked, and `on_error = "hold"` says wait.
    Unasked { why: String },
}

impl Gate {
    pub fn holds(&self) -> bool {
        matches!(self, Self::Alert(_) | Self::Unasked { .. })
    }
}

/// The gate from Prometheus's answer (an error already put in words).
pub fn gate(answer: Result<Option<Holding>, String>, on_error: OnError) -> Gate {
    match (answer, on_error) {
        (Ok(None), _) => Gate::Open,
        (Ok(Some(h)), _) => Gate::Alert(h),
        (Err(why), OnError::Hold) => Gate::Unasked { why },
        (Err(why), OnError::Proceed) => Gate::OpenUnasked { why },
    }
}

/// How a committed node's soak ends: when its FleetLock slot goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Soak {
    /// No soak, or it is over: release now.
    Over,
    /// Keep the slot until `until`.
    Until { until: Timestamp },
    /// The soak would outlast the reboot window it began in: keep the slot only
    /// until the window closes (`until`), never past it.
    CutByWindow { until: Timestamp, full: Timestamp },
}

/// The soak of a release committed at `committed`: `soak` long, but never past the
/// end of the window the commit fell in (windows bound when slots are held, and a
/// slot held across a closed window would stall the group until the next one).
pub fn soak(now: Timestamp, committed: Timestamp, soak: SignedDuration, windows: &Windows) -> Soak {
    let full = committed.saturating_add(soak).unwrap_or(Timestamp::MAX);
    if now >= full {
        return Soak::Over;
    }
    if windows.is_empty() {
        return Soak::Until { until: full };
    }
    match windows.current(committed) {
        Some(w) if w.end >= full => Soak::Until { until: full },
        Some(w) if now < w.end => Soak::CutByWindow { until: w.end, full },
        // Committed outside any window, or the window closed: nothing to wait for.
        _ => Soak::Over,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::window::WindowConfig;
    use crate::slots::Slot;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn entry(version: &str, outcome: Outcome, at: u64) -> Entry {
        Entry {
            version: version.into(),
            from_version: Some("1.0".into()),
            slot: Slot::B,
            outcome,
            reason: format!("{version} went wrong"),
            bytes_fetched: 0,
            at,
            cause: None,
            boot: None,
        }
    }

    #[test]
    fn staging_waits_for_the_nodes_wave() {
        let published = ts("2026-11-26T00:00:00Z").as_second() as u64;
        let waves = [
            Wave {
                after_secs: 0,
                percent: 5.0,
            },
            Wave {
                after_secs: 86_400,
                percent: 100.0,
            },
        ];
        let offer = Offer {
            version: "2.0",
            published,
            waves: &waves,
        };
        let now = ts("2026-11-26T06:00:00Z");
        // A canary (position 2) starts at once; position 52.5 half a day later.
        assert_eq!(
            update(now, &offer, Some("1.0"), None, 2.0),
            UpdateDecision::Start
        );
        assert_eq!(
            update(now, &offer, Some("1.0"), None, 52.5),
            UpdateDecision::WaitWave {
                at: ts("2026-11-26T12:00:00Z")
            }
        );
        assert_eq!(
            update(ts("2026-11-26T12:00:00Z"), &offer, Some("1.0"), None, 52.5),
            UpdateDecision::Start
        );
        // Already there, or newer.
        assert_eq!(
            update(now, &offer, Some("2.0"), None, 2.0),
            UpdateDecision::UpToDate
        );
        assert_eq!(
            update(now, &offer, Some("2.1"), None, 2.0),
            UpdateDecision::UpToDate
        );
        // Unknown running release: anything signed for this line is taken.
        assert_eq!(update(now, &offer, None, None, 2.0), UpdateDecision::Start);
    }

    #[test]
    fn a_release_that_failed_here_is_held_until_a_newer_one() {
        let history = [
            entry("2.0", Outcome::RolledBack, 10),
            entry("2.0", Outcome::Failed, 20),
            entry("1.5", Outcome::Committed, 30),
        ];
        let h = held(&history, "2.0").expect("held");
        assert_eq!((h.version.as_str(), h.at), ("2.0", 10));
        assert_eq!(held(&history, "1.5"), None);
        assert!(h.reason.contains("2.0 went wrong"), "{}", h.reason);
        // A failed download is not a verdict on the release: it is retried.
        assert_eq!(held(&[entry("3.0", Outcome::Failed, 1)], "3.0"), None);
        // A cancel is an operator's word: held too.
        let c = held(&[entry("3.0", Outcome::Cancelled, 5)], "3.0").expect("held");
        assert!(c.reason.contains("cancelled"), "{}", c.reason);
        let offer = Offer {
            version: "2.0",
            published: 0,
            waves: &[],
        };
        let now = ts("2026-11-26T06:00:00Z");
        assert_eq!(
            update(now, &offer, Some("1.5"), Some(h.clone()), 0.0),
            UpdateDecision::Held(h.clone())
        );
        let newer = Offer {
            version: "2.1",
            ..offer
        };
        assert_eq!(
            update(now, &newer, Some("1.5"), Some(h), 0.0),
            UpdateDecision::Start
        );
    }

    /// Thursdays 02:00-04:00 UTC.
    fn thursday_2_to_4() -> Windows {
        Windows::new(
            "UTC",
            &[WindowConfig {
                days: vec!["thu".into()],
                start: "02:00".into(),
                length: "2h".into(),
            }],
        )
        .expect("valid")
    }

    #[test]
    fn reboots_follow_the_strategy_and_the_windows() {
        let none = Windows::new("UTC", &[]).expect("valid");
        let w = thursday_2_to_4();
        // 2026-11-26 is a Thursday.
        let inside = ts("2026-11-26T03:00:00Z");
        let outside = ts("2026-11-26T05:00:00Z");
        use RebootStrategy as S;
        assert_eq!(reboot(outside, S::Immediate, &w), RebootDecision::Now);
        assert_eq!(reboot(outside, S::Never, &none), RebootDecision::Operator);
        assert_eq!(reboot(inside, S::Window, &w), RebootDecision::Now);
        assert_eq!(reboot(inside, S::FleetLock, &w), RebootDecision::Lock);
        assert_eq!(reboot(outside, S::FleetLock, &none), RebootDecision::Lock);
        let next = Span {
            start: ts("2026-12-03T02:00:00Z"),
            end: ts("2026-12-03T04:00:00Z"),
        };
        assert_eq!(
            reboot(outside, S::Window, &w),
            RebootDecision::WaitWindow { opens: Some(next) }
        );
        assert_eq!(
            reboot(outside, S::FleetLock, &w),
            RebootDecision::WaitWindow { opens: Some(next) }
        );
    }

    #[test]
    fn alerts_and_errors_hold_as_configured() {
        let h = Holding {
            alert: "UpdateAgentRollback".into(),
            count: 3,
        };
        assert_eq!(gate(Ok(None), OnError::Hold), Gate::Open);
        assert_eq!(gate(Ok(Some(h.clone())), OnError::Proceed), Gate::Alert(h));
        let held = gate(Err("down".into()), OnError::Hold);
        assert!(held.holds());
        let on = gate(Err("down".into()), OnError::Proceed);
        assert_eq!(on, Gate::OpenUnasked { why: "down".into() });
        assert!(!on.holds());
    }

    #[test]
    fn a_soak_keeps_the_slot_but_never_past_its_window() {
        let none = Windows::new("UTC", &[]).expect("valid");
        let w = thursday_2_to_4();
        let m = SignedDuration::from_mins;
        let at = ts("2026-11-26T03:00:00Z");
        assert_eq!(soak(at, at, m(0), &none), Soak::Over);
        assert_eq!(
            soak(at + m(10), at, m(30), &none),
            Soak::Until { until: at + m(30) }
        );
        assert_eq!(soak(at + m(30), at, m(30), &none), Soak::Over);
        assert_eq!(
            soak(at + m(5), at, m(30), &w),
            Soak::Until { until: at + m(30) }
        );
        // Longer than what is left of the window: cut at its end, then over.
        assert_eq!(
            soak(at + m(5), at, m(180), &w),
            Soak::CutByWindow {
                until: ts("2026-11-26T04:00:00Z"),
                full: at + m(180)
            }
        );
        assert_eq!(soak(at + m(61), at, m(180), &w), Soak::Over);
        // Committed outside every window: no slot is kept.
        let outside = ts("2026-11-26T05:00:00Z");
        assert_eq!(soak(outside, outside, m(30), &w), Soak::Over);
    }

    #[test]
    fn checks_and_retries_spread_out() {
        let last = ts("2026-11-26T00:00:00Z");
        let h = SignedDuration::from_hours(1);
        assert_eq!(next_check(last, h * 6, h, 0.0), ts("2026-11-26T06:00:00Z"));
        assert_eq!(next_check(last, h * 6, h, 0.5), ts("2026-11-26T06:30:00Z"));
        let s = SignedDuration::from_secs;
        assert_eq!(backoff(0, s(1), s(300), 0.0), s(1));
        assert_eq!(backoff(3, s(1), s(300), 0.0), s(8));
        assert_eq!(backoff(30, s(1), s(300), 0.0), s(300));
        assert_eq!(backoff(30, s(1), s(300), 1.0), s(150));
    }
}
