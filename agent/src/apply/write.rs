//! The writer: results written strictly in operation order on the calling thread;
//! ZERO and COPY done here, without passing bytes through the workers.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Condvar, Mutex};

use crate::blockio::{AlignedBuf, RangesReader};
use crate::hashio::HashingReader;
use crate::payload::manifest::{Manifest, OpKind, Operation};

use super::produce::{check_hash, cost, Produced, Sched};
use super::{ApplyError, Event, Options, Report, SourceSlot, TargetSlot, FETCH_TICK, IO_CHUNK};

/// The writer's side of the workers: their results, and the budget it gives back.
pub(super) struct Workers<'a> {
    pub(super) rx: &'a mpsc::Receiver<(usize, Result<Produced, ApplyError>)>,
    pub(super) sched: &'a Mutex<Sched>,
    pub(super) cond: &'a Condvar,
}

pub(super) fn write_in_order(
    manifest: &Manifest,
    source: Option<&dyn SourceSlot>,
    target: &mut dyn TargetSlot,
    opts: &Options<'_>,
    workers: &Workers<'_>,
    report: &mut Report,
    on_event: &mut dyn FnMut(Event),
) -> Result<(), ApplyError> {
    let &Workers { rx, sched, cond } = workers;
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
    let mut from = HashingReader::new(RangesReader::new(
        |b: &mut [u8], off| src.read_exact_at(b, off),
        op.src.iter().map(|e| (e.start * bs, e.blocks * bs)),
    ));
    'dst: for d in &op.dst {
        let (mut d_off, mut d_left) = (d.start * bs, d.blocks * bs);
        while d_left > 0 {
            let want = d_left.min(buf.len() as u64) as usize;
            let n = from
                .read(&mut buf[..want])
                .map_err(|source| ApplyError::SourceRead {
                    op: i,
                    kind,
                    source,
                })?;
            if n == 0 {
                break 'dst;
            }
            target
                .write_all_at(&buf[..n], d_off)
                .map_err(|source| ApplyError::TargetWrite {
                    op: i,
                    kind,
                    source,
                })?;
            d_off += n as u64;
            d_left -= n as u64;
        }
    }
    check_hash(i, op, from.finalize())
}
