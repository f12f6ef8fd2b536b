//! The table: every scenario, step by step, with what both backends must observe
//! (or, where they legitimately differ, what each does and why).

use crate::slots::Slot;

use super::{Expect, Obs, Outcome, St, Step, A, B};

pub(super) struct Scenario {
    pub(super) name: &'static str,
    pub(super) steps: Vec<(Step, Expect)>,
}

pub(super) const T: bool = true;
pub(super) const F: bool = false;
/// Default a, no trial, b not bootable: where every scenario starts.
pub(super) const A_ONLY: St = (A, None, [T, F]);
pub(super) const A_BOTH: St = (A, None, [T, T]);
pub(super) const B_BOTH: St = (B, None, [T, T]);
pub(super) const B_ONLY: St = (B, None, [F, T]);

/// Default a, b on trial with `left` tries.
pub(super) const fn trial_b(left: u8) -> St {
    (A, Some((B, left)), [T, T])
}

/// Default b, a on trial with `left` tries.
pub(super) const fn trial_a(left: u8) -> St {
    (B, Some((A, left)), [T, T])
}

pub(super) const ARM: &str = "arm a trial of";
pub(super) const MARK: &str = "mark unbootable";
pub(super) const COMMIT: &str = "commit";
pub(super) const ROLLBACK: &str = "roll back to";
pub(super) const IS_DEFAULT: &str = "it is the default slot";
pub(super) const TRIES: &str = "tries must be 1 to 9";
pub(super) const UNBOOTABLE: &str = "it is marked unbootable";
pub(super) const NOTHING_STAGED: &str = "nothing is staged for it";

/// After a fallback: GRUB cleared the trial, systemd-boot's `+0-N` entry still reads
/// as the trial with 0 tries left.
pub(super) const FELL_BACK: &str =
    "after the loader fell back, GRUB's script has cleared ua_trial; \
    systemd-boot only renames counters, so the +0 entry still ranks above the default \
    and reads as trial (b, 0) until the agent's next call";
/// A guarded default that ran out of boots: where each backend says the default is.
pub(super) const GUARD_FELL_BACK: &str = "after the guarded default ran out, GRUB's \
    ua_default still names it (ua_fallen says the loader left it), while systemd-boot's \
    default is the entry it boots instead, the other slot's";
/// The guarded default's last boot: systemd-boot's names already say it fell back.
pub(super) const GUARD_LAST_BOOT: &str = "in the guarded default's last boot, \
    systemd-boot has renamed its entry to +0, which the loader will skip, so the names \
    already read as fallen back to the other slot; GRUB's ua_boots=0 is only acted on \
    at the next boot";
/// Arming a slot emptied by mark_unbootable without installing a release first.
pub(super) const NO_STAGE: &str = "mark_unbootable removed b's systemd-boot entry and nothing is \
    staged, so systemd-boot has nothing to arm; GRUB's ua_b_ok has no such precondition";

pub(super) fn ok(status: St) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Done,
        status,
        fell_back_from: None,
    })
}

pub(super) fn booted(slot: Slot, status: St) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Booted(slot),
        status,
        fell_back_from: None,
    })
}

/// A boot of `slot` after the loader gave up on the guarded default `from`.
pub(super) fn booted_after_falling_back(slot: Slot, status: St, from: Slot) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Booted(slot),
        status,
        fell_back_from: Some(from),
    })
}

pub(super) fn refused(action: &'static str, why: &'static str, status: St) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Refused { action, why },
        status,
        fell_back_from: None,
    })
}

/// A step where the backends legitimately differ: each one's expectation, and why.
pub(super) fn differ(why: &'static str, grub: Expect, systemd_boot: Expect) -> Expect {
    let (Expect::Both(grub), Expect::Both(systemd_boot)) = (grub, systemd_boot) else {
        panic!("differ takes two plain expectations");
    };
    Expect::Differ {
        why,
        grub,
        systemd_boot,
    }
}

