//! Operations: one update at a time, run on its own thread with the Agent, watched
//! through a broadcast of typed events.
//!
//! An operation is registered (phase OPENING) before its payload is even opened, so
//! a second StartUpdate for another target is refused at once and one for the same
//! target gets the same id. Its id is the staging attempt id, so `state.json`,
//! history and logs all name it the same way across restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::policy::RebootStrategy;

/// Where an operation is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Opening,
    Writing,
    Verifying,
    Armed,
    Rebooting,
    Done,
}

/// A snapshot of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub id: String,
    pub phase: Phase,
    pub version: String,
    /// The payload's location.
    pub source: String,
    pub delta: bool,
    /// The reboot its starter asked for.
    pub reboot: RebootStrategy,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_fetched: u64,
    pub ops_done: u32,
    pub ops_total: u32,
    pub started: Option<SystemTime>,
}

impl Default for Operation {
    fn default() -> Self {
        Self {
            id: String::new(),
            phase: Phase::default(),
            version: String::new(),
            source: String::new(),
            delta: false,
            reboot: RebootStrategy::Never,
            bytes_done: 0,
            bytes_total: 0,
            bytes_fetched: 0,
            ops_done: 0,
            ops_total: 0,
            started: None,
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpOutcome {
    /// Staged and armed for the next boot.
    Armed,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    pub outcome: OpOutcome,
    pub version: String,
    pub from_version: String,
    pub reason: String,
    pub at: SystemTime,
    pub bytes_fetched: u64,
}

/// Progress inside the writing phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_fetched: u64,
    pub ops_done: u32,
    pub ops_total: u32,
    pub in_flight_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpEventKind {
    Snapshot(Operation),
    Phase(Phase),
    Progress(OpProgress),
    Result(OpResult),
}

/// One event of one operation, as watchers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpEvent {
    pub operation_id: String,
    pub at: SystemTime,
    pub kind: OpEventKind,
}

/// Events buffered per watcher; one that falls further behind gets a fresh snapshot.
const EVENT_BUFFER: usize = 1024;

#[derive(Debug)]
struct Op {
    key: String,
    snapshot: Operation,
    cancel: Arc<AtomicBool>,
    result: Option<OpResult>,
    /// The staging thread was started: a slot may have been touched.
    staging: bool,
}

#[derive(Debug, Default)]
struct Inner {
    current: Option<Op>,
    last: Option<Op>,
}

/// The running operation (if any), the last finished one, and the event stream.
#[derive(Debug)]
pub struct Ops {
    inner: Mutex<Inner>,
    events: broadcast::Sender<OpEvent>,
}

/// What [`Ops::begin`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// A new operation with this id and cancel flag.
    Started { id: String },
    /// The same target is already running.
    AlreadyRunning { id: String },
    /// Something else runs.
    Busy { id: String, version: String },
}

impl Default for Ops {
    fn default() -> Self {
        Self::new()
    }
}

impl Ops {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicked worker must not take the API down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<OpEvent> {
        self.events.subscribe()
    }

    /// Registers an operation for `key` (the resolved target) unless one runs.
    pub fn begin(&self, key: &str, id: String, snapshot: Operation) -> Begin {
        let mut g = self.lock();
        if let Some(op) = &g.current {
            return if op.key == key {
                Begin::AlreadyRunning {
                    id: op.snapshot.id.clone(),
                }
            } else {
                Begin::Busy {
                    id: op.snapshot.id.clone(),
                    version: op.snapshot.version.clone(),
                }
            };
        }
        let mut snapshot = snapshot;
        snapshot.id = id.clone();
        g.current = Some(Op {
            key: key.to_owned(),
            snapshot: snapshot.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
            result: None,
            staging: false,
        });
        drop(g);
        self.emit(&id, OpEventKind::Snapshot(snapshot));
        Begin::Started { id }
    }

    pub fn cancel_flag(&self, id: &str) -> Option<Arc<AtomicBool>> {
        let g = self.lock();
        g.current
            .as_ref()
            .filter(|o| o.snapshot.id == id)
            .map(|o| Arc::clone(&o.cancel))
    }

    /// Records that the operation's staging thread starts (it may touch the slot).
    pub fn staging_started(&self, id: &str) {
        let mut g = self.lock();
        if let Some(o) = g.current.as_mut().filter(|o| o.snapshot.id == id) {
            o.staging = true;
        }
    }

    /// Whether operation `id` got as far as staging (unknown ids: assume it did).
    pub fn reached_staging(&self, id: &str) -> bool {
        let g = self.lock();
        let op = match (&g.current, &g.last) {
            (Some(o), _) if o.snapshot.id == id => Some(o),
            (_, Some(o)) if o.snapshot.id == id => Some(o),
            _ => None,
        };
        op.is_none_or(|o| o.staging)
    }

