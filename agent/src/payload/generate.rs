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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHasher};
use sha2::{Digest, Sha256};

use super::container::write_payload;
use super::limits;
use super::manifest::{Extent, Manifest, OpKind, Operation, SourceImage};
use super::sign::PublisherKey;

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
}

/// A slot image, mapped read-only. Generation runs on publisher machines, where
/// mapping both images is the cheapest way to compare blocks at random.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    map: Mmap,
    sha256: std::sync::OnceLock<[u8; 32]>,
}

impl Image {
    pub fn open(path: &Path) -> Result<Self, GenerateError> {
        let err = |source| GenerateError::ReadImage {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if meta.len() == 0 {
            return Err(GenerateError::EmptyImage {
                path: path.to_owned(),
            });
        }
        if meta.len() > limits::MAX_IMAGE_SIZE {
            return Err(GenerateError::TooLarge {
                path: path.to_owned(),
                size: meta.len(),
                max: limits::MAX_IMAGE_SIZE,
            });
        }
        let map = map_readonly(&file).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            sha256: std::sync::OnceLock::new(),
        })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn block(&self, bs: usize, i: u64) -> &[u8] {
        let start = i as usize * bs;
        &self.map[start..start + bs]
    }

    fn blocks(&self, bs: usize) -> u64 {
        (self.map.len() / bs) as u64
    }

    /// sha256 of the whole image (computed once).
    pub fn sha256(&self) -> [u8; 32] {
        *self
            .sha256
            .get_or_init(|| Sha256::digest(&self.map[..]).into())
    }
}

#[allow(unsafe_code)]
fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: the mapping is read-only and private to this process; concurrent
    // modification of the file by someone else can only change the bytes we read,
    // never memory safety of the slice beyond what the OS guarantees for file maps.
    unsafe { Mmap::map(file) }
}

/// Release metadata and tuning knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub compatible: String,
    pub version: String,
    pub min_source_version: Option<String>,
    pub created: u64,
    pub expires: u64,
    pub verity_root_hash: Option<Vec<u8>>,
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
            verity_root_hash: None,
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

/// How one target block will be produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    /// Present in the source at this block.
    Copy(u64),
    Changed,
}

/// An operation before its frame is compressed.
#[derive(Debug)]
struct Planned {
    kind: OpKind,
    dst: Vec<Extent>,
    src: Vec<Extent>,
}

const ZERO_OP_MAX_BLOCKS: u64 = 1 << 18;
const COPY_OP_MAX_BYTES: u64 = 32 << 20;
const MAX_EXTENTS_PER_PLANNED: usize = 4096;
/// Known runs shorter than this are not worth an operation of their own in a full payload.
const MIN_REUSE_BLOCKS: u64 = 1;

