//! The manifest: what a payload promises to produce, and the operations that produce it.
//!
//! Types here are plain data. `codec` turns them into the canonical bytes that are
//! signed; [`Manifest::validate`] checks the semantic rules (extents in range, no
//! overlap, exact coverage, sizes that add up) that the byte decoder cannot.

use std::fmt;

use super::error::{Loc, ManifestError};
use super::limits;

// Kept in `limits.rs`, below `error.rs`, which names it in a message.
pub use super::limits::FORMAT_VERSION;

/// A run of whole blocks: `start .. start + blocks`, in units of the manifest's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub start: u64,
    pub blocks: u64,
}

impl Extent {
    pub fn new(start: u64, blocks: u64) -> Self {
        Self { start, blocks }
    }

    /// One past the last block, or `None` on overflow (only a hostile manifest overflows).
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.blocks)
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocks {}+{}", self.start, self.blocks)
    }
}

/// Total number of blocks in a list of extents (saturating: validation rejects overflow).
pub fn total_blocks(extents: &[Extent]) -> u64 {
    extents
        .iter()
        .fold(0u64, |acc, e| acc.saturating_add(e.blocks))
}

/// What an operation does. The discriminants are the on-wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// Fill `dst` with zero bytes. No source, no data.
    Zero = 1,
    /// Copy `src` extents of the source slot, concatenated, into `dst`.
    Copy = 2,
    /// Decompress one zstd frame from the blob into `dst`. `src`, if present, are
    /// *hints*: extents of the node's booted slot that may already hold the output.
    Data = 3,
    /// Decompress one zstd frame whose reference prefix is the concatenated `src`
    /// extents of the source slot.
    Patch = 4,
}

impl OpKind {
    pub fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Zero),
            2 => Some(Self::Copy),
            3 => Some(Self::Data),
            4 => Some(Self::Patch),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "ZERO",
            Self::Copy => "COPY",
            Self::Data => "DATA",
            Self::Patch => "PATCH",
        }
    }

    /// Whether the operation's bytes come from the blob.
    pub fn has_data(self) -> bool {
        matches!(self, Self::Data | Self::Patch)
    }
}

/// One step of building the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub kind: OpKind,
    /// Where the output goes in the target, in output order.
    pub dst: Vec<Extent>,
    /// Source-slot extents: copied (COPY), used as zstd reference (PATCH), or reuse hints (DATA).
    pub src: Vec<Extent>,
    /// Byte range of this operation's zstd frame inside the blob (DATA, PATCH).
    pub data_offset: u64,
    pub data_len: u64,
    /// sha256 of the bytes this operation produces (the dst extents' content, in order).
    pub sha256: [u8; 32],
}

impl Operation {
    pub fn dst_blocks(&self) -> u64 {
        total_blocks(&self.dst)
    }
    pub fn src_blocks(&self) -> u64 {
        total_blocks(&self.src)
    }
}

/// The slot image a delta was computed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceImage {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// The dm-verity tree a node builds into the slot after the image and must find this
/// root hash at the top of: hash type 1, sha256, 4 KiB data and hash blocks, the data
/// being the whole target, the superblock at `hash_offset` and the tree after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verity {
    /// Byte offset of the superblock in the slot: at or past the end of the target.
    pub hash_offset: u64,
    pub salt: Vec<u8>,
    /// The superblock's uuid.
    pub uuid: [u8; 16],
    pub root_hash: [u8; 32],
}

impl Verity {
    /// Where the tree of a `target_size`-byte image sits.
    pub fn geometry(&self, target_size: u64) -> Result<crate::verity::Geometry, ManifestError> {
        if !target_size.is_multiple_of(crate::verity::BLOCK) {
            return Err(ManifestError::BadVerity(
                "the target size is not a multiple of 4096, the dm-verity block size",
            ));
        }
        crate::verity::Geometry::new(target_size / crate::verity::BLOCK, self.hash_offset).map_err(
            |e| match e {
                crate::verity::VerityError::Geometry(why) => ManifestError::BadVerity(why),
                _ => ManifestError::BadVerity("the tree cannot be laid out"),
            },
        )
    }
}

/// Everything the publisher signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Product/board line; a node refuses payloads for another line.
    pub compatible: String,
    /// Release version of the target image.
    pub version: String,
    /// Oldest version a node may update from with this payload, if limited.
    pub min_source_version: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Seconds since the Unix epoch after which nodes refuse the payload.
    pub expires: u64,
    pub block_size: u32,
    pub target_size: u64,
    pub target_sha256: [u8; 32],
    /// The dm-verity tree the node builds after the target (format version 2).
    pub verity: Option<Verity>,
    /// Present for a delta; absent for a full payload.
    pub source: Option<SourceImage>,
    pub blob_size: u64,
    pub blob_sha256: [u8; 32],
    pub operations: Vec<Operation>,
}

