//! The root of trust on a node: rotation followed from the release server with the
//! publisher's own verbs (`updatectl bundle root`), a removed key refused afterwards,
//! and every bad link refused by name with the node still on the last good root.

use std::fs;
use std::path::Path;
use std::process::Command;

use update_agent::payload::sign::PublisherKey;

use super::{text, Node};

fn updatectl(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(args)
        .output()
        .expect("updatectl");
    assert!(o.status.success(), "updatectl {args:?}: {}", text(&o));
    text(&o)
}

fn keygen(dir: &Path, name: &str) -> (String, String) {
    let d = dir.to_str().expect("utf8");
    updatectl(&["bundle", "keygen", "--out", d, "--name", name]);
    (format!("{d}/{name}.key"), format!("{d}/{name}.pub"))
}

/// `updatectl bundle root init` of a root at `out` with these public keys per role.
fn init_root(out: &str, root: &[&str], releases: &[&str], channels: &[&str], extra: &[&str]) {
    let mut a = vec!["bundle", "root", "init", "--out", out];
    for (flag, keys) in [
        ("--root-key", root),
        ("--releases-key", releases),
        ("--channels-key", channels),
    ] {
        for k in keys {
            a.extend([flag, k]);
        }
    }
    a.extend_from_slice(extra);
    updatectl(&a);
}

/// Points the node at `root` (its shipped root) and at the test server's releases.
fn use_root(n: &Node, root: &Path) {
    let cfg = fs::read_to_string(&n.config).expect("config");
    let cfg = format!(
        "{cfg}\n[trust]\nroot = \"{}\"\n[releases]\nurl = \"{}\"\n",
        root.display(),
        n.server.url("").trim_end_matches('/')
    );
    fs::write(&n.config, cfg).expect("config");
}

fn kept_version(n: &Node) -> Option<u64> {
    let bytes = fs::read(n.path("state/root.json")).ok()?;
    let root = update_agent::trust::root::Root::open_trusted(&bytes).expect("kept root verifies");
    Some(root.version())
}

