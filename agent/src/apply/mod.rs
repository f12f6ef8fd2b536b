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
//!
//! The parts: `produce.rs` the workers (budget, fetch, decompress, reuse, hash);
//! `write.rs` the writer, strictly in operation order (ZERO and COPY done there);
//! `verify.rs` the read-back and the other whole-slot hashes. `crate::blockio` holds
//! the O_DIRECT buffers the read-back and `slots` share.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::midstate::Mark;
use crate::payload::manifest::{Manifest, OpKind};
use crate::payload::RangeSource;

mod produce;
mod verify;
mod write;

use produce::{worker, Produced, Sched};
use write::{write_in_order, Workers};

pub use verify::{hash_source, hash_target, hash_target_from, verified_prefix};

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
    #[error("the manifest's dm-verity parameters")]
    VerityParams(#[source] crate::payload::ManifestError),
    #[error("dm-verity root hash {actual} of the tree built on the slot does not match the manifest's {expected}")]
    VerityRootMismatch { expected: String, actual: String },
    #[error("finishing the dm-verity tree")]
    Verity(#[source] crate::verity::VerityError),
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
                | Self::VerityRootMismatch { .. }
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
    /// Writes while the image is read back on another thread: the dm-verity tree,
    /// which lies past the image.
    fn write_shared_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Marks the target valid; called only after the whole image read back right (its
    /// sha256, or its dm-verity tree's root).
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
    check_slots(manifest, source, &*target)?;
    target.invalidate().map_err(ApplyError::Commit)?;
    let mut report = Report::default();
    write_all(manifest, blob, source, target, opts, &mut report, on_event)?;
    report.write_seconds = started.elapsed().as_secs_f64();
    target.sync().map_err(ApplyError::Flush)?;
    report.sync_seconds = started.elapsed().as_secs_f64() - report.write_seconds;
    on_event(Event::Verifying);
    read_back(manifest, &*target, opts, on_event)?;
    report.verify_seconds =
        started.elapsed().as_secs_f64() - report.write_seconds - report.sync_seconds;
    target.commit().map_err(ApplyError::Commit)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The slots are large enough: the source for the delta, the target for the image and
/// its dm-verity tree.
fn check_slots(
    manifest: &Manifest,
    source: Option<&dyn SourceSlot>,
    target: &dyn TargetSlot,
) -> Result<(), ApplyError> {
    if let Some(src) = &manifest.source {
        let s = source.ok_or(ApplyError::SourceRequired)?;
        if s.size() < src.size {
            return Err(ApplyError::SourceTooSmall {
                expected: src.size,
                actual: s.size(),
            });
        }
    }
    let needed = needed_size(manifest)?;
    if target.size() < needed {
        return Err(ApplyError::TargetTooSmall {
            expected: needed,
            actual: target.size(),
        });
    }
    Ok(())
}

/// Every operation from `opts.start_op` on, produced by the workers and written in
/// order by this thread.
fn write_all(
    manifest: &Manifest,
    blob: Blob<'_>,
    source: Option<&dyn SourceSlot>,
    target: &mut dyn TargetSlot,
    opts: &Options<'_>,
    report: &mut Report,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), ApplyError> {
    let sched = Mutex::new(Sched {
        next: opts.start_op,
        in_use: 0,
        stop: false,
    });
    let cond = Condvar::new();
    std::thread::scope(|scope| {
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
            &Workers {
                rx: &rx,
                sched: &sched,
                cond: &cond,
            },
            report,
            on_event,
        );
        // Stop the workers whatever happened, so the scope can end.
        if let Ok(mut s) = sched.lock() {
            s.stop = true;
        }
        cond.notify_all();
        r
    })
}

/// The whole target read back (continued from `opts.read_back_from` when it applies)
/// and checked against the manifest: by the root of the dm-verity tree built on the
/// way when the release has one, else by the image's sha256.
fn read_back(
    manifest: &Manifest,
    target: &dyn TargetSlot,
    opts: &Options<'_>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), ApplyError> {
    let from = opts
        .read_back_from
        .filter(|_| opts.start_op >= manifest.operations.len());
    let area = verify::SlotArea(target);
    let mut tree = tree_builder(manifest, &area, from)?;
    let on_mark = &mut |m| on_event(Event::ReadBack(m));
    match tree.as_mut() {
        // The signed root proves every byte: see `read_target_into_tree`.
        Some(t) => verify::read_target_into_tree(target, manifest.target_size, from, t, on_mark)
            .map_err(ApplyError::ReadBack)?,
        None => {
            let actual = verify::hash_target_from(target, manifest.target_size, from, on_mark)
                .map_err(ApplyError::ReadBack)?;
            if actual != manifest.target_sha256 {
                return Err(ApplyError::TargetHashMismatch {
                    expected: hex::encode(manifest.target_sha256),
                    actual: hex::encode(actual),
                });
            }
        }
    }
    if let (Some(b), Some(v)) = (tree, &manifest.verity) {
        let root = b.finish(&v.uuid).map_err(ApplyError::Verity)?;
        tracing::info!(root = %hex::encode(root), "slot read back; dm-verity tree built");
        if root != v.root_hash {
            return Err(ApplyError::VerityRootMismatch {
                expected: hex::encode(v.root_hash),
                actual: hex::encode(root),
            });
        }
    }
    Ok(())
}

/// Bytes of the target slot the manifest needs: the image, and its dm-verity tree.
pub fn needed_size(manifest: &Manifest) -> Result<u64, ApplyError> {
    match &manifest.verity {
        None => Ok(manifest.target_size),
        Some(v) => Ok(v
            .geometry(manifest.target_size)
            .map_err(ApplyError::VerityParams)?
            .end()),
    }
}

/// The builder of the manifest's dm-verity tree, if it has one, continuing where the
/// read-back continues (its level 0 was written as far as the mark).
fn tree_builder<'a>(
    manifest: &Manifest,
    area: &'a verify::SlotArea<'a>,
    from: Option<Mark>,
) -> Result<Option<crate::verity::Builder<'a>>, ApplyError> {
    let Some(v) = &manifest.verity else {
        return Ok(None);
    };
    let geo = v
        .geometry(manifest.target_size)
        .map_err(ApplyError::VerityParams)?;
    let salt = v.salt.clone();
    let b = match from {
        None => crate::verity::Builder::new(geo, salt, area),
        Some(m) => crate::verity::Builder::resume(geo, salt, area, m.len, &|buf, off| {
            area.0.read_back_at(buf, off)
        })
        .map_err(ApplyError::Verity)?,
    };
    Ok(Some(b))
}

fn hash_zeroes(h: &mut Sha256, n: u64) {
    feed_zeroes(n, &mut |z| h.update(z));
}

fn feed_zeroes(mut n: u64, feed: &mut dyn FnMut(&[u8])) {
    while n > 0 {
        let k = n.min(ZEROES.len() as u64) as usize;
        feed(&ZEROES[..k]);
        n -= k as u64;
    }
}