pub(super) fn scenarios() -> Vec<Scenario> {
    let mut all = committed();
    all.extend(fell_back());
    all.extend(cancelled());
    all.extend(illegal());
    all.extend(kexec());
    all.extend(guarded());
    all
}

/// The committed default's guard: boots that never reach the agent count it down,
/// and at 0 the loader boots the other slot; a boot that reaches the agent sets it
/// back; a rollback ends it.
fn guarded() -> Vec<Scenario> {
    use Step::{Boot, GuardDefault as Guard, MarkUnbootable as Mark, RollbackTo};
    const GUARD: &str = "guard the boots of";
    vec![
        Scenario {
            name: "a guarded default set back by every boot that reaches the agent",
            steps: b_committed()
                .into_iter()
                .chain([
                    (
                        Guard(A, 3),
                        refused(GUARD, "it is not the default slot", B_BOTH),
                    ),
                    (Guard(B, 10), refused(GUARD, "boots must be 0 to 9", B_BOTH)),
                    (Guard(B, 3), ok(B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Guard(B, 3), ok(B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Guard(B, 3), ok(B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    // No guard: boots for good.
                    (Guard(B, 0), ok(B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                ])
                .collect(),
        },
        Scenario {
            name: "a guarded default that stops booting: the other slot boots, rolled back to",
            steps: b_committed()
                .into_iter()
                .chain([
                    (Guard(B, 3), ok(B_BOTH)),
                    // Three boots of b that never reach the agent.
                    (Boot, booted(B, B_BOTH)),
                    (Boot, booted(B, B_BOTH)),
                    (
                        Boot,
                        differ(
                            GUARD_LAST_BOOT,
                            booted(B, B_BOTH),
                            booted_after_falling_back(B, A_BOTH, B),
                        ),
                    ),
                    (
                        Boot,
                        differ(
                            GUARD_FELL_BACK,
                            booted_after_falling_back(A, B_BOTH, B),
                            booted_after_falling_back(A, A_BOTH, B),
                        ),
                    ),
                    // The agent on a rolls back and marks b.
                    (RollbackTo(A), ok(A_BOTH)),
                    (Mark(B), ok(A_ONLY)),
                    (Boot, booted(A, A_ONLY)),
                    (Boot, booted(A, A_ONLY)),
                ])
                .collect(),
        },
    ]
}

/// b staged, tried once and committed: where the guard scenarios start.
fn b_committed() -> Vec<(Step, Expect)> {
    use Step::{Arm, Boot, Commit, Install, MarkUnbootable as Mark};
    vec![
        (Mark(B), ok(A_ONLY)),
        (Install(B), ok(A_ONLY)),
        (Arm(B, 3), ok(trial_b(3))),
        (Boot, booted(B, trial_b(2))),
        (Commit(B), ok(B_BOTH)),
    ]
}

/// Trials booted by kexec: the agent counts the try down itself, and what follows
/// (firmware boots after a panic or a hang) counts on from there.
fn kexec() -> Vec<Scenario> {
    use Step::{Arm, Boot, Commit, ConsumeTry as Kexec, Install, MarkUnbootable as Mark};
    const COUNT: &str = "count a try of";
    vec![
        Scenario {
            name: "a kexec trial is counted like a firmware one and committed",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 3), ok(trial_b(3))),
                (
                    Kexec(A),
                    refused(COUNT, "it is not the armed trial", trial_b(3)),
                ),
                (Kexec(B), ok(trial_b(2))),
                (Commit(B), ok(B_BOTH)),
                (
                    Kexec(B),
                    refused(COUNT, "it is not the armed trial", B_BOTH),
                ),
                (Boot, booted(B, B_BOTH)),
            ],
        },
        Scenario {
            name: "a kexec trial that panics: firmware boots count on, then fall back",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 2), ok(trial_b(2))),
                (Kexec(B), ok(trial_b(1))),
                (Boot, booted(B, trial_b(0))),
                (Kexec(B), refused(COUNT, "it has no try left", trial_b(0))),
                (
                    Boot,
                    differ(FELL_BACK, booted(A, A_BOTH), booted(A, trial_b(0))),
                ),
            ],
        },
    ]
}

