//! systemd-boot backend: the A/B state lives in the *names* of Boot Loader Specification
//! type #1 entries in `$ESP/loader/entries/`, with systemd-boot's boot counting
//! (`NAME+LEFT-DONE.conf`) and blessing (`systemd-bless-boot`: drop the counter).
//! Each slot's kernel and initrd live on the ESP, in `$ESP/update-agent/<slot>/`.
//!
//! # How systemd-boot chooses (the facts this backend relies on)
//!
//! With `timeout 0`, no `default` in `loader.conf` and no `LoaderEntryDefault` /
//! `LoaderEntryOneShot` EFI variable, systemd-boot boots the first entry of its sorted
//! list. The sort puts entries with no tries left (`+0` or `+0-N`) last, entries with a
//! `sort-key` before entries without one, and then orders by entry id (the file name,
//! lowercased) with `strverscmp_improved`, highest version first. Before booting a
//! counted entry it renames `NAME+L-D.conf` to `NAME+(L-1)-(D+1).conf` (`+3` becomes
//! `+2-1`). `systemd-bless-boot good` renames `NAME+L-D.conf` to `NAME.conf`.
//!
//! # Names
//!
//! | file | meaning |
//! |---|---|
//! | `update-agent-<rank>-<slot>-<version>.conf` | a bootable slot, blessed (no counter) |
//! | `update-agent-<rank>-<slot>-<version>+<left>[-<done>].conf` | a bootable slot with a boot counter |
//! | `update-agent-<slot>-<version>.staged` | an entry written by [`SystemdBoot::stage`], kernel installed, not yet armed (systemd-boot only reads `*.conf`) |
//! | `update-agent-<slot>.tmp` | a staged entry being written |
//!
//! `rank` is a decimal number without leading zeros that the agent owns. None of our
//! entries carries a `sort-key`, so systemd-boot orders them by id, and in
//! `update-agent-<rank>-…` the rank is the first segment that differs: **the entry with
//! the highest rank sorts first** (the version comparison reads that run of digits as
//! a number, so 10 sorts before 9). A new trial gets the highest rank there is plus
//! one, so it sorts first; blessing keeps its rank, so it stays first. `version` is the
//! release, with anything but `A-Za-z0-9._-` replaced by `_` (a `+` would read as a
//! counter) and cut to 64 characters; it is for people, the rank decides.
//!
//! Reading a directory ([`EspState::from_names`]):
//!
//! * the **default** is the entry without a counter with the highest rank; there must
//!   be one (it is what boots when a trial has no tries left);
//! * the **trial** is the counted entry ranked above the default, with its tries left;
//!   `+0-N` reports `(slot, 0)`: the last try is the boot running now (or it failed and
//!   the default boots), as GRUB's `ua_tries=0` does;
//! * a counted entry ranked *below* the default is no trial (systemd-boot never
//!   chooses it): that is what a rollback leaves behind;
//! * a slot is **bootable** when it has an entry (counted or not).
//!
//! Anything else under `update-agent-` (two entries for one slot, equal ranks, a staged
//! and a bootable entry for one slot, names that do not parse) is
//! [`BootError::Malformed`]: every call refuses to touch such a tree. Other files (other
//! distributions' entries) are never written, renamed or removed; they are read only to
//! check that none of them sorts before the entry we expect to boot (a foreign entry
//! with a `sort-key`, or with an id that compares higher, would be booted instead):
//! such a tree is Malformed too, naming the file, since what we arm would never boot.
//! So is a `default` line in `loader.conf` (it could select an entry with no tries
//! left), and an entry of ours whose `linux`/`initrd` file is missing or that has a
//! `sort-key` (systemd-boot silently skips the one and sorts the other apart); except
//! that `mark_unbootable(s)` still removes `s`'s own broken entry, and a staged entry is
//! only checked when `arm_trial` is about to arm it.
//!
//! # Transitions (each is at most one rename or removal of a `.conf` file)
//!
//! * `mark_unbootable(s)`: remove `s`'s entry, then its staged entry and temporary file;
//!   refused for the default slot. Removing (rather than renaming to an ignored name)
//!   leaves nothing a future loader or tool could pick up.
//! * [`SystemdBoot::stage`]`(s, version, kernel, initrd)`: refused while `s` has an
//!   entry; installs the kernel (see [`install_kernel`]) and writes the staged entry.
//!   Not part of [`BootControl`]: `arm_trial(s, n)` has no version, so the release's
//!   entry must be on the ESP before it is armed.
//! * [`SystemdBoot::create`]: a first entry (rank 1, blessed) on an ESP with none.
//! * `arm_trial(s, n)`: rename the staged entry to
//!   `update-agent-<max+1>-s-<version>+n.conf`; if `s` has an entry instead (a trial to
//!   re-arm, or a slot left bootable by a rollback), rename that one (keeping its rank
//!   if it is already the highest). Refused for the default slot, for `n` outside 1..=9
//!   (one digit, as the GRUB backend, so both backends accept the same calls), and when
//!   nothing is staged.
//! * `commit(s)`: if `s` has the highest rank, drop its counter: exactly the name
//!   `systemd-bless-boot good` produces, so whichever of the two runs second finds the
//!   work done. Otherwise rename it to `update-agent-<max+1>-s-<version>.conf`.
//!   Refused if `s` has no entry.
//! * `rollback_to(s)`: the same rename as `commit(s)`: the old entry gets the highest
//!   rank and no counter, so it sorts first whatever the trial's counter says. The trial
//!   entry is left as it is, below it. No `default` pattern is ever written.
//!
//! A refused transition writes nothing, and a transition that changes nothing writes
//! nothing. Every transition re-reads the directory, and checks the tree it will leave
//! (names, order against foreign entries) before it changes anything.
//!
//! # Crash safety (FAT)
//!
//! On vfat a rename within one directory is atomic, a write is not. So entry contents
//! are only ever written under a name systemd-boot ignores (`update-agent-<s>.tmp`),
//! fsynced, renamed to `.staged`, and the directory fsynced; kernels the same way in
//! their own directory. From then on every change of what boots is one rename or one
//! removal of one `.conf` file followed by an fsync of the directory, and each keeps a
//! bootable default:
//!
//! * `mark_unbootable` removes an entry that is not the default's;
//! * `stage` writes only files no live entry refers to (the slot has no entry);
//! * `arm_trial` renames a complete, fsynced file into place: before, the default boots;
//!   after, the trial sorts first and the default stays as the fallback;
//! * `commit` and `rollback_to` rename one entry that was already bootable: before and
//!   after, some blessed entry exists and the highest-ranked one is the default.
//!
//! A rename torn by the FAT driver (both names left pointing at the same clusters) reads
//! as two entries for one slot: Malformed, never "repaired" here, because removing one
//! of two cross-linked names frees the clusters of the other; run `fsck.vfat` first.

use std::cmp::Ordering;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{BootControl, BootError, BootStatus};
use crate::slots::Slot;

/// Every file the agent owns in the entries directory starts with this.
pub const PREFIX: &str = "update-agent-";
/// The entries directory, relative to the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";
/// systemd-boot's configuration, relative to the ESP.
pub const LOADER_CONF: &str = "loader/loader.conf";
/// The directory holding each slot's kernel, relative to the ESP.
pub const KERNEL_DIR: &str = "update-agent";
pub const KERNEL_NAME: &str = "vmlinuz";
pub const INITRD_NAME: &str = "initrd.img";
/// Tries are 1..=9, the same range the GRUB backend takes.
pub const MAX_TRIES: u8 = 9;
/// Longest version kept in a file name (FAT names are at most 255 characters).
pub const MAX_NAME_VERSION: usize = 64;

const CONF: &str = ".conf";
const STAGED: &str = ".staged";
const TMP: &str = ".tmp";
/// Entry files are a few hundred bytes; reading more than this is never needed.
const MAX_ENTRY_READ: u64 = 64 * 1024;

/// What is wrong with a set of names, before we know the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    /// The file at fault, when there is one.
    pub name: Option<String>,
    pub what: &'static str,
}

impl StateError {
    fn new(what: &'static str) -> Self {
        Self { name: None, what }
    }

    fn file(name: &str, what: &'static str) -> Self {
        Self {
            name: Some(name.to_owned()),
            what,
        }
    }

    fn at(self, dir: &Path) -> BootError {
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
    pub counter: Option<Counter>,
}

impl Entry {
    pub fn file_name(&self) -> String {
        format!(
            "{PREFIX}{}-{}-{}{}{CONF}",
            self.rank,
            self.slot,
            self.version,
            self.counter.map(|c| c.suffix()).unwrap_or_default()
        )
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
                counter,
            })),
            None => bad("an entry of the agent is not update-agent-<rank>-<slot>-<version>"),
        }
    }
}

fn staged_name(slot: Slot, version: &str) -> String {
    format!("{PREFIX}{slot}-{version}{STAGED}")
}

fn temp_name(slot: Slot) -> String {
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

/// One file-system step of a transition, on names in the entries directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Rename { from: String, to: String },
    Remove(String),
}

/// Our files in the entries directory, checked. Pure: built from names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspState {
    entries: [Option<Entry>; 2],
    staged: [Option<String>; 2],
    temps: [bool; 2],
}

