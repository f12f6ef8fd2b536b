//! Tests of [`SystemdBoot`] on real directory trees.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use crate::boot::systemd_boot::test_util::{
    bless_boot, boot, cfg, created, entries, refused_with, snapshot, status, tmp, Release, A, B,
};
use crate::boot::systemd_boot::{
    entry_text, install_kernel, EntryConfig, SystemdBoot, ENTRIES_DIR, LOADER_CONF,
};
use crate::boot::{BootControl, BootError};

#[test]
fn full_cycle_with_the_loader_counting() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2, r3) = (
        Release::new("1.0"),
        Release::new("2.0"),
        Release::new("3.0"),
    );
    let mut sb = created(esp, &r1);
    assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
    assert_eq!(status(&sb), (A, None, [true, false]));
    assert_eq!(
        fs::read_to_string(esp.join("loader/entries/update-agent-1-a-1.0.conf")).expect("entry"),
        entry_text(&cfg(), A, "1.0", true, None)
    );
    assert_eq!(
        fs::read(esp.join("update-agent/a/vmlinuz")).expect("kernel"),
        r1.kernel_bytes
    );
    assert_eq!(boot(esp), A);

    // Update to 2.0 in b.
    sb.mark_unbootable(B).expect("mark b");
    // 2.0 has a verified dm-verity tree: its entry mounts the root through it.
    let v = crate::boot::RootVerity::new(&"cd".repeat(32), 1 << 20).expect("verity");
    sb.set_root(B, Some(&v)).expect("set root");
    sb.stage(B, "2.0", &r2.kernel(), None).expect("stage b");
    assert_eq!(
        entries(esp),
        ["update-agent-1-a-1.0.conf", "update-agent-b-2.0.staged"]
    );
    assert_eq!(
        fs::read_to_string(esp.join("loader/entries/update-agent-b-2.0.staged")).expect("entry"),
        entry_text(&cfg(), B, "2.0", false, Some(&v))
    );
    assert_eq!(status(&sb), (A, None, [true, false]));
    assert_eq!(boot(esp), A, "a staged entry is not booted");
    sb.arm_trial(B, 3).expect("arm b");
    assert_eq!(
        entries(esp),
        ["update-agent-1-a-1.0.conf", "update-agent-2-b-2.0+3.conf"]
    );
    assert_eq!(status(&sb), (A, Some((B, 3)), [true, true]));
    let st = sb.status().expect("status");
    assert_eq!(
        st.raw,
        "update-agent-2-b-2.0+3.conf update-agent-1-a-1.0.conf"
    );

    // Three tries that never reach the health check, then the loader falls back.
    for left in [2, 1, 0] {
        assert_eq!(boot(esp), B);
        assert_eq!(status(&sb), (A, Some((B, left)), [true, true]));
    }
    assert_eq!(boot(esp), A);
    assert_eq!(
        entries(esp),
        ["update-agent-1-a-1.0.conf", "update-agent-2-b-2.0+0-3.conf"]
    );
    assert_eq!(status(&sb), (A, Some((B, 0)), [true, true]));
    // The agent on a records the rollback and makes it final.
    sb.rollback_to(A).expect("rollback to a");
    assert_eq!(
        entries(esp),
        ["update-agent-2-b-2.0+0-3.conf", "update-agent-3-a-1.0.conf"]
    );
    assert_eq!(status(&sb), (A, None, [true, true]));
    assert_eq!(boot(esp), A);

    // 3.0 into b again: this time healthy on its second try.
    sb.mark_unbootable(B).expect("mark b");
    assert_eq!(entries(esp), ["update-agent-3-a-1.0.conf"]);
    sb.stage(B, "3.0", &r3.kernel(), Some(&r3.initrd()))
        .expect("stage b");
    sb.arm_trial(B, 2).expect("arm b");
    assert_eq!(boot(esp), B);
    assert_eq!(boot(esp), B);
    assert_eq!(status(&sb), (A, Some((B, 0)), [true, true]));
    sb.commit(B).expect("commit b");
    assert_eq!(
        entries(esp),
        ["update-agent-3-a-1.0.conf", "update-agent-4-b-3.0.conf"]
    );
    assert_eq!(status(&sb), (B, None, [true, true]));
    assert_eq!(
        fs::read(esp.join("update-agent/b/initrd.img")).expect("initrd"),
        r3.initrd_bytes
    );
    for _ in 0..3 {
        assert_eq!(boot(esp), B);
    }
    sb.commit(B).expect("commit again is a no-op");

    // A manual rollback to the older, still bootable, release.
    sb.rollback_to(A).expect("rollback to a");
    assert_eq!(status(&sb), (A, None, [true, true]));
    assert_eq!(boot(esp), A);
    assert_eq!(
        entries(esp),
        ["update-agent-4-b-3.0.conf", "update-agent-5-a-1.0.conf"]
    );

    // Next update into b, failing its health check: rolled back by the agent while
    // the trial is running, with tries left.
    sb.mark_unbootable(B).expect("mark b");
    // Unreferenced kernel files stay until the next install replaces them.
    assert!(esp.join("update-agent/b/initrd.img").exists());
    sb.stage(B, "4.0", &r2.kernel(), None).expect("stage b");
    assert!(
        !esp.join("update-agent/b/initrd.img").exists(),
        "stale initrd left"
    );
    sb.arm_trial(B, 3).expect("arm b");
    assert_eq!(boot(esp), B);
    sb.rollback_to(A).expect("rollback to a");
    assert_eq!(status(&sb), (A, None, [true, true]));
    assert_eq!(
        entries(esp),
        ["update-agent-6-b-4.0+2-1.conf", "update-agent-7-a-1.0.conf"]
    );
    assert_eq!(boot(esp), A);
    assert_eq!(sb.name(), "systemd-boot");
}

