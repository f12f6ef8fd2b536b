//! `updatectl bundle`, as a publisher runs it.

use super::*;

#[test]
fn cli_publisher_workflow_and_errors() {
    let fx = Fixture::new(21, 96, 16);
    let keys = fx.path("keys");
    let out = fx.path("out");
    let (code, stdout, stderr) = updatectl(&["bundle", "keygen", "--out", s(&keys)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("fingerprint"));
    // A second keygen must not overwrite the key.
    let (code, _, stderr) = updatectl(&["bundle", "keygen", "--out", s(&keys)]);
    assert_eq!(code, 1);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");

    let key = keys.join("update-agent.key");
    let base = |extra: &[&str]| {
        let mut v = vec![
            "bundle",
            "create",
            "--target",
            s(&fx.tgt),
            "--version",
            "2.0",
            "--compatible",
            "board-x",
            "--out",
            s(&out),
            "--level",
            "3",
        ];
        v.extend_from_slice(extra);
        v.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let run = |v: Vec<String>| updatectl(&v.iter().map(String::as_str).collect::<Vec<_>>());

    // Missing key: named.
    let (code, _, stderr) = run(base(&[
        "--key",
        "/nonexistent/k.key",
        "--source",
        s(&fx.src),
    ]));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/k.key"), "{stderr}");
    // Unreadable image: named.
    let (code, _, stderr) = run(base(&["--key", s(&key), "--source", "/nonexistent/v0.img"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/v0.img"), "{stderr}");
    // Target smaller than the source: names both files.
    let big = fx.path("big.img");
    fs::write(&big, vec![1u8; fx.target_bytes.len() + 8 * BS]).expect("write");
    let (code, _, stderr) = run(base(&["--key", s(&key), "--source", s(&big)]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("smaller than source") && stderr.contains("big.img"),
        "{stderr}"
    );

    let (code, stdout, stderr) = run(base(&["--key", s(&key), "--source", s(&fx.src)]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("full payload") && stdout.contains("delta from"),
        "{stdout}"
    );
    let mut payloads: Vec<PathBuf> = fs::read_dir(&out)
        .expect("out dir")
        .map(|e| e.expect("entry").path())
        .collect();
    payloads.sort();
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    let full = payloads
        .iter()
        .find(|p| s(p).ends_with(".full.uap"))
        .expect("full");
    let delta = payloads
        .iter()
        .find(|p| s(p).contains(".from-"))
        .expect("delta");

    let (code, stdout, _) = updatectl(&["bundle", "inspect", "--json", s(delta)]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(j["schema"], 2);
    assert_eq!(j["kind"], "delta");
    assert_eq!(j["version"], "2.0");
    assert_eq!(j["compatible"], "board-x");
    let covered: u64 = j["operations"]
        .as_array()
        .expect("ops")
        .iter()
        .map(|k| k["target_bytes"].as_u64().expect("n"))
        .sum();
    assert_eq!(covered, fx.target_bytes.len() as u64);
    let (code, stdout, _) = updatectl(&["bundle", "inspect", s(full)]);
    assert_eq!(code, 0);
    assert!(stdout.contains("kind         full"), "{stdout}");

    let pubdir = fx.path("trusted");
    fs::create_dir(&pubdir).expect("mkdir");
    fs::copy(keys.join("update-agent.pub"), pubdir.join("publisher.pub")).expect("copy");
    let (code, stdout, stderr) = updatectl(&[
        "bundle",
        "verify",
        s(delta),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.src),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rebuild      ok"), "{stdout}");
    let (code, stdout, stderr) = updatectl(&["bundle", "verify", s(full), "--keys", s(&pubdir)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rebuild      ok"), "{stdout}");

    // The wrong source is named, exit 3.
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "verify",
        s(delta),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.tgt),
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("v2.img") && stderr.contains("not the image"),
        "{stderr}"
    );
    // An untrusted key directory: exit 3.
    let other = fx.path("other-keys");
    updatectl(&["bundle", "keygen", "--out", s(&other)]);
    fs::remove_file(other.join("update-agent.key")).expect("rm");
    let (code, _, stderr) = updatectl(&["bundle", "verify", s(delta), "--keys", s(&other)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("does not trust"), "{stderr}");
    // A key file that does not parse is named.
    fs::write(other.join("broken.pub"), "not a key").expect("write");
    let (code, _, stderr) = updatectl(&["bundle", "verify", s(delta), "--keys", s(&other)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("broken.pub"), "{stderr}");

    // apply writes the image, and it is the target byte for byte.
    let img = fx.path("applied.img");
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "apply",
        s(delta),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.src),
        "--output",
        s(&img),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(fs::read(&img).expect("img"), fx.target_bytes);

    // A corrupted blob: exit 3, and no output file.
    let mut bytes = fs::read(delta).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    let bad = fx.path("bad.uap");
    fs::write(&bad, bytes).expect("write");
    let img2 = fx.path("never.img");
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "apply",
        s(&bad),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.src),
        "--output",
        s(&img2),
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(!img2.exists());
}
