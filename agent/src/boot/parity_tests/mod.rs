//! The GRUB and systemd-boot backends produce the same observable results for the same
//! scenarios: one table of scenarios, run against both.
//!
//! Each backend lives in a [`Lab`]: a temporary directory holding its state (a grubenv,
//! an ESP tree), the backend over it, and a simulation of what the bootloader does at
//! each firmware boot. A scenario is a list of steps (the agent's calls, a new release
//! written into a slot, a boot); after every step the table gives what `status()` says
//! (default, trial with tries left, bootable) and, for a boot, the slot that booted.
//!
//! Where the backends legitimately differ the table says so with [`differ`], giving both
//! expectations and the reason; the test also checks that such a difference is real, so
//! the table cannot go on claiming one that has gone away. The differences:
//!
//! * After a trial used up its tries and the loader fell back to the default, GRUB's
//!   script has cleared `ua_trial` (no trial), while systemd-boot only renames
//!   counters, so the `+0-N` entry still ranks above the default and reads as trial
//!   `(slot, 0)` until the agent's `rollback_to`/`commit`/`mark_unbootable`.
//! * `arm_trial` of a slot that `mark_unbootable` emptied, with no new release written
//!   since: GRUB has nothing to check and arms it; systemd-boot refuses, because
//!   `mark_unbootable` removed the slot's entry and nothing is staged.
//! * After a guarded default ran out of boots and the loader booted the other slot,
//!   both say `fell_back_from` the default; GRUB's `ua_default` still names it, while
//!   systemd-boot reads the entry it now boots (the other slot's) as the default. In
//!   the default's last guarded boot, systemd-boot already reads so (its `+0` name
//!   will be skipped), GRUB only once it has booted the other slot.
//!
//! The parts: `labs.rs` the two labs; `table.rs` the scenarios. The power cut between
//! the flip and the state is tested in `postboot` (it asks `postboot`'s rule).

pub(crate) mod labs;
mod table;

use std::fs;

use super::grub::{GrubEnv, VAR_TRIAL, VAR_TRIES};
use super::BootError;
use crate::slots::Slot;

use labs::{grub_boot, grub_var, GrubLab, Lab, SystemdBootLab};
use table::{
    scenarios, Scenario, A_ONLY, FELL_BACK, GUARD_FELL_BACK, GUARD_LAST_BOOT, IS_DEFAULT, NO_STAGE,
    TRIES, UNBOOTABLE,
};

pub(crate) const A: Slot = Slot::A;
pub(crate) const B: Slot = Slot::B;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

// ---------------------------------------------------------------------------------
// Steps and observations.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    MarkUnbootable(Slot),
    /// A new release has been written into the slot (the agent marked it unbootable
    /// first): GRUB needs nothing, systemd-boot stages its kernel and entry.
    Install(Slot),
    Arm(Slot, u8),
    Commit(Slot),
    RollbackTo(Slot),
    /// The agent counts a try of the slot down itself (a kexec boot, which the
    /// bootloader never sees); the kexec itself changes nothing on disk.
    ConsumeTry(Slot),
    /// The agent on the running slot sets the default's guard to `n` boots.
    GuardDefault(Slot, u8),
    /// A firmware boot.
    Boot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Booted(Slot),
    Refused {
        action: &'static str,
        why: &'static str,
    },
}

