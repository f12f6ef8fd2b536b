//! Prometheus metrics in the text exposition format 0.0.4, rendered on demand from
//! the agent's state, its history and the unattended loop's view. Nothing is counted
//! in memory: counters are sums over history, so they survive restarts and agree with
//! `updatectl history` (they drop when history trims its oldest records, which
//! Prometheus reads as a counter reset).
//!
//! The format is written here rather than with a client library on purpose: the same
//! text goes to node-exporter's textfile collector, which reads format 0.0.4 only, and
//! the Rust clients emit OpenMetrics (`# EOF`, `info` and `unit` lines) or keep
//! registries of their own, when everything here is computed per scrape.

use std::fmt::Write as _;

use crate::history::{Entry, Outcome, RollbackCause};

/// What the unattended loop knows, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoFacts {
    /// Seconds since the epoch of the last check, and whether it worked.
    pub last_check: Option<(u64, bool)>,
    pub checks_ok: u64,
    pub checks_failed: u64,
    /// When the next maintenance window opens (seconds since the epoch).
    pub next_window: Option<u64>,
    /// Since when a staged release waits for its reboot (window or lock).
    pub waiting_since: Option<u64>,
    /// Whether this node holds a FleetLock slot (None: no FleetLock configured).
    pub lock_held: Option<bool>,
    /// Whether a firing alert (or no answer) halts the rollout (None: no
    /// `[auto.halt]`).
    pub halted: Option<bool>,
    /// When a committed release's soak gives the FleetLock slot back.
    pub soak_until: Option<u64>,
}

/// Everything a scrape shows.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub running: Option<&'a str>,
    pub slot: &'a str,
    pub bootloader: &'a str,
    pub compatible: &'a str,
    /// The persistent state's name.
    pub state: &'a str,
    /// Oldest first.
    pub history: &'a [Entry],
    /// Bytes the operation in progress has downloaded so far.
    pub op_bytes_fetched: u64,
    pub auto: Option<&'a AutoFacts>,
    /// The root of trust, when the node has one.
    pub root: Option<crate::trust::node::RootFacts>,
    pub now: u64,
}