fn check_image(img: &Image, bs: u32) -> Result<(), GenerateError> {
    if !img.len().is_multiple_of(u64::from(bs)) {
        return Err(GenerateError::NotBlockMultiple {
            path: img.path.clone(),
            size: img.len(),
            block_size: bs,
        });
    }
    Ok(())
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
            let classes = classify(target, known, bs);
            let mut fresh: Vec<u64> = Vec::new();
            let mut zero: Vec<u64> = Vec::new();
            // Reusable runs: contiguous in both images and long enough to matter.
            let mut i = 0usize;
            let mut reuse: Vec<(Extent, Extent)> = Vec::new();
            while i < classes.len() {
                match classes[i] {
                    Class::Zero => {
                        zero.push(i as u64);
                        i += 1;
                    }
                    Class::Changed => {
                        fresh.push(i as u64);
                        i += 1;
                    }
                    Class::Copy(s0) => {
                        let mut n = 1usize;
                        while i + n < classes.len() && classes[i + n] == Class::Copy(s0 + n as u64)
                        {
                            n += 1;
                        }
                        if (n as u64) < MIN_REUSE_BLOCKS {
                            fresh.extend(i as u64..(i + n) as u64);
                        } else {
                            reuse
                                .push((Extent::new(i as u64, n as u64), Extent::new(s0, n as u64)));
                        }
                        i += n;
                    }
                }
            }
            push_grouped(
                &mut planned,
                OpKind::Zero,
                runs_of(zero.into_iter()),
                ZERO_OP_MAX_BLOCKS,
            );
            // Reuse operations: split long runs, group short ones, up to one chunk each.
            let mut cur = Planned {
                kind: OpKind::Data,
                dst: Vec::new(),
                src: Vec::new(),
            };
            let mut cur_blocks = 0u64;
            for (mut d, mut s) in reuse {
                while d.blocks > 0 {
                    let take = d.blocks.min(chunk_blocks - cur_blocks);
                    cur.dst.push(Extent::new(d.start, take));
                    cur.src.push(Extent::new(s.start, take));
                    cur_blocks += take;
                    d = Extent::new(d.start + take, d.blocks - take);
                    s = Extent::new(s.start + take, s.blocks - take);
                    if cur_blocks == chunk_blocks || cur.dst.len() >= MAX_EXTENTS_PER_PLANNED {
                        planned.push(std::mem::replace(
                            &mut cur,
                            Planned {
                                kind: OpKind::Data,
                                dst: Vec::new(),
                                src: Vec::new(),
                            },
                        ));
                        cur_blocks = 0;
                    }
                }
            }
            if !cur.dst.is_empty() {
                planned.push(cur);
            }
            for blocks in fresh.chunks(chunk_blocks as usize) {
                planned.push(Planned {
                    kind: OpKind::Data,
                    dst: runs_of(blocks.iter().copied()),
                    src: Vec::new(),
                });
            }
        }
        None => {
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
                    push_grouped(&mut planned, OpKind::Zero, vec![e], ZERO_OP_MAX_BLOCKS);
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
    }
    finish(target, None, None, planned, opts, key, out)
}

/// ZERO and COPY operations for the blocks that need no data.
fn plan_runs(classes: &[Class], bs: usize, planned: &mut Vec<Planned>) {
    let zero = runs_of((0..classes.len() as u64).filter(|&t| classes[t as usize] == Class::Zero));
    push_grouped(planned, OpKind::Zero, zero, ZERO_OP_MAX_BLOCKS);
    let mut copy: Vec<(Extent, Extent)> = Vec::new();
    for (t, c) in classes.iter().enumerate() {
        if let Class::Copy(s) = *c {
            let t = t as u64;
            match copy.last_mut() {
                Some((d, sx)) if d.start + d.blocks == t && sx.start + sx.blocks == s => {
                    d.blocks += 1;
                    sx.blocks += 1;
                }
                _ => copy.push((Extent::new(t, 1), Extent::new(s, 1))),
            }
        }
    }
    let mut cur = Planned {
        kind: OpKind::Copy,
        dst: Vec::new(),
        src: Vec::new(),
    };
    let mut cur_bytes_blocks = 0u64;
    let max_blocks = COPY_OP_MAX_BYTES / bs as u64;
    for (d, s) in copy {
        cur.dst.push(d);
        cur.src.push(s);
        cur_bytes_blocks += d.blocks;
        if cur_bytes_blocks >= max_blocks || cur.dst.len() >= MAX_EXTENTS_PER_PLANNED {
            planned.push(std::mem::replace(
                &mut cur,
                Planned {
                    kind: OpKind::Copy,
                    dst: Vec::new(),
                    src: Vec::new(),
                },
            ));
            cur_bytes_blocks = 0;
        }
    }
    if !cur.dst.is_empty() {
        planned.push(cur);
    }
}

/// Groups extents into operations of `kind` holding at most `max_blocks` each.
fn push_grouped(planned: &mut Vec<Planned>, kind: OpKind, extents: Vec<Extent>, max_blocks: u64) {
    let mut cur: Vec<Extent> = Vec::new();
    let mut blocks = 0u64;
    let split = extents.into_iter().flat_map(|e| {
        (0..e.blocks.div_ceil(max_blocks)).map(move |k| {
            let start = e.start + k * max_blocks;
            Extent::new(start, max_blocks.min(e.start + e.blocks - start))
        })
    });
    for e in split {
        if !cur.is_empty()
            && (blocks + e.blocks > max_blocks || cur.len() >= MAX_EXTENTS_PER_PLANNED)
        {
            planned.push(Planned {
                kind,
                dst: std::mem::take(&mut cur),
                src: Vec::new(),
            });
            blocks = 0;
        }
        blocks += e.blocks;
        cur.push(e);
    }
    if !cur.is_empty() {
        planned.push(Planned {
            kind,
            dst: cur,
            src: Vec::new(),
        });
    }
}

