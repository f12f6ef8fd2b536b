//! The A/B rules: each transition byte-identical to grub-editenv, refusals that
//! write nothing, variables that are garbage or missing.

use super::*;
use std::os::unix::fs::MetadataExt;

/// One transition and the five variables grub-editenv must set to make the same block.
type Step = (
    &'static str,
    fn(&mut Grub) -> Result<(), BootError>,
    [&'static str; 5],
);

/// Runs each step on `ours` and checks it is byte-identical to `theirs` after
/// `grub-editenv set` of the step's variables.
fn steps_same_as_editenv(grub: &mut Grub, ours: &Path, theirs: &Path, steps: &[Step]) {
    for (what, step, sets) in steps {
        step(grub).expect(what);
        same_as_editenv(ours, theirs, sets);
    }
}

#[test]
fn transitions_are_byte_identical_to_editenv() {
    let dir = tmp();
    let d = dir.path();
    // A block other tools own: our variables are appended after theirs.
    let theirs = editenv_file(
        d,
        "theirs",
        &[
            "saved_entry=Debian GNU/Linux",
            "next_entry=",
            "boot_success=0",
            "note=back\\slash\nnewline",
        ],
    );
    let ours = d.join("ours");
    copy(&theirs, &ours);
    let mut grub = open(&ours);
    // Nothing set yet: default a, both bootable (missing = 1).
    let first: [Step; 3] = [
        (
            "commit a",
            |g| g.commit(Slot::A),
            [
                "ua_default=a",
                "ua_trial=",
                "ua_tries=0",
                "ua_a_ok=1",
                "ua_b_ok=1",
            ],
        ),
        (
            "mark b",
            |g| g.mark_unbootable(Slot::B),
            [
                "ua_default=a",
                "ua_trial=",
                "ua_tries=0",
                "ua_a_ok=1",
                "ua_b_ok=0",
            ],
        ),
        (
            "arm b",
            |g| g.arm_trial(Slot::B, 3),
            [
                "ua_default=a",
                "ua_trial=b",
                "ua_tries=3",
                "ua_a_ok=1",
                "ua_b_ok=1",
            ],
        ),
    ];
    steps_same_as_editenv(&mut grub, &ours, &theirs, &first);
    // Another tool edits the block between our calls (lines before ours move).
    for file in [&ours, &theirs] {
        editenv(
            file,
            &["set", "saved_entry=a much longer entry name than before"],
        );
        editenv(file, &["unset", "next_entry"]);
    }
    let then: [Step; 2] = [
        (
            "commit b",
            |g| g.commit(Slot::B),
            [
                "ua_default=b",
                "ua_trial=",
                "ua_tries=0",
                "ua_a_ok=1",
                "ua_b_ok=1",
            ],
        ),
        (
            "roll back to a",
            |g| g.rollback_to(Slot::A),
            [
                "ua_default=a",
                "ua_trial=",
                "ua_tries=0",
                "ua_a_ok=1",
                "ua_b_ok=1",
            ],
        ),
    ];
    steps_same_as_editenv(&mut grub, &ours, &theirs, &then);

    // Our variables already there, out of order and among others, with values
    // of other lengths: each is rewritten in place.
    let theirs = editenv_file(
        d,
        "theirs2",
        &[
            "ua_tries=7",
            "saved_entry=x",
            "ua_b_ok=1",
            "ua_trial=b",
            "ua_default=a",
            "foo=bar\\baz",
            "ua_a_ok=1",
        ],
    );
    let ours = d.join("ours2");
    copy(&theirs, &ours);
    let mark_b: [Step; 1] = [(
        "mark b",
        |g| g.mark_unbootable(Slot::B),
        [
            "ua_default=a",
            "ua_trial=",
            "ua_tries=0",
            "ua_a_ok=1",
            "ua_b_ok=0",
        ],
    )];
    steps_same_as_editenv(&mut open(&ours), &ours, &theirs, &mark_b);
}

#[test]
fn create_is_byte_identical_to_editenv() {
    let dir = tmp();
    let ours = dir.path().join("ours");
    let grub = Grub::create(&ours, Slot::B).expect("creating grubenv");
    let theirs = editenv_file(dir.path(), "theirs", &[]);
    same_as_editenv(
        &ours,
        &theirs,
        &[
            "ua_default=b",
            "ua_trial=",
            "ua_tries=0",
            "ua_a_ok=0",
            "ua_b_ok=1",
        ],
    );
    let st = status(&grub);
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::B, None, [false, true])
    );
    assert_eq!(
        st.raw,
        "ua_default=b ua_trial= ua_tries=0 ua_a_ok=0 ua_b_ok=1"
    );
    assert!(
        !dir.path().join("ours.new").exists(),
        "temporary file left behind"
    );
}

