//! The payload generator: slot images in, signed payload files out.
//!
//! A delta is built in four passes over the target, block by block:
//! 1. zero blocks become ZERO;
//! 2. blocks found byte-for-byte anywhere in the source become COPY (the same offset
//!    and the continuation of the previous run are tried before the hash index, so
//!    runs stay long);
//! 3. the remaining *changed* blocks are cut, in target order, into chunks;
//! 4. each chunk gets a reference: the source blocks that share content-defined
//!    anchors with it (a rolling hash picks ~1 in 64 positions, so an old version of
//!    a file is found wherever the file system put it) and the source blocks at the
//!    same offsets (metadata rewritten in place). The chunk is compressed with that
//!    reference as a zstd prefix (PATCH), or alone when nothing matched (DATA).
//!
//! A full payload is ZERO and DATA only. Given the images most nodes run (`known`),
//! DATA operations are cut so that blocks a node already has form operations of
//! their own, whose hints say where in that image they sit; a node checks a hint by
//! hash and skips the download. Frames are compressed on all cores.

//!
//! ```text
//! image.rs   the images, mapped read-only
//! plan.rs    blocks classified; ZERO and COPY runs
//! anchor.rs  the anchor index: which source blocks a changed block resembles
//! write.rs   frames compressed, the manifest signed, the payload written
//! ```

use std::io;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::limits;
use super::manifest::{Extent, OpKind, SourceImage};
use super::sign::PublisherKey;

mod anchor;
mod image;
mod plan;
mod write;

use anchor::AnchorIndex;
use image::check_image;
pub use image::Image;
use plan::{
    classify, is_zero, plan_runs, push_grouped, push_paired, runs_of, Class, Planned,
    MIN_REUSE_BLOCKS, ZERO_OP_MAX_BLOCKS,
};
use write::finish;

/// Errors a publisher can act on; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot read image {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is empty")]
    EmptyImage { path: PathBuf },
    #[error("image {path} is {size} bytes, not a multiple of the {block_size}-byte block size")]
    NotBlockMultiple {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("image {path} is {size} bytes, more than the format's limit of {max}")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error(
        "target {target} ({target_size} bytes) is smaller than source {source_path} ({source_size} bytes); \
         were --target and --source swapped? (pass --allow-shrink if the slot image really shrinks)"
    )]
    TargetShrinks {
        target: PathBuf,
        target_size: u64,
        source_path: PathBuf,
        source_size: u64,
    },
    #[error("writing payload {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("zstd failed on chunk {chunk}: {message}")]
    Compress { chunk: usize, message: &'static str },
    #[error("invalid release metadata")]
    Metadata(#[source] super::error::ManifestError),
    #[error("computing the target's dm-verity tree")]
    Verity(#[source] crate::verity::VerityError),
}

/// Release metadata and tuning knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub compatible: String,
    pub version: String,
    pub min_source_version: Option<String>,
    pub created: u64,
    pub expires: u64,
    /// The dm-verity tree nodes build after the target ([`verity_of`]).
    pub verity: Option<crate::payload::manifest::Verity>,
    pub block_size: u32,
    /// zstd level for frames.
    pub level: i32,
    /// Target output bytes of one PATCH/DATA operation in a delta.
    pub delta_chunk: u64,
    /// Target output bytes of one DATA operation of new content (full payloads, and
    /// the blocks of a delta that resemble nothing in the source).
    pub data_chunk: u64,
    /// Most reference bytes one PATCH operation may name.
    pub max_reference: u64,
    pub allow_shrink: bool,
}

impl Options {
    pub fn new(compatible: &str, version: &str, created: u64, expires: u64) -> Self {
        Self {
            compatible: compatible.to_owned(),
            version: version.to_owned(),
            min_source_version: None,
            created,
            expires,
            verity: None,
            block_size: 4096,
            level: 19,
            delta_chunk: 2 << 20,
            data_chunk: 16 << 20,
            max_reference: 8 << 20,
            allow_shrink: false,
        }
    }
}

/// What one generated payload holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub path: PathBuf,
    pub payload_bytes: u64,
    pub manifest_bytes: u64,
    pub operations: usize,
    pub delta: bool,
}