impl Manifest {
    pub fn is_delta(&self) -> bool {
        self.source.is_some()
    }

    pub fn target_blocks(&self) -> u64 {
        self.target_size / u64::from(self.block_size)
    }

    /// Size in bytes of `blocks` blocks.
    pub fn bytes(&self, blocks: u64) -> u64 {
        blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Semantic checks that must pass before a single byte is written anywhere.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_images()?;
        self.validate_dates()?;
        let target_blocks = self.target_blocks();
        let source_blocks = self
            .source
            .as_ref()
            .map(|s| s.size / u64::from(self.block_size));
        let mut all_dst: Vec<(u64, u64, usize)> = Vec::new();
        for (i, op) in self.operations.iter().enumerate() {
            self.validate_op(i, op, target_blocks, source_blocks)?;
            all_dst.extend(op.dst.iter().map(|e| (e.start, e.blocks, i)));
        }
        check_coverage(all_dst, target_blocks)
    }

    /// The block size, and the sizes of the target, its dm-verity tree and the source.
    fn validate_images(&self) -> Result<(), ManifestError> {
        let m = Loc::Manifest;
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(limits::MIN_BLOCK_SIZE..=limits::MAX_BLOCK_SIZE).contains(&bs)
        {
            return Err(ManifestError::BadBlockSize(bs));
        }
        if self.target_size == 0 || self.target_size > limits::MAX_IMAGE_SIZE {
            return Err(ManifestError::OutOfBounds {
                loc: m,
                field: "target_size",
                value: self.target_size,
                max: limits::MAX_IMAGE_SIZE,
            });
        }
        if !self.target_size.is_multiple_of(u64::from(bs)) {
            return Err(ManifestError::NotBlockMultiple {
                field: "target_size",
                value: self.target_size,
                block_size: bs,
            });
        }
        if let Some(v) = &self.verity {
            if v.salt.len() as u64 > limits::MAX_VERITY_SALT {
                return Err(ManifestError::OutOfBounds {
                    loc: m,
                    field: "verity_salt",
                    value: v.salt.len() as u64,
                    max: limits::MAX_VERITY_SALT,
                });
            }
            let end = v.geometry(self.target_size)?.end();
            if end > limits::MAX_IMAGE_SIZE.saturating_mul(2) {
                return Err(ManifestError::BadVerity("the tree ends past any slot"));
            }
        }
        if let Some(src) = &self.source {
            if src.size == 0 || src.size > limits::MAX_IMAGE_SIZE {
                return Err(ManifestError::OutOfBounds {
                    loc: m,
                    field: "source_size",
                    value: src.size,
                    max: limits::MAX_IMAGE_SIZE,
                });
            }
            if !src.size.is_multiple_of(u64::from(bs)) {
                return Err(ManifestError::NotBlockMultiple {
                    field: "source_size",
                    value: src.size,
                    block_size: bs,
                });
            }
        }
        Ok(())
    }

    fn validate_dates(&self) -> Result<(), ManifestError> {
        // Year 9999: keeps every date printable and comparisons far from overflow.
        if self.expires > limits::MAX_TIMESTAMP {
            return Err(ManifestError::OutOfBounds {
                loc: Loc::Manifest,
                field: "expires",
                value: self.expires,
                max: limits::MAX_TIMESTAMP,
            });
        }
        if self.expires <= self.created {
            return Err(ManifestError::ExpiresBeforeCreated {
                created: self.created,
                expires: self.expires,
            });
        }
        Ok(())
    }

    fn validate_op(
        &self,
        i: usize,
        op: &Operation,
        target_blocks: u64,
        source_blocks: Option<u64>,
    ) -> Result<(), ManifestError> {
        let loc = Loc::Op(i);
        if op.dst.is_empty() {
            return Err(ManifestError::Missing { loc, field: "dst" });
        }
        check_extents(loc, "dst", &op.dst, target_blocks)?;
        self.validate_op_data(i, op)?;
        self.validate_op_src(i, op, source_blocks)
    }

