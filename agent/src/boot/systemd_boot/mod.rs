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
//! | `update-agent-<rank>-<slot>-<version>@default[+<left>[-<done>]].conf` | the committed default, guarded: its counter counts boots of the default that do not reach the agent |
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
//! * the **default** is the highest-ranked entry that is blessed (no counter) or
//!   guarded (`@default`) with boots left; when the guarded one ran out, the entry the
//!   loader boots instead (the highest-ranked entry below it with tries left), else the
//!   guarded entry itself. There must be a blessed or guarded entry (it is what boots
//!   when a trial has no tries left);
//! * a guarded entry at `+0` ranked above the default is where the loader **fell back
//!   from** (or the default's last guarded boot is the one running: the agent knows
//!   which slot runs);
//! * the **trial** is the counted entry without `@default` ranked above the default,
//!   with its tries left;
//!   `+0-N` reports `(slot, 0)`: the last try is the boot running now (or it failed and
//!   the default boots), as GRUB's `ua_tries=0` does;
//! * a counted entry ranked *below* the default is no trial (systemd-boot never
//!   chooses it): that is what a rollback leaves behind;
//! * a slot is **bootable** when it has an entry (counted or not).
//!
//! Anything else under `update-agent-` (two entries for one slot other than a torn
//! rename, see below; equal ranks, a staged and a bootable entry for one slot, names
//! that do not parse) is
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
//!   Not part of [`BootControl`](super::BootControl): `arm_trial(s, n)` has no version, so the release's
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
//! * `guard_default(s, n)`: rename the default's entry (or a guarded entry at `+0` whose
//!   last boot runs now) to `…@default+n.conf`, rank kept; `n = 0` drops the mark and
//!   ranks it up. The loader then counts it down at each boot, and at `+0` sorts it last
//!   and boots the other slot. Commit and rollback to a guarded entry, and an arm of
//!   it, always rank it up and drop the mark (a commit of a guarded default that sorts
//!   first changes nothing). `mark_unbootable` and `arm_trial` of the other slot are
//!   refused while the only blessed or guarded entry is the one they would change
//!   (after a fallback the agent blesses its own slot first).
//!
//! A refused transition writes nothing, and a transition that changes nothing writes
//! nothing (but the removal of fsck residue, see [`fsck_residue`]). Every transition re-reads the directory, and checks the tree it will leave
//! (names, order against foreign entries) before it changes anything.
//!
//! # Crash safety (FAT)
//!
//! On vfat a rename within one directory is atomic, a write is not. So entry contents
//! are only ever written under a name systemd-boot ignores (`update-agent-<s>.tmp`),
//! fsynced, renamed to `.staged`, and the directory fsynced; kernels the same way in
//! their own directory. From then on every change of what boots is one rename or one
//! removal of one `.conf` file followed by an fsync of the directory, and each keeps a
//! bootable default. Every rename is also followed by an fsync of the renamed file,
//! before the directory's: Linux's vfat writes the new directory entry with size 0 and
//! no clusters and fills them in only at the file's inode writeback, so a power cut
//! before that (up to ~30 s) would leave the entry empty (see `durable::sync_renamed`):
//!
//! * `mark_unbootable` removes an entry that is not the default's;
//! * `stage` writes only files no live entry refers to (the slot has no entry);
//! * `arm_trial` renames a complete, fsynced file into place: before, the default boots;
//!   after, the trial sorts first and the default stays as the fallback;
//! * `commit` and `rollback_to` rename one entry that was already bootable: before and
//!   after, some blessed entry exists and the highest-ranked one is the default.
//!
//! A rename torn by a power cut (Linux's vfat makes the new name durable before the old
//! one is gone, both naming the same clusters; the VM lab's scenario 5 cuts the power
//! inside a commit and finds it) leaves two entries for one slot. When the names say
//! which was the rename's target (a higher rank: every rank change of ours raises it;
//! or a rename that keeps the rank: a counter dropped by a commit or
//! `systemd-bless-boot`, a guard set, see `state::same_rank_target`), the target is
//! read as the slot's entry and the other name is kept
//! as *stale*: it is listed, never renamed or removed, because removing either of two
//! cross-linked names frees the clusters of the other. So the commit counts as done
//! and the node keeps working; only `mark_unbootable` of that slot (before writing a
//! new release into it) is refused until `fsck.vfat` has been run. Any other pair is
//! Malformed. `fsck.vfat -a` (systemd-fsck runs it at boot where the ESP has a pass
//! number) truncates one of the two names to 0 bytes: that name is set aside (see
//! [`fsck_residue`]) and removed at the next write, and whichever name kept the data is
//! the slot's entry. When that is the rename's source, the rename is simply undone: a
//! trial is a trial again (the gate commits it), and a commit or rollback undone under
//! the state is done again by the gate (`postboot`). A torn arm (the staged file and
//! its entry, same version) reads as the entry, the staged name kept as stale.

mod control;
mod entry;
mod fs;
mod names;
mod order;
mod state;
#[cfg(test)]
pub(crate) mod test_util;
#[cfg(test)]
mod tests;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::BootError;
use crate::slots::Slot;

