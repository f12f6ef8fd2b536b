//! dm-verity hash trees as `veritysetup format` lays them out: format (hash type) 1,
//! sha256, 4 KiB data and hash blocks, a salt, a superblock at the hash offset and the
//! tree right after it, top level first. The publisher computes the tree of a release
//! to sign its root hash; the node builds the same tree into the slot after the image,
//! from the bytes its read-back reads anyway, so a delta never carries tree blocks.
//!
//! The parts: this file the geometry, the block hash and the superblock; `build.rs`
//! the builder that takes the data in order (resumable at any byte) and finishes the
//! upper levels.

use std::io;

use sha2::{Digest, Sha256};

mod build;
#[cfg(test)]
mod tests;

pub use build::{Area, Builder, MemArea};

/// Data and hash block size. The only size this format version uses: it is the page
/// size the kernel verifies in, and what every peer ships.
pub const BLOCK: u64 = 4096;
/// sha256 digests per hash block.
const PER_BLOCK: u64 = BLOCK / 32;
const PER_BLOCK_BITS: u32 = PER_BLOCK.trailing_zeros();
/// The superblock's size on disk (it is padded to a whole hash block).
const SUPERBLOCK_LEN: usize = 512;
// The salt field ends inside the superblock.
const _: () = assert!(88 + MAX_SALT <= SUPERBLOCK_LEN);
/// Longest salt the superblock holds.
pub const MAX_SALT: usize = 256;

/// Why a tree could not be laid out or built.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("dm-verity: {0}")]
    Geometry(&'static str),
    #[error("dm-verity: a salt of {0} bytes is longer than the superblock's {MAX_SALT}")]
    SaltTooLong(usize),
    #[error("dm-verity: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Where a tree's parts sit, in bytes of the device that holds the hash area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub data_blocks: u64,
    /// Where the superblock starts; the tree follows it.
    pub hash_offset: u64,
    /// Per level, leaves (level 0: hashes of data blocks) first: the first hash block
    /// (in units of [`BLOCK`] from the start of the device) and the number of blocks.
    levels: Vec<(u64, u64)>,
}

impl Geometry {
    /// The layout for `data_blocks` of data with the hash area at `hash_offset`. The
    /// hash area may share the device with the data but never overlap it.
    pub fn new(data_blocks: u64, hash_offset: u64) -> Result<Self, VerityError> {
        if data_blocks == 0 {
            return Err(VerityError::Geometry("an image of no blocks has no tree"));
        }
        if !hash_offset.is_multiple_of(BLOCK) {
            return Err(VerityError::Geometry(
                "the hash offset is not a multiple of 4096",
            ));
        }
        if data_blocks
            .checked_mul(BLOCK)
            .is_none_or(|end| hash_offset < end)
        {
            return Err(VerityError::Geometry(
                "the hash area starts inside the data it covers",
            ));
        }
        // The fewest levels whose top is one block (cryptsetup's rule: none at all for a
        // single data block, whose own hash is then the root).
        let mut n = 0u32;
        while n * PER_BLOCK_BITS < 64 && (data_blocks - 1) >> (n * PER_BLOCK_BITS) != 0 {
            n += 1;
        }
        let mut levels = vec![(0u64, 0u64); n as usize];
        // After the superblock's block; the top level is stored first.
        let mut pos = hash_offset / BLOCK + 1;
        for i in (0..n).rev() {
            let shift = (i + 1) * PER_BLOCK_BITS;
            let blocks = if shift >= 64 {
                1
            } else {
                (data_blocks - 1) / (1u64 << shift) + 1
            };
            levels[i as usize] = (pos, blocks);
            pos = pos
                .checked_add(blocks)
                .ok_or(VerityError::Geometry("the tree does not fit in 64 bits"))?;
        }
        pos.checked_mul(BLOCK)
            .ok_or(VerityError::Geometry("the tree does not fit in 64 bits"))?;
        Ok(Self {
            data_blocks,
            hash_offset,
            levels,
        })
    }

    /// One past the last byte of the hash area: how large the device must be.
    pub fn end(&self) -> u64 {
        let last = self
            .levels
            .first()
            .map_or(self.hash_offset / BLOCK + 1, |l| {
                // Level 0 is stored last.
                l.0 + l.1
            });
        last * BLOCK
    }

    /// Bytes of the hash area: superblock and tree.
    pub fn hash_bytes(&self) -> u64 {
        self.end() - self.hash_offset
    }

    pub fn levels(&self) -> usize {
        self.levels.len()
    }

    /// Byte offset and block count of level `i`.
    fn level(&self, i: usize) -> (u64, u64) {
        let (first, blocks) = self.levels[i];
        (first * BLOCK, blocks)
    }
}

