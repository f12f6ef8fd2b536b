//! Building a tree from data handed over in order: level 0 as the data passes (written
//! out whole hash blocks at a time, so a restart can continue from any byte), the upper
//! levels and the superblock at the end, read back from what level 0 wrote.

use std::io;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::{hash_block, superblock, Geometry, VerityError, BLOCK, PER_BLOCK};

/// Where the hash area is written: the slot on a node, memory at the publisher. Takes
/// `&self` so the data can be read on another thread while the tree is written.
pub trait Area: Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
}

/// A hash area held in memory (the publisher only needs the root).
#[derive(Debug)]
pub struct MemArea {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl MemArea {
    pub fn new(geo: &Geometry) -> Self {
        Self {
            base: geo.hash_offset,
            bytes: Mutex::new(vec![0u8; geo.hash_bytes() as usize]),
        }
    }

    /// The hash area's bytes: superblock, then the tree.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn span(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = offset
            .checked_sub(self.base)
            .ok_or_else(|| io::Error::other("below the hash area"))? as usize;
        Ok(start..start + len)
    }
}

impl Area for MemArea {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.span(offset, buf.len())?;
        let b = self
            .bytes
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        buf.copy_from_slice(
            b.get(r)
                .ok_or_else(|| io::Error::other("past the hash area"))?,
        );
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.span(offset, buf.len())?;
        let mut b = self
            .bytes
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        b.get_mut(r)
            .ok_or_else(|| io::Error::other("past the hash area"))?
            .copy_from_slice(buf);
        Ok(())
    }
}

/// Level-0 digests waiting to be written once this many bytes of them pile up (they
/// are also written at every [`Builder::flush`]).
const WRITE_AT: usize = 256 << 10;

/// Builds a tree from the data, in order. Level 0 is written out as it fills; the
/// digests of a hash block not yet full are written too at [`Builder::flush`] (and
/// again, completed, later), so what is on the area always covers [`Builder::position`].
pub struct Builder<'a> {
    geo: Geometry,
    salt: Vec<u8>,
    area: &'a dyn Area,
    /// The salted hasher before any data: cloned per block.
    salted: Sha256,
    zero_digest: [u8; 32],
    /// Data blocks hashed so far.
    blocks: u64,
    /// The bytes of a data block not yet complete.
    carry: Vec<u8>,
    /// Digests of blocks `pending_from ..` (a multiple of [`PER_BLOCK`]), not yet
    /// written as a whole hash block.
    pending: Vec<u8>,
    pending_from: u64,
}

impl std::fmt::Debug for Builder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("geo", &self.geo)
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

impl<'a> Builder<'a> {
    pub fn new(geo: Geometry, salt: Vec<u8>, area: &'a dyn Area) -> Self {
        let salted = Sha256::new_with_prefix(&salt);
        let zero_digest = hash_block(&salt, &[0u8; BLOCK as usize]);
        Self {
            geo,
            salt,
            area,
            salted,
            zero_digest,
            blocks: 0,
            carry: Vec::with_capacity(BLOCK as usize),
            pending: Vec::new(),
            pending_from: 0,
        }
    }

    /// A builder continuing at byte `at` of the data: the level-0 digests before it are
    /// taken from the area (a flush wrote them), the bytes of the block `at` falls in
    /// are read from the data through `read_data`.
    pub fn resume(
        geo: Geometry,
        salt: Vec<u8>,
        area: &'a dyn Area,
        at: u64,
        read_data: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    ) -> Result<Self, VerityError> {
        if at > geo.data_blocks * BLOCK {
            return Err(VerityError::Geometry("resumed past the end of the data"));
        }
        let mut b = Self::new(geo, salt, area);
        b.blocks = at / BLOCK;
        b.pending_from = b.blocks - b.blocks % PER_BLOCK;
        let have = (b.blocks - b.pending_from) as usize * 32;
        if have > 0 && b.geo.levels() > 0 {
            let mut blk = vec![0u8; BLOCK as usize];
            let (off, _) = b.geo.level(0);
            area.read_at(&mut blk, off + b.pending_from / PER_BLOCK * BLOCK)
                .map_err(|source| VerityError::Io {
                    what: "reading back level 0 of the tree to resume it",
                    source,
                })?;
            b.pending.extend_from_slice(&blk[..have]);
        }
        if b.geo.levels() == 0 && b.blocks > 0 {
            return Err(VerityError::Geometry(
                "a one-block image's tree is not resumable past its block",
            ));
        }
        let part = (at % BLOCK) as usize;
        if part > 0 {
            b.carry.resize(part, 0);
            read_data(&mut b.carry, b.blocks * BLOCK).map_err(|source| VerityError::Io {
                what: "reading the data block a resumed tree continues in",
                source,
            })?;
        }
        Ok(b)
    }

    /// Bytes of data taken so far.
    pub fn position(&self) -> u64 {
        self.blocks * BLOCK + self.carry.len() as u64
    }