pub use entry::{entry_text, EntryConfig};
pub use fs::{install_kernel, resolve_in_root, BootFile};
pub use names::{name_version, Counter, Entry, Name, StateError};
pub use order::{check_order, is_entry_name, strverscmp_improved, Foreign};
pub use state::{apply_ops, EspState, Op};

use entry::{has_default, has_sort_key, key_values};
use fs::{ensure_dirs, list_files, read_bounded, run_ops};
use names::{staged_name, temp_name};
use state::{refused, rename, under};

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
/// Marks a guarded default's entry, before its counter: `@` is outside the version
/// alphabet, so no version can end in it, and systemd-boot's order skips it.
const GUARD_MARK: &str = "@default";
const STAGED: &str = ".staged";
const TMP: &str = ".tmp";
/// Entry files are a few hundred bytes; reading more than this is never needed.
const MAX_ENTRY_READ: u64 = 64 * 1024;

/// The directory as read: our state, foreign entries, all names.
#[derive(Debug)]
struct Tree {
    names: Vec<String>,
    state: EspState,
    foreign: Vec<Foreign>,
    /// Emptied names set aside (see [`fsck_residue`]), removed at the next write.
    residue: Vec<String>,
}

/// What [`SystemdBoot::list`] finds.
struct Listing {
    names: Vec<String>,
    foreign: Vec<Foreign>,
    residue: Vec<String>,
}

/// Our entry names that `fsck.vfat` emptied after a torn rename: of two names sharing
/// clusters it truncates the second it meets to 0 bytes (systemd-fsck runs it at boot
/// wherever the ESP has a pass number, as Debian installs it). An empty file has no
/// clusters, so removing it frees nothing, and systemd-boot skips it (no `linux`
/// line). Only an empty name beside a non-empty name that a rename of ours could have
/// torn it from (the same slot and version: an entry, or the staged file an arm
/// renames) is residue; a lone empty entry stays an error.
fn fsck_residue(dir: &Path, names: &[String]) -> Result<Vec<String>, BootError> {
    let mut ours = Vec::new();
    for name in names {
        // Names that do not parse are reported by `EspState::from_names`.
        let key = match Name::parse(name) {
            Ok(Name::Entry(e)) => (e.slot, e.version),
            Ok(Name::Staged { slot, version }) => (slot, version),
            _ => continue,
        };
        let path = dir.join(name);
        let len = std::fs::metadata(&path)
            .map_err(|source| BootError::Read { path, source })?
            .len();
        ours.push((name, key, len == 0));
    }
    Ok(ours
        .iter()
        .filter(|(_, key, empty)| *empty && ours.iter().any(|(_, k, e)| k == key && !e))
        .map(|(name, ..)| (*name).clone())
        .collect())
}

/// The systemd-boot backend over one ESP.
#[derive(Debug)]
pub struct SystemdBoot {
    esp: PathBuf,
    cfg: EntryConfig,
    /// How each slot's next staged entry finds its root (`set_root`).
    roots: [Option<crate::boot::RootVerity>; 2],
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
        Ok(Self {
            esp,
            cfg,
            roots: [None, None],
        })
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
        // Residue needs another entry of ours, which create refuses anyway.
        let Listing { names, foreign, .. } = sb.list(true)?;
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
            guard: false,
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
        let text = entry_text(
            &self.cfg,
            slot,
            version,
            initrd,
            self.roots[slot.index()].as_ref(),
        );
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

    /// Names in the entries directory but the fsck residue, the foreign entries among
    /// them, and the residue.
    fn list(&self, missing_ok: bool) -> Result<Listing, BootError> {
        let dir = self.entries_dir();
        let mut names = list_files(&dir, missing_ok)?;
        let residue = fsck_residue(&dir, &names)?;
        names.retain(|n| !residue.contains(n));
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
        Ok(Listing {
            names,
            foreign,
            residue,
        })
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
            if text.trim().is_empty() {
                return Err(bad(
                    "an entry of the agent is empty (its data never reached the disk?)",
                ));
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
        let Listing {
            names,
            foreign,
            residue,
        } = self.list(false)?;
        let state = self.check(&names, &foreign)?;
        self.check_contents(&state, skip, staged)?;
        Ok(Tree {
            names,
            state,
            foreign,
            residue,
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
        // Residue first: a rename never replaces a file, and one may have its name.
        for name in &tree.residue {
            tracing::warn!(entry = %name, "removing an empty boot entry name beside a whole one (fsck.vfat's repair of a rename a power cut tore)");
        }
        let mut ops: Vec<Op> = tree.residue.iter().cloned().map(Op::Remove).collect();
        ops.extend(plan(&tree.state).map_err(|e| under(&self.entries_dir(), e))?);
        if ops.is_empty() {
            return Ok(());
        }
        // Never leave a tree that status() would refuse.
        self.check(&apply_ops(&tree.names, &ops), &tree.foreign)?;
        run_ops(&self.entries_dir(), &ops)
    }
}
