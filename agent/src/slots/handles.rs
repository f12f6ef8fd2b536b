//! Handles on a slot: the booted one read-only (`BootedSlot`), the inactive one the
//! only writer (`SlotWriter`, opened O_EXCL), a slot's file system mounted read-only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::apply::{SourceSlot, TargetSlot};
use crate::blockio::open_direct;

use super::{Slot, SlotError, SlotLayout};

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

impl SlotLayout {
    /// The booted slot, read-only. On a dm-verity root it is read through the verity
    /// device: every block the deltas take from it is then proven by the kernel
    /// against the running release's root hash (a changed block reads as an I/O
    /// error, never as wrong data), and the device ends where the image does.
    pub fn open_booted(&self) -> Result<BootedSlot, SlotError> {
        let p = self.partition(self.booted);
        let device = match &self.root_dm {
            Some(dm) if self.root_verity() => &dm.device,
            _ => &p.device,
        };
        let open_err = |source| SlotError::Open {
            slot: self.booted,
            device: device.clone(),
            source,
        };
        let mut file = File::open(device).map_err(open_err)?;
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        // The mounted file system may have changed blocks in the page cache that it
        // never writes back (ext4 touches its superblock even on a read-only mount):
        // deltas are made against the bytes on the device, so read those.
        let direct = open_direct(device);
        Ok(BootedSlot { file, direct, size })
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
        crate::blockio::read_direct_at(d, buf, offset)
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
    fn write_shared_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn read_back_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) if crate::blockio::direct_ok(buf, offset) => {
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
