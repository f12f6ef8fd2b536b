//! Tests of `fs.rs`: installing kernels and cleaning up after an interrupted stage.

use std::fs;
use std::io;
use std::path::Path;

use crate::boot::systemd_boot::fs::{install_kernel, list_files, BootFile};
use crate::boot::systemd_boot::test_util::{
    boot, created, entries, refused_with, sha, snapshot, status, tmp, Release, A, B,
};
use crate::boot::systemd_boot::{ENTRIES_DIR, KERNEL_NAME};
use crate::boot::{BootControl, BootError};

#[test]
fn install_kernel_copies_and_verifies() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2) = (Release::new("1"), Release::new("2"));
    let mut sb = created(esp, &r1);
    // Into a slot with no entry, on an ESP that has never seen one for it.
    install_kernel(esp, B, &r2.kernel(), Some(&r2.initrd())).expect("install");
    assert_eq!(
        fs::read(esp.join("update-agent/b/vmlinuz")).expect("read"),
        r2.kernel_bytes
    );
    assert_eq!(
        fs::read(esp.join("update-agent/b/initrd.img")).expect("read"),
        r2.initrd_bytes
    );

    // A source that is not what the manifest says: refused, nothing left behind,
    // and the staged entry of the earlier stage is gone with the old files.
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    let wrong = BootFile {
        sha256: sha(b"something else"),
        ..r1.kernel()
    };
    match install_kernel(esp, B, &wrong, None) {
        Err(BootError::Read { path, source }) => {
            assert_eq!(path, r1.kernel);
            assert_eq!(source.kind(), io::ErrorKind::InvalidData);
            assert!(source
                .to_string()
                .contains(&hex::encode(sha(b"something else"))));
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    assert!(list_files(&esp.join("update-agent/b"), false)
        .expect("list")
        .is_empty());
    assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
    refused_with(sb.arm_trial(B, 3), "nothing is staged");
    // A wrong initrd fails after the kernel went in; staging again recovers.
    let bad_initrd = BootFile {
        sha256: sha(b"x"),
        ..r2.initrd()
    };
    assert!(sb.stage(B, "2", &r2.kernel(), Some(&bad_initrd)).is_err());
    assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
    assert_eq!(
        list_files(&esp.join("update-agent/b"), false).expect("list"),
        [KERNEL_NAME]
    );
    // A missing source.
    let missing = BootFile {
        path: Path::new("/nonexistent/vmlinuz"),
        sha256: [0; 32],
    };
    assert!(matches!(
        install_kernel(esp, B, &missing, None),
        Err(BootError::Read { .. })
    ));
    sb.stage(B, "2", &r2.kernel(), Some(&r2.initrd()))
        .expect("stage");
    sb.arm_trial(B, 1).expect("arm");
    assert_eq!(boot(esp), B);
    // Slot a's files were never touched.
    assert_eq!(
        fs::read(esp.join("update-agent/a/vmlinuz")).expect("read"),
        r1.kernel_bytes
    );
}

#[test]
fn leftovers_of_an_interrupted_stage_are_cleaned() {
    let esp = tmp();
    let esp = esp.path();
    let (r1, r2) = (Release::new("1"), Release::new("2"));
    let mut sb = created(esp, &r1);
    let dir = esp.join(ENTRIES_DIR);
    // Power cut while the staged entry was being written, and while a kernel was.
    fs::write(dir.join("update-agent-b.tmp"), "title half").expect("write");
    fs::create_dir_all(esp.join("update-agent/b")).expect("mkdir");
    fs::write(esp.join("update-agent/b/vmlinuz.tmp"), "half a kernel").expect("write");
    assert_eq!(status(&sb), (A, None, [true, false]));
    sb.mark_unbootable(B).expect("mark");
    assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
    fs::write(dir.join("update-agent-b.tmp"), "title half").expect("write");
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    assert_eq!(
        entries(esp),
        ["update-agent-1-a-1.0.conf", "update-agent-b-2.staged"]
    );
    assert_eq!(
        list_files(&esp.join("update-agent/b"), false).expect("list"),
        [KERNEL_NAME]
    );
    // Staging again replaces the staged entry; marking unbootable removes it.
    sb.stage(B, "2.1", &r2.kernel(), None).expect("stage again");
    assert_eq!(
        entries(esp),
        ["update-agent-1-a-1.0.conf", "update-agent-b-2.1.staged"]
    );
    sb.mark_unbootable(B).expect("mark");
    assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
    // A staged entry whose kernel vanished is refused before it is armed, and
    // does not stand in the way of anything else.
    sb.stage(B, "2", &r2.kernel(), None).expect("stage");
    fs::remove_file(esp.join("update-agent/b/vmlinuz")).expect("rm");
    let before = snapshot(esp);
    match sb.arm_trial(B, 3) {
        Err(BootError::Malformed { path, what }) => {
            assert!(path.ends_with("update-agent-b-2.staged"), "{path:?}");
            assert!(what.contains("not on the ESP"), "{what}");
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert_eq!(snapshot(esp), before);
    assert_eq!(status(&sb), (A, None, [true, false]));
    sb.stage(B, "2", &r2.kernel(), None).expect("stage again");
    sb.arm_trial(B, 3).expect("arm");

    // The same for a trial entry: reported, and marking the slot unbootable (the
    // cure) still works while everything else refuses.
    fs::remove_file(esp.join("update-agent/b/vmlinuz")).expect("rm");
    let before = snapshot(esp);
    assert!(matches!(sb.status(), Err(BootError::Malformed { .. })));
    assert!(matches!(sb.commit(B), Err(BootError::Malformed { .. })));
    assert!(matches!(
        sb.rollback_to(A),
        Err(BootError::Malformed { .. })
    ));
    assert_eq!(snapshot(esp), before);
    sb.mark_unbootable(B).expect("mark b");
    assert_eq!(status(&sb), (A, None, [true, false]));
    // But the default's entry is never skipped: with its kernel gone, nothing goes.
    fs::remove_file(esp.join("update-agent/a/vmlinuz")).expect("rm");
    assert!(matches!(
        sb.mark_unbootable(B),
        Err(BootError::Malformed { .. })
    ));
}

/// Hardening finding 12: the release's `/boot/vmlinuz` is resolved inside the mounted
/// slot, so an absolute symlink (or `..`) in a release cannot make the root daemon
/// copy a file of the running system onto the ESP and boot it.
#[test]
fn release_files_resolve_inside_the_slot() {
    use crate::boot::systemd_boot::fs::{resolve_by_hand, resolve_in_root};
    // The kernel's resolution and ours (used where seccomp hides openat2) agree.
    let both = |root: &Path, rel: &str| {
        let kernel = resolve_in_root(root, Path::new(rel)).expect("openat2");
        let by_hand = resolve_by_hand(root, Path::new(rel))
            .expect("by hand")
            .map(|p| fs::canonicalize(p).expect("canonical"));
        assert_eq!(kernel, by_hand, "{rel}");
        kernel
    };
    let host = tmp();
    let secret = host.path().join("host-secret");
    fs::write(&secret, b"the host's, not the release's").expect("secret");
    let root = tmp();
    let root = root.path();
    fs::create_dir_all(root.join("boot")).expect("boot");
    fs::create_dir_all(root.join("etc")).expect("etc");
    fs::write(root.join("etc/shadow"), b"the release's own").expect("shadow");

    // Absolute links name the slot's own files.
    std::os::unix::fs::symlink("/etc/shadow", root.join("boot/vmlinuz")).expect("link");
    let real = both(root, "boot/vmlinuz").expect("exists");
    assert_eq!(real, fs::canonicalize(root.join("etc/shadow")).expect("c"));
    // A link to a host path the slot does not have resolves to nothing.
    fs::remove_file(root.join("boot/vmlinuz")).expect("rm");
    std::os::unix::fs::symlink(&secret, root.join("boot/vmlinuz")).expect("link");
    assert_eq!(both(root, "boot/vmlinuz"), None);
    // `..` stops at the slot's root.
    fs::remove_file(root.join("boot/vmlinuz")).expect("rm");
    let climb = format!("../../../../../../..{}", secret.display());
    std::os::unix::fs::symlink(&climb, root.join("boot/vmlinuz")).expect("link");
    assert_eq!(both(root, "boot/vmlinuz"), None);

    // The usual case: a relative link beside the kernel, through a linked directory.
    fs::write(root.join("boot/vmlinuz-6.1.0-1"), b"kernel").expect("kernel");
    std::os::unix::fs::symlink("boot", root.join("b")).expect("dir link");
    std::os::unix::fs::symlink("vmlinuz-6.1.0-1", root.join("boot/v2")).expect("rel link");
    let want = Some(fs::canonicalize(root.join("boot/vmlinuz-6.1.0-1")).expect("c"));
    assert_eq!(both(root, "b/v2"), want);
    assert_eq!(both(root, "boot/v2"), want);

    // And prepare() refuses such a release instead of copying the host's file.
    let esp = tmp();
    let mut sb = created(esp.path(), &Release::new("1"));
    match sb.prepare(B, "2", root) {
        Err(BootError::Read { path, source }) => {
            assert!(path.ends_with("boot/vmlinuz"), "{}", path.display());
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(!esp.path().join("update-agent/b/vmlinuz").exists());
}
