//! What the file names in the entries directory say: [`Entry`], [`Name`], boot
//! [`Counter`]s, and the versions that go into names.

use std::path::Path;

use super::{CONF, GUARD_MARK, MAX_NAME_VERSION, PREFIX, STAGED, TMP};
use crate::boot::BootError;
use crate::slots::Slot;

/// What is wrong with a set of names, before we know the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    /// The file at fault, when there is one.
    pub name: Option<String>,
    pub what: &'static str,
}

impl StateError {
    pub(super) fn new(what: &'static str) -> Self {
        Self { name: None, what }
    }

    pub(super) fn file(name: &str, what: &'static str) -> Self {
        Self {
            name: Some(name.to_owned()),
            what,
        }
    }

    pub(super) fn at(self, dir: &Path) -> BootError {
        BootError::Malformed {
            path: self.name.map_or_else(|| dir.to_owned(), |n| dir.join(n)),
            what: self.what,
        }
    }
}

/// A boot counter as in `NAME+LEFT-DONE.conf`; `done` is `None` for `NAME+LEFT.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub left: u32,
    pub done: Option<u32>,
}

impl Counter {
    /// The counter systemd-boot's name parser finds in `stem` (the name without
    /// `.conf`): after the last `+`, digits, optionally `-` and digits, then the end.
    /// Returns the part before the `+` and the counter.
    pub fn split(stem: &str) -> Option<(&str, Self)> {
        let plus = stem.rfind('+')?;
        let (left, done) = match stem[plus + 1..].split_once('-') {
            Some((l, d)) => (l, Some(d)),
            None => (&stem[plus + 1..], None),
        };
        let num = |s: &str| -> Option<u32> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // systemd-boot ignores counters above INT_MAX.
            s.parse::<u32>().ok().filter(|&n| n <= i32::MAX as u32)
        };
        let left = num(left)?;
        let done = match done {
            Some(d) => Some(num(d)?),
            None => None,
        };
        Some((&stem[..plus], Self { left, done }))
    }

    fn suffix(&self) -> String {
        match self.done {
            Some(done) => format!("+{}-{done}", self.left),
            None => format!("+{}", self.left),
        }
    }
}

/// One of our `.conf` entries, as its name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub rank: u32,
    pub slot: Slot,
    /// The version as it appears in the name (see [`name_version`]).
    pub version: String,
    /// The committed default with a boot guard (`@default` before the counter): its
    /// counter limits the boots in a row that do not reach the agent, not a trial's.
    pub guard: bool,
    pub counter: Option<Counter>,
}

impl Entry {
    pub fn file_name(&self) -> String {
        format!(
            "{PREFIX}{}-{}-{}{}{}{CONF}",
            self.rank,
            self.slot,
            self.version,
            if self.guard { GUARD_MARK } else { "" },
            self.counter.map(|c| c.suffix()).unwrap_or_default()
        )
    }

    /// Whether systemd-boot would choose this entry over lower-ranked ones: it has no
    /// counter, or tries left.
    pub fn has_tries(&self) -> bool {
        self.tries_left() != Some(0)
    }

    /// Whether this entry can be the default: blessed, or a guarded default (whose
    /// counter counts boots of the default, not tries of a trial).
    pub fn is_default_kind(&self) -> bool {
        self.counter.is_none() || self.guard
    }

    /// Tries left as systemd-boot sees them: `None` without a counter.
    pub fn tries_left(&self) -> Option<u32> {
        self.counter.map(|c| c.left)
    }
}

/// What a file name in the entries directory is to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    Entry(Entry),
    Staged {
        slot: Slot,
        version: String,
    },
    Temp(Slot),
    /// Not ours: left alone.
    Foreign,
}

fn slot_of(s: &str) -> Option<Slot> {
    match s {
        "a" => Some(Slot::A),
        "b" => Some(Slot::B),
        _ => None,
    }
}

fn valid_name_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_NAME_VERSION
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `<slot>-<version>`, as in staged names and after the rank in entry names.
fn slot_version(s: &str) -> Option<(Slot, String)> {
    let (slot, version) = s.split_once('-')?;
    let slot = slot_of(slot)?;
    valid_name_version(version).then(|| (slot, version.to_owned()))
}

impl Name {
    pub fn parse(name: &str) -> Result<Self, StateError> {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return Ok(Self::Foreign);
        };
        let bad = |what| Err(StateError::file(name, what));
        if let Some(slot) = rest.strip_suffix(TMP) {
            return match slot_of(slot) {
                Some(slot) => Ok(Self::Temp(slot)),
                None => bad("a temporary file of the agent names no slot"),
            };
        }
        if let Some(sv) = rest.strip_suffix(STAGED) {
            return match slot_version(sv) {
                Some((slot, version)) => Ok(Self::Staged { slot, version }),
                None => bad("a staged entry is not update-agent-<slot>-<version>.staged"),
            };
        }
        let Some(stem) = rest.strip_suffix(CONF) else {
            return bad("a file named update-agent-* is none of the agent's kinds");
        };
        let (stem, counter) = match Counter::split(stem) {
            Some((stem, c)) => (stem, Some(c)),
            None if stem.contains('+') => {
                return bad("an entry of the agent has a '+' that is not a boot counter")
            }
            None => (stem, None),
        };
        let (stem, guard) = match stem.strip_suffix(GUARD_MARK) {
            Some(stem) => (stem, true),
            None => (stem, false),
        };
        let Some((rank, sv)) = stem.split_once('-') else {
            return bad("an entry of the agent is not update-agent-<rank>-<slot>-<version>");
        };
        let digits = !rank.starts_with('0') && rank.bytes().all(|b| b.is_ascii_digit());
        let Some(rank) = rank.parse::<u32>().ok().filter(|_| digits) else {
            return bad(
                "an entry of the agent has a rank that is not 1 or more without leading zeros",
            );
        };
        match slot_version(sv) {
            Some((slot, version)) => Ok(Self::Entry(Entry {
                rank,
                slot,
                version,
                guard,
                counter,
            })),
            None => bad("an entry of the agent is not update-agent-<rank>-<slot>-<version>"),
        }
    }
}

pub(super) fn staged_name(slot: Slot, version: &str) -> String {
    format!("{PREFIX}{slot}-{version}{STAGED}")
}

pub(super) fn temp_name(slot: Slot) -> String {
    format!("{PREFIX}{slot}{TMP}")
}

/// The version as it goes into file names: characters other than `A-Za-z0-9._-` become
/// `_`, at most [`MAX_NAME_VERSION`] of them. Empty or control characters: refused.
pub fn name_version(version: &str) -> Result<String, &'static str> {
    if version.is_empty() {
        return Err("the version is empty");
    }
    if version.chars().any(char::is_control) {
        return Err("the version contains control characters");
    }
    Ok(version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_VERSION)
        .collect())
}