#[test]
fn full_cycle() {
    let dir = tmp();
    let path = dir.path().join("grubenv");
    let mut grub = Grub::create(&path, Slot::A).expect("creating grubenv");
    let st = status(&grub);
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::A, None, [true, false])
    );

    grub.mark_unbootable(Slot::B).expect("mark b");
    grub.arm_trial(Slot::B, 3).expect("arm b");
    let st = status(&grub);
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::A, Some((Slot::B, 3)), [true, true])
    );
    assert_eq!(
        st.raw,
        "ua_default=a ua_trial=b ua_tries=3 ua_a_ok=1 ua_b_ok=1"
    );

    // GRUB counts down with save_env; the last try is reported as (b, 0).
    editenv(&path, &["set", "ua_tries=0"]);
    assert_eq!(status(&grub).trial, Some((Slot::B, 0)));

    grub.commit(Slot::B).expect("commit b");
    let st = status(&grub);
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::B, None, [true, true])
    );

    // Next update into a: a trial cut short by mark_unbootable is cleared.
    grub.mark_unbootable(Slot::A).expect("mark a");
    grub.arm_trial(Slot::A, 2).expect("arm a");
    grub.mark_unbootable(Slot::A).expect("mark a again");
    let st = status(&grub);
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::B, None, [false, true])
    );

    // A failed health check: roll back while running the trial; a stays bootable.
    grub.arm_trial(Slot::A, 9).expect("arm a");
    grub.rollback_to(Slot::B).expect("roll back to b");
    let st = status(&grub);
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::B, None, [true, true])
    );
    // And back to a, which is bootable.
    grub.rollback_to(Slot::A).expect("roll back to a");
    assert_eq!(status(&grub).default, Slot::A);
    assert_eq!(grub.name(), "grub");
}

fn refused_with(res: Result<(), BootError>, want: &str) {
    match res {
        Err(e @ BootError::Refused { .. }) => {
            assert!(e.to_string().contains(want), "{e} does not say {want:?}")
        }
        other => panic!("expected a refusal ({want}), got {other:?}"),
    }
}

#[test]
fn illegal_transitions_change_nothing() {
    let dir = tmp();
    let path = dir.path().join("grubenv");
    let mut grub = Grub::create(&path, Slot::A).expect("creating grubenv");
    grub.mark_unbootable(Slot::B).expect("mark b");
    let before = bytes(&path);

    refused_with(grub.mark_unbootable(Slot::A), "default slot");
    refused_with(grub.arm_trial(Slot::A, 3), "default slot");
    refused_with(grub.arm_trial(Slot::B, 0), "1 to 9");
    refused_with(grub.arm_trial(Slot::B, 10), "1 to 9");
    refused_with(grub.arm_trial(Slot::B, u8::MAX), "1 to 9");
    refused_with(grub.commit(Slot::B), "marked unbootable");
    refused_with(grub.rollback_to(Slot::B), "marked unbootable");
    assert_eq!(bytes(&path), before);

    grub.arm_trial(Slot::B, 3).expect("arm b");
    let before = bytes(&path);
    refused_with(grub.mark_unbootable(Slot::A), "default slot");
    refused_with(grub.arm_trial(Slot::A, 1), "default slot");
    refused_with(grub.arm_trial(Slot::B, 0), "1 to 9");
    assert_eq!(bytes(&path), before);

    // A call that changes nothing writes nothing (mtime can only miss a write, not
    // invent one).
    let mtime = |p: &Path| {
        let m = fs::metadata(p).expect("stat");
        (m.mtime(), m.mtime_nsec())
    };
    let before_mtime = mtime(&path);
    grub.arm_trial(Slot::B, 3).expect("arm b again");
    assert_eq!(mtime(&path), before_mtime);
    assert_eq!(bytes(&path), before);
}