/// Builds a delta from `source` to `target` and writes it to `out`.
pub fn create_delta(
    target: &Image,
    source: &Image,
    opts: &Options,
    key: &PublisherKey,
    out: &Path,
) -> Result<Summary, GenerateError> {
    check_image(target, opts.block_size)?;
    check_image(source, opts.block_size)?;
    if target.len() < source.len() && !opts.allow_shrink {
        return Err(GenerateError::TargetShrinks {
            target: target.path.clone(),
            target_size: target.len(),
            source_path: source.path.clone(),
            source_size: source.len(),
        });
    }
    let bs = opts.block_size as usize;
    let classes = classify(target, source, bs);
    let mut planned = Vec::new();
    plan_runs(&classes, bs, &mut planned);
    let changed: Vec<u64> = (0..classes.len() as u64)
        .filter(|&t| classes[t as usize] == Class::Changed)
        .collect();
    if !changed.is_empty() {
        let anchors = AnchorIndex::build(source, bs);
        // Changed blocks that share anchors with the source are patched in small
        // chunks, each with its own reference; the rest is new content, which
        // compresses best in large frames of its own.
        // (One shared anchor is enough: on the Debian pair 1, 2 and 4 hits gave 6.83,
        // 6.88 and 6.86 MB, and no split at all 9.42 MB.)
        let similar: Vec<bool> = changed
            .par_iter()
            .map(|&t| anchors.hits(target.block(bs, t)) > 0)
            .collect();
        let mut patch_blocks = Vec::new();
        let mut novel_blocks = Vec::new();
        for (&t, s) in changed.iter().zip(similar) {
            if s {
                patch_blocks.push(t);
            } else {
                novel_blocks.push(t);
            }
        }
        let chunk_blocks =
            (opts.delta_chunk.min(limits::MAX_FRAME_OUTPUT) / bs as u64).max(1) as usize;
        let novel_chunk =
            (opts.data_chunk.min(limits::MAX_FRAME_OUTPUT) / bs as u64).max(1) as usize;
        let max_ref = (opts.max_reference.min(limits::MAX_REFERENCE) / bs as u64) as usize;
        let chunks: Vec<&[u64]> = patch_blocks.chunks(chunk_blocks).collect();
        let patched: Vec<Planned> = chunks
            .par_iter()
            .map(|blocks| {
                let reference = anchors.reference_for(target, source, bs, blocks, max_ref);
                Planned {
                    kind: if reference.is_empty() {
                        OpKind::Data
                    } else {
                        OpKind::Patch
                    },
                    dst: runs_of(blocks.iter().copied()),
                    src: reference,
                }
            })
            .collect();
        planned.extend(patched);
        planned.extend(novel_blocks.chunks(novel_chunk).map(|blocks| Planned {
            kind: OpKind::Data,
            dst: runs_of(blocks.iter().copied()),
            src: Vec::new(),
        }));
    }
    let source_info = SourceImage {
        size: source.len(),
        sha256: source.sha256(),
    };
    finish(
        target,
        Some(source),
        Some(source_info),
        planned,
        opts,
        key,
        out,
    )
}

/// The dm-verity parameters of `target` with its tree at `hash_offset` (default: right
/// after the image): the salt and uuid derived from the image, the root computed here.
pub fn verity_of(
    target: &Image,
    hash_offset: Option<u64>,
) -> Result<crate::payload::manifest::Verity, GenerateError> {
    let (salt, uuid) = crate::verity::derive_salt_uuid(&target.sha256());
    let mut v = crate::payload::manifest::Verity {
        hash_offset: hash_offset.unwrap_or(target.len()),
        salt,
        uuid,
        root_hash: [0; 32],
    };
    let geo = v.geometry(target.len()).map_err(GenerateError::Metadata)?;
    v.root_hash = crate::verity::root_of(&mut target.bytes(), &geo, &v.salt, &v.uuid)
        .map_err(GenerateError::Verity)?;
    Ok(v)
}

