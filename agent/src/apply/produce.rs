//! The workers: operations taken in order under the memory budget, their frames
//! fetched and decompressed (or their bytes found on the source slot), hashed.

use std::io;
use std::sync::{mpsc, Condvar, Mutex};

use sha2::{Digest, Sha256};

use crate::payload::manifest::{Extent, Manifest, OpKind, Operation};

use super::{hash_zeroes, ApplyError, Blob, Options, SourceSlot};

/// Result of a worker for one operation.
pub(super) enum Produced {
    /// Nothing to carry: the writer does ZERO and COPY itself.
    Inline,
    Bytes {
        data: Vec<u8>,
        fetched: u64,
        reused: bool,
        /// Bytes counted in the partial store's in-flight figure until this is written.
        in_flight: u64,
    },
}

pub(super) struct Sched {
    pub(super) next: usize,
    pub(super) in_use: u64,
    pub(super) stop: bool,
}

/// Bytes an operation holds in memory while a worker produces it.
pub(super) fn cost(manifest: &Manifest, op: &Operation) -> u64 {
    match op.kind {
        OpKind::Zero | OpKind::Copy => 0,
        OpKind::Data | OpKind::Patch => {
            let out = manifest.bytes(op.dst_blocks());
            let reference = if op.kind == OpKind::Patch {
                manifest.bytes(op.src_blocks())
            } else {
                0
            };
            out + reference + op.data_len
        }
    }
}

