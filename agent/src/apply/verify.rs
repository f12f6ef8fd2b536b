//! Whole-slot hashes: the read-back of the target (resumable from a mark), the
//! verified prefix of a resumed apply, the booted slot's image.

use std::io;
use std::sync::mpsc;

use crate::blockio::{AlignedBuf, RangesReader};
use crate::hashio::sha256_with;
use crate::midstate::{Hasher, Mark};
use crate::payload::manifest::Manifest;
use crate::verity::{Area, Builder, VerityError};

use super::{feed_zeroes, ApplyError, SourceSlot, TargetSlot, IO_CHUNK, MARK_ZEROES};

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
        let ranges = op.dst.iter().map(|e| (e.start * bs, e.blocks * bs));
        let got = sha256_with(
            RangesReader::new(|b: &mut [u8], off| target.read_exact_at(b, off), ranges),
            &mut buf,
        )
        .map_err(ApplyError::ReadBack)?;
        if got != op.sha256 {
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
    let h = from.map_or_else(Hasher::new, Hasher::resume);
    let ranges = target_ranges(target, len)?;
    hash_ranges(&target_reader(target), &ranges, len, h, None, on_mark)
}

/// The read-back of a release with a signed dm-verity root: every byte goes to the
/// tree and nothing else. The root then proves the whole image, so a second sha256
/// of it (as long again as the tree's own hashing) would prove nothing more. Its marks
/// carry only their offset, each handed on once the tree's level 0 is written as far
/// as it.
pub(super) fn read_target_into_tree(
    target: &dyn TargetSlot,
    len: u64,
    from: Option<Mark>,
    tree: &mut Builder<'_>,
    on_mark: &mut dyn FnMut(Mark),
) -> io::Result<()> {
    let at = Counter(from.map_or(0, |m| m.len));
    let ranges = target_ranges(target, len)?;
    hash_ranges(
        &target_reader(target),
        &ranges,
        len,
        at,
        Some(tree),
        on_mark,
    )
}

fn target_reader<'a>(
    target: &'a dyn TargetSlot,
) -> impl Fn(&mut [u8], u64) -> io::Result<()> + Sync + 'a {
    |buf, off| target.read_back_at(buf, off)
}

/// Where the first `len` bytes of the target hold data (the rest reads as zeros).
fn target_ranges(target: &dyn TargetSlot, len: u64) -> io::Result<Vec<(u64, u64)>> {
    Ok(target.data_ranges(len)?.unwrap_or_else(|| vec![(0, len)]))
}

/// What a read-back keeps of the bytes it passes: a resumable sha256 of them, or
/// only how far it got.
trait Progress {
    type Out;
    fn update(&mut self, data: &[u8]);
    /// Where it stands, when that can be written down.
    fn mark(&self) -> Option<Mark>;
    fn position(&self) -> u64;
    fn finish(self) -> Self::Out;
}

impl Progress for Hasher {
    type Out = [u8; 32];
    fn update(&mut self, data: &[u8]) {
        Hasher::update(self, data);
    }
    fn mark(&self) -> Option<Mark> {
        Hasher::mark(self)
    }
    fn position(&self) -> u64 {
        Hasher::position(self)
    }
    fn finish(self) -> [u8; 32] {
        self.finalize()
    }
}

/// Bytes passed, for a read-back whose bytes the dm-verity tree proves.
struct Counter(u64);

impl Progress for Counter {
    type Out = ();
    fn update(&mut self, data: &[u8]) {
        self.0 += data.len() as u64;
    }
    fn mark(&self) -> Option<Mark> {
        // On a 64-byte boundary like a hash's, so either kind of mark is written down
        // and read back the same way; the state is not used.
        self.0.is_multiple_of(64).then_some(Mark {
            len: self.0,
            state: [0; 8],
        })
    }
    fn position(&self) -> u64 {
        self.0
    }
    fn finish(self) {}
}

/// What goes to the tree's thread, in the order the read-back hashed it.
enum TreeMsg {
    Data(AlignedBuf, usize),
    Zeros(u64),
    /// Write level 0 as far as this byte, then say so.
    Flush(u64),
}

/// The dm-verity tree's half of the read-back, on a thread of its own: the tree's
/// digest of every 4 KiB block runs beside the reading instead of queueing behind it.
struct TreeThread<'scope> {
    tx: mpsc::SyncSender<TreeMsg>,
    /// Bytes of data whose level-0 digests are written.
    flushed: mpsc::Receiver<u64>,
    handle: std::thread::ScopedJoinHandle<'scope, Result<(), VerityError>>,
}

impl<'scope> TreeThread<'scope> {
    fn start<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        tree: &'scope mut Builder<'_>,
        empty: mpsc::SyncSender<AlignedBuf>,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel::<TreeMsg>(4);
        let (flushed_tx, flushed) = mpsc::channel();
        let handle = scope.spawn(move || {
            for msg in rx {
                match msg {
                    TreeMsg::Data(mut buf, n) => {
                        tree.feed(&buf.bytes_mut()[..n])?;
                        let _ = empty.send(buf);
                    }
                    TreeMsg::Zeros(n) => tree.feed_zeros(n)?,
                    TreeMsg::Flush(at) => {
                        tree.flush()?;
                        let _ = flushed_tx.send(at);
                    }
                }
            }
            Ok(())
        });
        Self {
            tx,
            flushed,
            handle,
        }
    }

    /// Waits for the thread; its error, or that it stopped.
    fn join(self) -> io::Result<()> {
        drop(self.tx);
        match self.handle.join() {
            Ok(r) => r.map_err(io::Error::other),
            Err(_) => Err(io::Error::other("the dm-verity tree thread panicked")),
        }
    }
}

