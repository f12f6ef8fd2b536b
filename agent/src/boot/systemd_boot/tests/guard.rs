//! Tests of the committed default's guard (`…@default+N.conf`): reading guarded
//! names, planning the guard's renames, torn renames of a guarded entry, and the
//! guard's life on a real tree with the loader's and systemd-bless-boot's renames.

use std::fs;

use super::state::{refusal, ren};
use crate::boot::systemd_boot::state::Op;
use crate::boot::systemd_boot::test_util::{
    bless_boot, boot, boot_order, created, entries, owned, snapshot, st, state, status, summary,
    tmp, Release, A, B,
};
use crate::boot::systemd_boot::ENTRIES_DIR;
use crate::boot::{BootControl, BootError};

/// `(default, boots left, fell back from)`.
type Guard = (crate::slots::Slot, Option<u8>, Option<crate::slots::Slot>);

/// [`Guard`] of a set of names.
fn guard_summary(names: &[&str]) -> Guard {
    let b = st(names)
        .status(String::new())
        .expect("a state with a default");
    (b.default, b.default_boots_left, b.fell_back_from)
}

#[test]
fn a_guarded_default_reads_as_the_default_with_its_boots_left() {
    let b1 = "update-agent-1-b-1.conf";
    let cases: &[(&[&str], Guard)] = &[
        (
            &["update-agent-2-a-2@default+3.conf", b1],
            (A, Some(3), None),
        ),
        (
            &["update-agent-2-a-2@default+1-2.conf", b1],
            (A, Some(1), None),
        ),
        // Blessed by systemd-bless-boot: the default, unguarded until set again.
        (&["update-agent-2-a-2@default.conf", b1], (A, None, None)),
        // Its boots ran out: systemd-boot sorts it last and boots b.
        (
            &["update-agent-2-a-2@default+0-3.conf", b1],
            (B, None, Some(A)),
        ),
        // Nothing else to boot: it stays the default (and boots, last or not).
        (&["update-agent-2-a-2@default+0-3.conf"], (A, Some(0), None)),
        // A guard ranked below a newer blessed default is no default.
        (
            &[
                "update-agent-2-a-2@default+3.conf",
                "update-agent-3-b-3.conf",
            ],
            (B, None, None),
        ),
        // Both ran out: the higher rank boots (systemd-boot's order among `+0`).
        (
            &[
                "update-agent-2-a-2@default+0-3.conf",
                "update-agent-1-b-1@default+0-3.conf",
            ],
            (A, Some(0), None),
        ),
    ];
    for (names, want) in cases {
        assert_eq!(guard_summary(names), *want, "{names:?}");
        let s = st(names);
        assert_eq!(
            boot_order(&owned(names))[0],
            s.first().expect("first").file_name()
        );
    }
    // A trial above a guarded default is a trial; the guard is not one.
    let s = st(&[
        "update-agent-2-a-2@default+2-1.conf",
        "update-agent-3-b-3+3.conf",
    ]);
    assert_eq!(summary(&s), (A, Some((B, 3)), [true, true]));
    let s = st(&["update-agent-2-a-2@default+2-1.conf", b1]);
    assert_eq!(summary(&s), (A, None, [true, true]));
}

#[test]
fn guarding_the_default_is_one_rename_in_place() {
    let b1 = "update-agent-1-b-1.conf";
    let a2 = "update-agent-2-a-2.conf";
    let s = st(&[a2, b1]);
    assert_eq!(
        s.guard_default(s.default_entry().expect("default").slot, 3)
            .expect("guard"),
        [ren(a2, "update-agent-2-a-2@default+3.conf")]
    );
    assert_eq!(s.guard_default(A, 0).expect("off already"), []);
    assert!(refusal(s.guard_default(A, 10)).contains("0 to 9"));
    // Counted down by the loader, or blessed by systemd-bless-boot: set back.
    for from in [
        "update-agent-2-a-2@default+1-2.conf",
        "update-agent-2-a-2@default.conf",
    ] {
        assert_eq!(
            st(&[from, b1]).guard_default(A, 3).expect("reset"),
            [ren(from, "update-agent-2-a-2@default+3.conf")]
        );
    }
    let fresh = "update-agent-2-a-2@default+3.conf";
    assert_eq!(st(&[fresh, b1]).guard_default(A, 3).expect("fresh"), []);
    // Off: the mark goes and the rank goes up (a torn rename must read its target).
    assert_eq!(
        st(&[fresh, b1]).guard_default(A, 0).expect("off"),
        [ren(fresh, "update-agent-3-a-2.conf")]
    );
    // The guarded default is committed: a commit keeps it; a rollback to it or an arm
    // of it ends it, each raising the rank.
    let g = st(&["update-agent-2-a-2@default+2-1.conf", b1]);
    assert_eq!(g.commit(A).expect("commit"), []);
    assert_eq!(
        g.rollback_to(A).expect("rollback"),
        [ren(
            "update-agent-2-a-2@default+2-1.conf",
            "update-agent-3-a-2.conf"
        )]
    );
    assert!(refusal(g.arm_trial(A, 3)).contains("default slot"));
    assert!(refusal(g.mark_unbootable(A)).contains("default slot"));
    // Fallen over: b is the default; rolling back to it and removing a is what the
    // agent does.
    let fallen = "update-agent-2-a-2@default+0-3.conf";
    let f = st(&[fallen, b1]);
    assert_eq!(
        f.rollback_to(B).expect("rollback"),
        [ren(b1, "update-agent-3-b-1.conf")]
    );
    assert_eq!(
        f.mark_unbootable(A).expect("mark"),
        [Op::Remove(fallen.into())]
    );
    // Re-arming a fallen entry as a trial drops the mark and raises the rank.
    assert_eq!(
        f.arm_trial(A, 3).expect("arm"),
        [ren(fallen, "update-agent-3-a-2+3.conf")]
    );
}

