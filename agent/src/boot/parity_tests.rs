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

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::grub::{Grub, GrubEnv, VAR_A_OK, VAR_B_OK, VAR_DEFAULT, VAR_TRIAL, VAR_TRIES};
use super::systemd_boot::test_util;
use super::systemd_boot::{BootFile, EntryConfig, SystemdBoot};
use super::{BootControl, BootError};
use crate::slots::Slot;

const A: Slot = Slot::A;
const B: Slot = Slot::B;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

// ---------------------------------------------------------------------------------
// Labs.

/// One backend over its own temporary state, with a simulated bootloader.
trait Lab {
    fn name(&self) -> &'static str;
    fn ctl(&mut self) -> &mut dyn BootControl;
    /// What the backend needs once a new release has been written into `slot`, before
    /// it can be armed.
    fn install(&mut self, slot: Slot) -> Result<(), BootError>;
    /// One firmware boot, as the bootloader chooses and counts; the slot it boots.
    fn boot(&mut self) -> Slot;
    /// Every file of the backend's state, for "a refused call changes nothing".
    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>>;
}

/// GRUB over a grubenv made by [`Grub::create`]; boots as
/// `bootloader-hooks/grub/update-agent.cfg` does.
struct GrubLab {
    dir: tempfile::TempDir,
    grub: Grub,
}

impl GrubLab {
    fn new() -> Self {
        let dir = tmp();
        let grub = Grub::create(dir.path().join("grubenv"), A).expect("creating the grubenv");
        Self { dir, grub }
    }
}

/// A variable as the script sees it after `load_env`: missing reads as empty.
fn grub_var(env: &GrubEnv, name: &str) -> String {
    env.get(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// `save_env`: the block written over the same file, in place.
fn save_env(path: &Path, env: &GrubEnv) {
    let block = env.to_bytes().expect("the block fits");
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening the grubenv");
    file.write_all_at(&block, 0).expect("writing the grubenv");
}

/// One boot as `bootloader-hooks/grub/update-agent.cfg` decides it, on the grubenv at
/// `path`: the default is `b` only if `ua_default=b`; a trial runs only on the
/// non-default slot and only if that slot is not marked `0`; `ua_tries` 1..9 is counted
/// down and saved before the trial boots; anything else (0, empty) clears the trial
/// and boots the default. The default boots even when marked `0` (last resort).
fn grub_boot(path: &Path) -> Slot {
    let mut env = GrubEnv::parse(&fs::read(path).expect("reading the grubenv"))
        .expect("a block GRUB can load");
    let default = if grub_var(&env, VAR_DEFAULT) == "b" {
        B
    } else {
        A
    };
    let trial = match grub_var(&env, VAR_TRIAL).as_str() {
        "a" => Some(A),
        "b" => Some(B),
        _ => None,
    };
    let ok = |slot: Slot| grub_var(&env, if slot == A { VAR_A_OK } else { VAR_B_OK }) != "0";
    let Some(trial) = trial.filter(|&t| t != default && ok(t)) else {
        return default;
    };
    let next = match grub_var(&env, VAR_TRIES).as_bytes() {
        &[d @ b'1'..=b'9'] => Some(d - b'1'),
        _ => None,
    };
    match next {
        Some(left) => {
            env.set(VAR_TRIES, &left.to_string()).expect("valid");
            save_env(path, &env);
            trial
        }
        None => {
            env.set(VAR_TRIAL, "").expect("valid");
            env.set(VAR_TRIES, "0").expect("valid");
            save_env(path, &env);
            default
        }
    }
}

impl Lab for GrubLab {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn ctl(&mut self) -> &mut dyn BootControl {
        &mut self.grub
    }

    fn install(&mut self, _slot: Slot) -> Result<(), BootError> {
        // GRUB boots whatever the slot's partition holds: nothing to put anywhere.
        Ok(())
    }

    fn boot(&mut self) -> Slot {
        grub_boot(self.grub.path())
    }

    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        test_util::snapshot(self.dir.path())
    }
}

/// systemd-boot over an ESP made by [`SystemdBoot::create`]; boots as the loader does
/// ([`test_util::boot`]: first entry in its order, counter renamed one try down).
struct SystemdBootLab {
    dir: tempfile::TempDir,
    sb: SystemdBoot,
    /// Releases made so far; each gets its own version and kernel.
    releases: u32,
}

impl SystemdBootLab {
    fn esp(dir: &Path) -> PathBuf {
        dir.join("esp")
    }

    /// A small fake kernel for release `n`, outside the ESP.
    fn kernel(dir: &Path, n: u32) -> (PathBuf, [u8; 32]) {
        let src = dir.join("src");
        fs::create_dir_all(&src).expect("mkdir");
        let path = src.join(format!("vmlinuz-{n}"));
        let bytes = format!("kernel of release {n}\n");
        fs::write(&path, &bytes).expect("writing a fake kernel");
        (path, Sha256::digest(bytes.as_bytes()).into())
    }

    fn new() -> Self {
        let dir = tmp();
        // The ESP is a mount point: it exists.
        fs::create_dir(Self::esp(dir.path())).expect("mkdir esp");
        let (path, sha256) = Self::kernel(dir.path(), 1);
        let kernel = BootFile {
            path: &path,
            sha256,
        };
        let sb = SystemdBoot::create(
            Self::esp(dir.path()),
            EntryConfig::default(),
            A,
            "1",
            &kernel,
            None,
        )
        .expect("creating the ESP");
        Self {
            dir,
            sb,
            releases: 1,
        }
    }
}

impl Lab for SystemdBootLab {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn ctl(&mut self) -> &mut dyn BootControl {
        &mut self.sb
    }

    fn install(&mut self, slot: Slot) -> Result<(), BootError> {
        self.releases += 1;
        let n = self.releases;
        let (path, sha256) = Self::kernel(self.dir.path(), n);
        let kernel = BootFile {
            path: &path,
            sha256,
        };
        self.sb.stage(slot, &n.to_string(), &kernel, None)
    }

    fn boot(&mut self) -> Slot {
        test_util::boot(&Self::esp(self.dir.path()))
    }

    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        test_util::snapshot(&Self::esp(self.dir.path()))
    }
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
    };
    match res {
        Ok(()) => Outcome::Done,
        Err(BootError::Refused { action, why, .. }) => Outcome::Refused { action, why },
        Err(e) => panic!("{}: {step:?} failed: {e}", lab.name()),
    }
}