    /// Takes the next bytes of the data.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), VerityError> {
        if !self.carry.is_empty() {
            let k = (BLOCK as usize - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..k]);
            data = &data[k..];
            if self.carry.len() == BLOCK as usize {
                let d: [u8; 32] = self
                    .salted
                    .clone()
                    .chain_update(&self.carry)
                    .finalize()
                    .into();
                self.carry.clear();
                self.push(&d)?;
            }
        }
        let mut chunks = data.chunks_exact(BLOCK as usize);
        for blk in &mut chunks {
            let d: [u8; 32] = self.salted.clone().chain_update(blk).finalize().into();
            self.push(&d)?;
        }
        self.carry.extend_from_slice(chunks.remainder());
        Ok(())
    }

    /// Takes `n` zero bytes of data without hashing each block.
    pub fn feed_zeros(&mut self, mut n: u64) -> Result<(), VerityError> {
        if !self.carry.is_empty() {
            let k = (BLOCK - self.carry.len() as u64).min(n);
            self.feed(&vec![0u8; k as usize])?;
            n -= k;
        }
        for _ in 0..n / BLOCK {
            let d = self.zero_digest;
            self.push(&d)?;
        }
        self.feed(&vec![0u8; (n % BLOCK) as usize])
    }

    fn push(&mut self, d: &[u8; 32]) -> Result<(), VerityError> {
        if self.blocks >= self.geo.data_blocks {
            return Err(VerityError::Geometry("more data than the tree covers"));
        }
        self.blocks += 1;
        self.pending.extend_from_slice(d);
        if self.pending.len() >= WRITE_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes level 0 as far as the data taken, so a restart can resume at
    /// [`Builder::position`] once the area is durable.
    pub fn flush(&mut self) -> Result<(), VerityError> {
        if self.pending.is_empty() || self.geo.levels() == 0 {
            return Ok(());
        }
        let (off, _) = self.geo.level(0);
        let len = self.pending.len();
        let whole = len / BLOCK as usize * BLOCK as usize;
        // Padded in place to whole hash blocks for the write, then cut back.
        self.pending
            .resize(len.div_ceil(BLOCK as usize) * BLOCK as usize, 0);
        let written = self
            .area
            .write_at(&self.pending, off + self.pending_from / PER_BLOCK * BLOCK);
        self.pending.truncate(len);
        written.map_err(|source| VerityError::Io {
            what: "writing level 0 of the tree",
            source,
        })?;
        // A hash block still filling stays pending: it is written again when complete.
        self.pending.drain(..whole);
        self.pending_from += (whole / 32) as u64;
        Ok(())
    }

    /// Writes the rest of the tree and the superblock, and returns the root hash. Every
    /// data block must have been taken.
    pub fn finish(mut self, uuid: &[u8; 16]) -> Result<[u8; 32], VerityError> {
        if self.blocks != self.geo.data_blocks || !self.carry.is_empty() {
            return Err(VerityError::Geometry(
                "the tree was finished before all of its data was taken",
            ));
        }
        let sb = superblock(&self.geo, &self.salt, uuid)?;
        let root = if self.geo.levels() == 0 {
            // One data block: its own digest is the root.
            let mut r = [0u8; 32];
            r.copy_from_slice(&self.pending[..32]);
            r
        } else {
            self.flush()?;
            for i in 1..self.geo.levels() {
                self.level_from_below(i)?;
            }
            let (top, _) = self.geo.level(self.geo.levels() - 1);
            let mut blk = vec![0u8; BLOCK as usize];
            self.read(&mut blk, top)?;
            hash_block(&self.salt, &blk)
        };
        self.area
            .write_at(&sb, self.geo.hash_offset)
            .map_err(|source| VerityError::Io {
                what: "writing the superblock",
                source,
            })?;
        Ok(root)
    }

    /// Level `i` from level `i - 1`, a chunk of blocks at a time.
    fn level_from_below(&self, i: usize) -> Result<(), VerityError> {
        let (below, below_blocks) = self.geo.level(i - 1);
        let (at, blocks) = self.geo.level(i);
        let mut out = Vec::with_capacity(blocks as usize * BLOCK as usize);
        let mut buf = vec![0u8; 256 * BLOCK as usize];
        let mut done = 0u64;
        while done < below_blocks {
            let n = (below_blocks - done).min(256);
            let chunk = &mut buf[..(n * BLOCK) as usize];
            self.read(chunk, below + done * BLOCK)?;
            for blk in chunk.chunks_exact(BLOCK as usize) {
                out.extend_from_slice(&self.salted.clone().chain_update(blk).finalize());
            }
            done += n;
        }
        out.resize(blocks as usize * BLOCK as usize, 0);
        self.area
            .write_at(&out, at)
            .map_err(|source| VerityError::Io {
                what: "writing an upper level of the tree",
                source,
            })
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), VerityError> {
        self.area
            .read_at(buf, offset)
            .map_err(|source| VerityError::Io {
                what: "reading the tree back to build the level above",
                source,
            })
    }
}
