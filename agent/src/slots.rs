//! Slots: the two root partitions, which one is booted, and the only way to write one.

use std::fmt;

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    pub fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }

    /// The lowercase letter used in boot variables and partition labels.
    pub fn letter(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    pub fn from_letter(s: &str) -> Option<Self> {
        match s {
            "a" | "A" => Some(Self::A),
            "b" | "B" => Some(Self::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::apply::{SourceSlot, TargetSlot};
use crate::config::SlotsConfig;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel command line ({path}) names no slot: expected root=PARTLABEL={a}|{b} or updateagent.slot=a|b")]
    NoSlotOnCmdline { path: PathBuf, a: String, b: String },
    #[error("kernel command line ({path}) names slot {cmdline} but also {other}")]
    CmdlineConflict {
        path: PathBuf,
        cmdline: Slot,
        other: Slot,
    },
    #[error(
        "the root file system is on {root} ({major}:{minor}), which is not a partition of any disk"
    )]
    RootNotPartition {
        root: PathBuf,
        major: u32,
        minor: u32,
    },
    #[error("no partition labelled {label:?} on disk {disk}")]
    LabelMissing { label: String, disk: String },
    #[error("partition label {label:?} appears more than once on disk {disk}")]
    DuplicateLabel { label: String, disk: String },
    #[error("the kernel command line says slot {cmdline} booted, but / is on {root}, which is slot {mounted}'s partition {device}")]
    Disagree {
        cmdline: Slot,
        mounted: Slot,
        root: PathBuf,
        device: PathBuf,
    },
    #[error("the kernel command line says slot {cmdline} booted, but / is on {root}, which is neither slot")]
    RootNotASlot { cmdline: Slot, root: PathBuf },
    #[error("slot {slot} ({device}) is in use (mounted or open elsewhere); refusing to write it")]
    Busy {
        slot: Slot,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening slot {slot} ({device})")]
    Open {
        slot: Slot,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A partition as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Partition {
    pub label: String,
    /// Partition number on its disk (1-based).
    pub number: u32,
    pub device: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// Name of the whole disk (`vda`, `loop3`).
    pub disk: String,
    pub size: u64,
}

/// Reads every partition from sysfs (`/sys/class/block/*/uevent`): no udev needed,
/// so it works in early boot, containers and on freshly attached loop devices.
pub fn scan_partitions(sys_block: &Path, dev: &Path) -> Result<Vec<Partition>, SlotError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SlotError::Io { path, source }
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(sys_block).map_err(io(sys_block))? {
        let entry = entry.map_err(io(sys_block))?;
        let p = entry.path();
        if !p.join("partition").exists() {
            continue;
        }
        let uevent = fs::read_to_string(p.join("uevent")).map_err(io(&p))?;
        let field = |k: &str| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .map(str::to_owned)
        };
        let (Some(devname), Some(major), Some(minor)) =
            (field("DEVNAME"), field("MAJOR"), field("MINOR"))
        else {
            continue;
        };
        let partn: Option<u32> = field("PARTN").and_then(|n| n.parse().ok());
        let sectors: u64 = fs::read_to_string(p.join("size"))
            .map_err(io(&p))?
            .trim()
            .parse()
            .unwrap_or(0);
        // The parent directory of the partition's sysfs node is its disk.
        let disk = fs::canonicalize(&p)
            .ok()
            .and_then(|c| {
                c.parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        out.push(Partition {
            label: field("PARTNAME").unwrap_or_default(),
            number: partn.unwrap_or(0),
            device: dev.join(&devname),
            major: major.parse().unwrap_or(0),
            minor: minor.parse().unwrap_or(0),
            disk,
            size: sectors * 512,
        });
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    // Partitions added with BLKPG (partx, some loop setups) carry no PARTNAME in
    // sysfs; read the names from the disk's GPT instead.
    let unnamed: Vec<String> = out
        .iter()
        .filter(|p| p.label.is_empty())
        .map(|p| p.disk.clone())
        .collect();
    for disk in unnamed.iter().collect::<std::collections::BTreeSet<_>>() {
        if let Ok(names) = gpt_names(&dev.join(disk)) {
            for p in out
                .iter_mut()
                .filter(|p| &p.disk == disk && p.label.is_empty())
            {
                if let Some(n) = names.get(&p.number) {
                    p.label.clone_from(n);
                }
            }
        }
    }
    Ok(out)
}

/// Partition names from a disk's primary GPT, by partition number.
fn gpt_names(disk: &Path) -> io::Result<std::collections::BTreeMap<u32, String>> {
    let f = File::open(disk)?;
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", disk.display()),
        )
    };
    // The header sits in LBA 1; try both logical sector sizes in use.
    for sector in [512u64, 4096] {
        let mut h = [0u8; 92];
        FileExt::read_exact_at(&f, &mut h, sector)?;
        if &h[..8] != b"EFI PART" {
            continue;
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&h[72..80]);
        let entries_lba = u64::from_le_bytes(lba);
        let (count, size) = (u32_at(80), u32_at(84));
        if !(128..=4096).contains(&size) || count > 1024 {
            return Err(bad("implausible GPT entry table"));
        }
        let mut table = vec![0u8; (count * size) as usize];
        FileExt::read_exact_at(&f, &mut table, entries_lba * sector)?;
        let mut names = std::collections::BTreeMap::new();
        for (i, e) in table.chunks_exact(size as usize).enumerate() {
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            names.insert(i as u32 + 1, String::from_utf16_lossy(&units));
        }
        return Ok(names);
    }
    Err(bad("no GPT header"))
}

/// Which slot the kernel command line says booted, if it says.
pub fn slot_from_cmdline(
    cmdline: &str,
    cfg: &SlotsConfig,
    path: &Path,
) -> Result<Option<Slot>, SlotError> {
    let mut found: Option<Slot> = None;
    for word in cmdline.split_whitespace() {
        let slot = if let Some(v) = word.strip_prefix("updateagent.slot=") {
            Slot::from_letter(v)
        } else if let Some(label) = word.strip_prefix("root=PARTLABEL=") {
            if label == cfg.label_a {
                Some(Slot::A)
            } else if label == cfg.label_b {
                Some(Slot::B)
            } else {
                None
            }
        } else {
            None
        };
        match (found, slot) {
            (Some(f), Some(s)) if f != s => {
                return Err(SlotError::CmdlineConflict {
                    path: path.to_owned(),
                    cmdline: f,
                    other: s,
                })
            }
            (None, Some(s)) => found = Some(s),
            _ => {}
        }
    }
    Ok(found)
}

/// The two slots of this node and which one runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotLayout {
    pub a: Partition,
    pub b: Partition,
    pub esp: Option<Partition>,
    pub booted: Slot,
}

impl SlotLayout {
    /// Finds the slots by label and the booted slot from the kernel command line,
    /// cross-checked against the device behind `/`. Disagreement is an error, never
    /// a guess.
    pub fn discover(cfg: &SlotsConfig) -> Result<Self, SlotError> {
        Self::discover_in(cfg, Path::new("/sys/class/block"), Path::new("/dev"))
    }

    pub fn discover_in(cfg: &SlotsConfig, sys_block: &Path, dev: &Path) -> Result<Self, SlotError> {
        let cmdline = fs::read_to_string(&cfg.cmdline).map_err(|source| SlotError::Io {
            path: cfg.cmdline.clone(),
            source,
        })?;
        let said = slot_from_cmdline(&cmdline, cfg, &cfg.cmdline)?.ok_or_else(|| {
            SlotError::NoSlotOnCmdline {
                path: cfg.cmdline.clone(),
                a: cfg.label_a.clone(),
                b: cfg.label_b.clone(),
            }
        })?;
        let (root, (major, minor)) = root_devnum(cfg)?;
        let parts = scan_partitions(sys_block, dev)?;
        let root_part = parts
            .iter()
            .find(|p| (p.major, p.minor) == (major, minor))
            .ok_or_else(|| SlotError::RootNotPartition {
                root: root.clone(),
                major,
                minor,
            })?;
        let disk = match &cfg.disk {
            Some(d) => d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            None => root_part.disk.clone(),
        };
        let on_disk: Vec<&Partition> = parts.iter().filter(|p| p.disk == disk).collect();
        let find = |label: &str| -> Result<Option<Partition>, SlotError> {
            let mut m = on_disk.iter().filter(|p| p.label == label);
            let first = m.next().map(|p| (*p).clone());
            if m.next().is_some() {
                return Err(SlotError::DuplicateLabel {
                    label: label.to_owned(),
                    disk: disk.clone(),
                });
            }
            Ok(first)
        };
        let need = |label: &str| {
            find(label)?.ok_or_else(|| SlotError::LabelMissing {
                label: label.to_owned(),
                disk: disk.clone(),
            })
        };
        let a = need(&cfg.label_a)?;
        let b = need(&cfg.label_b)?;
        let esp = find(&cfg.label_esp)?;
        let mounted = if (a.major, a.minor) == (major, minor) {
            Slot::A
        } else if (b.major, b.minor) == (major, minor) {
            Slot::B
        } else {
            return Err(SlotError::RootNotASlot {
                cmdline: said,
                root,
            });
        };
        if mounted != said {
            let device = if mounted == Slot::A {
                a.device
            } else {
                b.device
            };
            return Err(SlotError::Disagree {
                cmdline: said,
                mounted,
                root,
                device,
            });
        }
        Ok(Self {
            a,
            b,
            esp,
            booted: said,
        })
    }

    pub fn partition(&self, slot: Slot) -> &Partition {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    pub fn inactive(&self) -> Slot {
        self.booted.other()
    }

    /// The booted slot, read-only.
    pub fn open_booted(&self) -> Result<BootedSlot, SlotError> {
        let p = self.partition(self.booted);
        let file = File::open(&p.device).map_err(|source| SlotError::Open {
            slot: self.booted,
            device: p.device.clone(),
            source,
        })?;
        // The mounted file system may have changed blocks in the page cache that it
        // never writes back (ext4 touches its superblock even on a read-only mount):
        // deltas are made against the bytes on the device, so read those.
        let direct = open_direct(&p.device);
        Ok(BootedSlot {
            file,
            direct,
            size: p.size,
        })
    }

    /// The inactive slot, opened for writing with O_EXCL: the kernel refuses if the
    /// device is mounted or held open exclusively by anyone else. This is the only
    /// constructor of [`SlotWriter`], and it only ever opens the slot that is not
    /// booted, so the booted slot cannot be written through this crate.
    pub fn open_inactive(&self) -> Result<SlotWriter, SlotError> {
        let slot = self.inactive();
        let p = self.partition(slot);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(&p.device)
            .map_err(|source| {
                if source.raw_os_error() == Some(nix::libc::EBUSY) {
                    SlotError::Busy {
                        slot,
                        device: p.device.clone(),
                        source,
                    }
                } else {
                    SlotError::Open {
                        slot,
                        device: p.device.clone(),
                        source,
                    }
                }
            })?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| SlotError::Open {
                slot,
                device: p.device.clone(),
                source,
            })?;
        // Read-back goes around the page cache where the device allows it, so the
        // verification sees the device's bytes, not our own writes still in memory.
        let direct = open_direct(&p.device);
        Ok(SlotWriter {
            slot,
            device: p.device.clone(),
            file,
            direct,
            size,
        })
    }
}

/// The `/` device: configured, or the device number behind `/`.
fn root_devnum(cfg: &SlotsConfig) -> Result<(PathBuf, (u32, u32)), SlotError> {
    let (path, dev) = match &cfg.root_device {
        Some(p) => {
            let m = fs::metadata(p).map_err(|source| SlotError::Io {
                path: p.clone(),
                source,
            })?;
            (p.clone(), m.rdev())
        }
        None => {
            let m = fs::metadata("/").map_err(|source| SlotError::Io {
                path: "/".into(),
                source,
            })?;
            (PathBuf::from("/"), m.dev())
        }
    };
    Ok((
        path,
        (
            nix::sys::stat::major(dev) as u32,
            nix::sys::stat::minor(dev) as u32,
        ),
    ))
}

/// A slot's file system mounted read-only for as long as the value lives: a handle
/// with a fallible `close()` and a best-effort unmount on drop.
#[derive(Debug)]
pub struct ReadOnlyMount {
    path: PathBuf,
    mounted: bool,
}

impl ReadOnlyMount {
    /// File systems a slot image may carry, tried in order.
    const TYPES: [&'static str; 3] = ["ext4", "erofs", "squashfs"];

    pub fn new(device: &Path, at: &Path) -> Result<Self, SlotError> {
        use nix::mount::{mount, MsFlags};
        let io = |source: io::Error| SlotError::Io {
            path: at.to_owned(),
            source,
        };
        fs::create_dir_all(at).map_err(io)?;
        let flags =
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let mut last = nix::errno::Errno::EINVAL;
        for fstype in Self::TYPES {
            // ext4 "noload": never replay a journal, so a read-only mount writes nothing.
            let data = (fstype == "ext4").then_some("noload");
            match mount(Some(device), at, Some(fstype), flags, data) {
                Ok(()) => {
                    return Ok(Self {
                        path: at.to_owned(),
                        mounted: true,
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(SlotError::Io {
            path: device.to_owned(),
            source: io::Error::other(format!(
                "cannot mount it read-only as {}: {last}",
                Self::TYPES.join(", ")
            )),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn close(mut self) -> Result<(), SlotError> {
        self.mounted = false;
        nix::mount::umount(&self.path).map_err(|e| SlotError::Io {
            path: self.path.clone(),
            source: e.into(),
        })
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// `device` opened for reading with O_DIRECT (the device's bytes, not the page
/// cache), when the device allows it.
fn open_direct(device: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(device)
        .ok()
}

/// The running system's slot: readable, never writable.
#[derive(Debug)]
pub struct BootedSlot {
    file: File,
    /// The same device with O_DIRECT (device bytes, not the page cache), when supported.
    direct: Option<File>,
    size: u64,
}

impl SourceSlot for BootedSlot {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(d) = &self.direct else {
            return FileExt::read_exact_at(&self.file, buf, offset);
        };
        if crate::apply::direct_ok(buf, offset) {
            return FileExt::read_exact_at(d, buf, offset);
        }
        // Unaligned: read the aligned blocks around it into a bounce buffer.
        const CHUNK: u64 = 1 << 20;
        let align = crate::apply::AlignedBuf::ALIGN as u64;
        let (mut pos, end) = (offset, offset + buf.len() as u64);
        // No bigger than the span needs: small reads stay cheap.
        let span = (end - (offset - offset % align)).div_ceil(align) * align;
        let mut bounce = crate::apply::AlignedBuf::new(span.min(CHUNK) as usize);
        while pos < end {
            let start = pos - pos % align;
            let len = ((end - start).div_ceil(align) * align).min(CHUNK);
            let b = &mut bounce.bytes_mut()[..len as usize];
            FileExt::read_exact_at(d, b, start)?;
            let from = (pos - start) as usize;
            let n = (len as usize - from).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&b[from..from + n]);
            pos += n as u64;
        }
        Ok(())
    }
}

/// The inactive slot, opened exclusively for writing. Only [`SlotLayout::open_inactive`]
/// makes one. Marking it unbootable and arming it are the bootloader's business; the
/// agent does both around the apply.
#[derive(Debug)]
pub struct SlotWriter {
    slot: Slot,
    device: PathBuf,
    file: File,
    /// The same device opened with O_DIRECT for reading back, when supported.
    direct: Option<File>,
    size: u64,
}

impl SlotWriter {
    pub fn slot(&self) -> Slot {
        self.slot
    }
    pub fn device(&self) -> &Path {
        &self.device
    }
    /// Another handle on the same device, for fsync while the writer is lent out.
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

impl TargetSlot for SlotWriter {
    fn size(&self) -> u64 {
        self.size
    }
    fn invalidate(&mut self) -> io::Result<()> {
        // The agent marks the slot unbootable in the bootloader before apply starts.
        Ok(())
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, offset)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        crate::file_target::zero_range(&self.file, offset, len)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn read_back_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) if crate::apply::direct_ok(buf, offset) => {
                FileExt::read_exact_at(d, buf, offset)
            }
            _ => FileExt::read_exact_at(&self.file, buf, offset),
        }
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn commit(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

impl AsRawFd for SlotWriter {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SlotsConfig {
        SlotsConfig::default()
    }

    #[test]
    fn cmdline_forms() {
        let p = Path::new("/proc/cmdline");
        let c = cfg();
        assert_eq!(
            slot_from_cmdline("ro root=PARTLABEL=root-b quiet", &c, p)
                .ok()
                .flatten(),
            Some(Slot::B)
        );
        assert_eq!(
            slot_from_cmdline("updateagent.slot=a root=/dev/vda2", &c, p)
                .ok()
                .flatten(),
            Some(Slot::A)
        );
        assert_eq!(
            slot_from_cmdline("root=PARTLABEL=root-a updateagent.slot=a", &c, p)
                .ok()
                .flatten(),
            Some(Slot::A)
        );
        assert_eq!(
            slot_from_cmdline("root=/dev/vda2", &c, p).ok().flatten(),
            None
        );
        assert!(matches!(
            slot_from_cmdline("root=PARTLABEL=root-a updateagent.slot=b", &c, p),
            Err(SlotError::CmdlineConflict { .. })
        ));
    }
}
