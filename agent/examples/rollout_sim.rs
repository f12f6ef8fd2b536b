//! A rollout of one release to a large fleet, simulated: the agent's own pure policy
//! code (`policy::decide::{update, next_check, backoff, gate}`, `policy::wave`) for
//! every virtual node under a simulated clock, with a FleetLock of K slots and a
//! health-check failure rate. No disks, no network: the decisions only.
//!
//! `cargo run --release --example rollout_sim -- [NODES] [SLOTS] [FAILURE_RATE]`
//! prints, per wave schedule, the rollout's duration, the peak payload bandwidth,
//! the peak FleetLock request rate and how many nodes took the release before the
//! halt; then the per-minute series as CSV (for plotting).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use jiff::{SignedDuration, Timestamp};
use rand::{Rng as _, SeedableRng as _};
use update_agent::halt::Holding;
use update_agent::policy::decide::{self, Offer, UpdateDecision};
use update_agent::policy::wave::{self, Wave};
use update_agent::policy::OnError;

/// Events by time: (seconds after publication, node, step).
type Queue = BinaryHeap<Reverse<(i64, usize, u8)>>;

/// What a virtual node does next.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Check,
    Staged,
    AskLock,
    Booted,
    RolledBack,
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Model {
    nodes: usize,
    slots: usize,
    failure: f64,
    /// Seconds to download and write the delta, and its bytes.
    stage_secs: i64,
    delta_bytes: f64,
    reboot_secs: i64,
    /// From the first rollback to the alert firing (scrape + rule evaluation).
    detect_secs: i64,
}

#[derive(Debug, Default)]
struct Outcome {
    duration_secs: i64,
    took: usize,
    rolled_back: usize,
    committed: usize,
    peak_bytes_per_sec: f64,
    peak_lock_per_min: u32,
    held: usize,
    /// Per minute: bytes per second (mean), FleetLock requests.
    series: Vec<(f64, u32)>,
}

fn secs(t: Timestamp, t0: Timestamp) -> i64 {
    t.duration_since(t0).as_secs()
}