/// Builds a full payload. `known` are images many nodes run (the first one is used for
/// reuse hints); without them hints point at the same offsets.
pub fn create_full(
    target: &Image,
    known: Option<&Image>,
    opts: &Options,
    key: &PublisherKey,
    out: &Path,
) -> Result<Summary, GenerateError> {
    check_image(target, opts.block_size)?;
    let bs = opts.block_size as usize;
    let chunk_blocks = (opts.data_chunk.min(limits::MAX_FRAME_OUTPUT) / bs as u64).max(1);
    let mut planned = Vec::new();
    match known {
        Some(known) => {
            let split = split_against(&classify(target, known, bs));
            push_grouped(
                &mut planned,
                OpKind::Zero,
                runs_of(split.zero.into_iter()),
                ZERO_OP_MAX_BLOCKS,
            );
            // Reuse operations (DATA with hints): long runs split, short ones grouped,
            // up to one chunk each.
            push_paired(&mut planned, OpKind::Data, split.reuse, chunk_blocks);
            for blocks in split.fresh.chunks(chunk_blocks as usize) {
                planned.push(Planned {
                    kind: OpKind::Data,
                    dst: runs_of(blocks.iter().copied()),
                    src: Vec::new(),
                });
            }
        }
        None => plan_in_place(target, bs, chunk_blocks, &mut planned),
    }
    finish(target, None, None, planned, opts, key, out)
}

/// A target's blocks as a full payload sees them against a known image.
struct Split {
    zero: Vec<u64>,
    /// Blocks the known image does not have (or has in runs too short to matter).
    fresh: Vec<u64>,
    /// Reusable runs (target, known image): contiguous in both, long enough to matter.
    reuse: Vec<(Extent, Extent)>,
}

fn split_against(classes: &[Class]) -> Split {
    let mut split = Split {
        zero: Vec::new(),
        fresh: Vec::new(),
        reuse: Vec::new(),
    };
    let mut i = 0usize;
    while i < classes.len() {
        match classes[i] {
            Class::Zero => {
                split.zero.push(i as u64);
                i += 1;
            }
            Class::Changed => {
                split.fresh.push(i as u64);
                i += 1;
            }
            Class::Copy(s0) => {
                let mut n = 1usize;
                while i + n < classes.len() && classes[i + n] == Class::Copy(s0 + n as u64) {
                    n += 1;
                }
                if (n as u64) < MIN_REUSE_BLOCKS {
                    split.fresh.extend(i as u64..(i + n) as u64);
                } else {
                    split
                        .reuse
                        .push((Extent::new(i as u64, n as u64), Extent::new(s0, n as u64)));
                }
                i += n;
            }
        }
    }
    split
}

/// With no known image: zero runs become ZERO, the rest DATA in chunks whose hints
/// point at the same offsets (a node that already runs this release skips them).
fn plan_in_place(target: &Image, bs: usize, chunk_blocks: u64, planned: &mut Vec<Planned>) {
    let n = target.blocks(bs);
    let zero: Vec<bool> = (0..n)
        .into_par_iter()
        .map(|t| is_zero(target.block(bs, t)))
        .collect();
    let mut t = 0u64;
    while t < n {
        let z = zero[t as usize];
        let mut len = 1u64;
        while t + len < n && zero[(t + len) as usize] == z && (z || len < chunk_blocks) {
            len += 1;
        }
        let e = Extent::new(t, len);
        if z {
            push_grouped(planned, OpKind::Zero, vec![e], ZERO_OP_MAX_BLOCKS);
        } else {
            planned.push(Planned {
                kind: OpKind::Data,
                dst: vec![e],
                src: vec![e],
            });
        }
        t += len;
    }
}