impl EspState {
    /// Reads our names among `names` (others are ignored). A tree without a default
    /// is accepted here (a fresh ESP); [`EspState::default_entry`] refuses it.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, StateError> {
        let mut st = Self {
            entries: [None, None],
            staged: [None, None],
            temps: [false; 2],
        };
        for name in names {
            match Name::parse(name)? {
                Name::Foreign => {}
                Name::Temp(slot) => st.temps[slot.index()] = true,
                Name::Staged { slot, version } => {
                    if st.staged[slot.index()].replace(version).is_some() {
                        return Err(StateError::file(name, "a slot has two staged entries"));
                    }
                }
                Name::Entry(e) => {
                    let i = e.slot.index();
                    if st.entries[i].replace(e).is_some() {
                        return Err(StateError::file(
                            name,
                            "a slot has two entries (a torn rename? run fsck.vfat)",
                        ));
                    }
                }
            }
        }
        for slot in [Slot::A, Slot::B] {
            let i = slot.index();
            if st.entries[i].is_some() {
                if let Some(v) = &st.staged[i] {
                    return Err(StateError::file(
                        &staged_name(slot, v),
                        "a slot has both an entry and a staged entry",
                    ));
                }
            }
        }
        if let [Some(a), Some(b)] = &st.entries {
            if a.rank == b.rank {
                return Err(StateError::file(
                    &b.file_name(),
                    "both slots' entries have the same rank",
                ));
            }
        }
        Ok(st)
    }

    pub fn entry(&self, slot: Slot) -> Option<&Entry> {
        self.entries[slot.index()].as_ref()
    }

    pub fn staged(&self, slot: Slot) -> Option<&str> {
        self.staged[slot.index()].as_deref()
    }

    pub fn has_temp(&self, slot: Slot) -> bool {
        self.temps[slot.index()]
    }

    fn live(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().flatten()
    }

    /// Whether either slot has an entry (a `.conf` file).
    pub fn has_entries(&self) -> bool {
        self.live().next().is_some()
    }

    /// The blessed entry with the highest rank: what boots when no trial is pending.
    pub fn default_entry(&self) -> Result<&Entry, StateError> {
        self.live()
            .filter(|e| e.counter.is_none())
            .max_by_key(|e| e.rank)
            .ok_or(StateError::new(
                "no entry of the agent is without a boot counter: nothing to fall back to",
            ))
    }

    /// The counted entry ranked above the default, if any.
    pub fn trial_entry(&self) -> Result<Option<&Entry>, StateError> {
        let default = self.default_entry()?;
        Ok(self
            .live()
            .find(|e| e.counter.is_some() && e.rank > default.rank))
    }

    /// The entry systemd-boot boots next: the trial while it has tries left, else the
    /// default.
    pub fn first(&self) -> Result<&Entry, StateError> {
        match self.trial_entry()? {
            Some(t) if t.tries_left() != Some(0) => Ok(t),
            _ => self.default_entry(),
        }
    }

    pub fn status(&self, raw: String) -> Result<BootStatus, StateError> {
        let default = self.default_entry()?.slot;
        let trial = self.trial_entry()?.map(|t| {
            let left = t.tries_left().unwrap_or(0);
            (t.slot, u8::try_from(left).unwrap_or(u8::MAX))
        });
        Ok(BootStatus {
            default,
            trial,
            bootable: [self.entries[0].is_some(), self.entries[1].is_some()],
            raw,
        })
    }

    /// Our file names: entries by rank, highest first, then staged entries.
    pub fn names(&self) -> Vec<String> {
        let mut live: Vec<&Entry> = self.live().collect();
        live.sort_by_key(|e| std::cmp::Reverse(e.rank));
        let mut out: Vec<String> = live.iter().map(|e| e.file_name()).collect();
        for slot in [Slot::A, Slot::B] {
            if let Some(v) = self.staged(slot) {
                out.push(staged_name(slot, v));
            }
        }
        out
    }

    fn next_rank(&self) -> Result<u32, StateError> {
        self.live()
            .map(|e| e.rank)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(StateError::new("the entry rank would overflow"))
    }

    fn is_top(&self, e: &Entry) -> bool {
        self.live().all(|o| o.rank <= e.rank)
    }

    pub fn mark_unbootable(&self, slot: Slot) -> Result<Vec<Op>, BootError> {
        if slot == self.default_entry().map_err(malformed)?.slot {
            return Err(refused("mark unbootable", slot, "it is the default slot"));
        }
        let mut ops = Vec::new();
        // The entry first: from then on the slot cannot be chosen.
        if let Some(e) = self.entry(slot) {
            ops.push(Op::Remove(e.file_name()));
        }
        if let Some(v) = self.staged(slot) {
            ops.push(Op::Remove(staged_name(slot, v)));
        }
        if self.has_temp(slot) {
            ops.push(Op::Remove(temp_name(slot)));
        }
        Ok(ops)
    }

    pub fn arm_trial(&self, slot: Slot, tries: u8) -> Result<Vec<Op>, BootError> {
        const ACTION: &str = "arm a trial of";
        if slot == self.default_entry().map_err(malformed)?.slot {
            return Err(refused(ACTION, slot, "it is the default slot"));
        }
        if tries == 0 || tries > MAX_TRIES {
            return Err(refused(ACTION, slot, "tries must be 1 to 9"));
        }
        let counter = Some(Counter {
            left: u32::from(tries),
            done: None,
        });
        let next = self.next_rank().map_err(malformed)?;
        let (from, target) = match (self.staged(slot), self.entry(slot)) {
            (Some(version), _) => (
                staged_name(slot, version),
                Entry {
                    rank: next,
                    slot,
                    version: version.to_owned(),
                    counter,
                },
            ),
            (None, Some(e)) => {
                // Keep the rank of a trial that already sorts first: only its counter changes.
                let rank = if self.is_top(e) { e.rank } else { next };
                (
                    e.file_name(),
                    Entry {
                        rank,
                        counter,
                        ..e.clone()
                    },
                )
            }
            (None, None) => return Err(refused(ACTION, slot, "nothing is staged for it")),
        };
        Ok(rename(from, target.file_name()))
    }

    pub fn commit(&self, slot: Slot) -> Result<Vec<Op>, BootError> {
        self.make_default("commit", slot)
    }

    pub fn rollback_to(&self, slot: Slot) -> Result<Vec<Op>, BootError> {
        self.make_default("roll back to", slot)
    }

    /// One rename: the slot's entry without a counter, ranked first.
    fn make_default(&self, action: &'static str, slot: Slot) -> Result<Vec<Op>, BootError> {
        self.default_entry().map_err(malformed)?;
        let Some(e) = self.entry(slot) else {
            return Err(refused(action, slot, "it is marked unbootable"));
        };
        let rank = if self.is_top(e) {
            // Dropping the counter of the top entry is what systemd-bless-boot does.
            e.rank
        } else {
            self.next_rank().map_err(malformed)?
        };
        let target = Entry {
            rank,
            counter: None,
            ..e.clone()
        };
        Ok(rename(e.file_name(), target.file_name()))
    }
}

fn rename(from: String, to: String) -> Vec<Op> {
    if from == to {
        Vec::new()
    } else {
        vec![Op::Rename { from, to }]
    }
}

/// For errors found while planning, before the directory is known: the path is the
/// file name (or empty), which [`SystemdBoot`] puts under the entries directory.
fn malformed(e: StateError) -> BootError {
    BootError::Malformed {
        path: e.name.map(PathBuf::from).unwrap_or_default(),
        what: e.what,
    }
}

fn under(dir: &Path, e: BootError) -> BootError {
    match e {
        BootError::Malformed { path, what } if path.is_relative() => BootError::Malformed {
            path: if path.as_os_str().is_empty() {
                dir.to_owned()
            } else {
                dir.join(path)
            },
            what,
        },
        e => e,
    }
}

fn refused(action: &'static str, slot: Slot, why: &'static str) -> BootError {
    BootError::Refused { action, slot, why }
}

/// `names` after `ops`, as a directory listing would show them.
pub fn apply_ops(names: &[String], ops: &[Op]) -> Vec<String> {
    let mut out = names.to_vec();
    for op in ops {
        match op {
            Op::Rename { from, to } => {
                out.retain(|n| n != from);
                out.push(to.clone());
            }
            Op::Remove(name) => out.retain(|n| n != name),
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// systemd-boot's order, to check that no foreign entry sorts before ours.

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
fn name_tries_left(name: &str) -> Option<u32> {
    let lower = name.to_ascii_lowercase();
    let stem = lower.strip_suffix(CONF)?;
    Counter::split(stem).map(|(_, c)| c.left)
}

/// Whether `f` may sort before our entry `ours` in systemd-boot's menu (its
/// `boot_entry_compare`). Where systemd-boot's order is not determined by what we
/// know, the answer is yes.
fn may_sort_before(f: &Foreign, ours: &Entry) -> bool {
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

// ---------------------------------------------------------------------------------
// Entry contents.

/// What goes into an entry besides the slot and the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryConfig {
    /// Shown in the menu, followed by the version and the slot.
    pub title: String,
    /// GPT PARTLABELs of the slots, `[a, b]`, for `root=PARTLABEL=`.
    pub root_labels: [String; 2],
    /// Further kernel arguments, after `root=` and `updateagent.slot=`.
    pub options: String,
}

impl Default for EntryConfig {
    fn default() -> Self {
        Self {
            title: "update-agent".into(),
            root_labels: ["root-a".into(), "root-b".into()],
            options: "ro".into(),
        }
    }
}

impl EntryConfig {
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.title.trim().is_empty() || self.title.chars().any(char::is_control) {
            return Err("the entry title is empty or has control characters");
        }
        let label_ok =
            |l: &String| !l.is_empty() && !l.chars().any(|c| c.is_control() || c.is_whitespace());
        if !self.root_labels.iter().all(label_ok) {
            return Err("a root partition label is empty or has spaces or control characters");
        }
        if self.options.chars().any(char::is_control) {
            return Err("the kernel options have control characters");
        }
        Ok(())
    }
}

/// `/update-agent/<slot>/<file>`: a path on the ESP as entries name it.
fn esp_path(slot: Slot, file: &str) -> String {
    format!("/{KERNEL_DIR}/{slot}/{file}")
}

/// The entry for `slot`. `version` must have no control characters.
pub fn entry_text(cfg: &EntryConfig, slot: Slot, version: &str, initrd: bool) -> String {
    let mut t = format!(
        "title {} {version} (slot {slot})\nversion {version}\nlinux {}\n",
        cfg.title,
        esp_path(slot, KERNEL_NAME)
    );
    if initrd {
        t.push_str(&format!("initrd {}\n", esp_path(slot, INITRD_NAME)));
    }
    t.push_str(&format!(
        "options root=PARTLABEL={} updateagent.slot={slot}",
        cfg.root_labels[slot.index()]
    ));
    if !cfg.options.trim().is_empty() {
        t.push(' ');
        t.push_str(cfg.options.trim());
    }
    t.push('\n');
    t
}

/// `key value` lines as systemd-boot reads them (`#` comments, leading blanks skipped).
fn key_values(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(['\n', '\r'])
        .map(|l| l.trim_start_matches([' ', '\t']))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once([' ', '\t']) {
            Some((k, v)) => (k, v.trim_matches([' ', '\t'])),
            None => (l, ""),
        })
}

fn has_sort_key(text: &str) -> bool {
    key_values(text).any(|(k, _)| k == "sort-key")
}

fn has_default(loader_conf: &str) -> bool {
    key_values(loader_conf).any(|(k, _)| k == "default")
}

// ---------------------------------------------------------------------------------
// Files.

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `root/rel/...` as needed, fsyncing each parent that gained a directory.
fn ensure_dirs(root: &Path, rel: &[&str]) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in rel {
        let next = dir.join(part);
        match fs::create_dir(&next) {
            Ok(()) => sync_dir(&dir)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && next.is_dir() => {}
            Err(e) => return Err(e),
        }
        dir = next;
    }
    Ok(dir)
}

