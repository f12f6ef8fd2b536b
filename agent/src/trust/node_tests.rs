//! What a release server (here a directory, read the way a `file://` mirror is) can
//! feed the root follower, and a state directory's channel marks gone bad.

use std::fs;

use super::marks::Marks;
use super::node::{NodeTrust, NodeTrustError};
use super::root::{RoleName, RootBody};
use crate::config::{FetchConfig, TrustConfig};
use crate::payload::sign::PublisherKey;

fn signed(version: u64, k: &PublisherKey) -> Vec<u8> {
    let mut b = RootBody::new(version, 4_000_000_000);
    for role in RoleName::ALL {
        b.add_key(role, &k.public());
    }
    b.sign(&[k])
}

/// A node on root 1 (shipped), its state directory, and a server directory.
fn node(d: &std::path::Path, k: &PublisherKey) -> NodeTrust {
    fs::write(d.join("shipped.json"), signed(1, k)).expect("ship");
    fs::create_dir_all(d.join("www/root")).expect("www");
    let cfg = TrustConfig {
        root: d.join("shipped.json"),
        ..TrustConfig::default()
    };
    NodeTrust::load(&cfg, &d.join("state"), &d.join("keys.d")).expect("load")
}

#[test]
fn a_server_root_past_the_size_limit_is_refused_and_nothing_is_kept() {
    let d = tempfile::tempdir().expect("tempdir");
    let k = PublisherKey::from_seed([5; 32]);
    let mut t = node(d.path(), &k);
    fs::write(d.path().join("www/root/2.json"), vec![b' '; 70 << 10]).expect("big");
    let www = d.path().join("www");
    let e = t
        .follow(www.to_str().expect("utf8"), &FetchConfig::default(), 100)
        .expect_err("too large");
    assert!(
        matches!(e, NodeTrustError::TooLarge { version: 2, .. }),
        "{e}"
    );
    assert!(!d.path().join("state/root.json").exists());
    assert_eq!(t.root().map(|r| r.version()), Some(1));
}

#[test]
fn a_bad_link_stops_the_walk_on_the_last_good_root() {
    let d = tempfile::tempdir().expect("tempdir");
    let k = PublisherKey::from_seed([5; 32]);
    let mut t = node(d.path(), &k);
    fs::write(d.path().join("www/root/2.json"), signed(2, &k)).expect("v2");
    fs::write(d.path().join("www/root/3.json"), b"{\"signed\": 1}").expect("junk");
    let www = d.path().join("www");
    let e = t
        .follow(www.to_str().expect("utf8"), &FetchConfig::default(), 100)
        .expect_err("bad link");
    assert!(
        matches!(
            e,
            NodeTrustError::Next {
                version: 3,
                current: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(t.root().map(|r| r.version()), Some(2));
    // What was verified was kept: a new process starts from root 2.
    let cfg = TrustConfig {
        root: d.path().join("shipped.json"),
        ..TrustConfig::default()
    };
    let again = NodeTrust::load(&cfg, &d.path().join("state"), &d.path().join("keys.d"));
    assert_eq!(again.expect("load").root().map(|r| r.version()), Some(2));
}

#[test]
fn corrupt_channel_marks_are_an_error_that_names_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    fs::write(d.path().join("channels.json"), b"{not json").expect("corrupt");
    let e = Marks::load(d.path()).expect_err("corrupt");
    assert!(matches!(e, NodeTrustError::MarksCorrupt { .. }), "{e}");
    assert!(e.to_string().contains("channels.json"), "{e}");
}
