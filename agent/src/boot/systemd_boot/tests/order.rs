//! Tests of `order.rs`: systemd's version comparison and foreign entries.

use std::cmp::Ordering;

use crate::boot::systemd_boot::order::{
    check_order, is_entry_name, may_sort_before, strverscmp_improved, Foreign,
};
use crate::boot::systemd_boot::test_util::{st, A};

#[test]
fn strverscmp_matches_systemd() {
    // Ordered oldest to newest, from systemd's test-string-util.c.
    let versions = [
        "~1",
        "",
        "ab",
        "abb",
        "abc",
        "0001",
        "002",
        "12",
        "122",
        "122.9",
        "123~rc1",
        "123",
        "123-a",
        "123-a.1",
        "123-a1",
        "123-a1.1",
        "123-3",
        "123-3.1",
        "123^patch1",
        "123^1",
        "123.a-1",
        "123.1-1",
        "123a-1",
        "124",
    ];
    for (i, older) in versions.iter().enumerate() {
        assert_eq!(
            strverscmp_improved(older, older),
            Ordering::Equal,
            "{older}"
        );
        for newer in &versions[i + 1..] {
            assert_eq!(
                strverscmp_improved(older, newer),
                Ordering::Less,
                "{older} < {newer}"
            );
            assert_eq!(
                strverscmp_improved(newer, older),
                Ordering::Greater,
                "{newer} > {older}"
            );
        }
    }
    let newer = [
        ("123.45-67.88", "123.45-67.89"),
        ("123.45-67.89", "123.45-67.89a"),
        ("123.45-67.ab", "123.45-67.89"),
        ("123.45-67.9", "123.45-67.89"),
        ("123.45-67", "123.45-67.89"),
        ("123-99.99", "123.45-67.89"),
        ("123~rc1-99.99", "123^aa2-67.89"),
        ("123^45-67.89", "123.45-67.89"),
        ("123.aa2-67.89", "123aa2-67.89"),
        ("5.5p1", "5.5p10"),
        ("10.1xyz", "10xyz"),
        ("xyz.4", "2"),
        ("6.0", "6.0.rc1"),
        ("1.0~rc1", "1.0"),
        ("1.0^git1", "1.01"),
        ("4.999.9", "5.0"),
        ("2.0", "2_0"),
        ("1.fc17", "1b.fc17"),
    ];
    for (o, n) in newer {
        assert_eq!(strverscmp_improved(o, n), Ordering::Less, "{o} < {n}");
        assert_eq!(strverscmp_improved(n, o), Ordering::Greater, "{n} > {o}");
    }
    let equal = [
        ("123_aa2-67.89", "123aa+2-67.89"),
        ("10.0001", "10.1"),
        ("0_", "0"),
        ("_0_", "0"),
        ("", "_"),
        ("~", "~"),
        ("a+", "a_"),
        ("1.1.α", "1.1.β"),
    ];
    for (x, y) in equal {
        assert_eq!(strverscmp_improved(x, y), Ordering::Equal, "{x} == {y}");
    }
    for (x, y, want) in [
        ("123.", "123", Ordering::Greater),
        ("12_3", "123", Ordering::Less),
        ("12_3", "12.3", Ordering::Greater),
        ("123..0", "123.0", Ordering::Less),
        ("", "~", Ordering::Greater),
    ] {
        assert_eq!(strverscmp_improved(x, y), want, "{x} vs {y}");
    }
    // What the naming relies on: the rank decides, numerically, whatever follows.
    assert_eq!(
        strverscmp_improved("update-agent-10-a-1.0.conf", "update-agent-9-b-9.9+3.conf"),
        Ordering::Greater
    );
    assert_eq!(
        strverscmp_improved("update-agent-2-a-1.0+0-3.conf", "update-agent-1-b-99.conf"),
        Ordering::Greater
    );
}

#[test]
fn foreign_entries_that_sort_first_are_found() {
    let s = st(&["update-agent-1-a-1.0.conf"]);
    let f = |name: &str, sort_key| Foreign {
        name: name.into(),
        sort_key,
    };
    let after = [
        f("debian-6.1.0-18-cloud-amd64.conf", false),
        f("arch.conf", false),
        f("fedora-40.conf", false),
        f("abc123def-6.1.conf", false),
        f("ubuntu.conf", false),
        f("zzz+0-3.conf", true),
        f("zzz+0.conf", false),
    ];
    for x in &after {
        assert!(!may_sort_before(x, s.first().expect("first")), "{}", x.name);
    }
    assert_eq!(check_order(&s, &after), Ok(()));
    for x in [
        f("zz.conf", false),
        f("0123456789abcdef-6.1.conf", false),
        f("debian-6.1.conf", true),
        f("update-agentx.conf", false),
        // '.' is newer than '-' in systemd's comparison.
        f("update-agent.conf", false),
        f("vmlinuz+3.conf", false),
    ] {
        let err = check_order(&s, std::slice::from_ref(&x)).expect_err(&x.name);
        assert_eq!(err.name.as_deref(), Some(x.name.as_str()));
    }
    // Against a trial with no tries left the default is what must come first.
    let s = st(&["update-agent-1-a-1.conf", "update-agent-2-b-2+0-3.conf"]);
    assert_eq!(s.first().expect("first").slot, A);
    assert_eq!(check_order(&s, &[f("arch.conf", false)]), Ok(()));
    // A trial with tries sorts before foreign entries with none.
    let s = st(&["update-agent-1-a-1.conf", "update-agent-2-b-2+1-2.conf"]);
    assert_eq!(check_order(&s, &[f("zzz+0-1.conf", false)]), Ok(()));
    assert!(
        is_entry_name("X.CONF") && !is_entry_name("auto-windows.conf") && !is_entry_name(".conf")
    );
}