/// Coalesces ascending block numbers into extents.
fn runs_of(blocks: impl Iterator<Item = u64>) -> Vec<Extent> {
    let mut v: Vec<Extent> = Vec::new();
    for b in blocks {
        match v.last_mut() {
            Some(e) if e.start + e.blocks == b => e.blocks += 1,
            _ => v.push(Extent::new(b, 1)),
        }
    }
    v
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    // Word-wise: the generator calls this for every block of every image.
    let (words, rest) = b.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && rest.iter().all(|&x| x == 0)
}

fn block_hash(b: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = FxHasher::default();
    h.write(b);
    h.finish()
}

/// Classifies every target block against `source`.
fn classify(target: &Image, source: &Image, bs: usize) -> Vec<Class> {
    let sn = source.blocks(bs);
    let tn = target.blocks(bs);
    let src_hashes: Vec<Option<u64>> = (0..sn)
        .into_par_iter()
        .map(|s| {
            let b = source.block(bs, s);
            (!is_zero(b)).then(|| block_hash(b))
        })
        .collect();
    let mut index: FxHashMap<u64, u64> = FxHashMap::default();
    index.reserve(src_hashes.len() / 2);
    for (s, h) in src_hashes.iter().enumerate() {
        if let Some(h) = h {
            index.entry(*h).or_insert(s as u64);
        }
    }
    let tgt: Vec<(bool, u64)> = (0..tn)
        .into_par_iter()
        .map(|t| {
            let b = target.block(bs, t);
            let z = is_zero(b);
            (z, if z { 0 } else { block_hash(b) })
        })
        .collect();
    let same = |t: u64, s: u64| s < sn && source.block(bs, s) == target.block(bs, t);
    let mut classes = Vec::with_capacity(tn as usize);
    let mut prev: Option<u64> = None;
    for t in 0..tn {
        let (z, h) = tgt[t as usize];
        let c = if z {
            Class::Zero
        } else if let Some(s) = prev.map(|p| p + 1).filter(|&s| same(t, s)) {
            Class::Copy(s)
        } else if same(t, t) {
            Class::Copy(t)
        } else if let Some(&s) = index.get(&h).filter(|&&s| same(t, s)) {
            Class::Copy(s)
        } else {
            Class::Changed
        };
        prev = match c {
            Class::Copy(s) => Some(s),
            _ => None,
        };
        classes.push(c);
    }
    classes
}

/// Content-defined anchors of the source: positions where a rolling hash over the
/// previous ANCHOR_WINDOW bytes has ANCHOR_BITS bits clear, mapped to their block.
struct AnchorIndex {
    map: FxHashMap<u64, u32>,
}

/// One anchor every 2^ANCHOR_BITS positions on average.
const ANCHOR_BITS: u32 = 6;
/// Bytes an anchor covers. Bit k of the gear hash depends on the last k+1 bytes, so
/// testing bits below ANCHOR_WINDOW makes the choice depend on exactly this window.
/// 32 bytes finds recompiled code better than 64 and costs little (measured on the
/// Debian image pair: 7.14 MB at 64, 7.11 MB at 32, 7.06 MB at 16 but 50% slower).
const ANCHOR_WINDOW: usize = 32;
const ANCHOR_MASK: u64 = ((1u64 << ANCHOR_BITS) - 1) << (ANCHOR_WINDOW as u32 - ANCHOR_BITS);

static GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    // splitmix64 from a fixed seed: the table must never change, or anchors from
    // different builds would not agree (they only steer compression, not correctness).
    let mut t = [0u64; 256];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut i = 0;
    while i < 256 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
}

