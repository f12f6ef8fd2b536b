//! What may stop the unattended loop from going on: the fleet's alerts (asked before a
//! staging starts and before a reboot) and the soak that keeps a FleetLock slot after
//! a commit. Both only ever hold: an answer from Prometheus cannot start anything.

use jiff::Timestamp;

use super::{blocking, secs, Auto};
use crate::policy::decide::{self, Gate, Soak};
use crate::update::error_chain;

/// Asks Prometheus before `what` ("staging 2.0", "rebooting into 2.0"). `None` lets it
/// go on; `Some(t)`: held, ask again at `t`. Without `[auto.halt]` it never holds.
pub(super) async fn halted(auto: &Auto, what: &str, now: Timestamp) -> Option<Timestamp> {
    let (Some(client), Some(h)) = (auto.halt.clone(), auto.settings.halt.as_ref()) else {
        return None;
    };
    let m = h.matcher.clone();
    let answer = match blocking(move || client.holding(&m)).await {
        Some(r) => r.map_err(|e| error_chain(&e)),
        None => Err("the worker thread died".to_owned()),
    };
    let gate = decide::gate(answer, h.on_error);
    let before = auto.view().halted;
    let reason = match &gate {
        Gate::Open => None,
        Gate::OpenUnasked { why } => {
            tracing::warn!(error = %why, "cannot ask Prometheus which alerts fire; going on (auto.halt.on_error = \"proceed\")");
            None
        }
        Gate::Alert(a) if a.count > 1 => Some(format!(
            "alert {} is firing ({} matching alerts)",
            a.alert, a.count
        )),
        Gate::Alert(a) => Some(format!("alert {} is firing", a.alert)),
        Gate::Unasked { why } => Some(format!(
            "{why} (auto.halt.on_error = \"hold\": no answer holds as an alert would)"
        )),
    };
    let Some(reason) = reason else {
        not_halted(auto);
        return None;
    };
    if before.as_deref() != Some(reason.as_str()) {
        let alert = match &gate {
            Gate::Alert(a) => a.alert.as_str(),
            _ => "",
        };
        crate::emit!(tracing::Level::WARN, crate::events::ROLLOUT_HALTED, update_agent_alert = %alert, update_agent_reason = %reason, "rollout halted before {what}: {reason}");
    }
    let at = now + h.recheck;
    auto.set(|v| {
        v.next_step = format!("halted before {what}: {reason}; asking again at {at}");
        v.halted = Some(reason);
        v.facts.halted = Some(true);
    });
    Some(at)
}

/// Nothing halts the rollout (any more): the event once, the view cleared.
pub(super) fn not_halted(auto: &Auto) {
    if auto.settings.halt.is_none() {
        return;
    }
    if let Some(was) = auto.view().halted {
        crate::emit!(tracing::Level::INFO, crate::events::ROLLOUT_RESUMED, update_agent_reason = %was, "rollout resumes: no alert matching auto.halt holds it any more");
    }
    auto.set(|v| {
        v.halted = None;
        v.facts.halted = Some(false);
    });
}

/// A committed release's soak: `Some(t)` while its FleetLock slot is kept (look again
/// at `t`), `None` when the slot may go back. `committed`: seconds since the epoch.
pub(super) fn soaking(
    auto: &Auto,
    version: &str,
    committed: u64,
    now: Timestamp,
) -> Option<Timestamp> {
    let s = &auto.settings;
    let at = Timestamp::from_second(i64::try_from(committed).unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::MAX);
    let (until, step) = match decide::soak(now, at, s.soak, &s.windows) {
        Soak::Over => {
            auto.set(|v| {
                v.soak_until = None;
                v.facts.soak_until = None;
            });
            return None;
        }
        Soak::Until { until } => (
            until,
            format!("{version} is committed; soaking: the FleetLock slot goes back at {until}"),
        ),
        Soak::CutByWindow { until, full } => (
            until,
            format!(
                "{version} is committed; soaking: auto.fleetlock.soak ({:#}) ends at {full}, \
                 after the reboot window closes, so the FleetLock slot goes back when it \
                 closes at {until}",
                s.soak
            ),
        ),
    };
    auto.set(|v| {
        v.soak_until = Some(until);
        v.next_step = step;
        v.facts.soak_until = Some(secs(until));
    });
    Some(until)
}
