//! Tests of `state.rs`: reading a set of names and planning transitions on it.

use crate::boot::systemd_boot::state::{apply_ops, EspState, Op};
use crate::boot::systemd_boot::test_util::{
    bless_boot, boot_order, entry, guarded, owned, st, state, summary, Counted, Summary, A, B,
};
use crate::boot::BootError;

#[test]
fn state_from_names() {
    let cases: &[(&[&str], Summary)] = &[
        (&["update-agent-1-a-1.0.conf"], (A, None, [true, false])),
        (&["update-agent-1-b-1.0.conf"], (B, None, [false, true])),
        // Both blessed: the higher rank is the default.
        (
            &["update-agent-1-a-1.conf", "update-agent-2-b-2.conf"],
            (B, None, [true, true]),
        ),
        (
            &["update-agent-9-a-1.conf", "update-agent-2-b-2.conf"],
            (A, None, [true, true]),
        ),
        // A trial, as armed and part used.
        (
            &["update-agent-1-a-1.conf", "update-agent-2-b-2+3.conf"],
            (A, Some((B, 3)), [true, true]),
        ),
        (
            &["update-agent-1-a-1.conf", "update-agent-2-b-2+0-3.conf"],
            (A, Some((B, 0)), [true, true]),
        ),
        // A counted entry below the default is what a rollback leaves: no trial.
        (
            &["update-agent-3-a-1.conf", "update-agent-2-b-2+1-2.conf"],
            (A, None, [true, true]),
        ),
        (
            &["update-agent-3-a-1.conf", "update-agent-2-b-2+0-3.conf"],
            (A, None, [true, true]),
        ),
        // Staged entries and temporary files are not bootable.
        (
            &[
                "update-agent-1-a-1.conf",
                "update-agent-b-2.staged",
                "update-agent-b.tmp",
            ],
            (A, None, [true, false]),
        ),
        // Foreign names are ignored.
        (
            &["debian.conf", "update-agent-1-a-1.conf", "x+0.conf"],
            (A, None, [true, false]),
        ),
    ];
    for (names, want) in cases {
        assert_eq!(summary(&st(names)), *want, "{names:?}");
    }
    let s = st(&[
        "update-agent-1-a-1.conf",
        "update-agent-b-2.staged",
        "update-agent-b.tmp",
    ]);
    assert_eq!(s.staged(B), Some("2"));
    assert!(s.has_temp(B) && !s.has_temp(A));
    assert_eq!(
        s.names(),
        ["update-agent-1-a-1.conf", "update-agent-b-2.staged"]
    );
}

#[test]
fn inconsistent_sets_are_malformed() {
    let cases: &[(&[&str], &str)] = &[
        // Two names of one entry that no torn rename of ours leaves: other versions,
        // equal ranks with counters on both, three names.
        (
            &["update-agent-1-a-1.conf", "update-agent-2-a-2.conf"],
            "two entries",
        ),
        (
            &["update-agent-1-a-1+3.conf", "update-agent-1-a-1+2-1.conf"],
            "two entries",
        ),
        (
            &[
                "update-agent-1-a-1.conf",
                "update-agent-2-a-1.conf",
                "update-agent-3-a-1.conf",
            ],
            "two entries",
        ),
        (
            &["update-agent-1-a-1.conf", "update-agent-1-b-2.conf"],
            "same rank",
        ),
        (
            &["update-agent-1-a-1.conf", "update-agent-a-2.staged"],
            "both an entry and a staged",
        ),
        (
            &["update-agent-b-1.staged", "update-agent-b-2.staged"],
            "two staged",
        ),
    ];
    for (names, want) in cases {
        match state(names) {
            Err(e) => assert!(e.what.contains(want), "{names:?}: {}", e.what),
            Ok(s) => panic!("{names:?}: accepted as {s:?}"),
        }
    }
    // Valid names, but nothing to fall back to.
    for names in [
        &[][..],
        &["update-agent-b-1.staged"][..],
        &["update-agent-2-b-2+3.conf"][..],
        &["update-agent-1-a-1+1-2.conf", "update-agent-2-b-2+3.conf"][..],
    ] {
        let s = st(names);
        assert!(s.status(String::new()).is_err(), "{names:?}");
        assert!(s
            .default_entry()
            .expect_err("no default")
            .what
            .contains("nothing to fall back to"));
        assert!(
            s.mark_unbootable(B).is_err() && s.arm_trial(B, 1).is_err() && s.commit(A).is_err()
        );
    }
}