#[test]
fn commit_is_what_systemd_bless_boot_does() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2) = (Release::new("1"), Release::new("2"));
    let dir = esp.join(ENTRIES_DIR);

    // The agent first, then systemd-bless-boot finds its target there.
    let mut sb = created(esp, &r1);
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    sb.arm_trial(B, 3).expect("arm");
    assert_eq!(boot(esp), B);
    let booted = "update-agent-2-b-2+2-1.conf";
    assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf", booted]);
    sb.commit(B).expect("commit");
    assert!(dir.join(bless_boot(booted)).exists());
    assert!(!dir.join(booted).exists());

    // systemd-bless-boot first: the agent's commit has nothing left to do.
    let esp2 = tmp();
    let esp2 = esp2.path();
    let dir2 = esp2.join(ENTRIES_DIR);
    let mut sb = created(esp2, &r1);
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    sb.arm_trial(B, 3).expect("arm");
    assert_eq!(boot(esp2), B);
    fs::rename(dir2.join(booted), dir2.join(bless_boot(booted))).expect("bless");
    assert_eq!(status(&sb), (B, None, [true, true]));
    let before = snapshot(esp2);
    sb.commit(B).expect("commit");
    assert_eq!(snapshot(esp2), before);
    assert_eq!(snapshot(esp), before, "both orders end in the same tree");
}

#[test]
fn illegal_transitions_leave_the_tree_byte_identical() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2) = (Release::new("1"), Release::new("2"));
    let mut sb = created(esp, &r1);
    let before = snapshot(esp);
    refused_with(sb.mark_unbootable(A), "default slot");
    refused_with(sb.arm_trial(A, 3), "default slot");
    refused_with(sb.arm_trial(B, 3), "nothing is staged");
    refused_with(sb.commit(B), "marked unbootable");
    refused_with(sb.rollback_to(B), "marked unbootable");
    refused_with(sb.stage(A, "2", &r2.kernel(), None), "has a boot entry");
    refused_with(
        install_kernel(esp, A, &r2.kernel(), None),
        "has a boot entry",
    );
    assert_eq!(snapshot(esp), before);

    sb.stage(B, "2", &r2.kernel(), Some(&r2.initrd()))
        .expect("stage");
    let before = snapshot(esp);
    refused_with(sb.arm_trial(B, 0), "1 to 9");
    refused_with(sb.arm_trial(B, 10), "1 to 9");
    refused_with(sb.commit(B), "marked unbootable");
    assert_eq!(snapshot(esp), before);

    sb.arm_trial(B, 3).expect("arm");
    let before = snapshot(esp);
    refused_with(sb.mark_unbootable(A), "default slot");
    refused_with(sb.arm_trial(A, 1), "default slot");
    refused_with(sb.arm_trial(B, 0), "1 to 9");
    refused_with(sb.stage(B, "3", &r1.kernel(), None), "has a boot entry");
    assert_eq!(snapshot(esp), before);
    // Calls that change nothing write nothing.
    sb.arm_trial(B, 3).expect("arm again");
    assert_eq!(
        snapshot(esp),
        before,
        "re-arming with the same tries renames nothing"
    );
    sb.mark_unbootable(B).expect("mark b");
    let before_mark = snapshot(esp);
    sb.mark_unbootable(B).expect("mark b again");
    assert_eq!(snapshot(esp), before_mark);
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    sb.arm_trial(B, 3).expect("arm");
    sb.rollback_to(A).expect("first rollback");
    let before_rb = snapshot(esp);
    sb.rollback_to(A).expect("second rollback");
    assert_eq!(snapshot(esp), before_rb);
    assert_ne!(before, before_rb);
}

