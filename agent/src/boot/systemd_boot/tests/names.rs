//! Tests of `names.rs`: parsing and writing file names, counters, versions.

use crate::boot::systemd_boot::names::{Counter, Entry, Name, StateError};
use crate::boot::systemd_boot::test_util::{entry, loader_try, st, state, summary, A, B};
use crate::boot::systemd_boot::{name_version, MAX_NAME_VERSION};

#[test]
fn names_round_trip() {
    let cases = [
        ("update-agent-1-a-1.0.conf", 1, A, "1.0", None),
        (
            "update-agent-7-b-2.0-rc_1+3.conf",
            7,
            B,
            "2.0-rc_1",
            Some((3, None)),
        ),
        (
            "update-agent-12-a-v3+2-1.conf",
            12,
            A,
            "v3",
            Some((2, Some(1))),
        ),
        (
            "update-agent-4294967295-b-x+0-3.conf",
            u32::MAX,
            B,
            "x",
            Some((0, Some(3))),
        ),
        ("update-agent-3-a-1+0.conf", 3, A, "1", Some((0, None))),
    ];
    let guarded = [
        (
            "update-agent-6-a-8.0@default+3.conf",
            6,
            A,
            "8.0",
            Some((3, None)),
        ),
        (
            "update-agent-6-a-8.0@default+2-1.conf",
            6,
            A,
            "8.0",
            Some((2, Some(1))),
        ),
        ("update-agent-7-b-x_y@default.conf", 7, B, "x_y", None),
    ];
    let all = cases.iter().map(|c| (c, false));
    for ((name, rank, slot, version, counter), guard) in
        all.chain(guarded.iter().map(|c| (c, true)))
    {
        let (name, rank, slot, version, counter) = (*name, *rank, *slot, *version, *counter);
        let want = Entry {
            rank,
            slot,
            version: version.into(),
            guard,
            counter: counter.map(|(left, done)| Counter { left, done }),
        };
        assert_eq!(Name::parse(name), Ok(Name::Entry(want.clone())), "{name}");
        assert_eq!(want.file_name(), name);
    }
    assert_eq!(
        Name::parse("update-agent-b-2.0.staged"),
        Ok(Name::Staged {
            slot: B,
            version: "2.0".into()
        })
    );
    assert_eq!(Name::parse("update-agent-a.tmp"), Ok(Name::Temp(A)));
    for foreign in [
        "debian-6.1.0-18-cloud-amd64.conf",
        "loader.conf",
        "Update-Agent-1-a-1.conf",
        "update-agent.conf",
        "updateagent-1-a-1.conf",
        ".update-agent-1-a-1.conf",
    ] {
        assert_eq!(Name::parse(foreign), Ok(Name::Foreign), "{foreign}");
    }
}

#[test]
fn counters_the_loader_changed_are_read_right() {
    // Armed with 3 tries, then what systemd-boot renames it to at each boot.
    let mut name = entry(2, B, "2.0", Some((3, None)));
    let mut seen = Vec::new();
    for want in [3u8, 2, 1, 0, 0] {
        let s = st(&["update-agent-1-a-1.0.conf", &name]);
        assert_eq!(summary(&s), (A, Some((B, want)), [true, true]), "{name}");
        // The trial boots while it has tries; then the default does.
        let first = s.first().expect("first").slot;
        assert_eq!(first, if want > 0 { B } else { A }, "{name}");
        seen.push(name.clone());
        if want > 0 {
            name = loader_try(&name);
        }
    }
    assert_eq!(
        seen,
        [
            "update-agent-2-b-2.0+3.conf",
            "update-agent-2-b-2.0+2-1.conf",
            "update-agent-2-b-2.0+1-2.conf",
            "update-agent-2-b-2.0+0-3.conf",
            "update-agent-2-b-2.0+0-3.conf",
        ]
    );
    // Written by other tools: `+N-0`, `+0` (systemd-bless-boot bad), big counters.
    for (name, left) in [
        ("update-agent-2-b-2.0+4-0.conf", 4),
        ("update-agent-2-b-2.0+0.conf", 0),
        ("update-agent-2-b-2.0+300-1.conf", 255),
    ] {
        let s = st(&["update-agent-1-a-1.0.conf", name]);
        assert_eq!(summary(&s).1, Some((B, left)), "{name}");
    }
    // A counter systemd-boot would not read (above INT_MAX) is no counter to it; to
    // us a '+' that is no counter is malformed.
    assert!(state(&[
        "update-agent-1-a-1.conf",
        "update-agent-2-b-2+2147483648.conf"
    ])
    .is_err());
    assert!(state(&[
        "update-agent-1-a-1.conf",
        "update-agent-2-b-2+2147483647.conf"
    ])
    .is_ok());
}

#[test]
fn malformed_names() {
    for name in [
        "update-agent-x.conf",
        "update-agent-a-1.conf",
        "update-agent-0-a-1.conf",
        "update-agent-01-a-1.conf",
        "update-agent-4294967296-a-1.conf",
        "update-agent-1-c-1.conf",
        "update-agent-1-A-1.conf",
        "update-agent-1-a-.conf",
        "update-agent-1-a.conf",
        "update-agent-1-a-1 2.conf",
        "update-agent-1-a-1+x.conf",
        "update-agent-1-a-1+1-.conf",
        "update-agent-1-a-1+-1.conf",
        "update-agent-1-a-1+1-2-3.conf",
        "update-agent-1-a-1+2+3.conf",
        "update-agent-1-a-1.CONF",
        "update-agent-1-a-1.conf.bak",
        "update-agent-c.tmp",
        "update-agent-b.staged",
        "update-agent-b-.staged",
        "update-agent-7-b-2.staged",
        "update-agent-",
        // The guard's mark: only once, only right before the counter or `.conf`.
        "update-agent-1-a-1@default@default+3.conf",
        "update-agent-1-a-1@defaultx+3.conf",
        "update-agent-1-a-1@default+3@default.conf",
        "update-agent-1-a-@default.conf",
        "update-agent-1-a-1@Default+3.conf",
        "update-agent-1-a@default.conf",
    ] {
        match Name::parse(name) {
            Err(StateError {
                name: Some(n),
                what,
            }) => {
                assert_eq!(n, name);
                assert!(!what.is_empty());
            }
            other => panic!("{name}: expected an error, got {other:?}"),
        }
    }
}

#[test]
fn versions_in_names() {
    assert_eq!(name_version("1.2.3"), Ok("1.2.3".into()));
    assert_eq!(name_version("1.2.3+build.5"), Ok("1.2.3_build.5".into()));
    assert_eq!(
        name_version("2024.06 (LTS)/x~rc1"),
        Ok("2024.06__LTS__x_rc1".into())
    );
    assert_eq!(name_version("ü"), Ok("_".into()));
    assert_eq!(
        name_version(&"9".repeat(100)).map(|v| v.len()),
        Ok(MAX_NAME_VERSION)
    );
    assert!(name_version("").is_err());
    assert!(name_version("1\n2").is_err());
    let long = name_version(&"9".repeat(300)).expect("valid");
    let name = entry(
        u32::MAX,
        B,
        &long,
        Some((i32::MAX as u32, Some(i32::MAX as u32))),
    );
    assert!(name.len() < 255, "{}", name.len());
}
