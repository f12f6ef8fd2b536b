//! Helpers shared by the tests in `tests/`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::entry::key_values;
use super::fs::list_files;
use super::names::{Counter, Entry, Name, StateError};
use super::order::{is_entry_name, name_tries_left, strverscmp_improved};
use super::state::EspState;
use super::{BootError, BootFile, EntryConfig, SystemdBoot, CONF, ENTRIES_DIR};
use crate::boot::BootControl;
use crate::slots::Slot;

pub(super) const A: Slot = Slot::A;
pub(super) const B: Slot = Slot::B;

pub(super) fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

pub(super) fn state(list: &[&str]) -> Result<EspState, StateError> {
    EspState::from_names(list.iter().copied())
}

pub(super) fn st(list: &[&str]) -> EspState {
    state(list).expect("a valid set of names")
}

pub(super) type Summary = (Slot, Option<(Slot, u8)>, [bool; 2]);

pub(super) fn summary(s: &EspState) -> Summary {
    let b = s.status(String::new()).expect("a state with a default");
    (b.default, b.trial, b.bootable)
}

pub(super) type Counted = Option<(u32, Option<u32>)>;

fn entry_name(rank: u32, slot: Slot, version: &str, guard: bool, counter: Counted) -> String {
    Entry {
        rank,
        slot,
        version: version.into(),
        guard,
        counter: counter.map(|(left, done)| Counter { left, done }),
    }
    .file_name()
}

pub(super) fn entry(rank: u32, slot: Slot, version: &str, counter: Counted) -> String {
    entry_name(rank, slot, version, false, counter)
}

/// A guarded default's entry name (`…@default[+LEFT[-DONE]].conf`).
pub(super) fn guarded(rank: u32, slot: Slot, version: &str, counter: Counted) -> String {
    entry_name(rank, slot, version, true, counter)
}

/// systemd-boot's rename of a counted entry before it boots it (boot.c:
/// `+LEFT-DONE` becomes `+(LEFT-1)-(DONE+1)`, never below 0).
pub(super) fn loader_try(name: &str) -> String {
    let stem = name.strip_suffix(CONF).expect(".conf name");
    let (prefix, c) = Counter::split(stem).expect("a counted name");
    format!(
        "{prefix}+{}-{}{CONF}",
        c.left.saturating_sub(1),
        c.done.unwrap_or(0) + 1
    )
}

/// `systemd-bless-boot good`: the name without `+LEFT[-DONE]`.
pub(super) fn bless_boot(name: &str) -> String {
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
pub(super) fn boot_order(names: &[String]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().filter(|n| is_entry_name(n)).cloned().collect();
    v.sort_by(|a, b| sd_compare(a, b));
    v
}

// ---------------------------------------------------------------------------------
// Real directory trees.

pub(super) fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

/// Every file and directory under `root`, with contents, for byte-identical checks.
pub(crate) fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
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

pub(super) fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A fake release: kernel and initrd files with distinct contents.
pub(super) struct Release {
    _dir: tempfile::TempDir,
    pub(super) kernel: PathBuf,
    pub(super) initrd: PathBuf,
    pub(super) kernel_bytes: Vec<u8>,
    pub(super) initrd_bytes: Vec<u8>,
}

impl Release {
    pub(super) fn new(tag: &str) -> Self {
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

    pub(super) fn kernel(&self) -> BootFile<'_> {
        BootFile {
            path: &self.kernel,
            sha256: sha(&self.kernel_bytes),
        }
    }

    pub(super) fn initrd(&self) -> BootFile<'_> {
        BootFile {
            path: &self.initrd,
            sha256: sha(&self.initrd_bytes),
        }
    }
}

pub(super) fn cfg() -> EntryConfig {
    EntryConfig {
        options: "ro console=ttyS0".into(),
        ..EntryConfig::default()
    }
}

pub(super) fn created(esp: &Path, rel: &Release) -> SystemdBoot {
    SystemdBoot::create(esp, cfg(), A, "1.0", &rel.kernel(), Some(&rel.initrd()))
        .expect("creating the ESP")
}

pub(super) fn entries(esp: &Path) -> Vec<String> {
    list_files(&esp.join(ENTRIES_DIR), false).expect("listing entries")
}

pub(super) fn status(sb: &SystemdBoot) -> Summary {
    let st = sb.status().expect("status");
    (st.default, st.trial, st.bootable)
}

/// One boot as systemd-boot does it: the first entry in its order; a counted one is
/// renamed one try down first. Returns the slot it boots.
pub(crate) fn boot(esp: &Path) -> Slot {
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

pub(super) fn refused_with(res: Result<(), BootError>, want: &str) {
    match res {
        Err(e @ BootError::Refused { .. }) => {
            assert!(e.to_string().contains(want), "{e} does not say {want:?}")
        }
        other => panic!("expected a refusal ({want}), got {other:?}"),
    }
}