/// The hash of one block: sha256 of the salt, then the block (hash type 1).
pub fn hash_block(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The superblock block `veritysetup format` writes at the hash offset (version 1,
/// little-endian, zero-padded to a whole hash block).
pub fn superblock(geo: &Geometry, salt: &[u8], uuid: &[u8; 16]) -> Result<Vec<u8>, VerityError> {
    if salt.len() > MAX_SALT {
        return Err(VerityError::SaltTooLong(salt.len()));
    }
    let mut b = vec![0u8; BLOCK as usize];
    b[0..8].copy_from_slice(b"verity\0\0");
    b[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    b[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: salt first
    b[16..32].copy_from_slice(uuid);
    b[32..38].copy_from_slice(b"sha256");
    b[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    b[72..80].copy_from_slice(&geo.data_blocks.to_le_bytes());
    b[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    b[88..88 + salt.len()].copy_from_slice(salt);
    Ok(b)
}

/// The root hash and tree of an image read in full: what the publisher signs.
pub fn root_of(
    image: &mut dyn io::Read,
    geo: &Geometry,
    salt: &[u8],
    uuid: &[u8; 16],
) -> Result<[u8; 32], VerityError> {
    let area = MemArea::new(geo);
    let mut b = Builder::new(geo.clone(), salt.to_vec(), &area);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = geo.data_blocks * BLOCK;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        image
            .read_exact(&mut buf[..n])
            .map_err(|source| VerityError::Io {
                what: "reading the image",
                source,
            })?;
        b.feed(&buf[..n])?;
        left -= n as u64;
    }
    b.finish(uuid)
}

/// What a superblock on disk says about its tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDisk {
    pub geometry: Geometry,
    pub salt: Vec<u8>,
    pub uuid: [u8; 16],
}

/// Reads the superblock at `hash_offset` of a device (format 1, sha256, 4 KiB blocks:
/// anything else is refused).
pub fn read_superblock(
    read_at: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    hash_offset: u64,
) -> Result<OnDisk, VerityError> {
    let mut b = [0u8; SUPERBLOCK_LEN];
    read_at(&mut b, hash_offset).map_err(|source| VerityError::Io {
        what: "reading the superblock",
        source,
    })?;
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let ok = &b[0..8] == b"verity\0\0"
        && u32_at(8) == 1
        && u32_at(12) == 1
        && &b[32..39] == b"sha256\0"
        && u64::from(u32_at(64)) == BLOCK
        && u64::from(u32_at(68)) == BLOCK;
    if !ok {
        return Err(VerityError::Geometry(
            "no format 1 sha256 4 KiB superblock at the hash offset",
        ));
    }
    let mut blocks = [0u8; 8];
    blocks.copy_from_slice(&b[72..80]);
    let salt_len = usize::from(u16::from_le_bytes([b[80], b[81]]));
    if salt_len > MAX_SALT {
        return Err(VerityError::SaltTooLong(salt_len));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    Ok(OnDisk {
        geometry: Geometry::new(u64::from_le_bytes(blocks), hash_offset)?,
        salt: b[88..88 + salt_len].to_vec(),
        uuid,
    })
}

/// The root hash of the data on a device, as its superblock at `hash_offset`
/// describes it: the whole tree computed again from the data (not read from the
/// device), so it says whether the data still is what the root hash signed.
pub fn root_of_device(
    read_at: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    hash_offset: u64,
) -> Result<[u8; 32], VerityError> {
    let d = read_superblock(read_at, hash_offset)?;
    let mut reader = ReadAt { read_at, off: 0 };
    root_of(&mut reader, &d.geometry, &d.salt, &d.uuid)
}

/// A positioned reader read in order (`root_of` asks for whole buffers).
struct ReadAt<'a> {
    read_at: &'a dyn Fn(&mut [u8], u64) -> io::Result<()>,
    off: u64,
}

impl io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (self.read_at)(buf, self.off)?;
        self.off += buf.len() as u64;
        Ok(buf.len())
    }
}

/// A salt and superblock uuid derived from the image's sha256: a salt unique to the
/// image (what a salt is for) that rebuilding the same image reproduces.
pub fn derive_salt_uuid(image_sha256: &[u8; 32]) -> (Vec<u8>, [u8; 16]) {
    let salt: [u8; 32] = Sha256::new()
        .chain_update(b"update-agent dm-verity salt\0")
        .chain_update(image_sha256)
        .finalize()
        .into();
    let u: [u8; 32] = Sha256::new()
        .chain_update(b"update-agent dm-verity uuid\0")
        .chain_update(image_sha256)
        .finalize()
        .into();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&u[..16]);
    // RFC 4122 version 4 / variant bits, so tools show it as an ordinary uuid.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    (salt.to_vec(), uuid)
}

/// A uuid in its usual text form.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