fn read_bounded(path: &Path) -> io::Result<String> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_ENTRY_READ)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Regular files in `dir`, names as text. A missing directory lists as empty when
/// `missing_ok`.
fn list_files(dir: &Path, missing_ok: bool) -> Result<Vec<String>, BootError> {
    let rerr = |source| BootError::Read {
        path: dir.to_owned(),
        source,
    };
    let iter = match fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(rerr(e)),
    };
    let mut names = Vec::new();
    for de in iter {
        let de = de.map_err(rerr)?;
        // systemd-boot skips directories; FAT has nothing but files and directories.
        if de.file_type().map_err(rerr)?.is_dir() {
            continue;
        }
        names.push(de.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn remove_in(dir: &Path, name: &str) -> Result<(), BootError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BootError::Write { path, source }),
    }
}

/// Renames within `dir`, never over an existing file (a name we did not see when we
/// read the directory means someone else is changing it).
fn rename_in(dir: &Path, from: &str, to: &str) -> Result<(), BootError> {
    use nix::fcntl::{renameat2, RenameFlags};
    renameat2(
        None,
        &dir.join(from),
        None,
        &dir.join(to),
        RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| BootError::Write {
        path: dir.join(to),
        source: io::Error::from(e),
    })
}

/// Executes `ops` in order, fsyncing the directory after each, so they reach the disk
/// in the order the crash-safety argument assumes.
fn run_ops(dir: &Path, ops: &[Op]) -> Result<(), BootError> {
    for op in ops {
        match op {
            Op::Rename { from, to } => rename_in(dir, from, to)?,
            Op::Remove(name) => remove_in(dir, name)?,
        }
        sync_dir(dir).map_err(|source| BootError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// A kernel or initrd to copy onto the ESP, and the sha256 it must have.
#[derive(Debug, Clone, Copy)]
pub struct BootFile<'a> {
    pub path: &'a Path,
    pub sha256: [u8; 32],
}

fn mismatch(what: &str, got: &[u8], want: &[u8; 32]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{what} has sha256 {}, expected {}",
            hex::encode(got),
            hex::encode(want)
        ),
    )
}

