//! Block I/O: O_DIRECT (buffers aligned for it, the alignment rule, and reads that see
//! the device's bytes rather than the page cache: the read-back of the apply engine,
//! the slots' reads), and byte ranges read by position as one stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// A buffer whose start is aligned to 4 KiB, so block devices can read into it with
/// O_DIRECT (no page cache: the read-back sees what the device holds).
#[derive(Debug)]
pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    pub fn new(len: usize) -> Self {
        let v = vec![0u8; len + Self::ALIGN];
        let off = (Self::ALIGN - v.as_ptr() as usize % Self::ALIGN) % Self::ALIGN;
        Self { v, off, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Whether a read of `buf` at `offset` meets O_DIRECT's alignment rules.
pub fn direct_ok(buf: &[u8], offset: u64) -> bool {
    let a = AlignedBuf::ALIGN;
    (buf.as_ptr() as usize).is_multiple_of(a)
        && buf.len().is_multiple_of(a)
        && offset.is_multiple_of(a as u64)
}

/// `device` opened for reading with O_DIRECT (the device's bytes, not the page
/// cache), when the device allows it.
pub fn open_direct(device: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(device)
        .ok()
}

/// Reads `buf.len()` bytes at `offset` from `direct`, a device opened with O_DIRECT:
/// an aligned read goes straight through, any other through the blocks around it.
pub fn read_direct_at(direct: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    if direct_ok(buf, offset) {
        return FileExt::read_exact_at(direct, buf, offset);
    }
    // Unaligned: read the aligned blocks around it into a bounce buffer.
    const CHUNK: u64 = 1 << 20;
    let align = AlignedBuf::ALIGN as u64;
    let (mut pos, end) = (offset, offset + buf.len() as u64);
    // No bigger than the span needs: small reads stay cheap.
    let span = (end - (offset - offset % align)).div_ceil(align) * align;
    let mut bounce = AlignedBuf::new(span.min(CHUNK) as usize);
    while pos < end {
        let start = pos - pos % align;
        let len = ((end - start).div_ceil(align) * align).min(CHUNK);
        let b = &mut bounce.bytes_mut()[..len as usize];
        FileExt::read_exact_at(direct, b, start)?;
        let from = (pos - start) as usize;
        let n = (len as usize - from).min((end - pos) as usize);
        let at = (pos - offset) as usize;
        buf[at..at + n].copy_from_slice(&b[from..from + n]);
        pos += n as u64;
    }
    Ok(())
}

/// Byte ranges `(offset, len)` of something read by position (a slot), in order, as
/// one `Read`: each read stays inside one range and asks for at most what `buf` holds.
pub struct RangesReader<F, I> {
    read_at: F,
    ranges: I,
    /// The range being read: next offset, bytes left.
    cur: (u64, u64),
}

impl<F, I> RangesReader<F, I>
where
    F: FnMut(&mut [u8], u64) -> io::Result<()>,
    I: Iterator<Item = (u64, u64)>,
{
    pub fn new(read_at: F, ranges: impl IntoIterator<IntoIter = I>) -> Self {
        Self {
            read_at,
            ranges: ranges.into_iter(),
            cur: (0, 0),
        }
    }
}

impl<F, I> Read for RangesReader<F, I>
where
    F: FnMut(&mut [u8], u64) -> io::Result<()>,
    I: Iterator<Item = (u64, u64)>,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.1 == 0 {
            match self.ranges.next() {
                Some(r) => self.cur = r,
                None => return Ok(0),
            }
        }
        let (off, left) = self.cur;
        let n = left.min(buf.len() as u64) as usize;
        (self.read_at)(&mut buf[..n], off)?;
        self.cur = (off + n as u64, left - n as u64);
        Ok(n)
    }
}

impl<F, I> std::fmt::Debug for RangesReader<F, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangesReader")
            .field("cur", &self.cur)
            .finish_non_exhaustive()
    }
}
