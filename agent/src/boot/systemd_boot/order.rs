//! systemd-boot's order, to check that no foreign entry sorts before ours.

use std::cmp::Ordering;

use super::names::{Counter, Entry, StateError};
use super::state::EspState;
use super::CONF;

/// systemd's `strverscmp_improved()`, on bytes (systemd-boot compares UTF-16 ids, where
/// anything but ASCII letters, digits and `~-^.` is a separator, as non-ASCII bytes are
/// here).
pub fn strverscmp_improved(a: &str, b: &str) -> Ordering {
    let valid = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'~' | b'-' | b'^' | b'.');
    let at = |s: &[u8]| s.first().copied().unwrap_or(0);
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        while !a.is_empty() && !valid(a[0]) {
            a = &a[1..];
        }
        while !b.is_empty() && !valid(b[0]) {
            b = &b[1..];
        }
        // '~' (pre-release) is older than anything, even the end of the string.
        if at(a) == b'~' || at(b) == b'~' {
            let r = (at(a) != b'~').cmp(&(at(b) != b'~'));
            if r != Ordering::Equal {
                return r;
            }
            a = &a[1..];
            b = &b[1..];
        }
        if a.is_empty() || b.is_empty() {
            return at(a).cmp(&at(b));
        }
        // '-' (release) is older than '^' (patch), which is older than '.' (point).
        for sep in [b'-', b'^', b'.'] {
            if at(a) == sep || at(b) == sep {
                let r = (at(a) != sep).cmp(&(at(b) != sep));
                if r != Ordering::Equal {
                    return r;
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
        let run = |s: &[u8], f: fn(&u8) -> bool| s.iter().take_while(|c| f(c)).count();
        let (na, nb);
        if at(a).is_ascii_digit() || at(b).is_ascii_digit() {
            na = run(a, u8::is_ascii_digit);
            nb = run(b, u8::is_ascii_digit);
            // A number is newer than no number.
            let r = (na != 0).cmp(&(nb != 0));
            if r != Ordering::Equal {
                return r;
            }
            let da = &a[run(a, |&c| c == b'0').min(na)..na];
            let db = &b[run(b, |&c| c == b'0').min(nb)..nb];
            let r = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
            if r != Ordering::Equal {
                return r;
            }
        } else {
            na = run(a, u8::is_ascii_alphabetic);
            nb = run(b, u8::is_ascii_alphabetic);
            let m = na.min(nb);
            let r = a[..m].cmp(&b[..m]).then(na.cmp(&nb));
            if r != Ordering::Equal {
                return r;
            }
        }
        a = &a[na..];
        b = &b[nb..];
    }
}

/// A `.conf` file that is not ours, as far as systemd-boot's order goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub name: String,
    /// Whether the file has a `sort-key` line (such entries sort before ours).
    pub sort_key: bool,
}

/// Whether systemd-boot reads `name` as a type #1 entry. Conservative: also names
/// starting with `.`, which systemd-boot before 256 still read.
pub fn is_entry_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.len() > CONF.len() && lower.ends_with(CONF) && !name.starts_with("auto-")
}

/// Tries left as systemd-boot reads them from a name: `None` without a valid counter.
pub(super) fn name_tries_left(name: &str) -> Option<u32> {
    let lower = name.to_ascii_lowercase();
    let stem = lower.strip_suffix(CONF)?;
    Counter::split(stem).map(|(_, c)| c.left)
}

/// Whether `f` may sort before our entry `ours` in systemd-boot's menu (its
/// `boot_entry_compare`). Where systemd-boot's order is not determined by what we
/// know, the answer is yes.
pub(super) fn may_sort_before(f: &Foreign, ours: &Entry) -> bool {
    let f_left = name_tries_left(&f.name);
    let o_left = ours.tries_left();
    // Entries with no tries left go last.
    match (f_left == Some(0)).cmp(&(o_left == Some(0))) {
        Ordering::Less => return true,
        Ordering::Greater => return false,
        Ordering::Equal => {}
    }
    // Entries with a sort-key go before those without (ours have none).
    if f.sort_key {
        return true;
    }
    // Then by id, highest version first.
    match strverscmp_improved(&f.name.to_ascii_lowercase(), &ours.file_name()) {
        Ordering::Greater => true,
        Ordering::Less => false,
        // Equal ids: the order comes down to counters or to the sort's whims.
        Ordering::Equal => true,
    }
}

/// Refuses a tree where a foreign entry would be booted instead of ours.
pub fn check_order(state: &EspState, foreign: &[Foreign]) -> Result<(), StateError> {
    let first = state.first()?;
    match foreign.iter().find(|f| may_sort_before(f, first)) {
        Some(f) => Err(StateError::file(
            &f.name,
            "a foreign entry sorts before the agent's, so systemd-boot would boot it; remove it",
        )),
        None => Ok(()),
    }
}
