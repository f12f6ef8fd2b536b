//! dm-verity on a real block device: the agent builds the tree into the slot after the
//! image, through restarts in the middle of it, and `veritysetup verify` accepts the
//! slot; a release whose tree does not fit is refused before anything is written.

use std::fs;
use std::process::Command;

use update_agent::payload::generate;

use super::{text, Node, IMAGE, SLOT};

/// Publishes v2 with its dm-verity tree at `hash_offset` (default: after the image);
/// returns the delta's URL and the signed root hash.
fn publish_verity(n: &Node, version: &str, hash_offset: Option<u64>) -> (String, String) {
    let root = std::cell::RefCell::new(String::new());
    let name = n.publish_with(
        &n.key,
        version,
        "test-board",
        &n.path("v2.img"),
        64 << 10,
        &|o, t| {
            let v = generate::verity_of(t, hash_offset).expect("verity");
            *root.borrow_mut() = hex::encode(v.root_hash);
            o.verity = Some(v);
        },
    );
    (n.server.url(&name), root.into_inner())
}

/// One byte of slot b's image, as a disk (or someone with it) would change it.
fn change_a_byte_of_slot_b(n: &Node) {
    fs::OpenOptions::new()
        .write(true)
        .open(n.disk.part(3))
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"\x5a", 7 << 20))
        .expect("change a byte in slot b");
}

/// Stages `url` with a read-back mark written down at every chance, stopped by the
/// fail point right after the first; returns that fail point's environment.
fn stop_at_the_first_read_back_mark(n: &Node, url: &str) -> [(&'static str, &'static str); 1] {
    n.checkpoint_at_every_chance();
    let stop = [("UPDATE_AGENT_FAILPOINT", "after-read-back-mark")];
    let o = n.agent(&["stage", url], &stop);
    assert!(
        text(&o).contains("failpoint after-read-back-mark"),
        "{}",
        text(&o)
    );
    stop
}

