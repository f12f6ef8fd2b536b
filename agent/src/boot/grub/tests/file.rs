//! The file: named in errors, never created by open nor replaced by create,
//! written in place.

use super::*;
use std::io;
use std::os::unix::fs::MetadataExt;

#[test]
fn malformed_file_names_its_path() {
    let dir = tmp();
    let path = dir.path().join("grubenv");
    fs::write(&path, b"# GRUB Environment Block\n").expect("writing short file");
    match Grub::open(&path) {
        Err(e @ BootError::Malformed { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
            assert!(msg.contains("1024"), "{msg}");
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn open_never_creates_and_create_never_replaces() {
    let dir = tmp();
    let path = dir.path().join("grubenv");
    match Grub::open(&path) {
        Err(BootError::Read { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::NotFound)
        }
        other => panic!("expected Read NotFound, got {other:?}"),
    }
    assert!(!path.exists());

    let existing = editenv_file(dir.path(), "grubenv", &["saved_entry=0"]);
    let before = bytes(&existing);
    match Grub::create(&existing, Slot::A) {
        Err(BootError::Write { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::AlreadyExists)
        }
        other => panic!("expected Write AlreadyExists, got {other:?}"),
    }
    assert_eq!(bytes(&existing), before);
}

#[test]
fn writes_in_place() {
    let dir = tmp();
    let path = editenv_file(dir.path(), "grubenv", &["saved_entry=0"]);
    let ino = fs::metadata(&path).expect("stat").ino();
    let mut grub = open(&path);
    grub.mark_unbootable(Slot::B).expect("mark b");
    grub.arm_trial(Slot::B, 5).expect("arm b");
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!((meta.ino(), meta.len()), (ino, BLOCK_SIZE as u64));
    assert_eq!(
        editenv(&path, &["list"]),
        b"saved_entry=0\nua_default=a\nua_trial=b\nua_tries=5\nua_a_ok=1\nua_b_ok=1\n"
    );

    // A file that changed size under us is not written.
    let mut longer = bytes(&path);
    longer.push(b'#');
    fs::write(&path, &longer).expect("growing test file");
    assert!(matches!(
        grub.commit(Slot::B),
        Err(BootError::Malformed { .. })
    ));
    assert_eq!(bytes(&path), longer);
}

/// A slot's dm-verity root in the block is what `grub-editenv set` / `unset` make of
/// the same variables, and leaves the A/B state alone.
#[test]
fn set_root_is_grub_editenv_set_and_unset() {
    let dir = tmp();
    let h = "0123456789abcdef".repeat(4);
    let path = editenv_file(dir.path(), "grubenv", &["saved_entry=0"]);
    let mut grub = open(&path);
    grub.mark_unbootable(Slot::B).expect("mark b");
    let ab = |s: BootStatus| (s.default, s.trial, s.bootable);
    let before = ab(grub.status().expect("status"));
    let v = crate::boot::RootVerity::new(&h.to_uppercase(), 1 << 30).expect("verity");
    grub.set_root(Slot::B, Some(&v)).expect("set root");
    assert_eq!(
        ab(grub.status().expect("status")),
        before,
        "A/B state changed"
    );
    let want = editenv(&path, &["list"]);
    assert!(
        String::from_utf8_lossy(&want)
            .contains(&format!("ua_b_roothash={h}\nua_b_hashoff=1073741824\n")),
        "{}",
        String::from_utf8_lossy(&want)
    );
    // The same edit by GRUB's tool, from the same starting block, gives the same bytes.
    let copy = dir.path().join("copy");
    fs::write(&copy, bytes(&path)).expect("copy");
    grub.set_root(Slot::B, None).expect("clear root");
    editenv(&copy, &["unset", "ua_b_roothash", "ua_b_hashoff"]);
    assert_eq!(bytes(&path), bytes(&copy));
    // Setting what is there writes nothing.
    let m = fs::metadata(&path)
        .expect("stat")
        .modified()
        .expect("mtime");
    grub.set_root(Slot::B, None).expect("clear again");
    assert_eq!(
        fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime"),
        m
    );
    // Only hex reaches the GRUB script and the kernel command line.
    for bad in ["", "zz", "0123; reboot", &"a".repeat(63)] {
        assert!(crate::boot::RootVerity::new(bad, 0).is_err(), "{bad:?}");
    }
}
