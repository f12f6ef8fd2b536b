//! The apply engine: turns a verified manifest, its blob, and the source slot into the
//! target slot, checking every operation's sha256 before it counts as done.
//!
//! Shape: worker threads take operations in manifest order, fetch and decompress the
//! DATA and PATCH frames (or find a DATA operation's bytes already on the source slot),
//! and hash the result; the calling thread writes results strictly in order, does
//! ZERO and COPY itself (no bytes pass through the workers for those), and reports each
//! finished operation so a caller can checkpoint. A byte budget bounds the frames in
//! flight, so memory does not grow with the image. When every operation is written,
//! the target is flushed, read back and hashed against the manifest; only then does
//! the target get committed. On any error the target stays invalid.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::midstate::{Hasher, Mark};
use crate::payload::manifest::{Extent, Manifest, OpKind, Operation};
use crate::payload::RangeSource;

/// Why applying stopped. Every variant that concerns one operation names it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("this payload is a delta and needs the source slot, but none was given")]
    SourceRequired,
    #[error(
        "source slot is {actual} bytes, smaller than the {expected} bytes the delta was built from"
    )]
    SourceTooSmall { expected: u64, actual: u64 },
    #[error("target slot is {actual} bytes, too small for the {expected}-byte image")]
    TargetTooSmall { expected: u64, actual: u64 },
    #[error("operation {op} ({kind}): fetching {len} bytes of data at blob offset {offset}")]
    Fetch {
        op: usize,
        kind: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("operation {op} ({kind}): reading the source slot")]
    SourceRead {
        op: usize,
        kind: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("operation {op} ({kind}): writing the target slot")]
    TargetWrite {
        op: usize,
        kind: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("operation {op} ({kind}): zstd frame is corrupt: {message}")]
    Decompress {
        op: usize,
        kind: &'static str,
        message: &'static str,
    },
    #[error("operation {op} ({kind}): frame decompressed to {actual} bytes, expected {expected}")]
    WrongLength {
        op: usize,
        kind: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error(
        "operation {op} ({kind}): output sha256 {actual} does not match the manifest's {expected}"
    )]
    OpHashMismatch {
        op: usize,
        kind: &'static str,
        expected: String,
        actual: String,
    },
    #[error("flushing the target slot")]
    Flush(#[source] io::Error),
    #[error("reading the target slot back for verification")]
    ReadBack(#[source] io::Error),
    #[error("target slot sha256 {actual} does not match the manifest's {expected} after writing")]
    TargetHashMismatch { expected: String, actual: String },
    #[error("committing the target slot")]
    Commit(#[source] io::Error),
    #[error("cancelled at operation {op}")]
    Cancelled { op: usize },
    #[error("internal error: an apply worker stopped unexpectedly")]
    WorkerLost,
}

impl ApplyError {
    /// Whether the error is about the bytes an operation produced (as opposed to I/O,
    /// cancellation or setup): what a wrong source image looks like.
    pub fn is_content_error(&self) -> bool {
        matches!(
            self,
            Self::OpHashMismatch { .. }
                | Self::Decompress { .. }
                | Self::WrongLength { .. }
                | Self::TargetHashMismatch { .. }
        )
    }
}

/// The slot an update is read from (the booted slot on a node). Read-only by type.
pub trait SourceSlot: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl SourceSlot for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map_or(0, |m| m.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// The slot being written. Implementations decide what "invalid" and "committed"
/// mean for them (a temporary file name, a boot entry marked unbootable, ...).
pub trait TargetSlot: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Marks the target not valid; called before the first write.
    fn invalidate(&mut self) -> io::Result<()>;
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read back as zeros without sending zeros through memory.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads for the final verification. Devices that can should bypass caches here,
    /// so the hash is of what the device holds.
    fn read_back_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    /// Makes everything written so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Marks the target valid; called only after the whole image hashed right.
    fn commit(&mut self) -> io::Result<()>;
    /// Ranges of `0..len` that may hold data, when the target knows the rest reads as
    /// zeros without reading (holes of a sparse file). `None`: everything must be read.
    fn data_ranges(&self, _len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// Where the blob's bytes come from: the payload itself, at `blob_offset`.
#[derive(Clone, Copy)]
pub struct Blob<'a> {
    pub source: &'a dyn RangeSource,
    pub offset: u64,
}

impl std::fmt::Debug for Blob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("source", &self.source.name())
            .field("offset", &self.offset)
            .finish()
    }
}

/// Something that happened while applying, for progress and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Operation `op` is written and its hash matched. `fetched` blob bytes were used.
    OpDone {
        op: usize,
        kind: OpKind,
        bytes: u64,
        fetched: u64,
        reused: bool,
    },
    /// Still waiting for operation `op` (the oldest unwritten); `received` bytes of the
    /// frames in flight have arrived. Sent about twice a second while frames download
    /// (only with [`Options::partial`]), so a slow link visibly moves.
    Fetching { op: usize, received: u64 },
    /// All operations are written; the whole target is being read back.
    Verifying,
    /// The read-back has hashed the target up to `mark.len`: a caller that writes the
    /// mark down can continue the read-back from there (see [`Options::read_back_from`]).
    ReadBack(Mark),
}