fn anchors(block: &[u8], mut f: impl FnMut(u64)) {
    let mut h = 0u64;
    for (i, &b) in block.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if i + 1 >= ANCHOR_WINDOW && h & ANCHOR_MASK == 0 {
            // The key hashes the window itself: the low gear bits alone would collide.
            f(block_hash(&block[i + 1 - ANCHOR_WINDOW..=i]));
        }
    }
}

impl AnchorIndex {
    fn build(source: &Image, bs: usize) -> Self {
        let per_block: Vec<Vec<u64>> = (0..source.blocks(bs))
            .into_par_iter()
            .map(|s| {
                let b = source.block(bs, s);
                let mut v = Vec::new();
                if !is_zero(b) {
                    anchors(b, |h| v.push(h));
                }
                v
            })
            .collect();
        let total: usize = per_block.iter().map(Vec::len).sum();
        let mut map = FxHashMap::default();
        map.reserve(total);
        for (s, v) in per_block.iter().enumerate() {
            for &h in v {
                map.entry(h).or_insert(s as u32);
            }
        }
        Self { map }
    }

    /// How many of `block`'s anchors occur in the source.
    fn hits(&self, block: &[u8]) -> usize {
        let mut n = 0;
        anchors(block, |h| n += usize::from(self.map.contains_key(&h)));
        n
    }

    /// Source extents to use as the zstd reference for the changed target `blocks`.
    fn reference_for(
        &self,
        target: &Image,
        source: &Image,
        bs: usize,
        blocks: &[u64],
        max_blocks: usize,
    ) -> Vec<Extent> {
        let sn = source.blocks(bs);
        let mut votes: FxHashMap<u64, u32> = FxHashMap::default();
        for &t in blocks {
            anchors(target.block(bs, t), |h| {
                if let Some(&s) = self.map.get(&h) {
                    *votes.entry(u64::from(s)).or_insert(0) += 1;
                }
            });
        }
        // Strongest matches first, each with a neighbour either side (files are
        // contiguous, and an edit shifts content across block borders); then the
        // blocks at the same offsets.
        let mut ranked: Vec<(u64, u32)> = votes.into_iter().collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut chosen: FxHashMap<u64, ()> = FxHashMap::default();
        let add = |s: u64, chosen: &mut FxHashMap<u64, ()>| {
            if chosen.len() < max_blocks && s < sn && !is_zero(source.block(bs, s)) {
                chosen.insert(s, ());
            }
        };
        for &(s, _) in &ranked {
            add(s, &mut chosen);
            if s > 0 {
                add(s - 1, &mut chosen);
            }
            add(s + 1, &mut chosen);
        }
        for &t in blocks {
            add(t, &mut chosen);
        }
        let mut list: Vec<u64> = chosen.into_keys().collect();
        list.sort_unstable();
        runs_of(list.into_iter())
    }
}