/// Every node's place in the rollout (machine ids made up from its number) and its
/// first look at the channel: somewhere in its last interval plus jitter.
fn fleet(m: &Model, t0: Timestamp, rng: &mut rand::rngs::StdRng) -> (Vec<f64>, Queue) {
    let (interval, jitter) = (SignedDuration::from_hours(6), SignedDuration::from_mins(30));
    let positions: Vec<f64> = (0..m.nodes)
        .map(|i| {
            wave::position(&format!(
                "{:032x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ))
        })
        .collect();
    let q: Queue = (0..m.nodes)
        .map(|i| {
            let at = decide::next_check(t0, SignedDuration::ZERO, interval + jitter, rng.gen());
            Reverse((secs(at, t0), i, 0))
        })
        .collect();
    (positions, q)
}

fn run(m: &Model, waves: &[Wave], seed: u64) -> Outcome {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0: Timestamp = "2026-12-01T00:00:00Z"
        .parse()
        .unwrap_or(Timestamp::UNIX_EPOCH);
    let offer = Offer {
        version: "2.0",
        published: u64::try_from(t0.as_second()).unwrap_or(0),
        waves,
    };
    let (positions, mut q) = fleet(m, t0, &mut rng);
    let mut step = vec![Step::Check; m.nodes];
    let mut failures = vec![0u32; m.nodes];
    let (mut free, mut alert_at, mut o) = (m.slots, i64::MAX, Outcome::default());
    let minutes = 14 * 24 * 60;
    let (mut bytes, mut locks) = (vec![0f64; minutes], vec![0u32; minutes]);
    while let Some(Reverse((now, i, _))) = q.pop() {
        let t = t0 + SignedDuration::from_secs(now);
        let minute = usize::try_from(now / 60).unwrap_or(0).min(minutes - 1);
        let firing = now >= alert_at;
        let gate = decide::gate(
            Ok(firing.then(|| Holding {
                alert: "UpdateAgentReleaseRolledBack".into(),
                count: 1,
            })),
            OnError::Hold,
        );
        let cur = step[i];
        let mut at = |secs: i64, s: Step, q: &mut BinaryHeap<_>| {
            step[i] = s;
            q.push(Reverse((now + secs, i, s as u8)));
        };
        match cur {
            Step::Check => match decide::update(t, &offer, Some("1.0"), None, positions[i]) {
                UpdateDecision::WaitWave { at: w } => at(secs(w, t0) - now, Step::Check, &mut q),
                // Halted: the alert stays firing in this model (nobody ships a fix),
                // so the node holds for good.
                UpdateDecision::Start if gate.holds() => o.held += 1,
                UpdateDecision::Start => {
                    o.took += 1;
                    // The download spreads over its minutes.
                    for k in 0..m.stage_secs {
                        let b = usize::try_from((now + k) / 60)
                            .unwrap_or(0)
                            .min(minutes - 1);
                        bytes[b] += m.delta_bytes / m.stage_secs as f64 / 60.0;
                    }
                    at(m.stage_secs, Step::Staged, &mut q)
                }
                _ => {}
            },
            // Staged before the halt: it stays staged, its reboot held.
            Step::Staged | Step::AskLock if gate.holds() => o.held += 1,
            Step::Staged | Step::AskLock => {
                locks[minute] += 1;
                if free > 0 {
                    free -= 1;
                    failures[i] = 0;
                    at(m.reboot_secs, Step::Booted, &mut q);
                } else {
                    let d = decide::backoff(
                        failures[i],
                        SignedDuration::from_secs(5),
                        SignedDuration::from_mins(5),
                        rng.gen(),
                    );
                    failures[i] += 1;
                    at(d.as_secs().max(1), Step::AskLock, &mut q);
                }
            }
            Step::Booted if rng.gen::<f64>() < m.failure => {
                // The health gate rolls back: one more reboot, then the slot goes back.
                at(m.reboot_secs, Step::RolledBack, &mut q);
            }
            Step::Booted => {
                o.committed += 1;
                at(0, Step::Release, &mut q);
            }
            Step::RolledBack => {
                o.rolled_back += 1;
                alert_at = alert_at.min(now + m.detect_secs);
                at(0, Step::Release, &mut q);
            }
            Step::Release => {
                free += 1;
                o.duration_secs = o.duration_secs.max(now);
            }
        }
        if now > (minutes as i64) * 60 {
            break;
        }
    }
    finish(&mut o, &bytes, &locks);
    o
}

/// The per-minute series up to the rollout's end, and their peaks.
fn finish(o: &mut Outcome, bytes: &[f64], locks: &[u32]) {
    let minutes = bytes.len();
    let last = usize::try_from(o.duration_secs / 60 + 1)
        .unwrap_or(0)
        .min(minutes);
    o.series = bytes[..last]
        .iter()
        .copied()
        .zip(locks[..last].iter().copied())
        .collect();
    o.peak_bytes_per_sec = bytes.iter().copied().fold(0.0, f64::max);
    o.peak_lock_per_min = locks.iter().copied().max().unwrap_or(0);
}

/// `AFTER:PERCENT ...` (AFTER in jiff's units up to hours), checked as a publisher's.
fn schedule(spec: &str) -> Vec<Wave> {
    let waves: Vec<Wave> = spec
        .split_whitespace()
        .map(|w| {
            let parsed = w.split_once(':').and_then(|(after, pct)| {
                Some(Wave {
                    after_secs: u64::try_from(after.parse::<SignedDuration>().ok()?.as_secs())
                        .ok()?,
                    percent: pct.parse().ok()?,
                })
            });
            parsed.unwrap_or_else(|| panic!("bad wave {w:?}"))
        })
        .collect();
    if let Err(e) = wave::validate(&waves) {
        panic!("bad schedule {spec:?}: {e}");
    }
    waves
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let m = Model {
        nodes: arg(1, 10_000.0) as usize,
        slots: arg(2, 20.0) as usize,
        failure: arg(3, 1.0),
        stage_secs: 30,
        delta_bytes: 30e6,
        reboot_secs: 90,
        detect_secs: 120,
    };
    println!("# {m:?}");
    println!(
        "schedule,good_duration_h,good_peak_MB_per_s,good_peak_lock_req_per_min,bad_took_release,bad_rolled_back,bad_held"
    );
    let mut csv = String::from("schedule,minute,MB_per_s,lock_req_per_min\n");
    for spec in [
        "",
        "0s:1 1h:1.5 6h:10 24h:100",
        "0s:5 12h:100",
        "0s:1 2h:1.5 48h:100",
    ] {
        // A good release (nobody fails) for the rollout's shape; a bad one (`failure`)
        // for how far it gets before the halt.
        let o = run(&Model { failure: 0.0, ..m }, &schedule(spec), 17);
        let bad = run(&m, &schedule(spec), 17);
        let name = if spec.is_empty() { "all at once" } else { spec };
        println!(
            "{name},{:.2},{:.1},{},{},{},{}",
            o.duration_secs as f64 / 3600.0,
            o.peak_bytes_per_sec / 1e6,
            o.peak_lock_per_min,
            bad.took,
            bad.rolled_back,
            bad.held
        );
        for (k, (b, l)) in o.series.iter().enumerate() {
            csv.push_str(&format!("{name},{k},{:.3},{l}\n", b / 1e6));
        }
    }
    if let Some(path) = std::env::var_os("ROLLOUT_SIM_CSV") {
        if let Err(e) = std::fs::write(&path, csv) {
            eprintln!(
                "rollout_sim: writing {}: {e}",
                std::path::Path::new(&path).display()
            );
            std::process::exit(1);
        }
    }
}