/// Where the read-back hands what it hashed: the buffer pool, the tree (if any) and
/// the marks, each handed on only once the tree's level 0 is written as far as it,
/// so a caller that makes the slot durable and writes the mark down can resume both.
struct Sink<'scope, 'm> {
    tree: Option<TreeThread<'scope>>,
    empty: mpsc::SyncSender<AlignedBuf>,
    on_mark: &'m mut dyn FnMut(Mark),
    /// Marks waiting for the tree to catch up with them, oldest first.
    pending: std::collections::VecDeque<Mark>,
}

impl Sink<'_, '_> {
    fn send(&mut self, msg: TreeMsg) -> io::Result<()> {
        let Some(t) = &self.tree else { return Ok(()) };
        if t.tx.send(msg).is_ok() {
            return Ok(());
        }
        // The thread stopped: its own error says why.
        match self.tree.take() {
            Some(t) => t
                .join()
                .and(Err(io::Error::other("the dm-verity tree thread stopped"))),
            None => Ok(()),
        }
    }

    fn data(&mut self, buf: AlignedBuf, n: usize) -> io::Result<()> {
        if self.tree.is_none() {
            let _ = self.empty.send(buf);
            return Ok(());
        }
        self.send(TreeMsg::Data(buf, n))
    }

    fn zeros(&mut self, n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.send(TreeMsg::Zeros(n))
    }

    fn mark(&mut self, m: Mark) -> io::Result<()> {
        if self.tree.is_none() {
            (self.on_mark)(m);
            return Ok(());
        }
        self.pending.push_back(m);
        self.send(TreeMsg::Flush(m.len))?;
        self.deliver();
        Ok(())
    }

    /// Hands on the newest mark the tree has caught up with, without waiting.
    fn deliver(&mut self) {
        let Some(t) = &self.tree else { return };
        let Some(at) = t.flushed.try_iter().last() else {
            return;
        };
        let mut ready = None;
        while self.pending.front().is_some_and(|m| m.len <= at) {
            ready = self.pending.pop_front();
        }
        if let Some(m) = ready {
            (self.on_mark)(m);
        }
    }

    /// Waits for the tree to take everything (every mark is then caught up with), and
    /// hands on the last mark.
    fn finish(mut self) -> io::Result<()> {
        let Some(t) = self.tree.take() else {
            return Ok(());
        };
        t.join()?;
        if let Some(m) = self.pending.pop_back() {
            (self.on_mark)(m);
        }
        Ok(())
    }
}

/// The target as the area a dm-verity tree is written to, past the image.
pub(super) struct SlotArea<'a>(pub(super) &'a dyn TargetSlot);

impl Area for SlotArea<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_back_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_shared_at(buf, offset)
    }
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
        Hasher::new(),
        None,
        &mut |_| {},
    )
}

type ReadAt<'a> = dyn Fn(&mut [u8], u64) -> io::Result<()> + Sync + 'a;

fn hash_ranges<P: Progress>(
    read: &ReadAt<'_>,
    ranges: &[(u64, u64)],
    len: u64,
    mut h: P,
    tree: Option<&mut Builder<'_>>,
    on_mark: &mut dyn FnMut(Mark),
) -> io::Result<P::Out> {
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
    // One more buffer when the tree's thread holds one.
    let bufs = if tree.is_some() { 4 } else { 3 };
    let (empty_tx, empty_rx) = mpsc::sync_channel::<AlignedBuf>(bufs);
    for _ in 0..bufs {
        let _ = empty_tx.send(AlignedBuf::new(IO_CHUNK * 4));
    }
    std::thread::scope(|scope| {
        // Owned here, so an early return drops it and a reader blocked on a full
        // channel gets an error instead of holding the scope open.
        let full_rx = full_rx;
        let mut feed = Sink {
            tree: tree.map(|t| TreeThread::start(scope, t, empty_tx.clone())),
            empty: empty_tx,
            on_mark,
            pending: Default::default(),
        };
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
            hash_zeroes_marked(&mut h, start - pos, &mut feed)?;
            let mut off = start;
            while off < end {
                let (mut buf, n) = full_rx
                    .recv()
                    .map_err(|_| io::Error::other("read-back thread stopped"))??;
                h.update(&buf.bytes_mut()[..n]);
                feed.data(buf, n)?;
                off += n as u64;
                if let Some(m) = h.mark() {
                    feed.mark(m)?;
                }
            }
            pos = end;
        }
        hash_zeroes_marked(&mut h, len - pos, &mut feed)?;
        feed.finish()?;
        Ok(h.finish())
    })
}

/// Hashes `n` zeros, with a mark every few MiB: a hole can be most of a slot.
fn hash_zeroes_marked(h: &mut impl Progress, n: u64, feed: &mut Sink<'_, '_>) -> io::Result<()> {
    let mut fed = 0u64;
    let mut marks = Vec::new();
    let mut zeros_at_mark = 0u64;
    feed_zeroes(n, &mut |z| {
        h.update(z);
        fed += z.len() as u64;
        if fed.is_multiple_of(MARK_ZEROES) {
            if let Some(m) = h.mark() {
                marks.push((fed, m));
            }
        }
    });
    // The tree takes its zeros (as one digest repeated) up to each mark, then the mark.
    for (at, m) in marks {
        feed.zeros(at - zeros_at_mark)?;
        zeros_at_mark = at;
        feed.mark(m)?;
    }
    feed.zeros(n - zeros_at_mark)?;
    if let Some(m) = h.mark().filter(|_| n > 0) {
        feed.mark(m)?;
    }
    Ok(())
}