/// `status()` as `(default, trial, bootable)`.
type St = (Slot, Option<(Slot, u8)>, [bool; 2]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Obs {
    outcome: Outcome,
    status: St,
    /// `status().fell_back_from`: the guarded default the loader gave up on.
    fell_back_from: Option<Slot>,
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Both(Obs),
    /// A legitimate difference between the backends, with the reason.
    Differ {
        why: &'static str,
        grub: Obs,
        systemd_boot: Obs,
    },
}

impl Expect {
    fn for_lab(&self, lab: &str) -> Obs {
        match *self {
            Self::Both(obs) => obs,
            Self::Differ {
                grub, systemd_boot, ..
            } => match lab {
                "grub" => grub,
                "systemd-boot" => systemd_boot,
                other => panic!("no expectation for lab {other}"),
            },
        }
    }
}

fn run_step(lab: &mut dyn Lab, step: Step) -> Outcome {
    let res = match step {
        Step::Boot => return Outcome::Booted(lab.boot()),
        Step::Install(s) => lab.install(s),
        Step::MarkUnbootable(s) => lab.ctl().mark_unbootable(s),
        Step::Arm(s, n) => lab.ctl().arm_trial(s, n),
        Step::Commit(s) => lab.ctl().commit(s),
        Step::RollbackTo(s) => lab.ctl().rollback_to(s),
        Step::ConsumeTry(s) => lab.ctl().consume_try(s).map(drop),
        Step::GuardDefault(s, n) => lab.ctl().guard_default(s, n).map(drop),
    };
    match res {
        Ok(()) => Outcome::Done,
        Err(BootError::Refused { action, why, .. }) => Outcome::Refused { action, why },
        Err(e) => panic!("{}: {step:?} failed: {e}", lab.name()),
    }
}

fn status(lab: &mut dyn Lab) -> (St, Option<Slot>) {
    let st = lab
        .ctl()
        .status()
        .unwrap_or_else(|e| panic!("{}: status: {e}", lab.name()));
    ((st.default, st.trial, st.bootable), st.fell_back_from)
}

/// Runs `scenario` on `lab`; every step's observation. Checks on the way that a refused
/// step leaves every file as it was.
fn observe(lab: &mut dyn Lab, scenario: &Scenario) -> Vec<Obs> {
    assert_eq!(
        status(lab),
        (A_ONLY, None),
        "{}: {}: initial state",
        lab.name(),
        scenario.name
    );
    let mut out = Vec::new();
    for (i, &(step, _)) in scenario.steps.iter().enumerate() {
        let before = lab.snapshot();
        let outcome = run_step(lab, step);
        if let Outcome::Refused { .. } = outcome {
            assert!(
                lab.snapshot() == before,
                "{}: {}: step {i} {step:?} was refused but changed files",
                lab.name(),
                scenario.name
            );
        }
        let (status, fell_back_from) = status(lab);
        out.push(Obs {
            outcome,
            status,
            fell_back_from,
        });
    }
    out
}

// ---------------------------------------------------------------------------------
// The tests.

#[test]
fn both_backends_agree_on_every_scenario() {
    let mut failures = Vec::new();
    let mut differences = std::collections::BTreeSet::new();
    for scenario in scenarios() {
        let mut grub = GrubLab::new();
        let mut sb = SystemdBootLab::new();
        let got_grub = observe(&mut grub, &scenario);
        let got_sb = observe(&mut sb, &scenario);
        for (i, (&(step, expect), (g, s))) in scenario
            .steps
            .iter()
            .zip(got_grub.iter().zip(&got_sb))
            .enumerate()
        {
            let at = format!("{}: step {i} {step:?}", scenario.name);
            for (lab, got) in [(grub.name(), g), (sb.name(), s)] {
                let want = expect.for_lab(lab);
                if *got != want {
                    failures.push(format!("{at}: {lab}: got {got:?}, expected {want:?}"));
                }
            }
            match expect {
                Expect::Both(_) if g != s => {
                    failures.push(format!("{at}: grub {g:?} but systemd-boot {s:?}"));
                }
                Expect::Differ { why, .. } => {
                    differences.insert(why);
                    if g == s {
                        failures.push(format!(
                            "{at}: listed as a difference ({why}) but both observe {g:?}"
                        ));
                    }
                }
                Expect::Both(_) => {}
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // The differences are the four in the module docs, nothing more.
    assert_eq!(
        differences,
        [FELL_BACK, NO_STAGE, GUARD_FELL_BACK, GUARD_LAST_BOOT]
            .into_iter()
            .collect()
    );
}

#[test]
fn the_table_covers_the_contract() {
    use Step::{Arm, Commit, MarkUnbootable, RollbackTo};
    let all: Vec<(Step, Expect)> = scenarios().into_iter().flat_map(|s| s.steps).collect();
    let any = |f: &dyn Fn(Step, Obs) -> bool| {
        all.iter()
            .any(|&(step, e)| matches!(e, Expect::Both(obs) if f(step, obs)))
    };
    fn refused_for(why: &'static str) -> impl Fn(Step, Obs) -> bool {
        move |_, o| matches!(o.outcome, Outcome::Refused { why: w, .. } if w == why)
    }
    assert!(any(
        &|s, o| matches!(s, Arm(..)) && o.outcome == Outcome::Done
    ));
    assert!(any(
        &|s, o| matches!(s, Commit(_)) && o.outcome == Outcome::Done
    ));
    assert!(any(
        &|s, o| matches!(s, RollbackTo(_)) && o.outcome == Outcome::Done
    ));
    assert!(any(
        &|s, o| matches!(s, MarkUnbootable(_)) && o.outcome == Outcome::Done
    ));
    assert!(any(&|_, o| o.outcome == Outcome::Booted(B)));
    assert!(any(&|_, o| o.outcome == Outcome::Booted(A)));
    assert!(any(&refused_for(IS_DEFAULT)));
    assert!(any(&refused_for(TRIES)));
    assert!(any(&refused_for(UNBOOTABLE)));
}

/// One simulated GRUB boot of a grubenv at `path` holding `vars`: it must boot `want`;
/// the block it leaves.
fn boot_grub_with(path: &std::path::Path, vars: &[(&str, &str)], want: Slot) -> GrubEnv {
    let mut env = GrubEnv::new();
    for (k, v) in vars {
        env.set(k, v).expect("valid");
    }
    fs::write(path, env.to_bytes().expect("fits")).expect("writing");
    assert_eq!(grub_boot(path), want, "{vars:?}");
    GrubEnv::parse(&fs::read(path).expect("reading")).expect("valid")
}

/// The GRUB simulation on blocks no transition makes, against what the script does.
#[test]
fn grub_boot_follows_the_script() {
    let dir = tmp();
    let path = dir.path().join("grubenv");
    // (variables set, slot booted, ua_trial and ua_tries afterwards)
    type Case<'a> = (&'a [(&'a str, &'a str)], Slot, &'a str, &'a str);
    let cases: [Case<'_>; 8] = [
        // Nothing set: slot a.
        (&[], A, "", ""),
        (&[("ua_default", "b")], B, "", ""),
        // Anything but "b" means a.
        (&[("ua_default", "c")], A, "", ""),
        // A trial of the default slot is ignored and left alone.
        (&[("ua_trial", "a"), ("ua_tries", "3")], A, "a", "3"),
        // So is a trial of a slot marked 0.
        (
            &[("ua_trial", "b"), ("ua_tries", "3"), ("ua_b_ok", "0")],
            A,
            "b",
            "3",
        ),
        (&[("ua_trial", "b"), ("ua_tries", "9")], B, "b", "8"),
        // No tries, empty or garbage: the trial is cleared, the default boots.
        (&[("ua_trial", "b"), ("ua_tries", "x")], A, "", "0"),
        // The default boots even when marked 0.
        (
            &[("ua_default", "b"), ("ua_b_ok", "0"), ("ua_trial", "a")],
            B,
            "",
            "0",
        ),
    ];
    for (vars, want, trial, tries) in cases {
        let after = boot_grub_with(&path, vars, want);
        assert_eq!(
            (grub_var(&after, VAR_TRIAL), grub_var(&after, VAR_TRIES)),
            (trial.to_owned(), tries.to_owned()),
            "{vars:?}"
        );
    }
}

/// The GRUB simulation's guard, against what the script does with `ua_boots`.
#[test]
fn grub_boot_counts_the_guard_like_the_script() {
    use super::grub::{VAR_BOOTS, VAR_FALLEN};
    let dir = tmp();
    let path = dir.path().join("grubenv");
    // (variables set, slot booted, ua_boots and ua_fallen afterwards)
    type Case<'a> = (&'a [(&'a str, &'a str)], Slot, &'a str, &'a str);
    let cases: [Case<'_>; 5] = [
        // Counted down before the default boots.
        (&[("ua_boots", "2")], A, "1", ""),
        (&[("ua_default", "b"), ("ua_boots", "1")], B, "0", ""),
        // Run out: the other slot boots, and the next boot tries the default again.
        (&[("ua_boots", "0")], B, "1", "a"),
        // ... unless it is marked 0: the default boots, the guard stays at 0.
        (&[("ua_boots", "0"), ("ua_b_ok", "0")], A, "0", ""),
        // A trial boot leaves the default's guard alone.
        (
            &[("ua_boots", "0"), ("ua_trial", "b"), ("ua_tries", "2")],
            B,
            "0",
            "",
        ),
    ];
    for (vars, want, boots, fallen) in cases {
        let after = boot_grub_with(&path, vars, want);
        assert_eq!(
            (grub_var(&after, VAR_BOOTS), grub_var(&after, VAR_FALLEN)),
            (boots.to_owned(), fallen.to_owned()),
            "{vars:?}"
        );
    }
}