/// Trials that end committed.
fn committed() -> Vec<Scenario> {
    use Step::{Arm, Boot, Commit, Install, MarkUnbootable as Mark, RollbackTo};
    vec![
        Scenario {
            name: "healthy trial is committed and boots for good",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 3), ok(trial_b(3))),
                (Boot, booted(B, trial_b(2))),
                (Commit(B), ok(B_BOTH)),
                (Boot, booted(B, B_BOTH)),
                (Boot, booted(B, B_BOTH)),
                (Boot, booted(B, B_BOTH)),
                // Committing again changes nothing.
                (Commit(B), ok(B_BOTH)),
                (Boot, booted(B, B_BOTH)),
            ],
        },
        Scenario {
            name: "roles swapped: the next update goes into a",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 2), ok(trial_b(2))),
                (Boot, booted(B, trial_b(1))),
                (Commit(B), ok(B_BOTH)),
                (Mark(A), ok(B_ONLY)),
                (Boot, booted(B, B_ONLY)),
                (Install(A), ok(B_ONLY)),
                (Arm(A, 2), ok(trial_a(2))),
                (Boot, booted(A, trial_a(1))),
                (RollbackTo(B), ok(B_BOTH)),
                (Boot, booted(B, B_BOTH)),
                // A manual rollback to the older release, still bootable.
                (RollbackTo(A), ok(A_BOTH)),
                (Boot, booted(A, A_BOTH)),
            ],
        },
    ]
}

/// Trials that fail: the tries run out, or the health checks roll back.
fn fell_back() -> Vec<Scenario> {
    use Step::{Arm, Boot, Commit, Install, MarkUnbootable as Mark, RollbackTo};
    vec![
        Scenario {
            name: "a trial that never comes up uses its tries and falls back to a",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 3), ok(trial_b(3))),
                (Boot, booted(B, trial_b(2))),
                (Boot, booted(B, trial_b(1))),
                // The last try: the boot running now.
                (Boot, booted(B, trial_b(0))),
                // The fallback. In both, b still reads bootable: neither bootloader
                // marks a failed slot; the agent does (below).
                (
                    Boot,
                    differ(FELL_BACK, booted(A, A_BOTH), booted(A, trial_b(0))),
                ),
                (
                    Boot,
                    differ(FELL_BACK, booted(A, A_BOTH), booted(A, trial_b(0))),
                ),
                // The agent on a records the rollback and makes it final.
                (RollbackTo(A), ok(A_BOTH)),
                (Boot, booted(A, A_BOTH)),
                (Mark(B), ok(A_ONLY)),
                (Boot, booted(A, A_ONLY)),
            ],
        },
        Scenario {
            name: "health check fails during the trial: rollback_to a, then b re-armed",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 3), ok(trial_b(3))),
                (Boot, booted(B, trial_b(2))),
                (RollbackTo(A), ok(A_BOTH)),
                (Boot, booted(A, A_BOTH)),
                (Boot, booted(A, A_BOTH)),
                // b still holds its release and is bootable: it can be tried again.
                (Arm(B, 2), ok(trial_b(2))),
                (Boot, booted(B, trial_b(1))),
                (Commit(B), ok(B_BOTH)),
                (Boot, booted(B, B_BOTH)),
            ],
        },
        Scenario {
            name: "one try fails, the same release is re-armed and passes",
            steps: vec![
                (Mark(B), ok(A_ONLY)),
                (Install(B), ok(A_ONLY)),
                (Arm(B, 1), ok(trial_b(1))),
                (Boot, booted(B, trial_b(0))),
                (
                    Boot,
                    differ(FELL_BACK, booted(A, A_BOTH), booted(A, trial_b(0))),
                ),
                (Arm(B, 2), ok(trial_b(2))),
                (Boot, booted(B, trial_b(1))),
                (Commit(B), ok(B_BOTH)),
                (Boot, booted(B, B_BOTH)),
            ],
        },
    ]
}

