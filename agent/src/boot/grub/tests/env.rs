//! The block: what grub-editenv writes we read, and the other way round.

use super::*;

#[test]
fn new_block_is_what_editenv_creates() {
    let dir = tmp();
    let file = editenv_file(dir.path(), "grubenv", &[]);
    let created = bytes(&file);
    assert_eq!(
        GrubEnv::new()
            .to_bytes()
            .expect("empty block fits")
            .to_vec(),
        created
    );
    assert_eq!(
        GrubEnv::parse(&created).expect("parsing a fresh block"),
        GrubEnv::new()
    );
}

#[test]
fn reads_what_editenv_writes() {
    let dir = tmp();
    let sets = [
        "saved_entry=gnulinux-advanced-1234>gnulinux-6.1",
        "next_entry=",
        "back=a\\b",
        "nl=line1\nline2",
        "both=x\\\ny\\",
        "eq=a=b#c",
        "ua_default=b",
        "ua_trial=a",
        "ua_tries=3",
        "ua_a_ok=1",
        "ua_b_ok=1",
    ];
    let file = editenv_file(dir.path(), "grubenv", &sets);
    let raw = bytes(&file);
    let env = GrubEnv::parse(&raw).expect("parsing grub-editenv's block");
    let get = |k| env.get(k).expect("variable set by grub-editenv");
    assert_eq!(get("back"), b"a\\b");
    assert_eq!(get("nl"), b"line1\nline2");
    assert_eq!(get("both"), b"x\\\ny\\");
    assert_eq!(get("eq"), b"a=b#c");
    assert_eq!(get("next_entry"), b"");
    assert_eq!(env.list(), editenv(&file, &["list"]));
    assert_eq!(env.to_bytes().expect("fits").to_vec(), raw);
    let names: Vec<&[u8]> = env.vars().map(|(n, _)| n).collect();
    let expected: Vec<&[u8]> = sets
        .iter()
        .map(|s| s.split('=').next().expect("name").as_bytes())
        .collect();
    assert_eq!(names, expected);
    assert_eq!(
        GrubState::from_env(&env).expect("valid agent variables"),
        GrubState {
            default: Slot::B,
            trial: Some(Slot::A),
            tries: 3,
            ok: [true, true],
            boots: None,
            fallen: None,
        }
    );
}

#[test]
fn editenv_reads_what_we_write() {
    let dir = tmp();
    let file = dir.path().join("grubenv");
    let mut env = GrubEnv::new();
    let vars = [
        ("plain", "value"),
        ("back", "a\\b\\\\"),
        ("nl", "line1\nline2\n"),
        ("mixed", "\\\n\\"),
        ("odd", "a=b #c ü"),
        ("empty", ""),
    ];
    for (k, v) in vars {
        env.set(k, v).expect("valid name");
    }
    fs::write(&file, env.to_bytes().expect("fits")).expect("writing test block");
    let mut expected = Vec::new();
    for (k, v) in vars {
        expected.extend_from_slice(format!("{k}={v}\n").as_bytes());
    }
    assert_eq!(editenv(&file, &["list"]), expected);
    assert_eq!(env.list(), expected);

    // grub-editenv can go on editing it, and we read its edit.
    editenv(&file, &["set", "back=short", "added=1"]);
    editenv(&file, &["unset", "plain"]);
    let back = GrubEnv::parse(&bytes(&file)).expect("parsing after grub-editenv");
    env.set("back", "short").expect("valid name");
    env.set("added", "1").expect("valid name");
    assert!(env.unset("plain"));
    assert_eq!(back, env);
    assert_eq!(env.to_bytes().expect("fits").to_vec(), bytes(&file));
}