/// An ESP with `extra` foreign entries (and their kernels), made by `created`.
fn esp_with_foreign(esp: &Path, rel: &Release, extra: &[(&str, &str)]) -> SystemdBoot {
    let sb = created(esp, rel);
    let dir = esp.join(ENTRIES_DIR);
    fs::create_dir_all(esp.join("debian")).expect("mkdir");
    fs::write(esp.join("debian/vmlinuz"), b"debian kernel").expect("write");
    for (name, text) in extra {
        fs::write(dir.join(name), text).expect("writing a foreign entry");
    }
    sb
}

#[test]
fn foreign_entries_are_left_alone() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2) = (Release::new("1"), Release::new("2"));
    let foreign = [
        (
            "debian-6.1.0-18-cloud-amd64.conf",
            "title Debian\nlinux /debian/vmlinuz\n",
        ),
        ("arch.conf", "title Arch\nlinux /arch/vmlinuz-linux\n"),
        (
            "fedora-40+0-3.conf",
            "title Fedora\nsort-key fedora\nlinux /f/vmlinuz\n",
        ),
        ("auto-windows.conf", "title whatever\nsort-key a\n"),
        ("notes.txt", "not an entry"),
    ];
    let mut sb = esp_with_foreign(esp, &r1, &foreign);
    fs::create_dir(esp.join("loader/entries/zz-dir.conf")).expect("a directory is no entry");
    fs::write(esp.join("loader/loader.conf"), "timeout 0\neditor no\n").expect("loader.conf");
    let foreign_files = |esp: &Path| {
        snapshot(esp)
            .into_iter()
            .filter(|(p, _)| {
                let s = p.to_string_lossy();
                !s.contains("update-agent")
            })
            .collect::<BTreeMap<_, _>>()
    };
    let before = foreign_files(esp);
    assert!(before.len() >= 8, "{before:?}");

    sb.mark_unbootable(B).expect("mark");
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    sb.arm_trial(B, 3).expect("arm");
    assert_eq!(boot(esp), B);
    assert_eq!(status(&sb), (A, Some((B, 2)), [true, true]));
    sb.rollback_to(A).expect("rollback");
    sb.commit(B).expect("commit");
    sb.mark_unbootable(A).expect("mark a");
    assert_eq!(status(&sb), (B, None, [false, true]));
    assert_eq!(foreign_files(esp), before);
    let raw = sb.status().expect("status").raw;
    assert!(raw.starts_with("update-agent-4-b-2.conf "), "{raw}");
    assert!(
        raw.contains("debian-6.1.0-18-cloud-amd64.conf") && !raw.contains("notes.txt"),
        "{raw}"
    );
}

#[test]
fn a_foreign_entry_that_would_boot_first_is_refused() {
    let r1 = Release::new("1");
    for (name, text) in [
        ("zz.conf", "title zz\nlinux /zz\n"),
        (
            "0123456789abcdef0123456789abcdef-6.1.conf",
            "title mid\nlinux /x\n",
        ),
        (
            "debian.conf",
            "title Debian\nsort-key debian\nlinux /debian/vmlinuz\n",
        ),
    ] {
        let esp = tmp();
        let esp = esp.path();
        let mut sb = created(esp, &r1);
        fs::write(esp.join(ENTRIES_DIR).join(name), text).expect("write");
        let before = snapshot(esp);
        let is_it = |r: Result<(), BootError>| match r {
            Err(BootError::Malformed { path, what }) => {
                assert!(path.ends_with(name), "{path:?}");
                assert!(what.contains("foreign"), "{what}");
            }
            other => panic!("{name}: expected Malformed, got {other:?}"),
        };
        is_it(sb.status().map(drop));
        is_it(sb.mark_unbootable(B));
        is_it(sb.commit(A));
        is_it(SystemdBoot::open(esp, cfg()).map(drop));
        assert_eq!(snapshot(esp), before, "{name}");
    }
    // create checks before it writes anything.
    let esp = tmp();
    let esp = esp.path();
    fs::create_dir_all(esp.join(ENTRIES_DIR)).expect("mkdir");
    fs::write(esp.join(ENTRIES_DIR).join("zz.conf"), "title zz\n").expect("write");
    let before = snapshot(esp);
    let res = SystemdBoot::create(esp, cfg(), A, "1", &r1.kernel(), None);
    assert!(matches!(res, Err(BootError::Malformed { .. })), "{res:?}");
    assert_eq!(snapshot(esp), before);
}