#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Apply operations from this index on (earlier ones are already in place).
    pub start_op: usize,
    /// Worker threads for fetch/decompress/hash.
    pub workers: usize,
    /// Most bytes of frames, references and outputs in flight at once.
    pub memory_budget: u64,
    pub cancel: Option<&'a AtomicBool>,
    /// Also hash the zeros of ZERO operations against their digests (a full audit of
    /// the manifest; the read-back already proves the bytes on the target).
    pub check_zero_digests: bool,
    /// Keeps the bytes of frames in flight across interruptions (see [`crate::partial`]).
    pub partial: Option<&'a crate::partial::Partials>,
    /// Continue an earlier read-back from this mark instead of from byte zero. Only
    /// honoured when every operation was already written (`start_op` is past the
    /// last): a mark says nothing about bytes written after it was taken.
    pub read_back_from: Option<Mark>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            start_op: 0,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            memory_budget: 40 << 20,
            cancel: None,
            check_zero_digests: false,
            partial: None,
            read_back_from: None,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub operations: usize,
    pub bytes_written: u64,
    /// Blob bytes fetched (what a node downloads beyond the manifest).
    pub bytes_fetched: u64,
    /// DATA operations whose output was found on the source slot instead of fetched.
    pub ops_reused: usize,
    /// Wall time writing operations, flushing, and reading back.
    pub write_seconds: f64,
    pub sync_seconds: f64,
    pub verify_seconds: f64,
    pub seconds: f64,
}

/// Result of a worker for one operation.
enum Produced {
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

struct Sched {
    next: usize,
    in_use: u64,
    stop: bool,
}

const IO_CHUNK: usize = 1 << 20;
/// How often the writer reports the bytes of frames in flight while it waits.
const FETCH_TICK: std::time::Duration = std::time::Duration::from_millis(500);
static ZEROES: [u8; 1 << 16] = [0; 1 << 16];
/// How often the read-back reports a mark inside a run of zeros (a hole).
const MARK_ZEROES: u64 = 4 << 20;

/// Applies `manifest` to `target`. See the module comment for the guarantees.
pub fn apply(
    manifest: &Manifest,
    blob: Blob<'_>,
    source: Option<&dyn SourceSlot>,
    target: &mut dyn TargetSlot,
    opts: &Options<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Report, ApplyError> {
    let started = Instant::now();
    if let Some(src) = &manifest.source {
        let s = source.ok_or(ApplyError::SourceRequired)?;
        if s.size() < src.size {
            return Err(ApplyError::SourceTooSmall {
                expected: src.size,
                actual: s.size(),
            });
        }
    }
    if target.size() < manifest.target_size {
        return Err(ApplyError::TargetTooSmall {
            expected: manifest.target_size,
            actual: target.size(),
        });
    }
    target.invalidate().map_err(ApplyError::Commit)?;
    let sched = Mutex::new(Sched {
        next: opts.start_op,
        in_use: 0,
        stop: false,
    });
    let cond = Condvar::new();
    let mut report = Report::default();
    let result = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<Produced, ApplyError>)>();
        for _ in 0..opts.workers.max(1) {
            let tx = tx.clone();
            let (sched, cond) = (&sched, &cond);
            scope.spawn(move || {
                worker(manifest, blob, source, sched, cond, opts, &tx);
            });
        }
        drop(tx);
        let r = write_in_order(
            manifest,
            source,
            target,
            opts,
            &rx,
            &sched,
            &cond,
            &mut report,
            on_event,
        );
        // Stop the workers whatever happened, so the scope can end.
        if let Ok(mut s) = sched.lock() {
            s.stop = true;
        }
        cond.notify_all();
        r
    });
    result?;
    report.write_seconds = started.elapsed().as_secs_f64();
    target.sync().map_err(ApplyError::Flush)?;
    report.sync_seconds = started.elapsed().as_secs_f64() - report.write_seconds;
    on_event(Event::Verifying);
    let from = opts
        .read_back_from
        .filter(|_| opts.start_op >= manifest.operations.len());
    let actual = hash_target_from(target, manifest.target_size, from, &mut |m| {
        on_event(Event::ReadBack(m));
    })
    .map_err(ApplyError::ReadBack)?;
    report.verify_seconds =
        started.elapsed().as_secs_f64() - report.write_seconds - report.sync_seconds;
    if actual != manifest.target_sha256 {
        return Err(ApplyError::TargetHashMismatch {
            expected: hex::encode(manifest.target_sha256),
            actual: hex::encode(actual),
        });
    }
    target.commit().map_err(ApplyError::Commit)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Bytes an operation holds in memory while a worker produces it.
