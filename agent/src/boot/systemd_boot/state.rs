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
/// renames that keep one are those [`same_rank_target`] knows. `(kept, stale)`, or
/// `None` when the names do not say.
fn torn_pair(a: Entry, b: Entry) -> Option<(Entry, Entry)> {
    if a.version != b.version {
        return None;
    }
    match a.rank.cmp(&b.rank) {
        std::cmp::Ordering::Greater => Some((a, b)),
        std::cmp::Ordering::Less => Some((b, a)),
        std::cmp::Ordering::Equal => {
            if same_rank_target(&a, &b)? {
                Some((a, b))
            } else {
                Some((b, a))
            }
        }
    }
}

/// Of two names of one entry with the same rank, whether `a` (rather than `b`) is the
/// newer one; `None` when the names do not say.
/// * Without marks: the one without a counter (a commit of the top trial, or
///   systemd-bless-boot of it); two counters do not say.
/// * One marked (`@default`): the marked one. A mark only ever comes in place (the
///   guard set); every rename that drops it raises the rank.
/// * Both marked: the same guarded default, and the names differ only in its count, so
///   a wrong pick only changes how many boots are left; they are never refused (the
///   default is renamed at every boot). The fresh `+N` of a guard set (never with a
///   `-DONE`), else the one without a counter (systemd-bless-boot), else the one with
///   more boots left. A loader's count torn by the firmware then reads as the guard's
///   reset torn the other way: at worst one more boot before the fallback.
fn same_rank_target(a: &Entry, b: &Entry) -> Option<bool> {
    let fresh = |e: &Entry| e.counter.is_some_and(|c| c.done.is_none());
    let left = |e: &Entry| e.counter.map_or(u32::MAX, |c| c.left);
    match (a.guard, b.guard) {
        (false, false) => match (a.counter.is_none(), b.counter.is_none()) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        },
        (true, false) => Some(true),
        (false, true) => Some(false),
        (true, true) if fresh(a) != fresh(b) => Some(fresh(a)),
        (true, true) => Some(left(a) > left(b)),
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

    /// What boots when no trial is pending: the highest-ranked entry that is blessed or
    /// a guarded default with boots left. When the guarded default ran out (it stopped
    /// booting), what systemd-boot boots instead: the highest-ranked entry below it
    /// with tries left, else (both slots ran out) the guarded default itself. There
    /// must be a blessed or guarded entry.
    pub fn default_entry(&self) -> Result<&Entry, StateError> {
        let top = |f: &dyn Fn(&Entry) -> bool| self.live().filter(|e| f(e)).max_by_key(|e| e.rank);
        let last_resort = top(&Entry::is_default_kind).ok_or(StateError::new(
            "no entry of the agent is blessed or a guarded default: nothing to fall back to",
        ))?;
        Ok(top(&|e| e.is_default_kind() && e.has_tries())
            .or_else(|| top(&|e| e.has_tries() && e.rank < last_resort.rank))
            .unwrap_or(last_resort))
    }

    /// The counted entry (not a guarded default) ranked above the default, if any.
    pub fn trial_entry(&self) -> Result<Option<&Entry>, StateError> {
        let default = self.default_entry()?;
        Ok(self
            .live()
            .find(|e| e.counter.is_some() && !e.guard && e.rank > default.rank))
    }

    /// A guarded default whose boots ran out, ranked above the default systemd-boot
    /// fell back to.
    pub fn fell_back_from(&self) -> Result<Option<&Entry>, StateError> {
        let default = self.default_entry()?;
        Ok(self
            .live()
            .find(|e| e.guard && !e.has_tries() && e.rank > default.rank))
    }

    /// The entry systemd-boot boots next: the highest-ranked entry with tries left (a
    /// trial while it has tries, else the default), else the highest-ranked of all.
    pub fn first(&self) -> Result<&Entry, StateError> {
        let default = self.default_entry()?;
        let top = |f: fn(&&Entry) -> bool| self.live().filter(f).max_by_key(|e| e.rank);
        Ok(top(|e| e.has_tries())
            .or_else(|| top(|_| true))
            .unwrap_or(default))
    }

    pub fn status(&self, raw: String) -> Result<BootStatus, StateError> {
        let small = |n: u32| u8::try_from(n).unwrap_or(u8::MAX);
        let default = self.default_entry()?;
        let trial = self.trial_entry()?.map(|t| {
            let left = t.tries_left().unwrap_or(0);
            (t.slot, small(left))
        });
        Ok(BootStatus {
            default: default.slot,
            trial,
            bootable: [self.entries[0].is_some(), self.entries[1].is_some()],
            default_boots_left: default
                .guard
                .then(|| default.tries_left().map(small))
                .flatten(),
            fell_back_from: self.fell_back_from()?.map(|e| e.slot),
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

    /// Refuses a change to `slot`'s entry that would leave no blessed or guarded entry:
    /// after a guard ran out, the default may be the other slot's counted entry, which
    /// must be blessed first (rollback_to).
    fn keeps_a_fallback(&self, action: &'static str, slot: Slot) -> Result<(), BootError> {
        if self.live().any(|e| e.slot != slot && e.is_default_kind()) {
            return Ok(());
        }
        Err(refused(
            action,
            slot,
            "the other slot's entry is not blessed yet: roll back to it first",
        ))
    }

    pub fn mark_unbootable(&self, slot: Slot) -> Result<Vec<Op>, BootError> {
        if slot == self.default_entry().map_err(malformed)?.slot {
            return Err(refused("mark unbootable", slot, "it is the default slot"));
        }
        self.keeps_a_fallback("mark unbootable", slot)?;
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
        self.keeps_a_fallback(ACTION, slot)?;
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
                    guard: false,
                    counter,
                },
            ),
            (None, Some(e)) => {
                // Keep the rank of a trial that already sorts first: only its counter
                // changes. A guarded name loses its mark, so it moves up (torn_pair).
                let rank = if self.is_top(e) && !e.guard {
                    e.rank
                } else {
                    next
                };
                (
                    e.file_name(),
                    Entry {
                        rank,
                        counter,
                        guard: false,
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
        let default = self.default_entry().map_err(malformed)?;
        if default.slot == slot && default.guard && default.has_tries() && self.is_top(default) {
            // Committed already, and guarded: the guard stays.
            return Ok(Vec::new());
        }
        self.make_default("commit", slot)
    }

    /// Makes `slot` the blessed default; a guard on it ends (as GRUB's does): the slot
    /// may run an agent that never sets it back.
    pub fn rollback_to(&self, slot: Slot) -> Result<Vec<Op>, BootError> {
        self.make_default("roll back to", slot)
    }

    /// One rename: the slot's entry without a counter or a guard, ranked first.
    fn make_default(&self, action: &'static str, slot: Slot) -> Result<Vec<Op>, BootError> {
        self.default_entry().map_err(malformed)?;
        let Some(e) = self.entry(slot) else {
            return Err(refused(action, slot, "it is marked unbootable"));
        };
        let rank = if self.is_top(e) && !e.guard {
            // Dropping the counter of the top entry is what systemd-bless-boot does.
            e.rank
        } else {
            self.next_rank().map_err(malformed)?
        };
        let target = Entry {
            rank,
            guard: false,
            counter: None,
            ..e.clone()
        };
        Ok(rename(e.file_name(), target.file_name()))
    }

    /// Sets the boot guard of `slot`, the running default, to `boots` (one rename, the
    /// rank kept): systemd-boot counts the guarded entry down before each boot of it
    /// and, once it reaches `+0`, sorts it last and boots the other slot's entry.
    /// `slot` may also be a guarded default at `+0`, whose last boot reached the agent
    /// (the names alone then say the other slot is the default). `0` removes the guard
    /// (the rank raised: see `same_rank_target`). Nothing to do when the guard is
    /// fresh at `boots` already.
    pub fn guard_default(&self, slot: Slot, boots: u8) -> Result<Vec<Op>, BootError> {
        const ACTION: &str = "guard the boots of";
        let default = self.default_entry().map_err(malformed)?;
        let d = match self.fell_back_from().map_err(malformed)? {
            Some(last) if last.slot == slot => last,
            _ if default.slot == slot => default,
            _ => return Err(refused(ACTION, slot, "it is not the default slot")),
        };
        if boots > MAX_TRIES {
            return Err(refused(ACTION, slot, "boots must be 0 to 9"));
        }
        let target = if boots == 0 {
            if !d.guard {
                return Ok(Vec::new());
            }
            Entry {
                rank: self.next_rank().map_err(malformed)?,
                guard: false,
                counter: None,
                ..d.clone()
            }
        } else {
            // A counted entry the loader fell back to (not yet blessed by the agent)
            // moves up: only a blessed or guarded name turns into a guard in place.
            let rank = if d.is_default_kind() {
                d.rank
            } else {
                self.next_rank().map_err(malformed)?
            };
            Entry {
                rank,
                guard: true,
                counter: Some(Counter {
                    left: u32::from(boots),
                    done: None,
                }),
                ..d.clone()
            }
        };
        Ok(rename(d.file_name(), target.file_name()))
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