/// The pairs a torn rename of a guarded entry leaves, and which name is read.
#[test]
fn a_torn_guard_rename_reads_as_its_target() {
    let b1 = "update-agent-1-b-1.conf";
    let cases: &[(&str, &str, &str)] = &[
        // (source, target, kept)
        (
            "update-agent-2-a-2.conf",
            "update-agent-2-a-2@default+3.conf",
            "update-agent-2-a-2@default+3.conf",
        ),
        (
            "update-agent-2-a-2@default+1-2.conf",
            "update-agent-2-a-2@default+3.conf",
            "update-agent-2-a-2@default+3.conf",
        ),
        (
            "update-agent-2-a-2@default.conf",
            "update-agent-2-a-2@default+3.conf",
            "update-agent-2-a-2@default+3.conf",
        ),
        // systemd-bless-boot's rename.
        (
            "update-agent-2-a-2@default+2-1.conf",
            "update-agent-2-a-2@default.conf",
            "update-agent-2-a-2@default.conf",
        ),
        // Guard off, a rollback to it: the rank went up.
        (
            "update-agent-2-a-2@default+3.conf",
            "update-agent-3-a-2.conf",
            "update-agent-3-a-2.conf",
        ),
        // The loader's own count torn by the firmware reads as the agent's reset
        // (documented: one more boot before the fallback at worst).
        (
            "update-agent-2-a-2@default+3.conf",
            "update-agent-2-a-2@default+2-1.conf",
            "update-agent-2-a-2@default+3.conf",
        ),
    ];
    for (from, to, kept) in cases {
        let s = st(&[from, to, b1]);
        let stale = if kept == to { from } else { to };
        assert_eq!(
            s.entry(A).map(|e| e.file_name()).as_deref(),
            Some(*kept),
            "{from} -> {to}"
        );
        assert_eq!(s.stale(A), Some(*stale), "{from} -> {to}");
        assert_eq!(s.default_entry().expect("default").slot, A);
    }
    // A commit torn, then the guard set on its target: the stale trial name sorts
    // first and the loader counts it down; the guarded name is still the entry.
    for stale in ["update-agent-2-a-2+2-1.conf", "update-agent-2-a-2+0-3.conf"] {
        for kept in [
            "update-agent-2-a-2@default+3.conf",
            "update-agent-2-a-2@default+1-2.conf",
        ] {
            let s = st(&[stale, kept, b1]);
            assert_eq!(
                s.entry(A).map(|e| e.file_name()).as_deref(),
                Some(kept),
                "{stale} {kept}"
            );
            assert_eq!(s.stale(A), Some(stale));
        }
    }
    // Two counts of the guarded default that no single rename explains: the one with
    // more boots left (a wrong pick only changes the count).
    let s = st(&[
        "update-agent-2-a-2@default+2-1.conf",
        "update-agent-2-a-2@default+1-2.conf",
        b1,
    ]);
    assert_eq!(s.stale(A), Some("update-agent-2-a-2@default+1-2.conf"));
    // Unmarked pairs that no rename makes: refused, as before.
    for pair in [
        ["update-agent-2-a-2+2-1.conf", "update-agent-2-a-2+1-2.conf"],
        ["update-agent-2-a-2+3.conf", "update-agent-2-a-2+2-1.conf"],
    ] {
        assert!(state(&[pair[0], pair[1], b1]).is_err(), "{pair:?}");
    }
}