fn status(lab: &mut dyn Lab) -> St {
    let st = lab
        .ctl()
        .status()
        .unwrap_or_else(|e| panic!("{}: status: {e}", lab.name()));
    (st.default, st.trial, st.bootable)
}

/// Runs `scenario` on `lab`; every step's observation. Checks on the way that a refused
/// step leaves every file as it was.
fn observe(lab: &mut dyn Lab, scenario: &Scenario) -> Vec<Obs> {
    assert_eq!(
        status(lab),
        A_ONLY,
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
        out.push(Obs {
            outcome,
            status: status(lab),
        });
    }
    out
}

// ---------------------------------------------------------------------------------
// The table.

struct Scenario {
    name: &'static str,
    steps: Vec<(Step, Expect)>,
}

const T: bool = true;
const F: bool = false;
/// Default a, no trial, b not bootable: where every scenario starts.
const A_ONLY: St = (A, None, [T, F]);
const A_BOTH: St = (A, None, [T, T]);
const B_BOTH: St = (B, None, [T, T]);
const B_ONLY: St = (B, None, [F, T]);

/// Default a, b on trial with `left` tries.
const fn trial_b(left: u8) -> St {
    (A, Some((B, left)), [T, T])
}

/// Default b, a on trial with `left` tries.
const fn trial_a(left: u8) -> St {
    (B, Some((A, left)), [T, T])
}

const ARM: &str = "arm a trial of";
const MARK: &str = "mark unbootable";
const COMMIT: &str = "commit";
const ROLLBACK: &str = "roll back to";
const IS_DEFAULT: &str = "it is the default slot";
const TRIES: &str = "tries must be 1 to 9";
const UNBOOTABLE: &str = "it is marked unbootable";
const NOTHING_STAGED: &str = "nothing is staged for it";

/// After a fallback: GRUB cleared the trial, systemd-boot's `+0-N` entry still reads
/// as the trial with 0 tries left.
const FELL_BACK: &str = "after the loader fell back, GRUB's script has cleared ua_trial; \
    systemd-boot only renames counters, so the +0 entry still ranks above the default \
    and reads as trial (b, 0) until the agent's next call";