/// Concatenated bytes of `extents` in `img`.
fn gather(img: &Image, bs: usize, extents: &[Extent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(extents.iter().map(|e| e.blocks as usize * bs).sum());
    for e in extents {
        let a = e.start as usize * bs;
        v.extend_from_slice(&img.bytes()[a..a + e.blocks as usize * bs]);
    }
    v
}

fn sha_of(img: &Image, bs: usize, extents: &[Extent]) -> [u8; 32] {
    let mut h = Sha256::new();
    for e in extents {
        let a = e.start as usize * bs;
        h.update(&img.bytes()[a..a + e.blocks as usize * bs]);
    }
    h.finalize().into()
}

/// Compresses one frame, with `reference` as its zstd prefix when not empty.
pub(crate) fn compress_frame(
    data: &[u8],
    reference: &[u8],
    level: i32,
) -> Result<Vec<u8>, &'static str> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    let window = (data.len() + reference.len())
        .max(1 << 17)
        .next_power_of_two();
    let window_log = window.trailing_zeros().min(27);
    let e = |c| zstd::zstd_safe::get_error_name(c);
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(e)?;
    cctx.set_parameter(CParameter::WindowLog(window_log))
        .map_err(e)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(e)?;
    cctx.set_parameter(CParameter::ChecksumFlag(false))
        .map_err(e)?;
    if !reference.is_empty() {
        cctx.ref_prefix(reference).map_err(e)?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(e)?;
    Ok(out)
}

/// A compressed frame (for DATA/PATCH) and the sha256 of the operation's output.
type FrameResult = Result<(Option<Vec<u8>>, [u8; 32]), GenerateError>;

/// Compresses frames, assigns blob offsets, signs and writes the payload.
fn finish(
    target: &Image,
    source: Option<&Image>,
    source_info: Option<SourceImage>,
    mut planned: Vec<Planned>,
    opts: &Options,
    key: &PublisherKey,
    out: &Path,
) -> Result<Summary, GenerateError> {
    let bs = opts.block_size as usize;
    planned.sort_by_key(|p| p.dst.first().map_or(0, |e| e.start));
    let werr = |source| GenerateError::Write {
        path: out.to_owned(),
        source,
    };
    let dir = out.parent().unwrap_or(Path::new("."));
    let blob_path = dir.join(format!(
        ".{}.blob.tmp",
        out.file_name()
            .map_or("payload".into(), |n| n.to_string_lossy())
    ));
    let mut blob = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&blob_path)
        .map_err(werr)?;
    let _cleanup = RemoveOnDrop(blob_path);
    let mut blob_hash = Sha256::new();
    let mut blob_size = 0u64;
    let mut ops: Vec<Operation> = Vec::with_capacity(planned.len());
    // Batches bound the compressed frames held in memory at once.
    for (batch_no, batch) in planned.chunks(16).enumerate() {
        let results: Vec<FrameResult> = batch
            .par_iter()
            .enumerate()
            .map(|(j, p)| {
                let sha = sha_of(target, bs, &p.dst);
                if !p.kind.has_data() {
                    return Ok((None, sha));
                }
                let data = gather(target, bs, &p.dst);
                let reference = match (p.kind, source) {
                    (OpKind::Patch, Some(src)) => gather(src, bs, &p.src),
                    _ => Vec::new(),
                };
                let frame = compress_frame(&data, &reference, opts.level).map_err(|message| {
                    GenerateError::Compress {
                        chunk: batch_no * 16 + j,
                        message,
                    }
                })?;
                Ok((Some(frame), sha))
            })
            .collect();
        for (p, r) in batch.iter().zip(results) {
            let (frame, sha256) = r?;
            let (data_offset, data_len) = match frame {
                Some(f) => {
                    blob.write_all(&f).map_err(werr)?;
                    blob_hash.update(&f);
                    let at = blob_size;
                    blob_size += f.len() as u64;
                    (at, f.len() as u64)
                }
                None => (0, 0),
            };
            ops.push(Operation {
                kind: p.kind,
                dst: p.dst.clone(),
                src: p.src.clone(),
                data_offset,
                data_len,
                sha256,
            });
        }
    }
    let manifest = Manifest {
        compatible: opts.compatible.clone(),
        version: opts.version.clone(),
        min_source_version: opts.min_source_version.clone(),
        created: opts.created,
        expires: opts.expires,
        block_size: opts.block_size,
        target_size: target.len(),
        target_sha256: target.sha256(),
        verity_root_hash: opts.verity_root_hash.clone(),
        source: source_info,
        blob_size,
        blob_sha256: blob_hash.finalize().into(),
        operations: ops,
    };
    // The generator checks its own output with the same rules a node applies.
    manifest.validate().map_err(GenerateError::Metadata)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        out.file_name()
            .map_or("payload".into(), |n| n.to_string_lossy())
    ));
    let _cleanup_tmp = RemoveOnDrop(tmp.clone());
    let mut f = File::create(&tmp).map_err(werr)?;
    let size = write_payload(&mut f, &manifest, key, &mut blob).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    fs::rename(&tmp, out).map_err(werr)?;
    Ok(Summary {
        path: out.to_owned(),
        payload_bytes: size,
        manifest_bytes: super::codec::encode(&manifest).len() as u64,
        operations: manifest.operations.len(),
        delta: manifest.is_delta(),
    })
}

/// Removes a temporary file when generation ends, whether it succeeded or not.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
