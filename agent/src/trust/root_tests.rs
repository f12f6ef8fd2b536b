//! The root's rules: thresholds, one link at a time, both sides of a rotation, and
//! every malformed root refused by name.

use super::root::{RoleName, Root, RootBody, RootError};
use crate::payload::sign::{Domain, PublisherKey};
use crate::payload::TrustError;

fn key(n: u8) -> PublisherKey {
    PublisherKey::from_seed([n; 32])
}

/// Root `version`: root role keys `roots` (threshold `t`), one release key, one
/// channel key.
fn body(version: u64, roots: &[&PublisherKey], t: usize, release: &PublisherKey) -> RootBody {
    let mut b = RootBody::new(version, 2_000_000_000);
    for k in roots {
        b.add_key(RoleName::Root, &k.public());
    }
    b.role_mut(RoleName::Root).threshold = t;
    b.add_key(RoleName::Releases, &release.public());
    b.add_key(RoleName::Channels, &release.public());
    b
}

fn below(e: &RootError) -> bool {
    matches!(
        e,
        RootError::Signatures {
            source: TrustError::BelowThreshold { .. },
            ..
        }
    )
}

#[test]
fn a_root_needs_the_threshold_of_its_own_root_keys() {
    let (a, b, c, rel) = (key(1), key(2), key(3), key(9));
    let v1 = body(1, &[&a, &b, &c], 2, &rel);
    let root = Root::open_trusted(&v1.sign(&[&a, &b])).expect("2 of 3");
    assert_eq!(root.version(), 1);
    assert_eq!(root.role(RoleName::Root).threshold(), 2);
    let e = Root::open_trusted(&v1.sign(&[&a])).expect_err("1 of 3");
    assert!(below(&e), "{e:?}");
    // The same key twice is one signature.
    let e = Root::open_trusted(&v1.sign(&[&a, &a])).expect_err("a twice");
    assert!(below(&e), "{e:?}");
    // A release key is not a root key.
    let e = Root::open_trusted(&v1.sign(&[&rel])).expect_err("release key");
    assert!(
        matches!(
            e,
            RootError::Signatures {
                source: TrustError::UntrustedKey { .. },
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn rotation_follows_one_link_at_a_time_signed_by_old_and_new() {
    let (a, b, c, d, rel, rel2) = (key(1), key(2), key(3), key(4), key(9), key(10));
    let v1 = Root::open_trusted(&body(1, &[&a, &b, &c], 2, &rel).sign(&[&a, &b])).expect("v1");
    // v2 replaces root key c by d and the leaked release key by rel2.
    let mut b2 = body(2, &[&a, &b, &d], 2, &rel);
    assert!(b2
        .remove_key(
            RoleName::Releases,
            &hex::encode(crate::payload::sign::fingerprint(&rel.public()))[..8]
        )
        .is_some());
    b2.remove_key(
        RoleName::Channels,
        &hex::encode(crate::payload::sign::fingerprint(&rel.public()))[..16],
    );
    b2.add_key(RoleName::Releases, &rel2.public());
    b2.add_key(RoleName::Channels, &rel2.public());
    assert!(
        !b2.keys
            .contains_key(&hex::encode(crate::payload::sign::fingerprint(
                &rel.public()
            ))),
        "a key no role names leaves the root"
    );
    let v2 = v1
        .open_next(&b2.sign(&[&a, &b, &d]))
        .expect("old a+b, new a+b+d");
    // Signed by the new keys only (not a threshold of the old root): refused.
    let e = v1
        .open_next(&b2.sign(&[&d, &a]))
        .expect_err("old threshold");
    assert!(
        matches!(&e, RootError::Signatures { by: "previous", .. }),
        "{e:?}"
    );
    // Signed by old keys that the new root dropped only: its own threshold fails.
    let mut b2c = b2.clone();
    b2c.role_mut(RoleName::Root).threshold = 3;
    let e = v1
        .open_next(&b2c.sign(&[&a, &c, &b]))
        .expect_err("own threshold");
    assert!(
        matches!(&e, RootError::Signatures { by: "its own", .. }),
        "{e:?}"
    );
    // A skipped link, or the same version again: refused.
    let e = v1
        .open_next(&body(3, &[&a, &b], 2, &rel).sign(&[&a, &b]))
        .expect_err("skip");
    assert!(
        matches!(
            e,
            RootError::NotNext {
                current: 1,
                found: 3
            }
        ),
        "{e}"
    );
    let e = v2
        .open_next(&b2.sign(&[&a, &b, &d]))
        .expect_err("same version");
    assert!(
        matches!(
            e,
            RootError::NotNext {
                current: 2,
                found: 2
            }
        ),
        "{e}"
    );
    // The leaked release key no longer signs anything v2 accepts; the new one does.
    let manifest = b"a manifest";
    let e = v2
        .role(RoleName::Releases)
        .verify_as(Domain::Manifest, manifest, &[rel.sign(manifest)])
        .expect_err("revoked");
    assert!(matches!(e, TrustError::UntrustedKey { .. }), "{e}");
    v2.role(RoleName::Releases)
        .verify_as(Domain::Manifest, manifest, &[rel2.sign(manifest)])
        .expect("new key");
    v1.role(RoleName::Releases)
        .verify_as(Domain::Manifest, manifest, &[rel.sign(manifest)])
        .expect("v1 still trusted it");
}

#[test]
fn an_expired_root_can_still_be_followed_but_is_not_current() {
    let (a, rel) = (key(1), key(9));
    let mut b1 = body(1, &[&a], 1, &rel);
    b1.expires = 100;
    let v1 = Root::open_trusted(&b1.sign(&[&a])).expect("v1");
    let e = v1.current(100).expect_err("expired");
    assert!(e.to_string().contains("expired at 100"), "{e}");
    let v2 = v1
        .open_next(&body(2, &[&a], 1, &rel).sign(&[&a]))
        .expect("followed");
    v2.current(100).expect("the newer one is current");
}

#[test]
fn malformed_roots_are_refused_by_name() {
    let (a, rel) = (key(1), key(9));
    let good = body(1, &[&a], 1, &rel);
    let mut zero = good.clone();
    zero.role_mut(RoleName::Releases).threshold = 0;
    let mut over = good.clone();
    over.role_mut(RoleName::Releases).threshold = 2;
    let mut unknown = good.clone();
    unknown
        .role_mut(RoleName::Channels)
        .keys
        .push("ab".repeat(32));
    let mut badkey = good.clone();
    let fp = badkey.keys.keys().next().cloned().expect("a key");
    badkey.keys.insert(fp, "AAAA".into());
    let mut format = good;
    format.format = "tuf".into();
    for (what, b, want) in [
        (
            "threshold 0",
            zero,
            "a threshold must be 1 to the number of keys",
        ),
        ("threshold over", over, "needs 2 of 1 keys"),
        ("unknown key", unknown, "which is not in its key list"),
        ("bad key", badkey, "not a valid ed25519 key"),
        ("format", format, "format \"tuf\""),
    ] {
        let e = Root::open_trusted(&b.sign(&[&a])).expect_err(what);
        assert!(e.to_string().contains(want), "{what}: {e}");
    }
    let e = Root::open_trusted(&vec![b' '; 70 << 10]).expect_err("large");
    assert!(format!("{:?}", e).contains("TooLarge"), "{e:?}");
    let e = Root::open_trusted(b"{\"signed\": \"!!\", \"signatures\": []}").expect_err("b64");
    assert!(matches!(e, RootError::Envelope(_)), "{e:?}");
}