pub(super) fn worker(
    manifest: &Manifest,
    blob: Blob<'_>,
    source: Option<&dyn SourceSlot>,
    sched: &Mutex<Sched>,
    cond: &Condvar,
    opts: &Options<'_>,
    tx: &mpsc::Sender<(usize, Result<Produced, ApplyError>)>,
) {
    let budget = opts.memory_budget;
    loop {
        let i = {
            let Ok(mut s) = sched.lock() else { return };
            loop {
                if s.stop || s.next >= manifest.operations.len() {
                    return;
                }
                let c = cost(manifest, &manifest.operations[s.next]);
                // Reservations are taken in operation order, so the oldest unwritten
                // operation always holds one and the writer can never starve.
                if s.in_use == 0 || s.in_use + c <= budget {
                    s.in_use += c;
                    s.next += 1;
                    break s.next - 1;
                }
                s = match cond.wait(s) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        let r = produce(manifest, blob, source, i, opts);
        if tx.send((i, r)).is_err() {
            return;
        }
    }
}

fn produce(
    manifest: &Manifest,
    blob: Blob<'_>,
    source: Option<&dyn SourceSlot>,
    i: usize,
    opts: &Options<'_>,
) -> Result<Produced, ApplyError> {
    let op = &manifest.operations[i];
    let out_len = manifest.bytes(op.dst_blocks());
    match op.kind {
        OpKind::Copy => Ok(Produced::Inline),
        OpKind::Zero => {
            // The content is implied by the operation, and the read-back hash of the
            // whole target covers what the device holds; checking the digest only
            // catches a manifest that contradicts itself, at the cost of hashing every
            // zero byte (most of a slot), so it is an option (`bundle verify` sets it).
            if opts.check_zero_digests {
                let mut h = Sha256::new();
                hash_zeroes(&mut h, out_len);
                check_hash(i, op, h.finalize().into())?;
            }
            Ok(Produced::Inline)
        }
        OpKind::Data | OpKind::Patch => {
            if op.kind == OpKind::Data {
                if let Some(data) = try_reuse(manifest, op, source, out_len) {
                    return Ok(Produced::Bytes {
                        data,
                        fetched: 0,
                        reused: true,
                        in_flight: 0,
                    });
                }
            }
            produce_frame(manifest, blob, source, i, opts)
        }
    }
}

/// A DATA or PATCH operation's output from its frame: fetched (kept bytes first, if
/// any), decompressed against its reference, hashed.
fn produce_frame(
    manifest: &Manifest,
    blob: Blob<'_>,
    source: Option<&dyn SourceSlot>,
    i: usize,
    opts: &Options<'_>,
) -> Result<Produced, ApplyError> {
    let op = &manifest.operations[i];
    let out_len = manifest.bytes(op.dst_blocks());
    let mut frame = vec![0u8; op.data_len as usize];
    let partial = opts.partial.filter(|_| blob.source.is_remote());
    let kept = fetch_frame(blob, partial, i, op, &mut frame)?;
    let reference = read_reference(manifest, source, i, op)?;
    let data = match (decode_frame(i, op, &frame, &reference, out_len), partial) {
        // Kept bytes may be what a power cut left (a file longer than what
        // reached the disk): fetch the whole frame once more before blaming it.
        (Err(e), Some(p)) if kept > 0 => {
            tracing::warn!(op = i, error = %e, "a resumed frame did not verify; fetching it again whole");
            p.discard(i, op.data_len);
            fetch_frame(blob, partial, i, op, &mut frame)?;
            decode_frame(i, op, &frame, &reference, out_len)
        }
        (r, _) => r,
    };
    let data = data.inspect_err(|_| {
        if let Some(p) = partial {
            p.written(op.data_len);
        }
    })?;
    Ok(Produced::Bytes {
        data,
        fetched: op.data_len,
        reused: false,
        in_flight: if partial.is_some() { op.data_len } else { 0 },
    })
}

/// Fetches operation `i`'s frame into `frame`, through the partial store when there is
/// one; returns how many of its bytes were kept from before.
fn fetch_frame(
    blob: Blob<'_>,
    partial: Option<&crate::partial::Partials>,
    i: usize,
    op: &Operation,
    frame: &mut [u8],
) -> Result<u64, ApplyError> {
    let at = blob.offset + op.data_offset;
    match partial {
        Some(p) => p.fetch(blob.source, i, at, frame).map(|f| f.kept),
        None => blob.source.read_range(at, frame).map(|()| 0),
    }
    .map_err(|source| ApplyError::Fetch {
        op: i,
        kind: op.kind.name(),
        offset: op.data_offset,
        len: op.data_len,
        source,
    })
}

/// A PATCH operation's reference, read from the source slot (empty for DATA).
fn read_reference(
    manifest: &Manifest,
    source: Option<&dyn SourceSlot>,
    i: usize,
    op: &Operation,
) -> Result<Vec<u8>, ApplyError> {
    if op.kind != OpKind::Patch {
        return Ok(Vec::new());
    }
    let src = source.ok_or(ApplyError::SourceRequired)?;
    read_extents(src, manifest.block_size, &op.src).map_err(|source| ApplyError::SourceRead {
        op: i,
        kind: op.kind.name(),
        source,
    })
}

/// Decompresses operation `i`'s frame and checks its output's length and sha256.
fn decode_frame(
    i: usize,
    op: &Operation,
    frame: &[u8],
    reference: &[u8],
    out_len: u64,
) -> Result<Vec<u8>, ApplyError> {
    let kind = op.kind.name();
    let data = decompress_frame(frame, reference, out_len).map_err(|e| match e {
        FrameError::Zstd(message) => ApplyError::Decompress {
            op: i,
            kind,
            message,
        },
        FrameError::Length(actual) => ApplyError::WrongLength {
            op: i,
            kind,
            expected: out_len,
            actual,
        },
    })?;
    check_hash(i, op, Sha256::digest(&data).into())?;
    Ok(data)
}

/// A DATA operation's hints name places on the source slot that may already hold its
/// output; use them only if the bytes hash right.
fn try_reuse(
    manifest: &Manifest,
    op: &Operation,
    source: Option<&dyn SourceSlot>,
    out_len: u64,
) -> Option<Vec<u8>> {
    let src = source?;
    if op.src.is_empty() || manifest.bytes(op.src_blocks()) != out_len {
        return None;
    }
    let end = op.src.iter().filter_map(Extent::end).max()?;
    if manifest.bytes(end) > src.size() {
        return None;
    }
    let data = read_extents(src, manifest.block_size, &op.src).ok()?;
    let digest: [u8; 32] = Sha256::digest(&data).into();
    (digest == op.sha256).then_some(data)
}

pub(super) fn check_hash(i: usize, op: &Operation, actual: [u8; 32]) -> Result<(), ApplyError> {
    if actual != op.sha256 {
        return Err(ApplyError::OpHashMismatch {
            op: i,
            kind: op.kind.name(),
            expected: hex::encode(op.sha256),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

fn read_extents(src: &dyn SourceSlot, bs: u32, extents: &[Extent]) -> io::Result<Vec<u8>> {
    let bs = u64::from(bs);
    let total: u64 = extents.iter().map(|e| e.blocks * bs).sum();
    let mut v = vec![0u8; total as usize];
    let mut at = 0usize;
    for e in extents {
        let n = (e.blocks * bs) as usize;
        src.read_exact_at(&mut v[at..at + n], e.start * bs)?;
        at += n;
    }
    Ok(v)
}

enum FrameError {
    Zstd(&'static str),
    Length(u64),
}

/// Decompresses one frame into exactly `out_len` bytes. Single-shot into a buffer of
/// the expected size: zstd then needs no window buffer of its own (so the frame's
/// declared window cannot make it allocate), and a frame that would produce more
/// fails instead of growing memory.
fn decompress_frame(frame: &[u8], reference: &[u8], out_len: u64) -> Result<Vec<u8>, FrameError> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let e = |c| FrameError::Zstd(zstd::zstd_safe::get_error_name(c));
    // Exactly one frame: libzstd would otherwise decode concatenated frames (and skip
    // skippable ones) in one call.
    if zstd::zstd_safe::find_frame_compressed_size(frame).map_err(e)? != frame.len() {
        return Err(FrameError::Zstd(
            "data range holds more than one zstd frame",
        ));
    }
    let mut dctx = DCtx::create();
    dctx.set_parameter(DParameter::WindowLogMax(27))
        .map_err(e)?;
    if !reference.is_empty() {
        dctx.ref_prefix(reference).map_err(e)?;
    }
    let mut out: Vec<u8> = Vec::with_capacity(out_len as usize);
    let n = dctx.decompress(&mut out, frame).map_err(e)?;
    if n as u64 != out_len {
        return Err(FrameError::Length(n as u64));
    }
    Ok(out)
}