#[test]
fn trees_systemd_boot_would_read_differently_are_refused() {
    let r1 = Release::new("1");
    type Spoil = fn(&Path);
    let cases: [(&str, Spoil); 6] = [
        // Alone, an empty entry is not fsck residue (see below): its slot has nothing.
        ("an empty entry", |esp| {
            fs::write(esp.join("loader/entries/update-agent-1-a-1.0.conf"), "").expect("write")
        }),
        ("default in loader.conf", |esp| {
            fs::write(esp.join(LOADER_CONF), "timeout 0\ndefault update-agent-*\n").expect("write")
        }),
        ("missing kernel", |esp| {
            fs::remove_file(esp.join("update-agent/a/vmlinuz")).expect("rm")
        }),
        ("missing initrd", |esp| {
            fs::remove_file(esp.join("update-agent/a/initrd.img")).expect("rm")
        }),
        ("sort-key in our entry", |esp| {
            let p = esp.join("loader/entries/update-agent-1-a-1.0.conf");
            let mut text = fs::read_to_string(&p).expect("read");
            text.push_str("sort-key ua\n");
            fs::write(&p, text).expect("write")
        }),
        // Two entries for one slot that no torn rename of ours leaves (another
        // version); a torn rename itself reads as its target (state.rs tests).
        ("two entries for one slot", |esp| {
            fs::copy(
                esp.join("loader/entries/update-agent-1-a-1.0.conf"),
                esp.join("loader/entries/update-agent-2-a-9.9.conf"),
            )
            .map(drop)
            .expect("copy")
        }),
    ];
    for (what, spoil) in cases {
        let esp = tmp();
        let esp = esp.path();
        let mut sb = created(esp, &r1);
        spoil(esp);
        let before = snapshot(esp);
        assert!(
            matches!(sb.status(), Err(BootError::Malformed { .. })),
            "{what}"
        );
        assert!(
            matches!(sb.rollback_to(A), Err(BootError::Malformed { .. })),
            "{what}"
        );
        assert!(
            matches!(sb.mark_unbootable(B), Err(BootError::Malformed { .. })),
            "{what}"
        );
        assert_eq!(snapshot(esp), before, "{what}");
    }
}