const STATES: [&str; 9] = [
    "idle",
    "staging",
    "staged",
    "armed",
    "failed",
    "cancelled",
    "committed",
    "rolling back",
    "rolled back",
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

pub fn render(i: &Inputs<'_>) -> String {
    let mut o = Out(String::new());
    o.family(
        "update_agent_info",
        "gauge",
        "The running release (always 1; the labels carry the facts).",
    );
    o.sample(
        "update_agent_info",
        &[
            ("version", i.running.unwrap_or("")),
            ("slot", i.slot),
            ("bootloader", i.bootloader),
            ("compatible", i.compatible),
        ],
        1,
    );
    o.family(
        "update_agent_state",
        "gauge",
        "1 for the agent's current state, 0 for the others.",
    );
    for s in STATES {
        let name = s.replace(' ', "_");
        o.sample(
            "update_agent_state",
            &[("state", &name)],
            u8::from(s == i.state),
        );
    }
    o.family(
        "update_agent_downloaded_bytes_total",
        "counter",
        "Payload bytes downloaded by the updates in history and the one in progress.",
    );
    let fetched: u64 = i.history.iter().map(|e| e.bytes_fetched).sum();
    o.sample(
        "update_agent_downloaded_bytes_total",
        &[],
        fetched.saturating_add(i.op_bytes_fetched),
    );
    o.family(
        "update_agent_updates_total",
        "counter",
        "Updates that ended, by outcome.",
    );
    for (name, outcome) in [
        ("committed", Outcome::Committed),
        ("rolled_back", Outcome::RolledBack),
        ("failed", Outcome::Failed),
        ("cancelled", Outcome::Cancelled),
    ] {
        let n = i.history.iter().filter(|e| e.outcome == outcome).count();
        o.sample("update_agent_updates_total", &[("outcome", name)], n);
    }
    o.family(
        "update_agent_rollbacks_total",
        "counter",
        "Rollbacks by cause (unknown: recorded by an agent too old to say).",
    );
    let causes = [
        Some(RollbackCause::HealthCheck),
        Some(RollbackCause::DidNotBoot),
        Some(RollbackCause::Manual),
        Some(RollbackCause::StoppedBooting),
        None,
    ];
    for c in causes {
        let n = i
            .history
            .iter()
            .filter(|e| e.outcome == Outcome::RolledBack && e.cause == c)
            .count();
        o.sample(
            "update_agent_rollbacks_total",
            &[("cause", c.map_or("unknown", RollbackCause::name))],
            n,
        );
    }
    if let Some(r) = i.root {
        root(&mut o, r);
    }
    if let Some(a) = i.auto {
        auto(&mut o, a, i.now);
    }
    o.0
}

/// The root of trust: an expired root stops every update on the node, so fleets
/// alert well before (integration/prometheus/rules.yml).
fn root(o: &mut Out, r: crate::trust::node::RootFacts) {
    o.family(
        "update_agent_trust_root_version",
        "gauge",
        "Version of the root of trust the node follows (absent on a node that trusts its keys directory).",
    );
    o.sample("update_agent_trust_root_version", &[], r.version);
    o.family(
        "update_agent_trust_root_expiry_timestamp_seconds",
        "gauge",
        "When the root of trust expires; after it the node accepts no release until it follows a newer root.",
    );
    o.sample(
        "update_agent_trust_root_expiry_timestamp_seconds",
        &[],
        r.expires,
    );
}

fn auto(o: &mut Out, a: &AutoFacts, now: u64) {
    o.family(
        "update_agent_checks_total",
        "counter",
        "Unattended checks for updates since the agent started, by result.",
    );
    o.sample(
        "update_agent_checks_total",
        &[("result", "ok")],
        a.checks_ok,
    );
    o.sample(
        "update_agent_checks_total",
        &[("result", "error")],
        a.checks_failed,
    );
    if let Some((at, ok)) = a.last_check {
        o.family(
            "update_agent_last_check_timestamp_seconds",
            "gauge",
            "When the last unattended check ran.",
        );
        o.sample("update_agent_last_check_timestamp_seconds", &[], at);
        o.family(
            "update_agent_last_check_success",
            "gauge",
            "1 if the last unattended check worked.",
        );
        o.sample("update_agent_last_check_success", &[], u8::from(ok));
    }
    if let Some(t) = a.next_window {
        o.family(
            "update_agent_next_window_start_timestamp_seconds",
            "gauge",
            "When the next maintenance window opens.",
        );
        o.sample("update_agent_next_window_start_timestamp_seconds", &[], t);
    }
    o.family(
        "update_agent_reboot_wait_seconds",
        "gauge",
        "How long a staged release has waited for its reboot (window or lock); 0 when none waits.",
    );
    o.sample(
        "update_agent_reboot_wait_seconds",
        &[],
        a.waiting_since.map_or(0, |s| now.saturating_sub(s)),
    );
    if let Some(h) = a.lock_held {
        o.family(
            "update_agent_fleetlock_held",
            "gauge",
            "1 while this node may hold a FleetLock reboot slot.",
        );
        o.sample("update_agent_fleetlock_held", &[], u8::from(h));
    }
    if let Some(h) = a.halted {
        o.family(
            "update_agent_rollout_halted",
            "gauge",
            "1 while a Prometheus alert matching auto.halt (or no answer, with on_error = hold) holds stagings and reboots.",
        );
        o.sample("update_agent_rollout_halted", &[], u8::from(h));
    }
    o.family(
        "update_agent_soak_remaining_seconds",
        "gauge",
        "How long a committed release still keeps its FleetLock slot (auto.fleetlock.soak); 0 when none soaks.",
    );
    o.sample(
        "update_agent_soak_remaining_seconds",
        &[],
        a.soak_until.map_or(0, |s| s.saturating_sub(now)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::Slot;

    fn entry(outcome: Outcome, cause: Option<RollbackCause>, bytes: u64) -> Entry {
        Entry {
            version: "2.0".into(),
            from_version: None,
            slot: Slot::B,
            outcome,
            reason: String::new(),
            bytes_fetched: bytes,
            at: 1,
            cause,
            boot: None,
        }
    }

    /// Checks the text against the exposition format's grammar, line by line.
    fn well_formed(text: &str) {
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(matches!(kind, "gauge" | "counter"), "{line}");
                assert!(typed.insert(name.to_owned()), "TYPE twice: {line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample");
            value.parse::<f64>().expect("value");
            let name = series.split('{').next().expect("name");
            assert!(typed.contains(name), "sample before its TYPE: {line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
        }
    }

    #[test]
    fn renders_counts_from_history() {
        let history = [
            entry(Outcome::Committed, None, 1000),
            entry(Outcome::RolledBack, Some(RollbackCause::HealthCheck), 0),
            entry(Outcome::RolledBack, None, 0),
            entry(Outcome::Failed, None, 500),
        ];
        let auto = AutoFacts {
            last_check: Some((90, false)),
            checks_ok: 3,
            checks_failed: 1,
            next_window: Some(200),
            waiting_since: Some(40),
            lock_held: Some(true),
            halted: Some(true),
            soak_until: Some(130),
        };
        let text = render(&Inputs {
            running: Some("2.0 \"beta\"\n"),
            slot: "a",
            bootloader: "grub",
            compatible: "azl3",
            state: "rolling back",
            history: &history,
            op_bytes_fetched: 25,
            auto: Some(&auto),
            root: Some(crate::trust::node::RootFacts {
                version: 4,
                expires: 1_900_000_000,
            }),
            now: 100,
        });
        well_formed(&text);
        for want in [
            "update_agent_info{version=\"2.0 \\\"beta\\\"\\n\",slot=\"a\",bootloader=\"grub\",compatible=\"azl3\"} 1",
            "update_agent_state{state=\"rolling_back\"} 1",
            "update_agent_state{state=\"idle\"} 0",
            "update_agent_downloaded_bytes_total 1525",
            "update_agent_updates_total{outcome=\"rolled_back\"} 2",
            "update_agent_rollbacks_total{cause=\"health_check\"} 1",
            "update_agent_rollbacks_total{cause=\"unknown\"} 1",
            "update_agent_rollbacks_total{cause=\"manual\"} 0",
            "update_agent_checks_total{result=\"error\"} 1",
            "update_agent_last_check_success 0",
            "update_agent_next_window_start_timestamp_seconds 200",
            "update_agent_reboot_wait_seconds 60",
            "update_agent_fleetlock_held 1",
            "update_agent_rollout_halted 1",
            "update_agent_soak_remaining_seconds 30",
            "update_agent_trust_root_version 4",
            "update_agent_trust_root_expiry_timestamp_seconds 1900000000",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
        // Without the unattended loop, none of its series appear.
        let plain = render(&Inputs {
            auto: None,
            running: None,
            state: "idle",
            history: &[],
            op_bytes_fetched: 0,
            slot: "a",
            bootloader: "grub",
            compatible: "azl3",
            root: None,
            now: 0,
        });
        well_formed(&plain);
        assert!(!plain.contains("checks_total"));
        // A node on its keys directory has no root to expire.
        assert!(!plain.contains("trust_root"), "{plain}");
    }
}
