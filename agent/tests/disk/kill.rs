//! An abort at every phase boundary and random SIGKILLs, each followed by a restart
//! that finishes the update.

use super::*;

#[test]
fn killed_at_every_phase_and_at_random_points_still_completes() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let url = n.server.url(&delta);
    // Slow enough that a checkpoint (every 100 ms) happens before the end.
    n.server.set(Faults {
        delay_ms: 5,
        ..Faults::default()
    });
    // Every phase boundary: abort there, then a plain restart finishes the job.
    for fp in [
        "after-mark-unbootable",
        "after-begin",
        "after-checkpoint",
        "after-apply",
        "after-staged",
        "after-arm",
    ] {
        n.reset();
        let o = n.agent(&["stage", &url], &[("UPDATE_AGENT_FAILPOINT", fp)]);
        assert!(
            !o.status.success(),
            "{fp}: the fail point did not fire: {}",
            text(&o)
        );
        assert!(
            text(&o).contains(&format!("failpoint {fp}")),
            "{fp}: {}",
            text(&o)
        );
        n.assert_booted_untouched();
        let o = n.agent(&["stage", &url], &[]);
        assert!(o.status.success(), "{fp}: restart failed: {}", text(&o));
        n.assert_armed_v2();
    }

    // Random SIGKILLs during a slow download, each followed by a restart, over as
    // many complete updates as it takes to land at least 50 kills.
    n.server.set(Faults {
        delay_ms: 8,
        ..Faults::default()
    });
    let payload_size = fs::metadata(n.payloads.join(&delta)).expect("meta").len();
    let mut seed = 0x9e37_79b9_u64;
    let mut kills = 0;
    let mut rounds = 0;
    while kills < 50 {
        rounds += 1;
        n.reset();
        // Old content in slot b that matches nothing, so nothing passes by accident.
        fs::OpenOptions::new()
            .write(true)
            .open(n.disk.part(3))
            .and_then(|mut f| f.write_all(&vec![0xa5u8; n.v2.len()]))
            .expect("scribble slot b");
        n.server.served.store(0, Ordering::Relaxed);
        // Up to half a second: a run must be able to get past its first checkpoint
        // even on a loaded machine (the booted slot is read with O_DIRECT, uncached).
        let (runs, k) = super::stage_under_kills(&n, &url, 200, &mut || {
            Duration::from_millis(20 + super::xorshift(&mut seed) % 480)
        });
        kills += k;
        n.assert_armed_v2();
        let served = n.server.served.load(Ordering::Relaxed);
        eprintln!("round {rounds}: {runs} runs, {kills} kills so far, served {served} bytes for a {payload_size}-byte payload");
        // Verified operations are not fetched again: allow for the work lost since
        // each run's last checkpoint, never a full re-download per kill.
        assert!(
            served < payload_size * (2 + runs as u64 / 4),
            "round {rounds}: served {served}"
        );
    }
    assert!(kills >= 50);
}
