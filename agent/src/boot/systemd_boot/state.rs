//! [`EspState`]: our files in the entries directory, checked, and the transitions
//! planned on it as [`Op`]s. Pure: nothing here touches the file system.

use std::path::{Path, PathBuf};

use super::names::{staged_name, temp_name, Counter, Entry, Name, StateError};
use super::MAX_TRIES;
use crate::boot::{BootError, BootStatus};
use crate::slots::Slot;

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
    /// A second name of a slot's entry left by a torn rename (see [`torn_pair`]).
    stale: [Option<String>; 2],
}

/// Two names of one slot's entry, as a rename torn by a power cut leaves them on vfat
/// (Linux writes the new directory entry before the old one is gone, both naming the
/// same clusters: seen in the VM lab, a cut inside a commit). Which is the rename's
/// target, when the names say: every rename that changes a rank raises it, and the
/// only renames that keep a rank and drop a counter are a commit and
/// `systemd-bless-boot`. `(kept, stale)`, or `None` when the names do not say.
fn torn_pair(a: Entry, b: Entry) -> Option<(Entry, Entry)> {
    if a.version != b.version {
        return None;
    }
    match (
        a.rank.cmp(&b.rank),
        a.counter.is_none(),
        b.counter.is_none(),
    ) {
        (std::cmp::Ordering::Greater, ..) => Some((a, b)),
        (std::cmp::Ordering::Less, ..) => Some((b, a)),
        (_, true, false) => Some((a, b)),
        (_, false, true) => Some((b, a)),
        _ => None,
    }
}

impl EspState {
    /// Reads our names among `names` (others are ignored). A tree without a default
    /// is accepted here (a fresh ESP); [`EspState::default_entry`] refuses it.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, StateError> {
        let mut st = Self {
            entries: [None, None],
            staged: [None, None],
            temps: [false; 2],
            stale: [None, None],
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
                    let two = || {
                        StateError::file(
                            name,
                            "a slot has two entries (a torn rename? run fsck.vfat)",
                        )
                    };
                    match st.entries[i].take() {
                        None => st.entries[i] = Some(e),
                        Some(_) if st.stale[i].is_some() => return Err(two()),
                        Some(prev) => {
                            let (kept, stale) = torn_pair(prev, e).ok_or_else(two)?;
                            st.entries[i] = Some(kept);
                            st.stale[i] = Some(stale.file_name());
                        }
                    }
                }
            }
        }
        for slot in [Slot::A, Slot::B] {
            let i = slot.index();
            if let (Some(e), Some(v)) = (&st.entries[i], &st.staged[i]) {
                // A torn arm (the staged file renamed to its entry, both names left):
                // the entry is the rename's target, the staged name is stale.
                if e.version == *v && st.stale[i].is_none() {
                    st.stale[i] = Some(staged_name(slot, v));
                    st.staged[i] = None;
                } else {
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

    /// The stale second name of `slot`'s entry, after a torn rename.
    pub fn stale(&self, slot: Slot) -> Option<&str> {
        self.stale[slot.index()].as_deref()
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
            default_boots_left: None,
            fell_back_from: None,
            raw,
        })
    }

    /// Our file names: entries by rank, highest first, then staged entries.
    pub fn names(&self) -> Vec<String> {
        let mut live: Vec<&Entry> = self.live().collect();
        live.sort_by_key(|e| std::cmp::Reverse(e.rank));
        let mut out: Vec<String> = live.iter().map(|e| e.file_name()).collect();
        out.extend(self.stale.iter().flatten().cloned());
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
        if self.stale(slot).is_some() {
            // Removing either name frees the clusters the other still names.
            return Err(refused(
                "mark unbootable",
                slot,
                "its entry has a second name from a torn rename, sharing its clusters: run fsck.vfat on the ESP first",
            ));
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

    /// What systemd-boot does before it starts a trial entry: `+LEFT[-DONE]` becomes
    /// `+(LEFT-1)-(DONE+1)`, one rename.
    pub fn consume_try(&self, slot: Slot) -> Result<Vec<Op>, BootError> {
        const ACTION: &str = "count a try of";
        let trial = self.trial_entry().map_err(malformed)?;
        let Some(e) = trial.filter(|e| e.slot == slot) else {
            return Err(refused(ACTION, slot, "it is not the armed trial"));
        };
        let Some(c) = e.counter.filter(|c| c.left > 0) else {
            return Err(refused(ACTION, slot, "it has no try left"));
        };
        let next = Entry {
            counter: Some(Counter {
                left: c.left - 1,
                done: Some(c.done.unwrap_or(0).saturating_add(1)),
            }),
            ..e.clone()
        };
        Ok(rename(e.file_name(), next.file_name()))
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

pub(super) fn rename(from: String, to: String) -> Vec<Op> {
    if from == to {
        Vec::new()
    } else {
        vec![Op::Rename { from, to }]
    }
}

/// For errors found while planning, before the directory is known: the path is the
/// file name (or empty), which [`SystemdBoot`](super::SystemdBoot) puts under the entries
/// directory.
fn malformed(e: StateError) -> BootError {
    BootError::Malformed {
        path: e.name.map(PathBuf::from).unwrap_or_default(),
        what: e.what,
    }
}

pub(super) fn under(dir: &Path, e: BootError) -> BootError {
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

pub(super) fn refused(action: &'static str, slot: Slot, why: &'static str) -> BootError {
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