#[test]
fn create_and_open() {
    let r1 = Release::new("1");
    let esp = tmp();
    let esp = esp.path();
    match SystemdBoot::open(esp, cfg()) {
        Err(BootError::Read { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::NotFound)
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    let sb = SystemdBoot::create(esp, cfg(), B, "7.1+x", &r1.kernel(), None).expect("create");
    assert_eq!(entries(esp), ["update-agent-1-b-7.1_x.conf"]);
    let text =
        fs::read_to_string(esp.join("loader/entries/update-agent-1-b-7.1_x.conf")).expect("read");
    assert!(
        text.contains("version 7.1+x\n") && !text.contains("initrd"),
        "{text}"
    );
    assert_eq!(status(&sb), (B, None, [false, true]));
    assert_eq!(sb.esp(), esp);
    let before = snapshot(esp);
    match SystemdBoot::create(esp, cfg(), A, "1", &r1.kernel(), None) {
        Err(BootError::Write { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::AlreadyExists)
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(snapshot(esp), before);
    SystemdBoot::open(esp, cfg()).expect("open");

    // A create cut short after the staged entry was written is finished by running
    // it again; leftovers of either slot go.
    let esp2 = tmp();
    let esp2 = esp2.path();
    let dir2 = esp2.join(ENTRIES_DIR);
    fs::create_dir_all(&dir2).expect("mkdir");
    fs::write(dir2.join("update-agent-a-1.staged"), "title half\n").expect("write");
    fs::write(dir2.join("update-agent-b.tmp"), "title half").expect("write");
    assert!(SystemdBoot::open(esp2, cfg()).is_err());
    let sb2 = SystemdBoot::create(esp2, cfg(), A, "1", &r1.kernel(), None).expect("create");
    assert_eq!(entries(esp2), ["update-agent-1-a-1.conf"]);
    assert_eq!(status(&sb2), (A, None, [true, false]));

    let bad = EntryConfig {
        title: String::new(),
        ..cfg()
    };
    assert!(matches!(
        SystemdBoot::open(esp, bad),
        Err(BootError::Malformed { .. })
    ));
    // An ESP whose entries are all gone has nothing to fall back to.
    fs::remove_file(esp.join("loader/entries/update-agent-1-b-7.1_x.conf")).expect("rm");
    match SystemdBoot::open(esp, cfg()) {
        Err(BootError::Malformed { what, .. }) => {
            assert!(what.contains("nothing to fall back to"))
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// 2.0 on trial on slot b, booted once, and its commit torn by a power cut: the
/// blessed name `update-agent-2-b-2.0.conf` beside the counted `…+2-1.conf`.
fn torn_commit(esp: &Path) -> SystemdBoot {
    let (r1, r2) = (Release::new("1"), Release::new("2"));
    let mut sb = created(esp, &r1);
    sb.mark_unbootable(B).expect("mark");
    sb.stage(B, "2.0", &r2.kernel(), None).expect("stage");
    sb.arm_trial(B, 3).expect("arm");
    assert_eq!(boot(esp), B);
    let dir = esp.join(ENTRIES_DIR);
    fs::copy(
        dir.join("update-agent-2-b-2.0+2-1.conf"),
        dir.join("update-agent-2-b-2.0.conf"),
    )
    .expect("the torn commit");
    sb
}

/// The torn commit the VM lab's scenario 5 left on a real ESP: the blessed name and
/// the counted one, both present. The agent reads the commit as done, commits again
/// without writing, rolls back by renaming the entry it reads, and refuses only to
/// remove the slot's entry (either name would free the other's clusters).
#[test]
fn a_torn_commit_is_read_as_committed_and_never_removed() {
    let esp = tmp();
    let esp = esp.path();
    let mut sb = torn_commit(esp);
    assert_eq!(status(&sb), (B, None, [true, true]));
    let before = snapshot(esp);
    sb.commit(B).expect("commit again");
    assert_eq!(snapshot(esp), before, "nothing to write");
    sb.rollback_to(A).expect("rollback");
    assert_eq!(status(&sb), (A, None, [true, true]));
    let before = snapshot(esp);
    match sb.mark_unbootable(B) {
        Err(BootError::Refused { why, .. }) => assert!(why.contains("fsck.vfat"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(snapshot(esp), before, "a refused call writes nothing");
    assert!(entries(esp).contains(&"update-agent-2-b-2.0+2-1.conf".to_owned()));
}

/// The same torn commit after `fsck.vfat -a`, which truncates the second of two
/// cross-linked names it meets to 0 bytes (tried on a real FAT image with mtools:
/// "share clusters. Truncating second to 0 bytes."). Whichever name it empties, the
/// agent reads the slot from the other, removes the empty one at its next write (a
/// file of 0 bytes has no clusters to free), and may remove the slot again afterwards.
#[test]
fn fsck_residue_of_a_torn_commit_is_set_aside_then_removed() {
    const BLESSED: &str = "update-agent-2-b-2.0.conf";
    const COUNTED: &str = "update-agent-2-b-2.0+2-1.conf";
    for emptied in [BLESSED, COUNTED] {
        let esp = tmp();
        let esp = esp.path();
        let mut sb = torn_commit(esp);
        let dir = esp.join(ENTRIES_DIR);
        fs::write(dir.join(emptied), "").expect("fsck truncates one name");
        let survivor = if emptied == BLESSED { COUNTED } else { BLESSED };
        // The commit is undone when the blessed name was emptied: a trial again.
        let trial = (emptied == BLESSED).then_some((B, 2));
        let default = if trial.is_some() { A } else { B };
        assert_eq!(status(&sb), (default, trial, [true, true]), "{emptied}");
        sb.commit(B).expect("commit");
        assert_eq!(status(&sb), (B, None, [true, true]), "{emptied}");
        let names = entries(esp);
        assert!(
            names.contains(&BLESSED.to_owned()) && !names.contains(&COUNTED.to_owned()),
            "{emptied} emptied, {survivor} kept: {names:?}"
        );
        assert!(
            fs::read_to_string(dir.join(BLESSED))
                .expect("read")
                .contains("linux"),
            "{emptied}: the blessed entry has the survivor's text"
        );
        sb.rollback_to(A).expect("rollback");
        sb.mark_unbootable(B).expect("the slot is whole again");
        assert_eq!(status(&sb), (A, None, [true, false]), "{emptied}");
    }
}