pub(super) fn refusal(res: Result<Vec<Op>, BootError>) -> String {
    match res {
        Err(e @ BootError::Refused { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub(super) fn ren(from: &str, to: &str) -> Op {
    Op::Rename {
        from: from.into(),
        to: to.into(),
    }
}

#[test]
fn transitions_plan_one_rename() {
    let a1 = "update-agent-1-a-1.conf";
    let b_staged = "update-agent-b-2.staged";

    let s = st(&[a1, b_staged, "update-agent-b.tmp"]);
    assert_eq!(
        s.arm_trial(B, 3).expect("arm"),
        [ren(b_staged, "update-agent-2-b-2+3.conf")]
    );
    assert_eq!(
        s.mark_unbootable(B).expect("mark"),
        [
            Op::Remove(b_staged.into()),
            Op::Remove("update-agent-b.tmp".into())
        ]
    );
    assert!(refusal(s.mark_unbootable(A)).contains("default slot"));
    assert!(refusal(s.arm_trial(A, 3)).contains("default slot"));
    assert!(refusal(s.arm_trial(B, 0)).contains("1 to 9"));
    assert!(refusal(s.arm_trial(B, 10)).contains("1 to 9"));
    assert!(refusal(s.commit(B)).contains("marked unbootable"));
    assert!(refusal(s.rollback_to(B)).contains("marked unbootable"));
    assert_eq!(s.commit(A).expect("commit default"), []);
    assert_eq!(s.rollback_to(A).expect("rollback to default"), []);

    let s = st(&[a1]);
    assert!(refusal(s.arm_trial(B, 3)).contains("nothing is staged"));
    assert_eq!(s.mark_unbootable(B).expect("nothing to do"), []);

    // A trial in progress.
    let t = "update-agent-2-b-2+1-2.conf";
    let s = st(&[a1, t]);
    // commit = systemd-bless-boot good.
    assert_eq!(s.commit(B).expect("commit"), [ren(t, &bless_boot(t))]);
    assert_eq!(bless_boot(t), "update-agent-2-b-2.conf");
    // Rolling back raises the old entry above the trial, which stays as it is.
    assert_eq!(
        s.rollback_to(A).expect("rollback"),
        [ren(a1, "update-agent-3-a-1.conf")]
    );
    // commit of the default ends the trial the same way.
    assert_eq!(
        s.commit(A).expect("commit a"),
        [ren(a1, "update-agent-3-a-1.conf")]
    );
    // Re-arming keeps the rank, resets the counter.
    assert_eq!(
        s.arm_trial(B, 5).expect("re-arm"),
        [ren(t, "update-agent-2-b-2+5.conf")]
    );
    assert_eq!(
        st(&[a1, "update-agent-2-b-2+5.conf"])
            .arm_trial(B, 5)
            .expect("same"),
        []
    );
    assert_eq!(s.mark_unbootable(B).expect("mark"), [Op::Remove(t.into())]);

    // After a rollback: the old trial can be armed again (raised), or committed
    // (raised and blessed in one rename).
    let s = st(&["update-agent-3-a-1.conf", t]);
    assert_eq!(
        s.arm_trial(B, 2).expect("arm"),
        [ren(t, "update-agent-4-b-2+2.conf")]
    );
    assert_eq!(
        s.commit(B).expect("commit"),
        [ren(t, "update-agent-4-b-2.conf")]
    );
    assert_eq!(s.rollback_to(A).expect("nothing to do"), []);

    // After a commit: a manual rollback raises the older release.
    let s = st(&[a1, "update-agent-2-b-2.conf"]);
    assert_eq!(
        s.rollback_to(A).expect("rollback"),
        [ren(a1, "update-agent-3-a-1.conf")]
    );
    assert!(refusal(s.mark_unbootable(B)).contains("default slot"));
    assert_eq!(s.mark_unbootable(A).expect("mark"), [Op::Remove(a1.into())]);

    // The rank cannot overflow.
    let s = st(&[
        "update-agent-4294967295-a-1.conf",
        "update-agent-b-2.staged",
    ]);
    assert!(matches!(
        s.arm_trial(B, 1),
        Err(BootError::Malformed { .. })
    ));
}

/// Every state the naming can produce with two entries, ranks 1..=3.
fn all_states() -> Vec<Vec<String>> {
    let counters = [
        None,
        Some((3, None)),
        Some((2, Some(1))),
        Some((0, Some(3))),
    ];
    // Plain and guarded names (the guard's counter counts boots of a default).
    let kinds = [
        entry as fn(u32, _, &str, Counted) -> String,
        guarded as fn(u32, _, &str, Counted) -> String,
    ];
    let mut out = Vec::new();
    for ra in 1..=3 {
        for ca in counters {
            for ka in kinds {
                out.push(vec![ka(ra, A, "1", ca)]);
                for rb in (1..=3).filter(|&r| r != ra) {
                    for cb in counters {
                        for kb in kinds {
                            out.push(vec![ka(ra, A, "1", ca), kb(rb, B, "2", cb)]);
                        }
                    }
                }
            }
        }
    }
    out.into_iter()
        .filter(|n| {
            EspState::from_names(n.iter().map(String::as_str))
                .expect("valid names")
                .default_entry()
                .is_ok()
        })
        .collect()
}

#[test]
fn pure_layer_agrees_with_systemd_boot_order() {
    let states = all_states();
    assert!(states.len() > 300, "{}", states.len());
    for names in states {
        let s = EspState::from_names(names.iter().map(String::as_str)).expect("valid");
        let order = boot_order(&names);
        assert_eq!(
            order[0],
            s.first().expect("first").file_name(),
            "{names:?} {order:?}"
        );
        // And with foreign entries that sort after ours, still ours first (but when
        // all of ours ran out: then systemd-boot boots a foreign entry).
        if !s.first().expect("first").has_tries() {
            continue;
        }
        let mut with = names.clone();
        with.extend(owned(&["debian-6.1.conf", "arch.conf", "zz+0-1.conf"]));
        assert_eq!(boot_order(&with)[0], order[0]);
    }
}

#[test]
fn every_step_of_every_transition_keeps_a_bootable_default() {
    let mut states = all_states();
    states.push(owned(&[
        "update-agent-1-a-1.conf",
        "update-agent-b-2.staged",
        "update-agent-b.tmp",
    ]));
    for names in states {
        let s = EspState::from_names(names.iter().map(String::as_str)).expect("valid");
        for slot in [A, B] {
            let plans = [
                ("mark_unbootable", s.mark_unbootable(slot)),
                ("arm_trial", s.arm_trial(slot, 3)),
                ("commit", s.commit(slot)),
                ("rollback_to", s.rollback_to(slot)),
                (
                    "guard_default",
                    s.guard_default(s.default_entry().expect("default").slot, 3),
                ),
            ];
            for (what, plan) in plans {
                let Ok(ops) = plan else { continue };
                // A power cut after any step leaves a tree that reads and boots our default
                // or the slot being made bootable.
                for n in 0..=ops.len() {
                    let after = apply_ops(&names, &ops[..n]);
                    let s2 = EspState::from_names(after.iter().map(String::as_str))
                        .unwrap_or_else(|e| panic!("{names:?} {what}({slot}) step {n}: {e:?}"));
                    let first = s2
                        .first()
                        .unwrap_or_else(|e| panic!("{names:?} {what}({slot}) step {n}: {e:?}"));
                    assert_eq!(boot_order(&after)[0], first.file_name());
                }
                let end = apply_ops(&names, &ops);
                let s2 = EspState::from_names(end.iter().map(String::as_str)).expect("valid");
                let (default, trial, bootable) = summary(&s2);
                match what {
                    "mark_unbootable" => assert!(!bootable[slot.index()]),
                    "arm_trial" => assert_eq!(trial, Some((slot, 3)), "{names:?}"),
                    "guard_default" => {
                        let before = s.status(String::new()).expect("status");
                        let after = s2.status(String::new()).expect("status");
                        assert_eq!((after.default, after.trial), (before.default, before.trial));
                        assert_eq!(after.default_boots_left, Some(3), "{names:?}");
                    }
                    _ => assert_eq!((default, trial), (slot, None), "{names:?} {what}"),
                }
                // The other slot stays as it was, unless it was the one marked.
                if what != "mark_unbootable" {
                    let o = slot.other().index();
                    assert_eq!(bootable[o], s.entry(slot.other()).is_some());
                }
            }
        }
    }
}

/// A rename torn by a power cut on vfat leaves both names (VM lab scenario 5: a cut in
/// the commit left `…-9-a-6.0.conf` and `…-9-a-6.0+2-1.conf`). The target is read as
/// the entry, the other name is kept as stale and never removed (it shares the
/// entry's clusters), and only `mark_unbootable` of that slot is refused.
#[test]
fn a_torn_rename_reads_as_its_target() {
    // A torn commit (the counter dropped, rank kept).
    let s = st(&[
        "update-agent-8-b-2.0.conf",
        "update-agent-9-a-6.0+2-1.conf",
        "update-agent-9-a-6.0.conf",
    ]);
    assert_eq!(summary(&s), (A, None, [true, true]));
    assert_eq!(s.stale(A), Some("update-agent-9-a-6.0+2-1.conf"));
    assert_eq!(s.stale(B), None);
    assert!(s.commit(A).expect("commit").is_empty(), "already done");
    assert!(s
        .names()
        .contains(&"update-agent-9-a-6.0+2-1.conf".to_owned()));
    // A torn arm (the staged file renamed to its counted entry): the entry is read,
    // the staged name is stale; the slot's trial is on.
    let s = st(&[
        "update-agent-1-a-1.0.conf",
        "update-agent-2-b-2.0+3.conf",
        "update-agent-b-2.0.staged",
    ]);
    assert_eq!(summary(&s), (A, Some((B, 3)), [true, true]));
    assert_eq!(s.stale(B), Some("update-agent-b-2.0.staged"));
    assert_eq!(s.staged(B), None);
    // A torn re-rank (rollback_to or commit of a lower entry): the higher rank wins,
    // and the slot can still be made the default or armed, never emptied.
    let names = owned(&[
        "update-agent-1-a-1.conf",
        "update-agent-2-a-1.conf",
        "update-agent-3-b-2.conf",
    ]);
    let s = st(&names.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(summary(&s), (B, None, [true, true]));
    assert_eq!(s.stale(A), Some("update-agent-1-a-1.conf"));
    match s.mark_unbootable(A) {
        Err(BootError::Refused { why, .. }) => assert!(why.contains("fsck.vfat"), "{why}"),
        other => panic!("mark_unbootable of a slot with a stale name: {other:?}"),
    }
    let ops = s.rollback_to(A).expect("rollback");
    let after = st(&apply_ops(&names, &ops)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(summary(&after), (A, None, [true, true]));
    assert_eq!(after.stale(A), Some("update-agent-1-a-1.conf"));
    // The other slot is not held back.
    assert!(st(&[
        "update-agent-1-a-1.conf",
        "update-agent-2-a-1.conf",
        "update-agent-3-b-2.conf"
    ])
    .mark_unbootable(A)
    .is_err());
}