/// A trial cancelled before its boot.
fn cancelled() -> Vec<Scenario> {
    use Step::{Arm, Boot, Commit, Install, MarkUnbootable as Mark};
    vec![Scenario {
        name: "trial cancelled with mark_unbootable, then a new release armed",
        steps: vec![
            (Mark(B), ok(A_ONLY)),
            (Install(B), ok(A_ONLY)),
            (Arm(B, 3), ok(trial_b(3))),
            (Boot, booted(B, trial_b(2))),
            (Mark(B), ok(A_ONLY)),
            (Boot, booted(A, A_ONLY)),
            // Arming without writing a release first.
            (
                Arm(B, 2),
                differ(
                    NO_STAGE,
                    ok(trial_b(2)),
                    refused(ARM, NOTHING_STAGED, A_ONLY),
                ),
            ),
            // Both back in the same state.
            (Mark(B), ok(A_ONLY)),
            (Boot, booted(A, A_ONLY)),
            (Install(B), ok(A_ONLY)),
            (Arm(B, 2), ok(trial_b(2))),
            (Boot, booted(B, trial_b(1))),
            (Boot, booted(B, trial_b(0))),
            // Healthy on the last try.
            (Commit(B), ok(B_BOTH)),
            (Boot, booted(B, B_BOTH)),
        ],
    }]
}

/// Moves the contract forbids.
fn illegal() -> Vec<Scenario> {
    use Step::{Arm, Boot, Commit, Install, MarkUnbootable as Mark, RollbackTo};
    vec![Scenario {
        name: "illegal moves are refused by both and change nothing",
        steps: vec![
            // Calls that have nothing to do succeed.
            (Commit(A), ok(A_ONLY)),
            (RollbackTo(A), ok(A_ONLY)),
            (Mark(B), ok(A_ONLY)),
            (Arm(A, 3), refused(ARM, IS_DEFAULT, A_ONLY)),
            (Mark(A), refused(MARK, IS_DEFAULT, A_ONLY)),
            (Commit(B), refused(COMMIT, UNBOOTABLE, A_ONLY)),
            (RollbackTo(B), refused(ROLLBACK, UNBOOTABLE, A_ONLY)),
            (Install(B), ok(A_ONLY)),
            (Arm(B, 0), refused(ARM, TRIES, A_ONLY)),
            (Arm(B, 10), refused(ARM, TRIES, A_ONLY)),
            (Arm(B, u8::MAX), refused(ARM, TRIES, A_ONLY)),
            // Written but not armed is not bootable.
            (Commit(B), refused(COMMIT, UNBOOTABLE, A_ONLY)),
            (RollbackTo(B), refused(ROLLBACK, UNBOOTABLE, A_ONLY)),
            (Boot, booted(A, A_ONLY)),
            (Arm(B, 3), ok(trial_b(3))),
            (Arm(A, 1), refused(ARM, IS_DEFAULT, trial_b(3))),
            (Mark(A), refused(MARK, IS_DEFAULT, trial_b(3))),
            (Arm(B, 0), refused(ARM, TRIES, trial_b(3))),
            // Re-arming with the same tries changes nothing.
            (Arm(B, 3), ok(trial_b(3))),
            (Boot, booted(B, trial_b(2))),
            (Arm(B, 10), refused(ARM, TRIES, trial_b(2))),
            (Mark(A), refused(MARK, IS_DEFAULT, trial_b(2))),
            // Re-arming resets the count.
            (Arm(B, 5), ok(trial_b(5))),
            (Commit(B), ok(B_BOTH)),
            (Arm(B, 3), refused(ARM, IS_DEFAULT, B_BOTH)),
            (Mark(B), refused(MARK, IS_DEFAULT, B_BOTH)),
            (Mark(A), ok(B_ONLY)),
            (Commit(A), refused(COMMIT, UNBOOTABLE, B_ONLY)),
            (RollbackTo(A), refused(ROLLBACK, UNBOOTABLE, B_ONLY)),
            (Arm(A, 0), refused(ARM, TRIES, B_ONLY)),
            (Boot, booted(B, B_ONLY)),
        ],
    }]
}