    /// An operation's frame: none for ZERO and COPY; for DATA and PATCH, one inside
    /// the blob, no larger than zstd's bound for an output the format allows.
    fn validate_op_data(&self, i: usize, op: &Operation) -> Result<(), ManifestError> {
        let loc = Loc::Op(i);
        if matches!(op.kind, OpKind::Zero | OpKind::Copy) {
            if op.data_len != 0 || op.data_offset != 0 {
                return Err(ManifestError::NotAllowed {
                    loc,
                    kind: op.kind.name(),
                    field: "data",
                });
            }
            return Ok(());
        }
        let out_bytes = self.bytes(op.dst_blocks());
        if out_bytes > limits::MAX_FRAME_OUTPUT {
            return Err(ManifestError::OutOfBounds {
                loc,
                field: "dst",
                value: out_bytes,
                max: limits::MAX_FRAME_OUTPUT,
            });
        }
        if op.data_len == 0 {
            return Err(ManifestError::Missing { loc, field: "data" });
        }
        let max_len = zstd::zstd_safe::compress_bound(out_bytes as usize) as u64;
        if op.data_len > max_len {
            return Err(ManifestError::OutOfBounds {
                loc,
                field: "data_len",
                value: op.data_len,
                max: max_len,
            });
        }
        let end = op.data_offset.checked_add(op.data_len);
        if end.is_none_or(|e| e > self.blob_size) {
            return Err(ManifestError::DataOutOfBlob {
                op: i,
                offset: op.data_offset,
                len: op.data_len,
                blob_size: self.blob_size,
            });
        }
        Ok(())
    }

    /// An operation's source extents: none for ZERO; inside the source for COPY and
    /// PATCH (a COPY as long as its output, a PATCH's reference bounded); for DATA,
    /// optional hints of the output's length.
    fn validate_op_src(
        &self,
        i: usize,
        op: &Operation,
        source_blocks: Option<u64>,
    ) -> Result<(), ManifestError> {
        let loc = Loc::Op(i);
        match op.kind {
            OpKind::Zero => {
                if !op.src.is_empty() {
                    return Err(ManifestError::NotAllowed {
                        loc,
                        kind: "ZERO",
                        field: "src",
                    });
                }
            }
            OpKind::Copy | OpKind::Patch => {
                let Some(source_blocks) = source_blocks else {
                    return Err(ManifestError::NeedsSource {
                        op: i,
                        kind: op.kind.name(),
                    });
                };
                if op.src.is_empty() {
                    return Err(ManifestError::Missing { loc, field: "src" });
                }
                check_extents(loc, "src", &op.src, source_blocks)?;
                let src_bytes = self.bytes(op.src_blocks());
                if op.kind == OpKind::Copy && op.src_blocks() != op.dst_blocks() {
                    return Err(ManifestError::SizeMismatch {
                        op: i,
                        src_blocks: op.src_blocks(),
                        dst_blocks: op.dst_blocks(),
                    });
                }
                if op.kind == OpKind::Patch && src_bytes > limits::MAX_REFERENCE {
                    return Err(ManifestError::OutOfBounds {
                        loc,
                        field: "src",
                        value: src_bytes,
                        max: limits::MAX_REFERENCE,
                    });
                }
            }
            OpKind::Data => {
                // Hints name places in whatever slot the node booted; they are checked by
                // hash before use, so only their shape is validated here.
                if !op.src.is_empty() {
                    check_extents(
                        loc,
                        "src",
                        &op.src,
                        limits::MAX_IMAGE_SIZE / u64::from(self.block_size),
                    )?;
                    if op.src_blocks() != op.dst_blocks() {
                        return Err(ManifestError::SizeMismatch {
                            op: i,
                            src_blocks: op.src_blocks(),
                            dst_blocks: op.dst_blocks(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Every target block written by exactly one operation: `all_dst` (start, blocks,
/// operation) sorted by start, each extent must begin where the last ended.
fn check_coverage(
    mut all_dst: Vec<(u64, u64, usize)>,
    target_blocks: u64,
) -> Result<(), ManifestError> {
    all_dst.sort_unstable();
    let mut next = 0u64;
    let mut prev_op = 0usize;
    for &(start, blocks, op) in &all_dst {
        if start < next {
            return Err(ManifestError::Overlap {
                op,
                other: prev_op,
                block: start,
            });
        }
        if start > next {
            return Err(ManifestError::Gap {
                start: next,
                blocks: start - next,
            });
        }
        next = start + blocks;
        prev_op = op;
    }
    if next != target_blocks {
        return Err(ManifestError::Gap {
            start: next,
            blocks: target_blocks.saturating_sub(next),
        });
    }
    Ok(())
}

fn check_extents(
    loc: Loc,
    field: &'static str,
    extents: &[Extent],
    limit_blocks: u64,
) -> Result<(), ManifestError> {
    for (j, e) in extents.iter().enumerate() {
        if e.blocks == 0 {
            return Err(ManifestError::EmptyExtent {
                loc,
                field,
                index: j,
            });
        }
        if e.end().is_none_or(|end| end > limit_blocks) {
            return Err(ManifestError::ExtentOutOfRange {
                loc,
                field,
                index: j,
                start: e.start,
                blocks: e.blocks,
                limit: limit_blocks,
            });
        }
    }
    Ok(())
}
