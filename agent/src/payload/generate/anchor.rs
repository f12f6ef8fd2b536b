//! The anchor index: content-defined anchors of the source (a gear rolling hash), so
//! a changed block finds the source blocks that share content with it wherever the
//! file system put them.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use super::image::Image;
use super::plan::{block_hash, is_zero, runs_of};
use crate::payload::manifest::Extent;

/// Content-defined anchors of the source: positions where a rolling hash over the
/// previous ANCHOR_WINDOW bytes has ANCHOR_BITS bits clear, mapped to their block.
pub(super) struct AnchorIndex {
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
    pub(super) fn build(source: &Image, bs: usize) -> Self {
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
    pub(super) fn hits(&self, block: &[u8]) -> usize {
        let mut n = 0;
        anchors(block, |h| n += usize::from(self.map.contains_key(&h)));
        n
    }

    /// Source extents to use as the zstd reference for the changed target `blocks`.
    pub(super) fn reference_for(
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
