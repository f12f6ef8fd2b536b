//! Partitions from sysfs (names from the GPT when sysfs has none) and the booted slot
//! named on the kernel command line.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::config::SlotsConfig;

use super::{Partition, Slot, SlotError};

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

/// The device behind a device-mapper device: the slot partition under a dm-verity
/// root (data and tree on one partition). `None` when `major:minor` is not a
/// device-mapper device; an error when it sits on more than one device.
pub fn under_dm(sys_block: &Path, (major, minor): (u32, u32)) -> Result<Option<DmRoot>, SlotError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SlotError::Io { path, source }
    };
    let want = format!("{major}:{minor}");
    for entry in fs::read_dir(sys_block).map_err(io(sys_block))? {
        let p = entry.map_err(io(sys_block))?.path();
        let dm = p.join("dm");
        if !dm.is_dir() || fs::read_to_string(p.join("dev")).map_err(io(&p))?.trim() != want {
            continue;
        }
        let uuid = fs::read_to_string(dm.join("uuid")).unwrap_or_default();
        let slaves: Vec<_> = fs::read_dir(p.join("slaves"))
            .map_err(io(&p))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        let [slave] = slaves.as_slice() else {
            return Err(SlotError::RootOnSeveralDevices {
                dm: p,
                count: slaves.len(),
            });
        };
        let dev = fs::read_to_string(slave.join("dev")).map_err(io(slave))?;
        let parsed = dev
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        let Some(under) = parsed else {
            return Err(SlotError::Io {
                path: slave.join("dev"),
                source: io::Error::new(io::ErrorKind::InvalidData, "not MAJOR:MINOR"),
            });
        };
        return Ok(Some(DmRoot {
            under,
            uuid: uuid.trim().to_owned(),
            name: entry_name(&p),
        }));
    }
    Ok(None)
}

/// A root on a device-mapper device (see [`under_dm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmRoot {
    /// The device under it.
    pub under: (u32, u32),
    /// Its dm uuid: veritysetup's start with `CRYPT-VERITY-`.
    pub uuid: String,
    /// Its kernel name (`dm-0`), as under `/dev`.
    pub name: String,
}

fn entry_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SlotsConfig {
        SlotsConfig::default()
    }

    /// sysfs as the kernel lays it out for a dm-verity root over nvme0n1p3 (the host
    /// kernel here has no device-mapper, so the layout is written out by hand; the VM
    /// lab boots a real one).
    #[test]
    fn a_dm_verity_root_is_the_partition_under_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path();
        let mk = |rel: &str, body: &str| {
            let f = sys.join(rel);
            fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
            fs::write(f, body).expect("write");
        };
        mk("nvme0n1p3/dev", "259:3\n");
        mk("dm-0/dev", "254:0\n");
        mk(
            "dm-0/dm/uuid",
            "CRYPT-VERITY-0f1e2d3c4b5a69788796a5b4c3d2e1f0-root\n",
        );
        mk("dm-0/slaves/nvme0n1p3/dev", "259:3\n");
        let got = under_dm(sys, (254, 0)).expect("scan").expect("a dm device");
        assert_eq!(got.under, (259, 3));
        assert!(got.uuid.starts_with("CRYPT-VERITY-"), "{}", got.uuid);
        assert_eq!(got.name, "dm-0");
        assert_eq!(under_dm(sys, (259, 3)).expect("scan"), None, "a partition");
        mk("dm-0/slaves/nvme0n1p4/dev", "259:4\n");
        assert!(matches!(
            under_dm(sys, (254, 0)),
            Err(SlotError::RootOnSeveralDevices { count: 2, .. })
        ));
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
