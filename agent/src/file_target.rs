//! A target slot that is a regular file (or a block device node opened as one), for
//! `updatectl bundle apply|verify` and for tests. The image is written under a
//! temporary name and renamed into place only on commit, so an interrupted or failed
//! apply never leaves a file at the final path that looks complete.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::apply::TargetSlot;

/// Makes `len` bytes at `offset` read as zeros. On block devices FALLOC_FL_ZERO_RANGE
/// is the kernel's BLKZEROOUT (write-zeroes or discard with zeroing guaranteed); on
/// files it makes unwritten extents. No zero bytes pass through memory unless the file
/// system supports neither form.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let (o, l) = (offset as i64, len as i64);
    if fallocate(fd, FallocateFlags::FALLOC_FL_ZERO_RANGE, o, l).is_ok() {
        return Ok(());
    }
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(fd, punch, o, l).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[derive(Debug)]
pub struct FileTarget {
    file: File,
    partial: PathBuf,
    dest: Option<PathBuf>,
    len: u64,
    committed: bool,
}

impl FileTarget {
    /// Creates `dest` (replacing it on commit) as a sparse file of `len` bytes.
    pub fn create(dest: &Path, len: u64) -> io::Result<Self> {
        let name = dest.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
        })?;
        let partial = dest.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        file.set_len(len)?;
        Ok(Self {
            file,
            partial,
            dest: Some(dest.to_owned()),
            len,
            committed: false,
        })
    }

    /// An anonymous scratch target in `dir`, removed when dropped (for `bundle verify`).
    pub fn scratch(dir: &Path, len: u64) -> io::Result<Self> {
        let file = tempfile_in(dir)?;
        file.set_len(len)?;
        Ok(Self {
            file,
            partial: PathBuf::new(),
            dest: None,
            len,
            committed: false,
        })
    }
}

fn tempfile_in(dir: &Path) -> io::Result<File> {
    // O_TMPFILE: no name, so nothing to clean up if the process dies.
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(dir)
}

impl TargetSlot for FileTarget {
    fn size(&self) -> u64 {
        self.len
    }

    fn invalidate(&mut self) -> io::Result<()> {
        // The partial name is the invalid state; nothing at the destination yet.
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&self.file, offset, len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_shared_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn data_ranges(&self, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        use nix::unistd::{lseek, Whence};
        let fd = self.file.as_raw_fd();
        let mut v = Vec::new();
        let mut off = 0i64;
        let len = len as i64;
        while off < len {
            let start = match lseek(fd, off, Whence::SeekData) {
                Ok(s) => s,
                // ENXIO: no data after `off`.
                Err(nix::errno::Errno::ENXIO) => break,
                // File systems without SEEK_DATA: read everything.
                Err(_) => return Ok(None),
            };
            if start >= len {
                break;
            }
            let end = lseek(fd, start, Whence::SeekHole)
                .map_err(io::Error::from)?
                .min(len);
            v.push((start as u64, end as u64));
            off = end;
        }
        Ok(Some(v))
    }

    fn commit(&mut self) -> io::Result<()> {
        if let Some(dest) = &self.dest {
            fs::rename(&self.partial, dest)?;
            if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for FileTarget {
    fn drop(&mut self) {
        if !self.committed && self.dest.is_some() {
            let _ = fs::remove_file(&self.partial);
        }
    }
}