#[test]
fn too_large_is_refused_and_changes_nothing() {
    let dir = tmp();
    let fill = format!("filler={}", "x".repeat(900));
    let path = editenv_file(dir.path(), "grubenv", &[&fill]);
    let before = bytes(&path);
    let mut grub = open(&path);
    assert_eq!(status(&grub).default, Slot::A);
    match grub.commit(Slot::A) {
        Err(BootError::TooLarge { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(bytes(&path), before);
    // grub-editenv agrees that it does not fit.
    let out = Command::new(tool(GRUB_EDITENV))
        .arg(&path)
        .args([
            "set",
            "ua_default=a",
            "ua_trial=",
            "ua_tries=0",
            "ua_a_ok=1",
            "ua_b_ok=1",
        ])
        .output()
        .expect("running grub-editenv");
    assert!(!out.status.success());

    // Exactly full (no padding left) is still a valid block.
    let mut env = GrubEnv::new();
    let room = BLOCK_SIZE - SIGNATURE.len() - EDITENV_WARNING.len() - "k=\n".len();
    env.set("k", &"y".repeat(room)).expect("valid name");
    let full = env.to_bytes().expect("exactly fits");
    assert_eq!(full[BLOCK_SIZE - 1], b'\n');
    assert_eq!(GrubEnv::parse(&full).expect("full block parses"), env);
    env.set("k", &"y".repeat(room + 1)).expect("valid name");
    assert!(matches!(env.to_bytes(), Err(EnvError::TooLarge(_))));
}

#[test]
fn strict_parsing() {
    use EnvError::Malformed;
    let bad_size = |n: usize| {
        let mut b = block(b"");
        b.resize(n, b'#');
        GrubEnv::parse(&b)
    };
    for n in [0, 1, 1023, 1025, 2048] {
        assert_eq!(bad_size(n), Err(Malformed("size is not 1024 bytes")), "{n}");
    }
    let mut no_header = block(b"a=1\n");
    no_header[2] = b'g';
    assert!(matches!(GrubEnv::parse(&no_header), Err(Malformed(w)) if w.contains("header")));

    let cases: [(&[u8], &str); 8] = [
        (b"foo\n", "neither a comment nor name=value"),
        (b"\n", "neither a comment nor name=value"),
        (b"=1\n", "empty name"),
        (b"a=1\na=2\n", "defined twice"),
        (b"a=\x001\n", "NUL"),
        (b"a=1", "padding"),
        (b"a=1\n# c\nbare\n", "neither a comment"),
        (b"a=1\\\n", "does not end"),
    ];
    for (content, want) in cases {
        match parse(content) {
            Err(Malformed(what)) => assert!(
                what.contains(want),
                "{:?}: {what} does not say {want}",
                show(content)
            ),
            other => panic!("{:?}: expected Malformed, got {other:?}", show(content)),
        }
    }
    let mut stray = block(b"a=1\n");
    stray[BLOCK_SIZE - 1] = b'x';
    assert!(matches!(GrubEnv::parse(&stray), Err(Malformed(w)) if w.contains("padding")));
    stray[BLOCK_SIZE - 1] = b'#';
    stray[BLOCK_SIZE - 100] = b' ';
    assert!(matches!(GrubEnv::parse(&stray), Err(Malformed(w)) if w.contains("padding")));

    // What GRUB accepts and we keep: comments anywhere, '\x' read as 'x'.
    let odd = b"# a comment\na=\\x\\\\\n## another=1\nb=c=d\n";
    let env = parse(odd).expect("valid block");
    assert_eq!(env.get("a"), Some(&b"x\\"[..]));
    assert_eq!(env.get("b"), Some(&b"c=d"[..]));
    assert_eq!(env.get("## another"), None);
    assert_eq!(env.to_bytes().expect("fits").to_vec(), block(odd));
}

#[test]
fn set_rejects_bad_names_and_nul() {
    let mut env = GrubEnv::new();
    for name in ["", "a=b", "a\nb", "#x", "a b", "ü"] {
        assert!(env.set(name, "1").is_err(), "{name:?}");
    }
    assert!(env.set("a", "x\0y").is_err());
    assert_eq!(env, GrubEnv::new());
    assert!(!env.unset("missing"));
}