/// Arming a slot emptied by mark_unbootable without installing a release first.
const NO_STAGE: &str = "mark_unbootable removed b's systemd-boot entry and nothing is \
    staged, so systemd-boot has nothing to arm; GRUB's ua_b_ok has no such precondition";

fn ok(status: St) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Done,
        status,
    })
}

fn booted(slot: Slot, status: St) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Booted(slot),
        status,
    })
}

fn refused(action: &'static str, why: &'static str, status: St) -> Expect {
    Expect::Both(Obs {
        outcome: Outcome::Refused { action, why },
        status,
    })
}

/// A step where the backends legitimately differ: each one's expectation, and why.
fn differ(why: &'static str, grub: Expect, systemd_boot: Expect) -> Expect {
    let (Expect::Both(grub), Expect::Both(systemd_boot)) = (grub, systemd_boot) else {
        panic!("differ takes two plain expectations");
    };
    Expect::Differ {
        why,
        grub,
        systemd_boot,
    }
}

fn scenarios() -> Vec<Scenario> {
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
        Scenario {
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
        },
    ]
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
    // The differences are the two in the module docs, nothing more.
    assert_eq!(differences, [FELL_BACK, NO_STAGE].into_iter().collect());
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
        let mut env = GrubEnv::new();
        for (k, v) in vars {
            env.set(k, v).expect("valid");
        }
        fs::write(&path, env.to_bytes().expect("fits")).expect("writing");
        assert_eq!(grub_boot(&path), want, "{vars:?}");
        let after = GrubEnv::parse(&fs::read(&path).expect("reading")).expect("valid");
        assert_eq!(
            (grub_var(&after, VAR_TRIAL), grub_var(&after, VAR_TRIES)),
            (trial.to_owned(), tries.to_owned()),
            "{vars:?}"
        );
    }
}

/// A power cut after `arm_trial` reached the disk and before the state said Armed (VM
/// lab scenario 5): the state still says Staged. On both backends the staged slot then
/// reads as bootable, so the gate takes the release as armed (the bootloader boots it
/// next), and a resumed run does not prepare it again, which systemd-boot would refuse.
#[test]
fn a_cut_between_the_flip_and_the_state_is_recognised() {
    let staged = crate::state::State::Staged(crate::state::Staged {
        attempt: "lab".into(),
        version: "2".into(),
        slot: B,
        target_sha256: String::new(),
        bytes_fetched: 0,
        from_version: Some("1".into()),
    });
    let labs: Vec<Box<dyn Lab>> = vec![Box::new(GrubLab::new()), Box::new(SystemdBootLab::new())];
    for mut lab in labs {
        let name = lab.name();
        let cut = |lab: &mut Box<dyn Lab>| {
            let st = lab.ctl().status().expect("status");
            crate::postboot::armed_before_the_cut(&staged, &st)
        };
        lab.ctl().mark_unbootable(B).expect("mark b unbootable");
        lab.install(B).expect("install b");
        // Staged, not armed yet: not taken as armed; systemd-boot still needs the kernel.
        assert!(!cut(&mut lab), "{name}: staged only");
        let sd = name == "systemd-boot";
        assert_eq!(
            super::needs_prepare(lab.ctl(), B).expect("needs_prepare"),
            sd,
            "{name}: before the flip"
        );
        lab.ctl().arm_trial(B, 3).expect("arm b");
        // The flip is on disk, the state is not: taken as armed, nothing to prepare.
        assert!(cut(&mut lab), "{name}: armed on disk, staged in the state");
        assert!(
            !super::needs_prepare(lab.ctl(), B).expect("needs_prepare"),
            "{name}: after the flip"
        );
        if sd {
            // What the resumed run did before the fix: stage over the entry, refused.
            assert!(
                matches!(lab.install(B), Err(BootError::Refused { .. })),
                "{name}: staging over an armed entry"
            );
        }
        // The next boot is the trial, whatever the state says.
        assert_eq!(lab.boot(), B, "{name}: the trial boots");
        assert!(cut(&mut lab), "{name}: during the trial");
    }
}
