//! After the reboot, on both bootloader backends' labs (`boot::parity_tests::labs`).

use crate::boot::parity_tests::labs::{GrubLab, Lab, SystemdBootLab};
use crate::boot::BootError;
use crate::slots::Slot;

const B: Slot = Slot::B;

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
            super::armed_before_the_cut(&staged, &st)
        };
        lab.ctl().mark_unbootable(B).expect("mark b unbootable");
        lab.install(B).expect("install b");
        // Staged, not armed yet: not taken as armed; systemd-boot still needs the kernel.
        assert!(!cut(&mut lab), "{name}: staged only");
        let sd = name == "systemd-boot";
        assert_eq!(
            crate::boot::needs_prepare(lab.ctl(), B).expect("needs_prepare"),
            sd,
            "{name}: before the flip"
        );
        lab.ctl().arm_trial(B, 3).expect("arm b");
        // The flip is on disk, the state is not: taken as armed, nothing to prepare.
        assert!(cut(&mut lab), "{name}: armed on disk, staged in the state");
        assert!(
            !crate::boot::needs_prepare(lab.ctl(), B).expect("needs_prepare"),
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