#[test]
fn trust_a_rotated_root_is_followed_and_a_removed_key_is_refused() {
    let n = Node::new();
    let keys = n.path("keys");
    let (r1, r1p) = keygen(&keys, "root1");
    let (r2, r2p) = keygen(&keys, "root2");
    let (b, bp) = keygen(&keys, "release-b");
    let a_pub = n.path("keys.d/publisher.pub");
    let a_pub = a_pub.to_str().expect("utf8");
    let www = n.payloads.to_str().expect("utf8").to_owned();
    let root1 = format!("{www}/root/1.json");
    // Root 1: root keys 1 and 2, both needed; the node's publisher key A releases.
    init_root(&root1, &[&r1p, &r2p], &[a_pub], &[a_pub], &[]);
    updatectl(&["bundle", "root", "threshold", &root1, "--role", "root", "2"]);
    updatectl(&["bundle", "root", "sign", &root1, "--key", &r1]);
    let e = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["bundle", "root", "verify", &root1])
        .output()
        .expect("verify");
    assert!(
        !e.status.success() && text(&e).contains("fewer than the 2"),
        "{}",
        text(&e)
    );
    updatectl(&["bundle", "root", "sign", &root1, "--key", &r2]);
    assert!(updatectl(&["bundle", "root", "verify", &root1]).contains("root version 1"));
    let shipped = n.path("shipped-root.json");
    fs::copy(&root1, &shipped).expect("ship root 1");
    use_root(&n, &shipped);

    // On root 1, A's release is taken.
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    n.assert_armed_v2();
    assert_eq!(kept_version(&n), None, "nothing to follow yet");

    // A leaks. Root 2 drops it for B, signed by both root keys.
    let root2 = format!("{www}/root/2.json");
    updatectl(&["bundle", "root", "next", &root1, "--out", &root2]);
    let a_fp = &hex::encode(update_agent::payload::sign::fingerprint(
        &update_agent::payload::TrustedKeys::load_public(Path::new(a_pub)).expect("a"),
    ))[..16];
    for role in ["releases", "channels"] {
        updatectl(&[
            "bundle", "root", "add-key", &root2, "--role", role, "--key", &bp,
        ]);
        updatectl(&[
            "bundle",
            "root",
            "remove-key",
            &root2,
            "--role",
            role,
            "--fingerprint",
            a_fp,
        ]);
    }
    // Signed by one root key only: the node refuses the link and stays on root 1.
    updatectl(&["bundle", "root", "sign", &root2, "--key", &r1]);
    n.reset();
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success()
            && text(&o).contains("root version 2")
            && text(&o).contains("fewer than the 2"),
        "{}",
        text(&o)
    );
    assert_eq!(kept_version(&n), None);
    updatectl(&["bundle", "root", "sign", &root2, "--key", &r2]);
    updatectl(&["bundle", "root", "verify", &root2, "--previous", &root1]);

    // Now followed; A's payload is refused, B's taken.
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("signed only by keys this node does not trust"),
        "{}",
        text(&o)
    );
    assert_eq!(
        kept_version(&n),
        Some(2),
        "root 2 kept in the state directory"
    );
    let b_key = PublisherKey::load(Path::new(&b)).expect("b");
    let delta_b = n.publish_signed(&b_key, "2.1", "test-board", &n.path("v2.img"), 64 << 10);
    let o = n.agent(&["stage", &n.server.url(&delta_b)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(n.state()["state"], "armed");

    // A link that skips a version (3.json says 4) is refused; the node keeps root 2.
    let root3 = format!("{www}/root/3.json");
    let root4 = n.path("root4.json");
    let root4 = root4.to_str().expect("utf8");
    updatectl(&["bundle", "root", "next", &root2, "--out", &root3]);
    updatectl(&["bundle", "root", "next", &root3, "--out", root4]);
    updatectl(&["bundle", "root", "sign", root4, "--key", &r1, "--key", &r2]);
    fs::copy(root4, &root3).expect("skip");
    n.reset();
    let o = n.agent(&["stage", &n.server.url(&delta_b)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("root version 4 cannot follow version 2"),
        "{}",
        text(&o)
    );
    assert_eq!(kept_version(&n), Some(2));
}

/// Root 1 (one root key; the node's publisher key for releases and channels) living
/// `days`, signed, on the release server and copied as the node's shipped root.
/// Returns the root key's private half, the server's directory, root 1's path there
/// and the shipped copy.
fn ship_root_1(n: &Node, days: u32) -> (String, String, String, std::path::PathBuf) {
    let (r1, r1p) = keygen(&n.path("keys"), "root1");
    let a_pub = n.path("keys.d/publisher.pub");
    let a_pub = a_pub.to_str().expect("utf8");
    let www = n.payloads.to_str().expect("utf8").to_owned();
    let root1 = format!("{www}/root/1.json");
    let days = days.to_string();
    init_root(
        &root1,
        &[&r1p],
        &[a_pub],
        &[a_pub],
        &["--expires-in-days", &days],
    );
    updatectl(&["bundle", "root", "sign", &root1, "--key", &r1]);
    let shipped = n.path("shipped-root.json");
    fs::copy(&root1, &shipped).expect("ship root 1");
    (r1, www, root1, shipped)
}

#[test]
fn trust_an_expired_root_is_followed_to_a_current_one() {
    let n = Node::new();
    let (r1, www, root1, shipped) = ship_root_1(&n, 0);
    use_root(&n, &shipped);
    fs::remove_file(&root1).expect("not on the server");
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("root version 1 expired"),
        "{}",
        text(&o)
    );
    // The publisher signs root 2 with a year to live: the node follows and stages.
    fs::copy(&shipped, &root1).expect("root 1 back");
    let root2 = format!("{www}/root/2.json");
    updatectl(&["bundle", "root", "next", &root1, "--out", &root2]);
    updatectl(&["bundle", "root", "sign", &root2, "--key", &r1]);
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    n.assert_armed_v2();
    assert_eq!(kept_version(&n), Some(2));
}

/// Replay, mix-and-match and endless lifetimes, on a node following a channel: an
/// older channel document, a payload of another release at a place the channel names,
/// and a document claiming to live longer than the node allows are each refused by
/// name; a refreshed document (same release, later publication) is taken.
#[test]
fn trust_replayed_channels_mixed_payloads_and_long_lives_are_refused() {
    use update_agent::trust::node::NodeTrustError;
    use update_agent::update::{Agent, UpdateError};
    let n = Node::new();
    let (k, kp) = keygen(&n.path("pk"), "channels");
    fs::copy(&kp, n.path("keys.d/channels.pub")).expect("trust it");
    let base = n.server.url("").trim_end_matches('/').to_owned();
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(&n.config, format!("{cfg}\n[releases]\nurl = \"{base}\"\n")).expect("config");
    n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let www = n.payloads.to_str().expect("utf8").to_owned();
    let publish = |extra: &[&str]| {
        let mut a = vec![
            "bundle",
            "publish",
            "--channel",
            "stable",
            "--dir",
            &www,
            "--key",
            &k,
        ];
        a.extend_from_slice(extra);
        updatectl(&a)
    };
    let agent = || {
        Agent::new(update_agent::config::Config::load(&n.config).expect("config")).expect("agent")
    };
    let doc = n.payloads.join("channels/stable.json");
    publish(&["--version", "2.0"]);
    let first = fs::read(&doc).expect("doc");
    let c = agent()
        .open_channel(&base, "stable")
        .expect("first document");
    assert_eq!(c.version, "2.0");
    assert_eq!(
        c.payloads.len(),
        2,
        "full and delta pinned: {:?}",
        c.payloads
    );

    // A refresh: same release, published later, rollout start kept.
    publish(&["--refresh"]);
    let c2 = agent().open_channel(&base, "stable").expect("refreshed");
    assert!(c2.published > c.published);
    assert_eq!(
        c2.rollout_start(),
        c.published,
        "the rollout is not restarted"
    );

    // The first document again (still signed, still unexpired): a replay.
    let refreshed = fs::read(&doc).expect("doc");
    fs::write(&doc, &first).expect("replay");
    let e = agent().open_channel(&base, "stable").expect_err("replay");
    assert!(
        matches!(&e, UpdateError::Trust(t) if matches!(**t, NodeTrustError::Replayed { .. })),
        "{e:?}"
    );
    let msg = update_agent::update::error_chain(&e);
    assert!(
        msg.contains(&format!("published {}", c2.published)) && msg.contains("replayed"),
        "{msg}"
    );
    fs::write(&doc, &refreshed).expect("restore");

    // A channel document that claims to live 200 days (the node allows 90).
    publish(&["--version", "2.0", "--expires-in-days", "200"]);
    let e = agent()
        .open_channel(&base, "stable")
        .expect_err("long life");
    let msg = update_agent::update::error_chain(&e);
    assert!(msg.contains("trust.max_channel_days"), "{msg}");

    // Another release's signed payload where the channel names 2.0's: refused before
    // a byte of it is written.
    n.publish("2.1", "test-board", &n.path("v2.img"), 64 << 10);
    fs::copy(
        n.payloads.join("2.1.full.uap"),
        n.payloads.join("2.0.full.uap"),
    )
    .expect("swap");
    let url = format!("{base}/2.0.full.uap");
    let e = agent().check(&url, true).expect_err("mixed");
    let msg = update_agent::update::error_chain(&e);
    assert!(
        msg.contains("is not the payload the channel names"),
        "{msg}"
    );
    // Without a channel naming it, the same signed payload is a payload like any.
    fs::remove_file(n.path("state/channels.json")).expect("forget the channel");
    agent().check(&url, true).expect("unpinned");
}

/// A releases role of two keys, both needed: a payload signed by one is refused,
/// naming how many signed and how many are needed; the second holder adds a
/// signature with `updatectl bundle sign` and the same payload is taken.
#[test]
fn trust_a_release_needs_the_threshold_of_its_role() {
    let n = Node::new();
    let keys = n.path("keys");
    let (r1, r1p) = keygen(&keys, "root1");
    let (b, bp) = keygen(&keys, "release-b");
    let a_pub = n.path("keys.d/publisher.pub");
    let a_pub = a_pub.to_str().expect("utf8");
    let root = n.path("root.json");
    let root_s = root.to_str().expect("utf8");
    init_root(root_s, &[&r1p], &[a_pub, &bp], &[a_pub], &[]);
    updatectl(&[
        "bundle",
        "root",
        "threshold",
        root_s,
        "--role",
        "releases",
        "2",
    ]);
    updatectl(&["bundle", "root", "sign", root_s, "--key", &r1]);
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(&n.config, format!("{cfg}\n[trust]\nroot = \"{root_s}\"\n")).expect("config");
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let url = n.server.url(&delta);
    let agent = || {
        update_agent::update::Agent::new(
            update_agent::config::Config::load(&n.config).expect("config"),
        )
        .expect("agent")
    };
    let e = agent().check(&url, true).expect_err("one of two");
    let msg = update_agent::update::error_chain(&e);
    assert!(
        msg.contains("signed by 1 trusted key(s)") && msg.contains("fewer than the 2"),
        "{msg}"
    );
    let path = n.payloads.join(&delta);
    let before = fs::read(&path).expect("payload");
    updatectl(&["bundle", "sign", path.to_str().expect("utf8"), "--key", &b]);
    agent().check(&url, true).expect("two of two");
    // Only the signature block changed: the blob is the same bytes.
    let after = fs::read(&path).expect("payload");
    let blob = |v: &[u8]| v[v.len() - 4096..].to_vec();
    assert_eq!(blob(&before), blob(&after));
    let o = n.agent(&["stage", &url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    n.assert_armed_v2();
}

/// Status and metrics show the root of trust the daemon holds and when it expires,
/// with a warning in the last month; a root followed while an update is admitted
/// shows at once, in both.
#[test]
fn trust_status_and_metrics_show_the_root_and_its_expiry() {
    // Its API socket and release server; the shipped root comes below.
    let n = super::api::api_node();
    let (r1, www, root1, shipped) = ship_root_1(&n, 10);
    let port = super::auto::free_port();
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        format!(
            "{cfg}\n[trust]\nroot = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            shipped.display()
        ),
    )
    .expect("config");
    let d = super::api::Daemon::start(&n);
    let socket = d.socket().to_str().expect("utf8").to_owned();
    let status = || {
        let json = updatectl(&["--socket", &socket, "status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("status json");
        (v, updatectl(&["--socket", &socket, "status"]))
    };
    let (v, t) = status();
    assert_eq!(v["trust"]["root_version"], 1, "{v}");
    // Ten days from its signing, less the time since (whole days, rounded down).
    let days = v["trust"]["root_days_left"].as_i64().unwrap_or(-1);
    assert!(days == 9 || days == 10, "{v}");
    assert!(
        t.contains(&format!("root 1 · expires in {days} days")) && t.contains("publish root 2"),
        "{t}"
    );
    let m = super::auto::http_get(port, "/metrics");
    assert!(m.contains("\nupdate_agent_trust_root_version 1\n"), "{m}");
    let expires = m
        .lines()
        .find_map(|l| l.strip_prefix("update_agent_trust_root_expiry_timestamp_seconds "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no expiry in {m}"));
    let now = update_agent::timefmt::now();
    assert!(
        expires > now + 9 * 86_400 && expires <= now + 10 * 86_400 + 1,
        "{expires} vs now {now}"
    );

    // Root 2 (a year to live) is published; the update admits it first.
    let root2 = format!("{www}/root/2.json");
    updatectl(&["bundle", "root", "next", &root1, "--out", &root2]);
    updatectl(&["bundle", "root", "sign", &root2, "--key", &r1]);
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let out = updatectl(&[
        "--socket",
        &socket,
        "update",
        "--url",
        &n.server.url(&delta),
        "--wait",
    ]);
    assert!(out.contains("armed"), "{out}");
    assert_eq!(kept_version(&n), Some(2));
    let (v, t) = status();
    assert_eq!(v["trust"]["root_version"], 2, "{v}");
    assert!(v["trust"]["root_days_left"].as_i64() > Some(300), "{v}");
    assert!(t.contains("Trust     root 2 · expires 20"), "{t}");
    assert!(!t.contains("publish root"), "{t}");
    let m = super::auto::http_get(port, "/metrics");
    assert!(m.contains("\nupdate_agent_trust_root_version 2\n"), "{m}");
}