    /// Asks the running operation to stop; returns its id.
    pub fn request_cancel(&self) -> Option<String> {
        let g = self.lock();
        g.current.as_ref().map(|o| {
            o.cancel.store(true, Ordering::SeqCst);
            o.snapshot.id.clone()
        })
    }

    pub fn current(&self) -> Option<Operation> {
        self.lock().current.as_ref().map(|o| o.snapshot.clone())
    }

    /// The running operation, else the last one if it ended armed (its snapshot keeps
    /// what the caller asked for, such as the reboot policy).
    pub fn current_or_armed(&self) -> Option<Operation> {
        let g = self.lock();
        g.current.as_ref().map(|o| o.snapshot.clone()).or_else(|| {
            g.last
                .as_ref()
                .filter(|o| {
                    o.result
                        .as_ref()
                        .is_some_and(|r| r.outcome == OpOutcome::Armed)
                })
                .map(|o| Operation {
                    phase: Phase::Armed,
                    ..o.snapshot.clone()
                })
        })
    }

    /// The snapshot (and result, once finished) of the current or last operation;
    /// `id` empty means the current one.
    pub fn find(&self, id: &str) -> Option<(Operation, Option<OpResult>)> {
        let g = self.lock();
        let op = match (&g.current, &g.last) {
            (Some(c), _) if id.is_empty() || c.snapshot.id == id => Some(c),
            (_, Some(l)) if !id.is_empty() && l.snapshot.id == id => Some(l),
            _ => None,
        };
        op.map(|o| (o.snapshot.clone(), o.result.clone()))
    }

    /// Updates the running operation's snapshot with `f` and broadcasts `kind`.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Operation), kind: Option<OpEventKind>) {
        {
            let mut g = self.lock();
            if let Some(op) = g.current.as_mut().filter(|o| o.snapshot.id == id) {
                f(&mut op.snapshot);
            }
        }
        if let Some(k) = kind {
            self.emit(id, k);
        }
    }

    /// Ends the running operation with its result.
    pub fn finish(&self, id: &str, result: OpResult) {
        {
            let mut g = self.lock();
            if g.current.as_ref().is_some_and(|o| o.snapshot.id == id) {
                if let Some(mut op) = g.current.take() {
                    op.snapshot.phase = Phase::Done;
                    op.result = Some(result.clone());
                    g.last = Some(op);
                }
            }
        }
        self.emit(id, OpEventKind::Phase(Phase::Done));
        self.emit(id, OpEventKind::Result(result));
    }

    fn emit(&self, id: &str, kind: OpEventKind) {
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(OpEvent {
            operation_id: id.to_owned(),
            at: crate::timefmt::now_system(),
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_at_a_time_and_idempotent() {
        let ops = Ops::new();
        let snap = Operation {
            version: "2.0".into(),
            ..Default::default()
        };
        let mut rx = ops.subscribe();
        assert_eq!(
            ops.begin("u1", "op1".into(), snap.clone()),
            Begin::Started { id: "op1".into() }
        );
        assert_eq!(
            ops.begin("u1", "op2".into(), snap.clone()),
            Begin::AlreadyRunning { id: "op1".into() }
        );
        assert_eq!(
            ops.begin("u2", "op3".into(), snap),
            Begin::Busy {
                id: "op1".into(),
                version: "2.0".into()
            }
        );
        ops.update("op1", |s| s.bytes_done = 7, None);
        assert_eq!(ops.current().map(|o| o.bytes_done), Some(7));
        assert_eq!(ops.request_cancel().as_deref(), Some("op1"));
        assert!(ops
            .cancel_flag("op1")
            .is_some_and(|f| f.load(Ordering::SeqCst)));
        ops.finish(
            "op1",
            OpResult {
                outcome: OpOutcome::Cancelled,
                version: String::new(),
                from_version: String::new(),
                reason: String::new(),
                at: crate::timefmt::now_system(),
                bytes_fetched: 0,
            },
        );
        assert!(ops.current().is_none());
        let (snap, result) = ops.find("op1").expect("last op is kept");
        assert_eq!(snap.phase, Phase::Done);
        assert!(result.is_some());
        assert!(ops.find("").is_none(), "nothing runs");
        // Snapshot first, then the phase change and the result.
        let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert!(matches!(kinds[0], OpEventKind::Snapshot(_)));
        assert!(matches!(kinds.last(), Some(OpEventKind::Result(_))));
        assert_eq!(
            ops.begin("u2", "op4".into(), Operation::default()),
            Begin::Started { id: "op4".into() }
        );
    }
}
