//! Planning: each target block classified (zero, found in the source, changed), and
//! the runs of zero and found blocks grouped into ZERO and COPY operations.

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHasher};

use super::image::Image;
use crate::payload::manifest::{Extent, OpKind};

/// How one target block will be produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Zero,
    /// Present in the source at this block.
    Copy(u64),
    Changed,
}

/// An operation before its frame is compressed.
#[derive(Debug)]
pub(super) struct Planned {
    pub(super) kind: OpKind,
    pub(super) dst: Vec<Extent>,
    pub(super) src: Vec<Extent>,
}

pub(super) const ZERO_OP_MAX_BLOCKS: u64 = 1 << 18;
pub(super) const COPY_OP_MAX_BYTES: u64 = 32 << 20;
pub(super) const MAX_EXTENTS_PER_PLANNED: usize = 4096;
/// Known runs shorter than this are not worth an operation of their own in a full payload.
pub(super) const MIN_REUSE_BLOCKS: u64 = 1;

/// ZERO and COPY operations for the blocks that need no data.
pub(super) fn plan_runs(classes: &[Class], bs: usize, planned: &mut Vec<Planned>) {
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
    // A long unchanged run is cut too: an operation is the unit of checkpoints and
    // progress, and one COPY of most of a slot would be redone whole after every
    // restart (a node restarted more often than it takes would never finish) and show
    // no progress while it runs.
    push_paired(planned, OpKind::Copy, copy, COPY_OP_MAX_BYTES / bs as u64);
}

/// Groups (target, source) extent pairs into operations of `kind` of at most
/// `max_blocks` blocks each, cutting a pair where an operation fills up.
pub(super) fn push_paired(
    planned: &mut Vec<Planned>,
    kind: OpKind,
    pairs: Vec<(Extent, Extent)>,
    max_blocks: u64,
) {
    let max_blocks = max_blocks.max(1);
    let empty = || Planned {
        kind,
        dst: Vec::new(),
        src: Vec::new(),
    };
    let mut cur = empty();
    let mut cur_blocks = 0u64;
    for (mut d, mut s) in pairs {
        while d.blocks > 0 {
            let take = d.blocks.min(max_blocks - cur_blocks);
            cur.dst.push(Extent::new(d.start, take));
            cur.src.push(Extent::new(s.start, take));
            cur_blocks += take;
            d = Extent::new(d.start + take, d.blocks - take);
            s = Extent::new(s.start + take, s.blocks - take);
            if cur_blocks == max_blocks || cur.dst.len() >= MAX_EXTENTS_PER_PLANNED {
                planned.push(std::mem::replace(&mut cur, empty()));
                cur_blocks = 0;
            }
        }
    }
    if !cur.dst.is_empty() {
        planned.push(cur);
    }
}

/// Groups extents into operations of `kind` holding at most `max_blocks` each.
pub(super) fn push_grouped(
    planned: &mut Vec<Planned>,
    kind: OpKind,
    extents: Vec<Extent>,
    max_blocks: u64,
) {
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
pub(super) fn runs_of(blocks: impl Iterator<Item = u64>) -> Vec<Extent> {
    let mut v: Vec<Extent> = Vec::new();
    for b in blocks {
        match v.last_mut() {
            Some(e) if e.start + e.blocks == b => e.blocks += 1,
            _ => v.push(Extent::new(b, 1)),
        }
    }
    v
}

pub(super) fn is_zero(b: &[u8]) -> bool {
    // Word-wise: the generator calls this for every block of every image.
    let (words, rest) = b.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && rest.iter().all(|&x| x == 0)
}

pub(super) fn block_hash(b: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = FxHasher::default();
    h.write(b);
    h.finish()
}

/// Classifies every target block against `source`.
pub(super) fn classify(target: &Image, source: &Image, bs: usize) -> Vec<Class> {
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