#[test]
fn verity_tree_built_on_the_slot_through_restarts_and_veritysetup_verifies_it() {
    let n = Node::new();
    let (url, root) = publish_verity(&n, "2.0", None);
    // Each fail point fires inside the tree's level 0 (it is built from the
    // read-back's bytes).
    let stop = stop_at_the_first_read_back_mark(&n, &url);
    let first = n.state()["read_back"]["offset"].as_u64().expect("mark");
    let o = n.agent(&["resume"], &stop);
    assert!(
        text(&o).contains("failpoint after-read-back-mark"),
        "{}",
        text(&o)
    );
    let second = n.state()["read_back"]["offset"].as_u64().expect("mark");
    assert!(second > first && second < IMAGE, "{first} -> {second}");
    let o = n.agent(&["resume"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    n.assert_armed_v2();
    // The trial entry boots the root through the tree: GRUB's fragment reads these.
    let g = n.grub_vars();
    assert_eq!(g.get("ua_b_roothash"), Some(&root), "{g:?}");
    assert_eq!(g.get("ua_b_hashoff"), Some(&IMAGE.to_string()), "{g:?}");
    assert_eq!(g.get("ua_a_roothash"), None, "{g:?}");

    assert_slot_b_verifies(&n, &root);
    let mut wrong = root.into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let bad = veritysetup_verify(&n, &String::from_utf8(wrong).expect("hex"));
    assert!(!bad.status.success(), "veritysetup accepted a wrong root");
}

/// cryptsetup's own `veritysetup verify` of slot b, its tree after the image.
fn veritysetup_verify(n: &Node, root: &str) -> std::process::Output {
    let dev = n.disk.part(3);
    Command::new("/usr/sbin/veritysetup")
        .args([
            "verify",
            &dev,
            &dev,
            root,
            &format!("--hash-offset={IMAGE}"),
        ])
        .output()
        .expect("running veritysetup")
}

fn assert_slot_b_verifies(n: &Node, root: &str) {
    let ok = veritysetup_verify(n, root);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// With a tree, its signed root is the read-back's only proof of the image (no
/// whole-image sha256: its marks carry the offset alone). Bytes past the mark that
/// change while the agent is down make the resumed root wrong: the operations are
/// rechecked and the changed one rewritten, and the slot armed verifies. When a
/// level-0 digest before the mark changes instead (every operation holds), the tree
/// is built again from byte 0.
#[test]
fn verity_a_slot_changed_past_the_read_back_mark_is_rewritten() {
    let n = Node::new();
    let (url, root) = publish_verity(&n, "2.0", None);
    // Where level 0 starts: after the superblock and the levels above it.
    let mut levels = vec![(IMAGE / 4096).div_ceil(128)];
    while levels.last().is_some_and(|&b| b > 1) {
        levels.push(levels.last().copied().unwrap_or(1).div_ceil(128));
    }
    let level0_at = IMAGE + 4096 + 4096 * levels[1..].iter().sum::<u64>();
    for (what, at, len) in [("image", None, 4096), ("level 0", Some(level0_at), 1)] {
        n.reset();
        n.boot_into("a");
        stop_at_the_first_read_back_mark(&n, &url);
        let st = n.state();
        let mark = st["read_back"]["offset"].as_u64().expect("mark");
        assert_eq!(
            st["read_back"]["sha256_state"].as_str(),
            Some(""),
            "a whole-image hash was kept beside the tree: {st}"
        );
        assert!(mark >= 4096 && mark + 4096 <= IMAGE, "{mark}");
        // The image past the mark, or the digest of its first block.
        fs::OpenOptions::new()
            .write(true)
            .open(n.disk.part(3))
            .and_then(|f| {
                std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xa5; len], at.unwrap_or(mark))
            })
            .expect("scribble slot b");
        let o = n.agent(&["resume"], &[]);
        let t = text(&o);
        assert!(o.status.success(), "{what}: {t}");
        let (rewritten, rebuilt) = (
            t.contains("did not read back as the checkpoint said"),
            t.contains("building it again from the start"),
        );
        assert_eq!(
            (rewritten, rebuilt),
            (at.is_none(), at.is_some()),
            "{what}: {t}"
        );
        n.assert_armed_v2();
        assert_slot_b_verifies(&n, &root);
    }
}

#[test]
fn verity_a_tree_past_the_slot_is_refused_before_anything_is_written() {
    let n = Node::new();
    // The tree's superblock one block before the slot's end: the tree cannot fit.
    let (url, _) = publish_verity(&n, "2.0", Some(SLOT - 4096));
    let before = n.grub_vars();
    let o = n.agent(&["stage", &url], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("dm-verity tree ends at byte") && t.contains(&format!("holds only {SLOT}")),
        "{t}"
    );
    assert_eq!(n.grub_vars(), before, "the bootloader was touched");
    assert!(
        !n.path("state/state.json").exists(),
        "a refused release left a state behind"
    );
    n.assert_booted_untouched();
}

/// A trial the bootloader gave up on (as a dm-verity restart on every try makes it):
/// the agent on the old slot checks the slot against the root hash it verified, and
/// names an integrity failure when the slot changed after staging; an intact slot
/// that did not boot keeps the plain reason.
#[test]
fn verity_a_slot_changed_after_staging_is_named_an_integrity_failure() {
    let n = Node::new();
    let (url, root) = publish_verity(&n, "2.0", None);
    let gave_up = |n: &Node| {
        super::sh(
            "grub-editenv",
            &[
                n.grubenv.to_str().expect("p"),
                "set",
                "ua_trial=",
                "ua_tries=0",
            ],
        );
        n.boot_into("a");
        n.agent(&["boot-check"], &[])
    };
    for corrupt in [false, true] {
        n.reset();
        n.boot_into("a");
        let o = n.agent(&["stage", &url], &[]);
        assert!(o.status.success(), "{}", text(&o));
        n.assert_armed_v2();
        if corrupt {
            change_a_byte_of_slot_b(&n);
        }
        let o = gave_up(&n);
        let t = text(&o);
        assert!(t.contains("rolled back: 2.0"), "{t}");
        if corrupt {
            assert!(
                t.contains("failed its integrity check") && t.contains(&root),
                "{t}"
            );
        } else {
            assert!(
                t.contains("the new slot did not boot") && !t.contains("integrity"),
                "{t}"
            );
        }
    }
}

/// A committed release whose slot stops booting (a byte changed under dm-verity
/// restarts it at every boot): each boot counts the default's guard down, GRUB gives
/// up at 0 and boots the slot before it, and the agent there rolls the release back,
/// marks its slot unbootable and says why: an integrity failure when the slot no longer
/// holds what was verified, the plain reason when it still does.
#[test]
fn verity_a_committed_slot_that_stops_booting_falls_back_and_says_why() {
    let n = Node::new();
    let (url, root) = publish_verity(&n, "2.0", None);
    let var = |n: &Node, k: &str| n.grub_vars().get(k).cloned().unwrap_or_default();
    for corrupt in [false, true] {
        n.reset();
        n.boot_into("a");
        let o = n.agent(&["stage", &url], &[]);
        assert!(o.status.success(), "{}", text(&o));
        n.boot_b_and_commit();
        assert_eq!(
            var(&n, "ua_boots"),
            "3",
            "the commit's boot guards the default"
        );
        // A boot of the default counts down, and reaching the agent sets it back.
        n.boot_into("b");
        assert_eq!(var(&n, "ua_boots"), "2");
        let o = n.agent(&["boot-check"], &[]);
        assert!(text(&o).contains("normal boot"), "{}", text(&o));
        assert_eq!(var(&n, "ua_boots"), "3");
        if corrupt {
            change_a_byte_of_slot_b(&n);
        }
        // Three boots of b that never reach the agent, then GRUB's fallback to a.
        for _ in 0..3 {
            n.boot_into("b");
        }
        assert_eq!(var(&n, "ua_boots"), "0");
        super::sh(
            "grub-editenv",
            &[
                n.grubenv.to_str().expect("p"),
                "set",
                "ua_boots=1",
                "ua_fallen=b",
            ],
        );
        n.boot_into("a");
        let o = n.agent(&["boot-check"], &[]);
        let t = text(&o);
        assert!(
            t.contains("rolled back: 2.0") && t.contains("slot b stopped booting"),
            "{t}"
        );
        assert_eq!(t.contains("failed its integrity check"), corrupt, "{t}");
        assert_eq!(t.contains(&root), corrupt, "{t}");
        let g = n.grub_vars();
        for (k, v) in [
            ("ua_default", "a"),
            ("ua_b_ok", "0"),
            ("ua_boots", "3"),
            ("ua_fallen", ""),
        ] {
            assert_eq!(g.get(k).map(String::as_str), Some(v), "{k}: {g:?}");
        }
        let st = n.state();
        assert_eq!(
            (st["state"].as_str(), st["cause"].as_str()),
            (Some("rolled_back"), Some("stopped_booting")),
            "{st}"
        );
        let history: Vec<serde_json::Value> =
            serde_json::from_slice(&fs::read(n.path("state/history.json")).expect("history"))
                .expect("json");
        let last = history.last().expect("entry");
        assert_eq!(
            (last["outcome"].as_str(), last["version"].as_str()),
            (Some("rolled_back"), Some("2.0")),
            "{last}"
        );
        // The next boot of a is a normal one, guarded.
        n.boot_into("a");
        let o = n.agent(&["boot-check"], &[]);
        assert!(text(&o).contains("normal boot"), "{}", text(&o));
        assert_eq!(var(&n, "ua_boots"), "3");
    }
}
