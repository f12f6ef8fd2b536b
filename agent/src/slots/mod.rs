//! Slots: the two root partitions, which one is booted, and the only way to write one.
//!
//! The parts: `scan.rs` partitions from sysfs and the GPT, the booted slot on the
//! kernel command line; `handles.rs` the handles on a slot (`BootedSlot` read-only,
//! `SlotWriter` the only writer, `ReadOnlyMount`).

use std::fmt;

mod handles;
mod scan;

pub use handles::{BootedSlot, ReadOnlyMount, SlotWriter};
pub use scan::{scan_partitions, slot_from_cmdline};

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

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    #[error(
        "the root file system is on device-mapper device {dm}, which sits on {count} \
         devices; set [slots] root_device to the slot partition"
    )]
    RootOnSeveralDevices { dm: PathBuf, count: usize },
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

/// The device-mapper device the root is mounted from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RootDm {
    /// `/dev/dm-N`.
    pub device: PathBuf,
    /// Its dm uuid (`CRYPT-VERITY-...` for veritysetup's).
    pub uuid: String,
}

/// The two slots of this node and which one runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotLayout {
    pub a: Partition,
    pub b: Partition,
    pub esp: Option<Partition>,
    pub booted: Slot,
    /// The device-mapper device `/` is mounted from, when it is one (the booted
    /// slot's partition is under it).
    pub root_dm: Option<RootDm>,
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
        let (root, devnum) = root_devnum(cfg)?;
        // A dm-verity root: the slot is the partition under the mapped device.
        let dm = scan::under_dm(sys_block, devnum)?;
        let (major, minor) = dm.as_ref().map_or(devnum, |d| d.under);
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
            root_dm: dm.map(|d| RootDm {
                device: dev.join(&d.name),
                uuid: d.uuid,
            }),
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

    /// Whether `/` is mounted through dm-verity (a veritysetup device over the slot).
    pub fn root_verity(&self) -> bool {
        self.root_dm
            .as_ref()
            .is_some_and(|d| d.uuid.starts_with("CRYPT-VERITY-"))
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