fn cost(manifest: &Manifest, op: &Operation) -> u64 {
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

fn worker(
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
    let check_zero_digests = opts.check_zero_digests;
    let op = &manifest.operations[i];
    let kind = op.kind.name();
    let out_len = manifest.bytes(op.dst_blocks());
    match op.kind {
        OpKind::Copy => Ok(Produced::Inline),
        OpKind::Zero => {
            // The content is implied by the operation, and the read-back hash of the
            // whole target covers what the device holds; checking the digest only
            // catches a manifest that contradicts itself, at the cost of hashing every
            // zero byte (most of a slot), so it is an option (`bundle verify` sets it).
            if check_zero_digests {
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
            let mut frame = vec![0u8; op.data_len as usize];
            let partial = opts.partial.filter(|_| blob.source.is_remote());
            let fetch = |frame: &mut [u8]| {
                let at = blob.offset + op.data_offset;
                match partial {
                    Some(p) => p.fetch(blob.source, i, at, frame).map(|f| f.kept),
                    None => blob.source.read_range(at, frame).map(|()| 0),
                }
                .map_err(|source| ApplyError::Fetch {
                    op: i,
                    kind,
                    offset: op.data_offset,
                    len: op.data_len,
                    source,
                })
            };
            let kept = fetch(&mut frame)?;
            let reference = if op.kind == OpKind::Patch {
                let src = source.ok_or(ApplyError::SourceRequired)?;
                read_extents(src, manifest.block_size, &op.src).map_err(|source| {
                    ApplyError::SourceRead {
                        op: i,
                        kind,
                        source,
                    }
                })?
            } else {
                Vec::new()
            };
            let decode = |frame: &[u8]| {
                let data = decompress_frame(frame, &reference, out_len).map_err(|e| match e {
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
            };
            let data = match (decode(&frame), partial) {
                // Kept bytes may be what a power cut left (a file longer than what
                // reached the disk): fetch the whole frame once more before blaming it.
                (Err(e), Some(p)) if kept > 0 => {
                    tracing::warn!(op = i, error = %e, "a resumed frame did not verify; fetching it again whole");
                    p.discard(i, op.data_len);
                    fetch(&mut frame)?;
                    decode(&frame)
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
    }
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

fn check_hash(i: usize, op: &Operation, actual: [u8; 32]) -> Result<(), ApplyError> {
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

#[allow(clippy::too_many_arguments)]
fn write_in_order(
    manifest: &Manifest,
    source: Option<&dyn SourceSlot>,
    target: &mut dyn TargetSlot,
    opts: &Options<'_>,
    rx: &mpsc::Receiver<(usize, Result<Produced, ApplyError>)>,
    sched: &Mutex<Sched>,
    cond: &Condvar,
    report: &mut Report,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), ApplyError> {
    let ops = &manifest.operations;
    let mut pending: BTreeMap<usize, Result<Produced, ApplyError>> = BTreeMap::new();
    // Aligned, so a booted slot opened with O_DIRECT reads straight into it.
    let mut copy_buf = AlignedBuf::new(IO_CHUNK);
    for (i, op) in ops.iter().enumerate().skip(opts.start_op) {
        if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(ApplyError::Cancelled { op: i });
        }
        let produced = loop {
            if let Some(r) = pending.remove(&i) {
                break r;
            }
            let Some(p) = opts.partial else {
                let (j, r) = rx.recv().map_err(|_| ApplyError::WorkerLost)?;
                pending.insert(j, r);
                continue;
            };
            match rx.recv_timeout(FETCH_TICK) {
                Ok((j, r)) => {
                    pending.insert(j, r);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => on_event(Event::Fetching {
                    op: i,
                    received: p.in_flight(),
                }),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ApplyError::WorkerLost),
            }
        }?;
        let kind = op.kind.name();
        let bs = u64::from(manifest.block_size);
        let werr = |source| ApplyError::TargetWrite {
            op: i,
            kind,
            source,
        };
        let (fetched, reused) = match produced {
            Produced::Inline if op.kind == OpKind::Zero => {
                for e in &op.dst {
                    target
                        .write_zeroes(e.start * bs, e.blocks * bs)
                        .map_err(werr)?;
                }
                (0, false)
            }
            Produced::Inline => {
                let src = source.ok_or(ApplyError::SourceRequired)?;
                copy_op(i, op, bs, src, target, copy_buf.bytes_mut())?;
                (0, false)
            }
            Produced::Bytes {
                data,
                fetched,
                reused,
                in_flight,
            } => {
                if let Some(p) = opts.partial {
                    p.written(in_flight);
                }
                let mut at = 0usize;
                for e in &op.dst {
                    let n = (e.blocks * bs) as usize;
                    target
                        .write_all_at(&data[at..at + n], e.start * bs)
                        .map_err(werr)?;
                    at += n;
                }
                (fetched, reused)
            }
        };
        if let Ok(mut s) = sched.lock() {
            s.in_use -= cost(manifest, op);
        }
        cond.notify_all();
        let bytes = manifest.bytes(op.dst_blocks());
        report.operations += 1;
        report.bytes_written += bytes;
        report.bytes_fetched += fetched;
        report.ops_reused += usize::from(reused);
        on_event(Event::OpDone {
            op: i,
            kind: op.kind,
            bytes,
            fetched,
            reused,
        });
    }
    Ok(())
}

/// Streams a COPY operation from the source slot to the target through one buffer,
/// hashing as it goes.
fn copy_op(
    i: usize,
    op: &Operation,
    bs: u64,
    src: &dyn SourceSlot,
    target: &mut dyn TargetSlot,
    buf: &mut [u8],
) -> Result<(), ApplyError> {
    let kind = op.kind.name();
    let mut h = Sha256::new();
    let mut d_iter = op.dst.iter().map(|e| (e.start * bs, e.blocks * bs));
    let mut d = d_iter.next();
    for s in &op.src {
        let (mut s_off, mut s_left) = (s.start * bs, s.blocks * bs);
        while s_left > 0 {
            let Some((d_off, d_left)) = d.as_mut() else {
                break;
            };
            let n = s_left.min(*d_left).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], s_off)
                .map_err(|source| ApplyError::SourceRead {
                    op: i,
                    kind,
                    source,
                })?;
            h.update(&buf[..n]);
            target
                .write_all_at(&buf[..n], *d_off)
                .map_err(|source| ApplyError::TargetWrite {
                    op: i,
                    kind,
                    source,
                })?;
            s_off += n as u64;
            s_left -= n as u64;
            *d_off += n as u64;
            *d_left -= n as u64;
            if *d_left == 0 {
                d = d_iter.next();
            }
        }
    }
    check_hash(i, op, h.finalize().into())
}

/// How many of the first `claimed` operations still hold their verified output in the
/// target: the index of the first one whose bytes no longer hash right, or `claimed`.
/// A resumed apply starts there, so a slot that changed under a checkpoint is
/// rewritten, never trusted.
pub fn verified_prefix(
    manifest: &Manifest,
    target: &mut dyn TargetSlot,
    claimed: usize,
) -> Result<usize, ApplyError> {
    let bs = u64::from(manifest.block_size);
    let mut buf = vec![0u8; IO_CHUNK];
    for (i, op) in manifest.operations.iter().enumerate().take(claimed) {
        let mut h = Sha256::new();
        for e in &op.dst {
            let (mut off, end) = (e.start * bs, (e.start + e.blocks) * bs);
            while off < end {
                let n = (end - off).min(buf.len() as u64) as usize;
                target
                    .read_exact_at(&mut buf[..n], off)
                    .map_err(ApplyError::ReadBack)?;
                h.update(&buf[..n]);
                off += n as u64;
            }
        }
        if <[u8; 32]>::from(h.finalize()) != op.sha256 {
            return Ok(i);
        }
    }
    Ok(claimed.min(manifest.operations.len()))
}

/// sha256 of the first `len` bytes of the target, read back from it. A reader thread
/// keeps the next buffer coming while this one is hashed; known holes are hashed as
/// zeros without being read.
pub fn hash_target(target: &dyn TargetSlot, len: u64) -> io::Result<[u8; 32]> {
    hash_target_from(target, len, None, &mut |_| {})
}

/// [`hash_target`] continued from `from` (where an earlier read-back stood), handing
/// `on_mark` where it stands after every buffer, so a caller can write it down.
pub fn hash_target_from(
    target: &dyn TargetSlot,
    len: u64,
    from: Option<Mark>,
    on_mark: &mut dyn FnMut(Mark),
) -> io::Result<[u8; 32]> {
    let ranges = target.data_ranges(len)?.unwrap_or_else(|| vec![(0, len)]);
    hash_ranges(
        &|buf, off| target.read_back_at(buf, off),
        &ranges,
        len,
        from,
        on_mark,
    )
}

/// sha256 of the first `len` bytes of a source slot: what a delta's `source.sha256`
/// describes (a slot device is usually larger than the image in it).
pub fn hash_source(source: &dyn SourceSlot, len: u64) -> io::Result<[u8; 32]> {
    if source.size() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("source is {} bytes, shorter than {len}", source.size()),
        ));
    }
    hash_ranges(
        &|buf, off| source.read_exact_at(buf, off),
        &[(0, len)],
        len,
        None,
        &mut |_| {},
    )
}

type ReadAt<'a> = dyn Fn(&mut [u8], u64) -> io::Result<()> + Sync + 'a;

fn hash_ranges(
    read: &ReadAt<'_>,
    ranges: &[(u64, u64)],
    len: u64,
    from: Option<Mark>,
    on_mark: &mut dyn FnMut(Mark),
) -> io::Result<[u8; 32]> {
    let mut h = from.map_or_else(Hasher::new, Hasher::resume);
    let skip = h.position();
    if skip > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a read-back mark at byte {skip} is past the image's end at {len}"),
        ));
    }
    // What is left to read: the ranges past the mark, clipped to it.
    let ranges: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.1 > skip)
        .map(|&(start, end)| (start.max(skip), end))
        .collect();
    let ranges = ranges.as_slice();
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(AlignedBuf, usize)>>(2);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<AlignedBuf>(3);
    for _ in 0..3 {
        let _ = empty_tx.send(AlignedBuf::new(IO_CHUNK * 4));
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for &(start, end) in ranges {
                let mut off = start;
                while off < end {
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    let n = (end - off).min(buf.len() as u64) as usize;
                    let r = read(&mut buf.bytes_mut()[..n], off).map(|()| (buf, n));
                    let failed = r.is_err();
                    if full_tx.send(r).is_err() || failed {
                        return;
                    }
                    off += n as u64;
                }
            }
        });
        let mut pos = skip;
        for &(start, end) in ranges {
            hash_zeroes_marked(&mut h, start - pos, on_mark);
            let mut off = start;
            while off < end {
                let (mut buf, n) = full_rx
                    .recv()
                    .map_err(|_| io::Error::other("read-back thread stopped"))??;
                h.update(&buf.bytes_mut()[..n]);
                off += n as u64;
                let _ = empty_tx.send(buf);
                if let Some(m) = h.mark() {
                    on_mark(m);
                }
            }
            pos = end;
        }
        hash_zeroes_marked(&mut h, len - pos, on_mark);
        Ok(h.finalize())
    })
}

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

fn hash_zeroes(h: &mut Sha256, n: u64) {
    feed_zeroes(n, &mut |z| h.update(z));
}

/// Hashes `n` zeros, with a mark every few MiB: a hole can be most of a slot.
fn hash_zeroes_marked(h: &mut Hasher, n: u64, on_mark: &mut dyn FnMut(Mark)) {
    let mut fed = 0u64;
    feed_zeroes(n, &mut |z| {
        h.update(z);
        fed += z.len() as u64;
        if fed.is_multiple_of(MARK_ZEROES) {
            if let Some(m) = h.mark() {
                on_mark(m);
            }
        }
    });
    if let Some(m) = h.mark().filter(|_| n > 0) {
        on_mark(m);
    }
}

fn feed_zeroes(mut n: u64, feed: &mut dyn FnMut(&[u8])) {
    while n > 0 {
        let k = n.min(ZEROES.len() as u64) as usize;
        feed(&ZEROES[..k]);
        n -= k as u64;
    }
}