#[test]
fn garbage_in_agent_variables_refuses_everything() {
    let dir = tmp();
    for bad in [
        "ua_default=c",
        "ua_default=",
        "ua_default=A",
        "ua_trial=c",
        "ua_trial= a",
        "ua_trial=a",
        "ua_tries=10",
        "ua_tries=x",
        "ua_tries=-1",
        "ua_a_ok=2",
        "ua_b_ok=yes",
        "ua_b_ok=",
        "ua_boots=10",
        "ua_boots=x",
        "ua_fallen=c",
        "ua_fallen=ab",
    ] {
        let path = editenv_file(dir.path(), "grubenv", &["saved_entry=0", bad]);
        let before = bytes(&path);
        let what = match Grub::open(&path) {
            Err(BootError::Malformed { what, .. }) => what,
            other => panic!("{bad}: expected Malformed from open, got {other:?}"),
        };
        let var = bad.split('=').next().expect("name");
        assert!(what.starts_with(var), "{bad}: {what} does not name {var}");
        let mut grub = Grub { path: path.clone() };
        assert!(matches!(grub.status(), Err(BootError::Malformed { .. })));
        let results = [
            grub.mark_unbootable(Slot::B),
            grub.arm_trial(Slot::B, 1),
            grub.commit(Slot::A),
            grub.rollback_to(Slot::A),
        ];
        for res in results {
            assert!(
                matches!(res, Err(BootError::Malformed { .. })),
                "{bad}: {res:?}"
            );
        }
        assert_eq!(bytes(&path), before, "{bad}: file changed");
        fs::remove_file(&path).expect("removing test file");
    }
}

#[test]
fn missing_agent_variables_mean_default_a_no_trial_both_bootable() {
    assert_eq!(
        state(b"saved_entry=1\n").expect("valid"),
        GrubState {
            default: Slot::A,
            trial: None,
            tries: 0,
            ok: [true, true],
            boots: None,
            fallen: None,
        }
    );
    assert_eq!(
        state(b"ua_default=b\nua_trial=\nua_tries=\nua_b_ok=0\n").expect("valid"),
        GrubState {
            default: Slot::B,
            trial: None,
            tries: 0,
            ok: [true, false],
            boots: None,
            fallen: None,
        }
    );
    assert_eq!(
        state(b"ua_trial=b\nua_tries=3\nua_b_ok=0\n"),
        Err(EnvError::Malformed("ua_trial names a slot marked not ok"))
    );
    let st = state(b"ua_trial=b\nua_tries=0\n").expect("valid");
    assert_eq!(st.status(String::new()).trial, Some((Slot::B, 0)));
}

/// The default's guard: set by the agent, counted down and given up on by GRUB (here
/// grub-editenv plays GRUB), and cleared once the agent has chosen a default again.
#[test]
fn guard_of_the_default() {
    let dir = tmp();
    let d = dir.path();
    let theirs = editenv_file(d, "theirs", &["saved_entry=0"]);
    let ours = d.join("ours");
    copy(&theirs, &ours);
    let mut grub = open(&ours);
    grub.commit(Slot::A).expect("commit a");
    let ab = [
        "ua_default=a",
        "ua_trial=",
        "ua_tries=0",
        "ua_a_ok=1",
        "ua_b_ok=1",
    ];
    same_as_editenv(&ours, &theirs, &ab);
    assert_eq!(
        status(&grub).default_boots_left,
        None,
        "no guard until asked"
    );

    assert!(grub.guard_default(Slot::A, 3).expect("guard"));
    same_as_editenv(&ours, &theirs, &["ua_boots=3"]);
    assert_eq!(status(&grub).default_boots_left, Some(3));

    // GRUB gave up on a after its boots ran out and booted b.
    editenv(&ours, &["set", "ua_boots=1", "ua_fallen=a"]);
    copy(&ours, &theirs);
    let st = status(&grub);
    assert_eq!((st.default, st.fell_back_from), (Slot::A, Some(Slot::A)));
    grub.rollback_to(Slot::B).expect("rollback to b");
    // Unguarded until the agent on b guards it: it may not know the guard.
    same_as_editenv(
        &ours,
        &theirs,
        &[
            "ua_default=b",
            "ua_trial=",
            "ua_tries=0",
            "ua_a_ok=1",
            "ua_b_ok=1",
            "ua_boots=",
            "ua_fallen=",
        ],
    );
    assert_eq!(status(&grub).fell_back_from, None);
    grub.mark_unbootable(Slot::A).expect("mark a");
    grub.guard_default(Slot::B, 3).expect("guard b");
    same_as_editenv(
        &ours,
        &theirs,
        &[
            "ua_default=b",
            "ua_trial=",
            "ua_tries=0",
            "ua_a_ok=0",
            "ua_b_ok=1",
            "ua_boots=3",
            "ua_fallen=",
        ],
    );

    let before = bytes(&ours);
    refused_with(
        grub.guard_default(Slot::B, 10).map(|_| ()),
        "boots must be 0 to 9",
    );
    refused_with(
        grub.guard_default(Slot::A, 3).map(|_| ()),
        "not the default slot",
    );
    assert_eq!(bytes(&ours), before);
    grub.guard_default(Slot::B, 0).expect("guard off");
    same_as_editenv(&ours, &theirs, &["ua_boots=", "ua_fallen="]);
    assert_eq!(status(&grub).default_boots_left, None);
}