/// The committed default's guard on a real tree, with systemd-boot's renames and
/// systemd-bless-boot's: set back after each boot that reaches the agent, run out by
/// boots that do not, and then the loader boots the other slot.
#[test]
fn a_guarded_default_that_stops_booting_falls_back_to_the_other_slot() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2) = (Release::new("1.0"), Release::new("2.0"));
    let mut sb = created(esp, &r1);
    sb.mark_unbootable(B).expect("mark b");
    sb.stage(B, "2.0", &r2.kernel(), None).expect("stage b");
    sb.arm_trial(B, 3).expect("arm b");
    assert_eq!(boot(esp), B);
    sb.commit(B).expect("commit b");
    // The gate's boot sets the guard: one rename, the rank kept.
    assert!(sb.guard_default(B, 3).expect("guard"));
    assert_eq!(
        entries(esp),
        [
            "update-agent-1-a-1.0.conf",
            "update-agent-2-b-2.0@default+3.conf"
        ]
    );
    let st = sb.status().expect("status");
    assert_eq!(
        (st.default, st.trial, st.default_boots_left),
        (B, None, Some(3))
    );
    // A boot that reaches the agent: counted by the loader, set back by the agent.
    assert_eq!(boot(esp), B);
    assert_eq!(sb.status().expect("status").default_boots_left, Some(2));
    sb.guard_default(B, 3).expect("guard again");
    let before = snapshot(esp);
    assert!(matches!(
        sb.guard_default(A, 3),
        Err(BootError::Refused { .. })
    ));
    assert_eq!(snapshot(esp), before, "a refusal changes nothing");
    assert_eq!(sb.status().expect("status").default_boots_left, Some(3));
    // systemd-bless-boot, where it runs (a boot nothing judged): the counter dropped,
    // the mark kept; unguarded until the agent sets it again.
    assert_eq!(boot(esp), B);
    let dir = esp.join(ENTRIES_DIR);
    let counted = "update-agent-2-b-2.0@default+2-1.conf";
    fs::rename(dir.join(counted), dir.join(bless_boot(counted))).expect("bless");
    assert_eq!(bless_boot(counted), "update-agent-2-b-2.0@default.conf");
    let st = sb.status().expect("status");
    assert_eq!((st.default, st.default_boots_left), (B, None));
    sb.guard_default(B, 3).expect("guard after bless");
    assert_eq!(sb.status().expect("status").default_boots_left, Some(3));
    // A staging into a: the guarded default stays, a goes and comes back as a trial.
    sb.mark_unbootable(A).expect("mark a");
    assert_eq!(status(&sb), (B, None, [false, true]));
    let unchanged = snapshot(esp);
    assert!(matches!(
        sb.mark_unbootable(B),
        Err(BootError::Refused { .. })
    ));
    assert_eq!(snapshot(esp), unchanged);
    sb.stage(A, "1.0", &r1.kernel(), None).expect("stage a");
    sb.rollback_to(A).expect_err("a staged slot is no entry");
    // Back to the two slots: 1.0 committed in a, then a manual rollback to b leaves a
    // blessed below it; then three boots of b that never reach the agent.
    sb.arm_trial(A, 1).expect("arm a");
    assert_eq!(boot(esp), A);
    sb.commit(A).expect("commit a");
    sb.rollback_to(B).expect("back to b");
    sb.guard_default(B, 3).expect("guard b");
    for left in [2, 1] {
        assert_eq!(boot(esp), B);
        let st = sb.status().expect("status");
        assert_eq!((st.default, st.default_boots_left), (B, Some(left)));
    }
    // The last boot: the names already say a, as after the fallback; an agent that
    // runs in it (on b) sets b's guard back, and b stays.
    assert_eq!(boot(esp), B);
    let st = sb.status().expect("status");
    assert_eq!((st.default, st.fell_back_from), (A, Some(B)));
    sb.guard_default(B, 3).expect("guard b in its last boot");
    let st = sb.status().expect("status");
    assert_eq!(
        (st.default, st.fell_back_from, st.default_boots_left),
        (B, None, Some(3))
    );
    // Then three boots that never reach the agent.
    for left in [2, 1, 0] {
        assert_eq!(boot(esp), B);
        assert_eq!(
            sb.status().expect("status").default_boots_left.unwrap_or(0),
            left
        );
    }
    // Run out: the loader sorts b last and boots a; status says b fell over.
    assert_eq!(boot(esp), A);
    let st = sb.status().expect("status");
    assert_eq!(
        (st.default, st.fell_back_from, st.default_boots_left),
        (A, Some(B), None)
    );
    // What the agent on a does: a made the default, b unbootable, a guarded.
    sb.rollback_to(A).expect("rollback to a");
    sb.mark_unbootable(B).expect("mark b");
    sb.guard_default(A, 3).expect("guard a");
    let st = sb.status().expect("status");
    assert_eq!(
        (
            st.default,
            st.fell_back_from,
            st.default_boots_left,
            st.bootable
        ),
        (A, None, Some(3), [true, false])
    );
    assert_eq!(boot(esp), A);
    // Off: a plain blessed entry again, ranked first.
    sb.guard_default(A, 0).expect("off");
    let st = sb.status().expect("status");
    assert_eq!((st.default, st.default_boots_left), (A, None));
    assert!(entries(esp).iter().all(|n| !n.contains("@default")));
}