fn sha256_of(mut r: impl Read) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// Copies `src` to `dir/name` through `dir/name.tmp`: hashed on the way (a wrong source
/// is refused before anything is renamed), fsynced, read back past the page cache and
/// hashed again, then renamed into place. The caller fsyncs `dir`.
fn copy_verified(src: &BootFile<'_>, dir: &Path, name: &str) -> Result<(), BootError> {
    let tmp = dir.join(format!("{name}{TMP}"));
    let dst = dir.join(name);
    let result = (|| {
        let werr = |source| BootError::Write {
            path: tmp.clone(),
            source,
        };
        let rerr = |source| BootError::Read {
            path: src.path.to_owned(),
            source,
        };
        let mut input = File::open(src.path).map_err(rerr)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(werr)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(rerr)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(werr)?;
        }
        let got: [u8; 32] = h.finalize().into();
        if got != src.sha256 {
            return Err(rerr(mismatch("the source", &got, &src.sha256)));
        }
        out.sync_all().map_err(werr)?;
        // Clean pages can be dropped after the fsync, so the read-back below comes from
        // the device. Advice only: where it is ignored we still read what was written.
        let _ = nix::fcntl::posix_fadvise(
            out.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        drop(out);
        let back = File::open(&tmp).and_then(sha256_of).map_err(werr)?;
        if back != src.sha256 {
            return Err(werr(mismatch("the copy read back", &back, &src.sha256)));
        }
        fs::rename(&tmp, &dst).map_err(|source| BootError::Write {
            path: dst.clone(),
            source,
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `slot`'s kernel (and initrd, if any) to `$ESP/update-agent/<slot>/` and checks
/// each against its sha256 after copying. Refused while `slot` has a boot entry (its
/// files may be in use: [`BootControl::mark_unbootable`] first). Drops the slot's
/// staged entry first, since it describes the files being replaced, and the old files
/// (to make room: an ESP is small). A release without an initrd leaves none behind.
pub fn install_kernel(
    esp: &Path,
    slot: Slot,
    kernel: &BootFile<'_>,
    initrd: Option<&BootFile<'_>>,
) -> Result<(), BootError> {
    let entries = esp.join(ENTRIES_DIR);
    let names = list_files(&entries, true)?;
    let state =
        EspState::from_names(names.iter().map(String::as_str)).map_err(|e| e.at(&entries))?;
    if state.entry(slot).is_some() {
        return Err(refused(
            "install a kernel for",
            slot,
            "it has a boot entry: mark it unbootable first",
        ));
    }
    let mut stale = Vec::new();
    if let Some(v) = state.staged(slot) {
        stale.push(staged_name(slot, v));
    }
    if state.has_temp(slot) {
        stale.push(temp_name(slot));
    }
    if !stale.is_empty() {
        run_ops(
            &entries,
            &stale.into_iter().map(Op::Remove).collect::<Vec<_>>(),
        )?;
    }

    let slot_dir =
        ensure_dirs(esp, &[KERNEL_DIR, slot.letter()]).map_err(|source| BootError::Write {
            path: esp.join(KERNEL_DIR).join(slot.letter()),
            source,
        })?;
    let werr = |source| BootError::Write {
        path: slot_dir.clone(),
        source,
    };
    for name in list_files(&slot_dir, false)? {
        remove_in(&slot_dir, &name)?;
    }
    sync_dir(&slot_dir).map_err(werr)?;
    copy_verified(kernel, &slot_dir, KERNEL_NAME)?;
    if let Some(initrd) = initrd {
        copy_verified(initrd, &slot_dir, INITRD_NAME)?;
    }
    sync_dir(&slot_dir).map_err(werr)
}

/// The directory as read: our state, foreign entries, all names.
#[derive(Debug)]
struct Tree {
    names: Vec<String>,
    state: EspState,
    foreign: Vec<Foreign>,
}

/// The systemd-boot backend over one ESP.
#[derive(Debug)]
pub struct SystemdBoot {
    esp: PathBuf,
    cfg: EntryConfig,
}

impl SystemdBoot {
    /// Opens the ESP mounted at `esp` and checks its entries (see the module docs).
    pub fn open(esp: impl Into<PathBuf>, cfg: EntryConfig) -> Result<Self, BootError> {
        let sb = Self::new(esp.into(), cfg)?;
        sb.read()?;
        Ok(sb)
    }

    fn new(esp: PathBuf, cfg: EntryConfig) -> Result<Self, BootError> {
        if let Err(what) = cfg.validate() {
            return Err(BootError::Malformed { path: esp, what });
        }
        Ok(Self { esp, cfg })
    }

    /// Sets up an ESP that boots `default`: installs its kernel and writes its entry
    /// (rank 1, blessed). Creates `loader/entries` if needed; refuses an ESP that
    /// already has an entry of the agent (`Write` with `AlreadyExists`). Staged and
    /// temporary files (an interrupted `create`) are removed first, so running it again
    /// finishes the job.
    pub fn create(
        esp: impl Into<PathBuf>,
        cfg: EntryConfig,
        default: Slot,
        version: &str,
        kernel: &BootFile<'_>,
        initrd: Option<&BootFile<'_>>,
    ) -> Result<Self, BootError> {
        let sb = Self::new(esp.into(), cfg)?;
        let entries = sb.entries_dir();
        let name_v = name_version(version).map_err(|what| BootError::Malformed {
            path: entries.clone(),
            what,
        })?;
        let (names, foreign) = sb.list(true)?;
        let state =
            EspState::from_names(names.iter().map(String::as_str)).map_err(|e| e.at(&entries))?;
        if state.has_entries() {
            return Err(BootError::Write {
                path: entries,
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the ESP already has update-agent entries; create never replaces them",
                ),
            });
        }
        let mut leftovers = Vec::new();
        for slot in [Slot::A, Slot::B] {
            if let Some(v) = state.staged(slot) {
                leftovers.push(Op::Remove(staged_name(slot, v)));
            }
            if state.has_temp(slot) {
                leftovers.push(Op::Remove(temp_name(slot)));
            }
        }
        let entry = Entry {
            rank: 1,
            slot: default,
            version: name_v.clone(),
            counter: None,
        };
        // Check the tree we will leave before writing anything.
        let mut after = apply_ops(&names, &leftovers);
        after.push(entry.file_name());
        sb.check(&after, &foreign)?;

        ensure_dirs(&sb.esp, &["loader", "entries"]).map_err(|source| BootError::Write {
            path: entries.clone(),
            source,
        })?;
        run_ops(&entries, &leftovers)?;
        install_kernel(&sb.esp, default, kernel, initrd)?;
        let staged = sb.write_staged(default, version, &name_v, initrd.is_some())?;
        run_ops(&entries, &rename(staged, entry.file_name()))?;
        sb.read()?;
        Ok(sb)
    }

    /// Stages a release for `slot`: installs its kernel and initrd on the ESP (see
    /// [`install_kernel`]) and writes its entry under a name systemd-boot ignores, for
    /// `arm_trial` to rename into place. Refused while `slot` has an entry.
    pub fn stage(
        &mut self,
        slot: Slot,
        version: &str,
        kernel: &BootFile<'_>,
        initrd: Option<&BootFile<'_>>,
    ) -> Result<(), BootError> {
        let entries = self.entries_dir();
        let name_v = name_version(version).map_err(|what| BootError::Malformed {
            path: entries.clone(),
            what,
        })?;
        let tree = self.read()?;
        if tree.state.entry(slot).is_some() {
            return Err(refused(
                "stage",
                slot,
                "it has a boot entry: mark it unbootable first",
            ));
        }
        install_kernel(&self.esp, slot, kernel, initrd)?;
        self.write_staged(slot, version, &name_v, initrd.is_some())?;
        Ok(())
    }

    pub fn esp(&self) -> &Path {
        &self.esp
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.esp.join(ENTRIES_DIR)
    }

    /// The entry text through a temporary file, fsynced, renamed to the staged name.
    fn write_staged(
        &self,
        slot: Slot,
        version: &str,
        name_v: &str,
        initrd: bool,
    ) -> Result<String, BootError> {
        let dir = self.entries_dir();
        let tmp = dir.join(temp_name(slot));
        let werr = |source| BootError::Write {
            path: tmp.clone(),
            source,
        };
        let text = entry_text(&self.cfg, slot, version, initrd);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(werr)?;
        let staged = staged_name(slot, name_v);
        // A staged entry of an earlier stage is gone (install_kernel), so no replace.
        run_ops(
            &dir,
            &[Op::Rename {
                from: temp_name(slot),
                to: staged.clone(),
            }],
        )?;
        Ok(staged)
    }

    /// Names in the entries directory, and the foreign entries among them.
    fn list(&self, missing_ok: bool) -> Result<(Vec<String>, Vec<Foreign>), BootError> {
        let dir = self.entries_dir();
        let names = list_files(&dir, missing_ok)?;
        let mut foreign = Vec::new();
        for name in &names {
            if name.starts_with(PREFIX) || !is_entry_name(name) {
                continue;
            }
            let path = dir.join(name);
            let text = read_bounded(&path).map_err(|source| BootError::Read { path, source })?;
            foreign.push(Foreign {
                name: name.clone(),
                sort_key: has_sort_key(&text),
            });
        }
        Ok((names, foreign))
    }

    /// Checks `names` as a complete tree: our names, a default, the order against
    /// `foreign`, and `loader.conf`.
    fn check(&self, names: &[String], foreign: &[Foreign]) -> Result<EspState, BootError> {
        let dir = self.entries_dir();
        let state =
            EspState::from_names(names.iter().map(String::as_str)).map_err(|e| e.at(&dir))?;
        state.default_entry().map_err(|e| e.at(&dir))?;
        check_order(&state, foreign).map_err(|e| e.at(&dir))?;
        let conf = self.esp.join(LOADER_CONF);
        match read_bounded(&conf) {
            Ok(text) if has_default(&text) => {
                return Err(BootError::Malformed {
                    path: conf,
                    what: "loader.conf sets `default`, which could select an entry with no tries left; remove it",
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(BootError::Read { path: conf, source }),
        }
        Ok(state)
    }

    /// Our entry files must name files that exist and carry no `sort-key`: systemd-boot
    /// skips an entry whose kernel is missing, and sorts one with a key differently.
    /// Checks the entries of every slot but `skip` (so the broken entry of a slot can
    /// still be removed), and `staged`'s staged entry (before it is armed).
    fn check_contents(
        &self,
        state: &EspState,
        skip: Option<Slot>,
        staged: Option<Slot>,
    ) -> Result<(), BootError> {
        let dir = self.entries_dir();
        let mut files: Vec<String> = [Slot::A, Slot::B]
            .into_iter()
            .filter(|&s| Some(s) != skip)
            .filter_map(|s| state.entry(s).map(Entry::file_name))
            .collect();
        if let Some(slot) = staged {
            if let Some(v) = state.staged(slot) {
                files.push(staged_name(slot, v));
            }
        }
        for name in files {
            let path = dir.join(&name);
            let text = read_bounded(&path).map_err(|source| BootError::Read {
                path: path.clone(),
                source,
            })?;
            let bad = |what| BootError::Malformed {
                path: path.clone(),
                what,
            };
            if has_sort_key(&text) {
                return Err(bad("an entry of the agent has a sort-key line"));
            }
            let mut linux = 0;
            for (key, value) in key_values(&text) {
                if key == "linux" {
                    linux += 1;
                }
                if key == "linux" || key == "initrd" {
                    let file = self.esp.join(value.trim_start_matches('/'));
                    if value.is_empty() || !file.is_file() {
                        return Err(bad(
                            "a file the entry boots (linux or initrd) is not on the ESP",
                        ));
                    }
                }
            }
            if linux != 1 {
                return Err(bad(
                    "an entry of the agent does not have exactly one linux line",
                ));
            }
        }
        Ok(())
    }

    /// The directory, checked; the contents of our entries as [`Self::check_contents`].
    fn read_checked(&self, skip: Option<Slot>, staged: Option<Slot>) -> Result<Tree, BootError> {
        let (names, foreign) = self.list(false)?;
        let state = self.check(&names, &foreign)?;
        self.check_contents(&state, skip, staged)?;
        Ok(Tree {
            names,
            state,
            foreign,
        })
    }

    fn read(&self) -> Result<Tree, BootError> {
        self.read_checked(None, None)
    }

    fn update(
        &mut self,
        tree: Result<Tree, BootError>,
        plan: impl FnOnce(&EspState) -> Result<Vec<Op>, BootError>,
    ) -> Result<(), BootError> {
        let tree = tree?;
        let ops = plan(&tree.state).map_err(|e| under(&self.entries_dir(), e))?;
        if ops.is_empty() {
            return Ok(());
        }
        // Never leave a tree that status() would refuse.
        self.check(&apply_ops(&tree.names, &ops), &tree.foreign)?;
        run_ops(&self.entries_dir(), &ops)
    }
}

impl BootControl for SystemdBoot {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn status(&self) -> Result<BootStatus, BootError> {
        let tree = self.read()?;
        let mut raw = tree.state.names();
        raw.extend(tree.foreign.iter().map(|f| f.name.clone()));
        tree.state
            .status(raw.join(" "))
            .map_err(|e| e.at(&self.entries_dir()))
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        // The slot's own files may be broken: removing them is the cure.
        let tree = self.read_checked(Some(slot), None);
        self.update(tree, |s| s.mark_unbootable(slot))
    }

    fn arm_trial(&mut self, slot: Slot, tries: u8) -> Result<(), BootError> {
        let tree = self.read_checked(None, Some(slot));
        self.update(tree, |s| s.arm_trial(slot, tries))
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let tree = self.read();
        self.update(tree, |s| s.commit(slot))
    }

    fn rollback_to(&mut self, slot: Slot) -> Result<(), BootError> {
        let tree = self.read();
        self.update(tree, |s| s.rollback_to(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const A: Slot = Slot::A;
    const B: Slot = Slot::B;

    fn owned(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn state(list: &[&str]) -> Result<EspState, StateError> {
        EspState::from_names(list.iter().copied())
    }

    fn st(list: &[&str]) -> EspState {
        state(list).expect("a valid set of names")
    }

    type Summary = (Slot, Option<(Slot, u8)>, [bool; 2]);

    fn summary(s: &EspState) -> Summary {
        let b = s.status(String::new()).expect("a state with a default");
        (b.default, b.trial, b.bootable)
    }

    fn entry(rank: u32, slot: Slot, version: &str, counter: Option<(u32, Option<u32>)>) -> String {
        Entry {
            rank,
            slot,
            version: version.into(),
            counter: counter.map(|(left, done)| Counter { left, done }),
        }
        .file_name()
    }

    /// systemd-boot's rename of a counted entry before it boots it (boot.c:
    /// `+LEFT-DONE` becomes `+(LEFT-1)-(DONE+1)`, never below 0).
    fn loader_try(name: &str) -> String {
        let stem = name.strip_suffix(CONF).expect(".conf name");
        let (prefix, c) = Counter::split(stem).expect("a counted name");
        format!(
            "{prefix}+{}-{}{CONF}",
            c.left.saturating_sub(1),
            c.done.unwrap_or(0) + 1
        )
    }

    /// `systemd-bless-boot good`: the name without `+LEFT[-DONE]`.
    fn bless_boot(name: &str) -> String {
        let plus = name.rfind('+').expect("a counted name");
        let rest = &name[plus + 1..];
        let suffix = &rest[rest.find('.').expect("a suffix")..];
        format!("{}{suffix}", &name[..plus])
    }

    /// systemd-boot's `boot_entry_compare` for entries without `sort-key`.
    fn sd_compare(a: &str, b: &str) -> Ordering {
        let (la, lb) = (name_tries_left(a), name_tries_left(b));
        (la == Some(0))
            .cmp(&(lb == Some(0)))
            .then_with(|| strverscmp_improved(&b.to_lowercase(), &a.to_lowercase()))
            .then_with(|| match (la, lb) {
                (Some(x), Some(y)) => y.cmp(&x),
                _ => Ordering::Equal,
            })
    }

    /// The `.conf` entries among `names` in systemd-boot's menu order.
    fn boot_order(names: &[String]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().filter(|n| is_entry_name(n)).cloned().collect();
        v.sort_by(|a, b| sd_compare(a, b));
        v
    }

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
        for (name, rank, slot, version, counter) in cases {
            let want = Entry {
                rank,
                slot,
                version: version.into(),
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
    fn state_from_names() {
        let cases: &[(&[&str], Summary)] = &[
            (&["update-agent-1-a-1.0.conf"], (A, None, [true, false])),
            (&["update-agent-1-b-1.0.conf"], (B, None, [false, true])),
            // Both blessed: the higher rank is the default.
            (
                &["update-agent-1-a-1.conf", "update-agent-2-b-2.conf"],
                (B, None, [true, true]),
            ),
            (
                &["update-agent-9-a-1.conf", "update-agent-2-b-2.conf"],
                (A, None, [true, true]),
            ),
            // A trial, as armed and part used.
            (
                &["update-agent-1-a-1.conf", "update-agent-2-b-2+3.conf"],
                (A, Some((B, 3)), [true, true]),
            ),
            (
                &["update-agent-1-a-1.conf", "update-agent-2-b-2+0-3.conf"],
                (A, Some((B, 0)), [true, true]),
            ),
            // A counted entry below the default is what a rollback leaves: no trial.
            (
                &["update-agent-3-a-1.conf", "update-agent-2-b-2+1-2.conf"],
                (A, None, [true, true]),
            ),
            (
                &["update-agent-3-a-1.conf", "update-agent-2-b-2+0-3.conf"],
                (A, None, [true, true]),
            ),
            // Staged entries and temporary files are not bootable.
            (
                &[
                    "update-agent-1-a-1.conf",
                    "update-agent-b-2.staged",
                    "update-agent-b.tmp",
                ],
                (A, None, [true, false]),
            ),
            // Foreign names are ignored.
            (
                &["debian.conf", "update-agent-1-a-1.conf", "x+0.conf"],
                (A, None, [true, false]),
            ),
        ];
        for (names, want) in cases {
            assert_eq!(summary(&st(names)), *want, "{names:?}");
        }
        let s = st(&[
            "update-agent-1-a-1.conf",
            "update-agent-b-2.staged",
            "update-agent-b.tmp",
        ]);
        assert_eq!(s.staged(B), Some("2"));
        assert!(s.has_temp(B) && !s.has_temp(A));
        assert_eq!(
            s.names(),
            ["update-agent-1-a-1.conf", "update-agent-b-2.staged"]
        );
    }

    #[test]
    fn inconsistent_sets_are_malformed() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["update-agent-1-a-1.conf", "update-agent-2-a-1.conf"],
                "two entries",
            ),
            (
                &["update-agent-1-a-1.conf", "update-agent-1-a-1+3.conf"],
                "two entries",
            ),
            (
                &["update-agent-1-a-1.conf", "update-agent-1-b-2.conf"],
                "same rank",
            ),
            (
                &["update-agent-1-a-1.conf", "update-agent-a-2.staged"],
                "both an entry and a staged",
            ),
            (
                &["update-agent-b-1.staged", "update-agent-b-2.staged"],
                "two staged",
            ),
        ];
        for (names, want) in cases {
            match state(names) {
                Err(e) => assert!(e.what.contains(want), "{names:?}: {}", e.what),
                Ok(s) => panic!("{names:?}: accepted as {s:?}"),
            }
        }
        // Valid names, but nothing to fall back to.
        for names in [
            &[][..],
            &["update-agent-b-1.staged"][..],
            &["update-agent-2-b-2+3.conf"][..],
            &["update-agent-1-a-1+1-2.conf", "update-agent-2-b-2+3.conf"][..],
        ] {
            let s = st(names);
            assert!(s.status(String::new()).is_err(), "{names:?}");
            assert!(s
                .default_entry()
                .expect_err("no default")
                .what
                .contains("nothing to fall back to"));
            assert!(
                s.mark_unbootable(B).is_err() && s.arm_trial(B, 1).is_err() && s.commit(A).is_err()
            );
        }
    }

    fn refusal(res: Result<Vec<Op>, BootError>) -> String {
        match res {
            Err(e @ BootError::Refused { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn ren(from: &str, to: &str) -> Op {
        Op::Rename {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn transitions_plan_one_rename() {
        let a1 = "update-agent-1-a-1.conf";
        let b_staged = "update-agent-b-2.staged";

        let s = st(&[a1, b_staged, "update-agent-b.tmp"]);
        assert_eq!(
            s.arm_trial(B, 3).expect("arm"),
            [ren(b_staged, "update-agent-2-b-2+3.conf")]
        );
        assert_eq!(
            s.mark_unbootable(B).expect("mark"),
            [
                Op::Remove(b_staged.into()),
                Op::Remove("update-agent-b.tmp".into())
            ]
        );
        assert!(refusal(s.mark_unbootable(A)).contains("default slot"));
        assert!(refusal(s.arm_trial(A, 3)).contains("default slot"));
        assert!(refusal(s.arm_trial(B, 0)).contains("1 to 9"));
        assert!(refusal(s.arm_trial(B, 10)).contains("1 to 9"));
        assert!(refusal(s.commit(B)).contains("marked unbootable"));
        assert!(refusal(s.rollback_to(B)).contains("marked unbootable"));
        assert_eq!(s.commit(A).expect("commit default"), []);
        assert_eq!(s.rollback_to(A).expect("rollback to default"), []);

        let s = st(&[a1]);
        assert!(refusal(s.arm_trial(B, 3)).contains("nothing is staged"));
        assert_eq!(s.mark_unbootable(B).expect("nothing to do"), []);

        // A trial in progress.
        let t = "update-agent-2-b-2+1-2.conf";
        let s = st(&[a1, t]);
        // commit = systemd-bless-boot good.
        assert_eq!(s.commit(B).expect("commit"), [ren(t, &bless_boot(t))]);
        assert_eq!(bless_boot(t), "update-agent-2-b-2.conf");
        // Rolling back raises the old entry above the trial, which stays as it is.
        assert_eq!(
            s.rollback_to(A).expect("rollback"),
            [ren(a1, "update-agent-3-a-1.conf")]
        );
        // commit of the default ends the trial the same way.
        assert_eq!(
            s.commit(A).expect("commit a"),
            [ren(a1, "update-agent-3-a-1.conf")]
        );
        // Re-arming keeps the rank, resets the counter.
        assert_eq!(
            s.arm_trial(B, 5).expect("re-arm"),
            [ren(t, "update-agent-2-b-2+5.conf")]
        );
        assert_eq!(
            st(&[a1, "update-agent-2-b-2+5.conf"])
                .arm_trial(B, 5)
                .expect("same"),
            []
        );
        assert_eq!(s.mark_unbootable(B).expect("mark"), [Op::Remove(t.into())]);

        // After a rollback: the old trial can be armed again (raised), or committed
        // (raised and blessed in one rename).
        let s = st(&["update-agent-3-a-1.conf", t]);
        assert_eq!(
            s.arm_trial(B, 2).expect("arm"),
            [ren(t, "update-agent-4-b-2+2.conf")]
        );
        assert_eq!(
            s.commit(B).expect("commit"),
            [ren(t, "update-agent-4-b-2.conf")]
        );
        assert_eq!(s.rollback_to(A).expect("nothing to do"), []);

        // After a commit: a manual rollback raises the older release.
        let s = st(&[a1, "update-agent-2-b-2.conf"]);
        assert_eq!(
            s.rollback_to(A).expect("rollback"),
            [ren(a1, "update-agent-3-a-1.conf")]
        );
        assert!(refusal(s.mark_unbootable(B)).contains("default slot"));
        assert_eq!(s.mark_unbootable(A).expect("mark"), [Op::Remove(a1.into())]);

        // The rank cannot overflow.
        let s = st(&[
            "update-agent-4294967295-a-1.conf",
            "update-agent-b-2.staged",
        ]);
        assert!(matches!(
            s.arm_trial(B, 1),
            Err(BootError::Malformed { .. })
        ));
    }

    /// Every state the naming can produce with two entries, ranks 1..=3.
    fn all_states() -> Vec<Vec<String>> {
        let counters = [
            None,
            Some((3, None)),
            Some((2, Some(1))),
            Some((0, Some(3))),
        ];
        let mut out = Vec::new();
        for ra in 1..=3 {
            for ca in counters {
                out.push(vec![entry(ra, A, "1", ca)]);
                for rb in (1..=3).filter(|&r| r != ra) {
                    for cb in counters {
                        out.push(vec![entry(ra, A, "1", ca), entry(rb, B, "2", cb)]);
                    }
                }
            }
        }
        out.into_iter()
            .filter(|n| {
                EspState::from_names(n.iter().map(String::as_str))
                    .expect("valid names")
                    .default_entry()
                    .is_ok()
            })
            .collect()
    }

    #[test]
    fn pure_layer_agrees_with_systemd_boot_order() {
        let states = all_states();
        assert!(states.len() > 40, "{}", states.len());
        for names in states {
            let s = EspState::from_names(names.iter().map(String::as_str)).expect("valid");
            let order = boot_order(&names);
            assert_eq!(order[0], s.first().expect("first").file_name(), "{names:?}");
            // And with foreign entries that sort after ours, still ours first.
            let mut with = names.clone();
            with.extend(owned(&["debian-6.1.conf", "arch.conf", "zz+0-1.conf"]));
            assert_eq!(boot_order(&with)[0], order[0]);
        }
    }

    #[test]
    fn every_step_of_every_transition_keeps_a_bootable_default() {
        let mut states = all_states();
        states.push(owned(&[
            "update-agent-1-a-1.conf",
            "update-agent-b-2.staged",
            "update-agent-b.tmp",
        ]));
        for names in states {
            let s = EspState::from_names(names.iter().map(String::as_str)).expect("valid");
            for slot in [A, B] {
                let plans = [
                    ("mark_unbootable", s.mark_unbootable(slot)),
                    ("arm_trial", s.arm_trial(slot, 3)),
                    ("commit", s.commit(slot)),
                    ("rollback_to", s.rollback_to(slot)),
                ];
                for (what, plan) in plans {
                    let Ok(ops) = plan else { continue };
                    // A power cut after any step leaves a tree that reads and boots our default
                    // or the slot being made bootable.
                    for n in 0..=ops.len() {
                        let after = apply_ops(&names, &ops[..n]);
                        let s2 = EspState::from_names(after.iter().map(String::as_str))
                            .unwrap_or_else(|e| panic!("{names:?} {what}({slot}) step {n}: {e:?}"));
                        let first = s2.first().expect("a default");
                        assert_eq!(boot_order(&after)[0], first.file_name());
                    }
                    let end = apply_ops(&names, &ops);
                    let s2 = EspState::from_names(end.iter().map(String::as_str)).expect("valid");
                    let (default, trial, bootable) = summary(&s2);
                    match what {
                        "mark_unbootable" => assert!(!bootable[slot.index()]),
                        "arm_trial" => assert_eq!(trial, Some((slot, 3)), "{names:?}"),
                        _ => assert_eq!((default, trial), (slot, None), "{names:?} {what}"),
                    }
                    // The other slot stays as it was, unless it was the one marked.
                    if what != "mark_unbootable" {
                        let o = slot.other().index();
                        assert_eq!(bootable[o], s.entry(slot.other()).is_some());
                    }
                }
            }
        }
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
            is_entry_name("X.CONF")
                && !is_entry_name("auto-windows.conf")
                && !is_entry_name(".conf")
        );
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

    #[test]
    fn entry_text_is_what_systemd_boot_reads() {
        let cfg = EntryConfig {
            title: "Azure Linux".into(),
            root_labels: ["root-a".into(), "root-b".into()],
            options: " ro console=ttyS0 panic=-1 ".into(),
        };
        let text = entry_text(&cfg, B, "3.0.20240601", true);
        assert_eq!(
            text,
            "title Azure Linux 3.0.20240601 (slot b)\n\
             version 3.0.20240601\n\
             linux /update-agent/b/vmlinuz\n\
             initrd /update-agent/b/initrd.img\n\
             options root=PARTLABEL=root-b updateagent.slot=b ro console=ttyS0 panic=-1\n"
        );
        let kv: Vec<(&str, &str)> = key_values(&text).collect();
        assert_eq!(kv[0], ("title", "Azure Linux 3.0.20240601 (slot b)"));
        assert_eq!(
            kv[4],
            (
                "options",
                "root=PARTLABEL=root-b updateagent.slot=b ro console=ttyS0 panic=-1"
            )
        );
        let bare = EntryConfig {
            options: String::new(),
            ..cfg.clone()
        };
        assert_eq!(
            entry_text(&bare, A, "1", false),
            "title Azure Linux 1 (slot a)\nversion 1\nlinux /update-agent/a/vmlinuz\noptions root=PARTLABEL=root-a updateagent.slot=a\n"
        );
        assert!(EntryConfig::default().validate().is_ok());
        for bad in [
            EntryConfig {
                title: " ".into(),
                ..cfg.clone()
            },
            EntryConfig {
                title: "a\nb".into(),
                ..cfg.clone()
            },
            EntryConfig {
                root_labels: ["root a".into(), "root-b".into()],
                ..cfg.clone()
            },
            EntryConfig {
                root_labels: ["root-a".into(), String::new()],
                ..cfg.clone()
            },
            EntryConfig {
                options: "ro\ninitrd /evil".into(),
                ..cfg
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(
            has_sort_key("title x\n  sort-key debian\n")
                && !has_sort_key("# sort-key x\ntitle sort-key\n")
        );
        assert!(
            has_default("timeout 0\ndefault @saved\n") && !has_default("timeout 0\n#default x\n")
        );
    }

    // -----------------------------------------------------------------------------
    // Real directory trees.

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("creating a temp dir")
    }

    /// Every file and directory under `root`, with contents, for byte-identical checks.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for de in fs::read_dir(&dir).expect("reading a test dir") {
                let path = de.expect("dir entry").path();
                let rel = path.strip_prefix(root).expect("under root").to_path_buf();
                if path.is_dir() {
                    out.insert(rel, None);
                    todo.push(path);
                } else {
                    out.insert(rel, Some(fs::read(&path).expect("reading a test file")));
                }
            }
        }
        out
    }

    fn sha(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// A fake release: kernel and initrd files with distinct contents.
    struct Release {
        _dir: tempfile::TempDir,
        kernel: PathBuf,
        initrd: PathBuf,
        kernel_bytes: Vec<u8>,
        initrd_bytes: Vec<u8>,
    }

    impl Release {
        fn new(tag: &str) -> Self {
            let dir = tmp();
            let kernel_bytes: Vec<u8> = format!("kernel {tag} ")
                .bytes()
                .cycle()
                .take(3 << 20)
                .collect();
            let initrd_bytes = format!("initrd {tag}").into_bytes();
            let kernel = dir.path().join("vmlinuz");
            let initrd = dir.path().join("initrd.img");
            fs::write(&kernel, &kernel_bytes).expect("writing kernel");
            fs::write(&initrd, &initrd_bytes).expect("writing initrd");
            Self {
                _dir: dir,
                kernel,
                initrd,
                kernel_bytes,
                initrd_bytes,
            }
        }

        fn kernel(&self) -> BootFile<'_> {
            BootFile {
                path: &self.kernel,
                sha256: sha(&self.kernel_bytes),
            }
        }

        fn initrd(&self) -> BootFile<'_> {
            BootFile {
                path: &self.initrd,
                sha256: sha(&self.initrd_bytes),
            }
        }
    }

    fn cfg() -> EntryConfig {
        EntryConfig {
            options: "ro console=ttyS0".into(),
            ..EntryConfig::default()
        }
    }

    fn created(esp: &Path, rel: &Release) -> SystemdBoot {
        SystemdBoot::create(esp, cfg(), A, "1.0", &rel.kernel(), Some(&rel.initrd()))
            .expect("creating the ESP")
    }

    fn entries(esp: &Path) -> Vec<String> {
        list_files(&esp.join(ENTRIES_DIR), false).expect("listing entries")
    }

    fn status(sb: &SystemdBoot) -> Summary {
        let st = sb.status().expect("status");
        (st.default, st.trial, st.bootable)
    }

    /// One boot as systemd-boot does it: the first entry in its order; a counted one is
    /// renamed one try down first. Returns the slot it boots.
    fn boot(esp: &Path) -> Slot {
        let dir = esp.join(ENTRIES_DIR);
        let first = boot_order(&entries(esp))
            .into_iter()
            .next()
            .expect("an entry");
        let mut booted = first.clone();
        if name_tries_left(&first).is_some_and(|l| l > 0) {
            booted = loader_try(&first);
            fs::rename(dir.join(&first), dir.join(&booted)).expect("loader rename");
        }
        let text = fs::read_to_string(dir.join(&booted)).expect("reading the entry");
        let kernel = key_values(&text)
            .find(|(k, _)| *k == "linux")
            .map(|(_, v)| esp.join(v.trim_start_matches('/')))
            .expect("a linux line");
        assert!(kernel.is_file(), "{booted}: no kernel");
        match Name::parse(&booted).expect("our name") {
            Name::Entry(e) => e.slot,
            other => panic!("booted {other:?}"),
        }
    }

    #[test]
    fn full_cycle_with_the_loader_counting() {
        let esp = tmp();
        let esp = esp.path();
        let (r1, r2, r3) = (
            Release::new("1.0"),
            Release::new("2.0"),
            Release::new("3.0"),
        );
        let mut sb = created(esp, &r1);
        assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
        assert_eq!(status(&sb), (A, None, [true, false]));
        assert_eq!(
            fs::read_to_string(esp.join("loader/entries/update-agent-1-a-1.0.conf"))
                .expect("entry"),
            entry_text(&cfg(), A, "1.0", true)
        );
        assert_eq!(
            fs::read(esp.join("update-agent/a/vmlinuz")).expect("kernel"),
            r1.kernel_bytes
        );
        assert_eq!(boot(esp), A);

        // Update to 2.0 in b.
        sb.mark_unbootable(B).expect("mark b");
        sb.stage(B, "2.0", &r2.kernel(), None).expect("stage b");
        assert_eq!(
            entries(esp),
            ["update-agent-1-a-1.0.conf", "update-agent-b-2.0.staged"]
        );
        assert_eq!(status(&sb), (A, None, [true, false]));
        assert_eq!(boot(esp), A, "a staged entry is not booted");
        sb.arm_trial(B, 3).expect("arm b");
        assert_eq!(
            entries(esp),
            ["update-agent-1-a-1.0.conf", "update-agent-2-b-2.0+3.conf"]
        );
        assert_eq!(status(&sb), (A, Some((B, 3)), [true, true]));
        let st = sb.status().expect("status");
        assert_eq!(
            st.raw,
            "update-agent-2-b-2.0+3.conf update-agent-1-a-1.0.conf"
        );

        // Three tries that never reach the health check, then the loader falls back.
        for left in [2, 1, 0] {
            assert_eq!(boot(esp), B);
            assert_eq!(status(&sb), (A, Some((B, left)), [true, true]));
        }
        assert_eq!(boot(esp), A);
        assert_eq!(
            entries(esp),
            ["update-agent-1-a-1.0.conf", "update-agent-2-b-2.0+0-3.conf"]
        );
        assert_eq!(status(&sb), (A, Some((B, 0)), [true, true]));
        // The agent on a records the rollback and makes it final.
        sb.rollback_to(A).expect("rollback to a");
        assert_eq!(
            entries(esp),
            ["update-agent-2-b-2.0+0-3.conf", "update-agent-3-a-1.0.conf"]
        );
        assert_eq!(status(&sb), (A, None, [true, true]));
        assert_eq!(boot(esp), A);

        // 3.0 into b again: this time healthy on its second try.
        sb.mark_unbootable(B).expect("mark b");
        assert_eq!(entries(esp), ["update-agent-3-a-1.0.conf"]);
        sb.stage(B, "3.0", &r3.kernel(), Some(&r3.initrd()))
            .expect("stage b");
        sb.arm_trial(B, 2).expect("arm b");
        assert_eq!(boot(esp), B);
        assert_eq!(boot(esp), B);
        assert_eq!(status(&sb), (A, Some((B, 0)), [true, true]));
        sb.commit(B).expect("commit b");
        assert_eq!(
            entries(esp),
            ["update-agent-3-a-1.0.conf", "update-agent-4-b-3.0.conf"]
        );
        assert_eq!(status(&sb), (B, None, [true, true]));
        assert_eq!(
            fs::read(esp.join("update-agent/b/initrd.img")).expect("initrd"),
            r3.initrd_bytes
        );
        for _ in 0..3 {
            assert_eq!(boot(esp), B);
        }
        sb.commit(B).expect("commit again is a no-op");

        // A manual rollback to the older, still bootable, release.
        sb.rollback_to(A).expect("rollback to a");
        assert_eq!(status(&sb), (A, None, [true, true]));
        assert_eq!(boot(esp), A);
        assert_eq!(
            entries(esp),
            ["update-agent-4-b-3.0.conf", "update-agent-5-a-1.0.conf"]
        );

        // Next update into b, failing its health check: rolled back by the agent while
        // the trial is running, with tries left.
        sb.mark_unbootable(B).expect("mark b");
        // Unreferenced kernel files stay until the next install replaces them.
        assert!(esp.join("update-agent/b/initrd.img").exists());
        sb.stage(B, "4.0", &r2.kernel(), None).expect("stage b");
        assert!(
            !esp.join("update-agent/b/initrd.img").exists(),
            "stale initrd left"
        );
        sb.arm_trial(B, 3).expect("arm b");
        assert_eq!(boot(esp), B);
        sb.rollback_to(A).expect("rollback to a");
        assert_eq!(status(&sb), (A, None, [true, true]));
        assert_eq!(
            entries(esp),
            ["update-agent-6-b-4.0+2-1.conf", "update-agent-7-a-1.0.conf"]
        );
        assert_eq!(boot(esp), A);
        assert_eq!(sb.name(), "systemd-boot");
    }

    #[test]
    fn commit_is_what_systemd_bless_boot_does() {
        let esp = tmp();
        let esp = esp.path();
        let (r1, r2) = (Release::new("1"), Release::new("2"));
        let dir = esp.join(ENTRIES_DIR);

        // The agent first, then systemd-bless-boot finds its target there.
        let mut sb = created(esp, &r1);
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        sb.arm_trial(B, 3).expect("arm");
        assert_eq!(boot(esp), B);
        let booted = "update-agent-2-b-2+2-1.conf";
        assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf", booted]);
        sb.commit(B).expect("commit");
        assert!(dir.join(bless_boot(booted)).exists());
        assert!(!dir.join(booted).exists());

        // systemd-bless-boot first: the agent's commit has nothing left to do.
        let esp2 = tmp();
        let esp2 = esp2.path();
        let dir2 = esp2.join(ENTRIES_DIR);
        let mut sb = created(esp2, &r1);
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        sb.arm_trial(B, 3).expect("arm");
        assert_eq!(boot(esp2), B);
        fs::rename(dir2.join(booted), dir2.join(bless_boot(booted))).expect("bless");
        assert_eq!(status(&sb), (B, None, [true, true]));
        let before = snapshot(esp2);
        sb.commit(B).expect("commit");
        assert_eq!(snapshot(esp2), before);
        assert_eq!(snapshot(esp), before, "both orders end in the same tree");
    }

    fn refused_with(res: Result<(), BootError>, want: &str) {
        match res {
            Err(e @ BootError::Refused { .. }) => {
                assert!(e.to_string().contains(want), "{e} does not say {want:?}")
            }
            other => panic!("expected a refusal ({want}), got {other:?}"),
        }
    }

    #[test]
    fn illegal_transitions_leave_the_tree_byte_identical() {
        let esp = tmp();
        let esp = esp.path();
        let (r1, r2) = (Release::new("1"), Release::new("2"));
        let mut sb = created(esp, &r1);
        let before = snapshot(esp);
        refused_with(sb.mark_unbootable(A), "default slot");
        refused_with(sb.arm_trial(A, 3), "default slot");
        refused_with(sb.arm_trial(B, 3), "nothing is staged");
        refused_with(sb.commit(B), "marked unbootable");
        refused_with(sb.rollback_to(B), "marked unbootable");
        refused_with(sb.stage(A, "2", &r2.kernel(), None), "has a boot entry");
        refused_with(
            install_kernel(esp, A, &r2.kernel(), None),
            "has a boot entry",
        );
        assert_eq!(snapshot(esp), before);

        sb.stage(B, "2", &r2.kernel(), Some(&r2.initrd()))
            .expect("stage");
        let before = snapshot(esp);
        refused_with(sb.arm_trial(B, 0), "1 to 9");
        refused_with(sb.arm_trial(B, 10), "1 to 9");
        refused_with(sb.commit(B), "marked unbootable");
        assert_eq!(snapshot(esp), before);

        sb.arm_trial(B, 3).expect("arm");
        let before = snapshot(esp);
        refused_with(sb.mark_unbootable(A), "default slot");
        refused_with(sb.arm_trial(A, 1), "default slot");
        refused_with(sb.arm_trial(B, 0), "1 to 9");
        refused_with(sb.stage(B, "3", &r1.kernel(), None), "has a boot entry");
        assert_eq!(snapshot(esp), before);
        // Calls that change nothing write nothing.
        sb.arm_trial(B, 3).expect("arm again");
        assert_eq!(
            snapshot(esp),
            before,
            "re-arming with the same tries renames nothing"
        );
        sb.mark_unbootable(B).expect("mark b");
        let before_mark = snapshot(esp);
        sb.mark_unbootable(B).expect("mark b again");
        assert_eq!(snapshot(esp), before_mark);
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        sb.arm_trial(B, 3).expect("arm");
        sb.rollback_to(A).expect("first rollback");
        let before_rb = snapshot(esp);
        sb.rollback_to(A).expect("second rollback");
        assert_eq!(snapshot(esp), before_rb);
        assert_ne!(before, before_rb);
    }

    /// An ESP with `extra` foreign entries (and their kernels), made by `created`.
    fn esp_with_foreign(esp: &Path, rel: &Release, extra: &[(&str, &str)]) -> SystemdBoot {
        let sb = created(esp, rel);
        let dir = esp.join(ENTRIES_DIR);
        fs::create_dir_all(esp.join("debian")).expect("mkdir");
        fs::write(esp.join("debian/vmlinuz"), b"debian kernel").expect("write");
        for (name, text) in extra {
            fs::write(dir.join(name), text).expect("writing a foreign entry");
        }
        sb
    }

    #[test]
    fn foreign_entries_are_left_alone() {
        let esp = tmp();
        let esp = esp.path();
        let (r1, r2) = (Release::new("1"), Release::new("2"));
        let foreign = [
            (
                "debian-6.1.0-18-cloud-amd64.conf",
                "title Debian\nlinux /debian/vmlinuz\n",
            ),
            ("arch.conf", "title Arch\nlinux /arch/vmlinuz-linux\n"),
            (
                "fedora-40+0-3.conf",
                "title Fedora\nsort-key fedora\nlinux /f/vmlinuz\n",
            ),
            ("auto-windows.conf", "title whatever\nsort-key a\n"),
            ("notes.txt", "not an entry"),
        ];
        let mut sb = esp_with_foreign(esp, &r1, &foreign);
        fs::create_dir(esp.join("loader/entries/zz-dir.conf")).expect("a directory is no entry");
        fs::write(esp.join("loader/loader.conf"), "timeout 0\neditor no\n").expect("loader.conf");
        let foreign_files = |esp: &Path| {
            snapshot(esp)
                .into_iter()
                .filter(|(p, _)| {
                    let s = p.to_string_lossy();
                    !s.contains("update-agent")
                })
                .collect::<BTreeMap<_, _>>()
        };
        let before = foreign_files(esp);
        assert!(before.len() >= 8, "{before:?}");

        sb.mark_unbootable(B).expect("mark");
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        sb.arm_trial(B, 3).expect("arm");
        assert_eq!(boot(esp), B);
        assert_eq!(status(&sb), (A, Some((B, 2)), [true, true]));
        sb.rollback_to(A).expect("rollback");
        sb.commit(B).expect("commit");
        sb.mark_unbootable(A).expect("mark a");
        assert_eq!(status(&sb), (B, None, [false, true]));
        assert_eq!(foreign_files(esp), before);
        let raw = sb.status().expect("status").raw;
        assert!(raw.starts_with("update-agent-4-b-2.conf "), "{raw}");
        assert!(
            raw.contains("debian-6.1.0-18-cloud-amd64.conf") && !raw.contains("notes.txt"),
            "{raw}"
        );
    }

    #[test]
    fn a_foreign_entry_that_would_boot_first_is_refused() {
        let r1 = Release::new("1");
        for (name, text) in [
            ("zz.conf", "title zz\nlinux /zz\n"),
            (
                "0123456789abcdef0123456789abcdef-6.1.conf",
                "title mid\nlinux /x\n",
            ),
            (
                "debian.conf",
                "title Debian\nsort-key debian\nlinux /debian/vmlinuz\n",
            ),
        ] {
            let esp = tmp();
            let esp = esp.path();
            let mut sb = created(esp, &r1);
            fs::write(esp.join(ENTRIES_DIR).join(name), text).expect("write");
            let before = snapshot(esp);
            let is_it = |r: Result<(), BootError>| match r {
                Err(BootError::Malformed { path, what }) => {
                    assert!(path.ends_with(name), "{path:?}");
                    assert!(what.contains("foreign"), "{what}");
                }
                other => panic!("{name}: expected Malformed, got {other:?}"),
            };
            is_it(sb.status().map(drop));
            is_it(sb.mark_unbootable(B));
            is_it(sb.commit(A));
            is_it(SystemdBoot::open(esp, cfg()).map(drop));
            assert_eq!(snapshot(esp), before, "{name}");
        }
        // create checks before it writes anything.
        let esp = tmp();
        let esp = esp.path();
        fs::create_dir_all(esp.join(ENTRIES_DIR)).expect("mkdir");
        fs::write(esp.join(ENTRIES_DIR).join("zz.conf"), "title zz\n").expect("write");
        let before = snapshot(esp);
        let res = SystemdBoot::create(esp, cfg(), A, "1", &r1.kernel(), None);
        assert!(matches!(res, Err(BootError::Malformed { .. })), "{res:?}");
        assert_eq!(snapshot(esp), before);
    }

    #[test]
    fn trees_systemd_boot_would_read_differently_are_refused() {
        let r1 = Release::new("1");
        type Spoil = fn(&Path);
        let cases: [(&str, Spoil); 5] = [
            ("default in loader.conf", |esp| {
                fs::write(esp.join(LOADER_CONF), "timeout 0\ndefault update-agent-*\n")
                    .expect("write")
            }),
            ("missing kernel", |esp| {
                fs::remove_file(esp.join("update-agent/a/vmlinuz")).expect("rm")
            }),
            ("missing initrd", |esp| {
                fs::remove_file(esp.join("update-agent/a/initrd.img")).expect("rm")
            }),
            ("sort-key in our entry", |esp| {
                let p = esp.join("loader/entries/update-agent-1-a-1.0.conf");
                let mut text = fs::read_to_string(&p).expect("read");
                text.push_str("sort-key ua\n");
                fs::write(&p, text).expect("write")
            }),
            ("torn rename", |esp| {
                fs::copy(
                    esp.join("loader/entries/update-agent-1-a-1.0.conf"),
                    esp.join("loader/entries/update-agent-2-a-1.0.conf"),
                )
                .map(drop)
                .expect("copy")
            }),
        ];
        for (what, spoil) in cases {
            let esp = tmp();
            let esp = esp.path();
            let mut sb = created(esp, &r1);
            spoil(esp);
            let before = snapshot(esp);
            assert!(
                matches!(sb.status(), Err(BootError::Malformed { .. })),
                "{what}"
            );
            assert!(
                matches!(sb.rollback_to(A), Err(BootError::Malformed { .. })),
                "{what}"
            );
            assert!(
                matches!(sb.mark_unbootable(B), Err(BootError::Malformed { .. })),
                "{what}"
            );
            assert_eq!(snapshot(esp), before, "{what}");
        }
    }

    #[test]
    fn install_kernel_copies_and_verifies() {
        let esp = tmp();
        let esp = esp.path();
        let (r1, r2) = (Release::new("1"), Release::new("2"));
        let mut sb = created(esp, &r1);
        // Into a slot with no entry, on an ESP that has never seen one for it.
        install_kernel(esp, B, &r2.kernel(), Some(&r2.initrd())).expect("install");
        assert_eq!(
            fs::read(esp.join("update-agent/b/vmlinuz")).expect("read"),
            r2.kernel_bytes
        );
        assert_eq!(
            fs::read(esp.join("update-agent/b/initrd.img")).expect("read"),
            r2.initrd_bytes
        );

        // A source that is not what the manifest says: refused, nothing left behind,
        // and the staged entry of the earlier stage is gone with the old files.
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        let wrong = BootFile {
            sha256: sha(b"something else"),
            ..r1.kernel()
        };
        match install_kernel(esp, B, &wrong, None) {
            Err(BootError::Read { path, source }) => {
                assert_eq!(path, r1.kernel);
                assert_eq!(source.kind(), io::ErrorKind::InvalidData);
                assert!(source
                    .to_string()
                    .contains(&hex::encode(sha(b"something else"))));
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        assert!(list_files(&esp.join("update-agent/b"), false)
            .expect("list")
            .is_empty());
        assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
        refused_with(sb.arm_trial(B, 3), "nothing is staged");
        // A wrong initrd fails after the kernel went in; staging again recovers.
        let bad_initrd = BootFile {
            sha256: sha(b"x"),
            ..r2.initrd()
        };
        assert!(sb.stage(B, "2", &r2.kernel(), Some(&bad_initrd)).is_err());
        assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
        assert_eq!(
            list_files(&esp.join("update-agent/b"), false).expect("list"),
            [KERNEL_NAME]
        );
        // A missing source.
        let missing = BootFile {
            path: Path::new("/nonexistent/vmlinuz"),
            sha256: [0; 32],
        };
        assert!(matches!(
            install_kernel(esp, B, &missing, None),
            Err(BootError::Read { .. })
        ));
        sb.stage(B, "2", &r2.kernel(), Some(&r2.initrd()))
            .expect("stage");
        sb.arm_trial(B, 1).expect("arm");
        assert_eq!(boot(esp), B);
        // Slot a's files were never touched.
        assert_eq!(
            fs::read(esp.join("update-agent/a/vmlinuz")).expect("read"),
            r1.kernel_bytes
        );
    }

    #[test]
    fn leftovers_of_an_interrupted_stage_are_cleaned() {
        let esp = tmp();
        let esp = esp.path();
        let (r1, r2) = (Release::new("1"), Release::new("2"));
        let mut sb = created(esp, &r1);
        let dir = esp.join(ENTRIES_DIR);
        // Power cut while the staged entry was being written, and while a kernel was.
        fs::write(dir.join("update-agent-b.tmp"), "title half").expect("write");
        fs::create_dir_all(esp.join("update-agent/b")).expect("mkdir");
        fs::write(esp.join("update-agent/b/vmlinuz.tmp"), "half a kernel").expect("write");
        assert_eq!(status(&sb), (A, None, [true, false]));
        sb.mark_unbootable(B).expect("mark");
        assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
        fs::write(dir.join("update-agent-b.tmp"), "title half").expect("write");
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        assert_eq!(
            entries(esp),
            ["update-agent-1-a-1.0.conf", "update-agent-b-2.staged"]
        );
        assert_eq!(
            list_files(&esp.join("update-agent/b"), false).expect("list"),
            [KERNEL_NAME]
        );
        // Staging again replaces the staged entry; marking unbootable removes it.
        sb.stage(B, "2.1", &r2.kernel(), None).expect("stage again");
        assert_eq!(
            entries(esp),
            ["update-agent-1-a-1.0.conf", "update-agent-b-2.1.staged"]
        );
        sb.mark_unbootable(B).expect("mark");
        assert_eq!(entries(esp), ["update-agent-1-a-1.0.conf"]);
        // A staged entry whose kernel vanished is refused before it is armed, and
        // does not stand in the way of anything else.
        sb.stage(B, "2", &r2.kernel(), None).expect("stage");
        fs::remove_file(esp.join("update-agent/b/vmlinuz")).expect("rm");
        let before = snapshot(esp);
        match sb.arm_trial(B, 3) {
            Err(BootError::Malformed { path, what }) => {
                assert!(path.ends_with("update-agent-b-2.staged"), "{path:?}");
                assert!(what.contains("not on the ESP"), "{what}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(snapshot(esp), before);
        assert_eq!(status(&sb), (A, None, [true, false]));
        sb.stage(B, "2", &r2.kernel(), None).expect("stage again");
        sb.arm_trial(B, 3).expect("arm");

        // The same for a trial entry: reported, and marking the slot unbootable (the
        // cure) still works while everything else refuses.
        fs::remove_file(esp.join("update-agent/b/vmlinuz")).expect("rm");
        let before = snapshot(esp);
        assert!(matches!(sb.status(), Err(BootError::Malformed { .. })));
        assert!(matches!(sb.commit(B), Err(BootError::Malformed { .. })));
        assert!(matches!(
            sb.rollback_to(A),
            Err(BootError::Malformed { .. })
        ));
        assert_eq!(snapshot(esp), before);
        sb.mark_unbootable(B).expect("mark b");
        assert_eq!(status(&sb), (A, None, [true, false]));
        // But the default's entry is never skipped: with its kernel gone, nothing goes.
        fs::remove_file(esp.join("update-agent/a/vmlinuz")).expect("rm");
        assert!(matches!(
            sb.mark_unbootable(B),
            Err(BootError::Malformed { .. })
        ));
    }

    #[test]
    fn create_and_open() {
        let r1 = Release::new("1");
        let esp = tmp();
        let esp = esp.path();
        match SystemdBoot::open(esp, cfg()) {
            Err(BootError::Read { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        let sb = SystemdBoot::create(esp, cfg(), B, "7.1+x", &r1.kernel(), None).expect("create");
        assert_eq!(entries(esp), ["update-agent-1-b-7.1_x.conf"]);
        let text = fs::read_to_string(esp.join("loader/entries/update-agent-1-b-7.1_x.conf"))
            .expect("read");
        assert!(
            text.contains("version 7.1+x\n") && !text.contains("initrd"),
            "{text}"
        );
        assert_eq!(status(&sb), (B, None, [false, true]));
        assert_eq!(sb.esp(), esp);
        let before = snapshot(esp);
        match SystemdBoot::create(esp, cfg(), A, "1", &r1.kernel(), None) {
            Err(BootError::Write { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::AlreadyExists)
            }
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        assert_eq!(snapshot(esp), before);
        SystemdBoot::open(esp, cfg()).expect("open");

        // A create cut short after the staged entry was written is finished by running
        // it again; leftovers of either slot go.
        let esp2 = tmp();
        let esp2 = esp2.path();
        let dir2 = esp2.join(ENTRIES_DIR);
        fs::create_dir_all(&dir2).expect("mkdir");
        fs::write(dir2.join("update-agent-a-1.staged"), "title half\n").expect("write");
        fs::write(dir2.join("update-agent-b.tmp"), "title half").expect("write");
        assert!(SystemdBoot::open(esp2, cfg()).is_err());
        let sb2 = SystemdBoot::create(esp2, cfg(), A, "1", &r1.kernel(), None).expect("create");
        assert_eq!(entries(esp2), ["update-agent-1-a-1.conf"]);
        assert_eq!(status(&sb2), (A, None, [true, false]));

        let bad = EntryConfig {
            title: String::new(),
            ..cfg()
        };
        assert!(matches!(
            SystemdBoot::open(esp, bad),
            Err(BootError::Malformed { .. })
        ));
        // An ESP whose entries are all gone has nothing to fall back to.
        fs::remove_file(esp.join("loader/entries/update-agent-1-b-7.1_x.conf")).expect("rm");
        match SystemdBoot::open(esp, cfg()) {
            Err(BootError::Malformed { what, .. }) => {
                assert!(what.contains("nothing to fall back to"))
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn hooks_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bootloader-hooks/systemd-boot")
    }

    #[test]
    fn hook_templates_match_the_code() {
        let loader =
            fs::read_to_string(hooks_dir().join("loader.conf")).expect("loader.conf template");
        assert!(
            !has_default(&loader),
            "the loader.conf template sets default"
        );
        assert!(
            key_values(&loader).any(|kv| kv == ("timeout", "0")),
            "{loader}"
        );
        let template =
            fs::read_to_string(hooks_dir().join("entry.conf.in")).expect("entry template");
        let cfg = cfg();
        for (slot, initrd) in [(A, true), (B, false)] {
            let mut text = template
                .replace("@TITLE@", &cfg.title)
                .replace("@VERSION@", "2.0")
                .replace("@SLOT@", slot.letter())
                .replace("@ROOT_LABEL@", &cfg.root_labels[slot.index()])
                .replace("@OPTIONS@", &cfg.options);
            if !initrd {
                text = text
                    .lines()
                    .filter(|l| !l.starts_with("initrd "))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
            let text: String = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(text, entry_text(&cfg, slot, "2.0", initrd));
        }
    }
}
