//! The `updateagent.v1.UpdateAgent` service: checks access, turns the request into
//! the daemon's terms, calls the daemon and turns its answer into protobuf.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::access::{Need, Policy};
use super::convert::{self, check_source, start_source};
use super::limits::Watchers;
use super::pb::update_event::Kind;
use super::{pb, status, ApiError};
use crate::daemon::{Daemon, DaemonError, OpEvent};
use crate::policy::RebootStrategy;

/// The tonic service (cheap to clone: one shared daemon).
#[derive(Debug, Clone)]
pub struct Service {
    d: Arc<Daemon>,
    policy: Policy,
    /// WatchUpdate streams open, in all and per peer.
    watchers: Arc<Watchers>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::UpdateEvent, Status>> + Send>>;

impl Service {
    pub fn new(d: Arc<Daemon>, policy: Policy) -> Self {
        let limits = &d.cfg.api.limits;
        let watchers = Watchers::new(limits.max_watchers, limits.max_watchers_per_peer);
        Self {
            d,
            policy,
            watchers: Arc::new(watchers),
        }
    }
}

#[tonic::async_trait]
impl pb::update_agent_server::UpdateAgent for Service {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        self.policy.check(&req, Need::Read)?;
        // Read on the runtime's thread: no lock, no network, no path a caller chose,
        // only the agent's own small files and the bootloader's block. A hop to the
        // blocking pool cost 1.2-2.3x the CPU per call and the p99 target
        // (docs/benchmarks.md, "The API under attack").
        let s = self.d.status().map_err(ApiError::from)?;
        Ok(Response::new(status::from_daemon(
            &self.d.cfg.compatible,
            self.d.layout(),
            s,
        )))
    }

    async fn check_for_update(
        &self,
        req: Request<pb::CheckForUpdateRequest>,
    ) -> Result<Response<pb::CheckForUpdateResponse>, Status> {
        // Readers may ask about versions and channels of the release server; a URL
        // or a path makes the root daemon fetch or open what the caller names, which
        // is an admin's right.
        let need = match &req.get_ref().source {
            Some(pb::check_for_update_request::Source::Url(_)) => Need::Change,
            _ => Need::Read,
        };
        self.policy.check(&req, need).map_err(|e| match e {
            ApiError::PermissionDenied(why) if need == Need::Change => ApiError::PermissionDenied(
                format!("{why}; readers may check a version or a channel, not a url"),
            ),
            e => e,
        })?;
        let c = self
            .d
            .check(check_source(req.into_inner().source))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CheckForUpdateResponse {
            available: c.reason.is_empty(),
            version: c.version,
            running_version: c.running_version,
            url: c.url,
            delta: c.delta,
            download_bytes: c.download_bytes,
            reason: c.reason,
        }))
    }

    async fn start_update(
        &self,
        req: Request<pb::StartUpdateRequest>,
    ) -> Result<Response<pb::StartUpdateResponse>, Status> {
        let caller = self.policy.check(&req, Need::Change)?;
        let r = req.into_inner();
        let reboot = match pb::RebootPolicy::try_from(r.reboot) {
            Ok(pb::RebootPolicy::Unspecified | pb::RebootPolicy::Never) => RebootStrategy::Never,
            Ok(pb::RebootPolicy::Immediate) => RebootStrategy::Immediate,
            Ok(pb::RebootPolicy::InWindow) => match self.d.in_window_strategy() {
                Some(s) => s,
                None => return Err(ApiError::InvalidArgument {
                    field: "reboot",
                    why: "IN_WINDOW needs maintenance windows ([[auto.windows]] in agent.toml), which this node does not have; use NEVER and reboot in your window".into(),
                }
                .into()),
            },
            Err(_) => {
                return Err(ApiError::InvalidArgument {
                    field: "reboot",
                    why: format!("{} is not a RebootPolicy", r.reboot),
                }
                .into())
            }
        };
        let target = self
            .d
            .resolve("version", start_source(r.source))
            .map_err(ApiError::from)?;
        let started = self
            .d
            .begin(target, r.allow_downgrade, reboot, &caller.to_string())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::StartUpdateResponse {
            operation_id: started.operation_id,
            already_running: started.already_running,
        }))
    }

    type WatchUpdateStream = EventStream;

    async fn watch_update(
        &self,
        req: Request<pb::WatchUpdateRequest>,
    ) -> Result<Response<Self::WatchUpdateStream>, Status> {
        let caller = self.policy.check(&req, Need::Read)?;
        let slot = self.watchers.admit(&caller.peer_key())?;
        let want = req.into_inner().operation_id;
        let d = Arc::clone(&self.d);
        // Subscribe before looking, so nothing between the two is missed.
        let rx = d.subscribe();
        let first = d.find(&want);
        if !want.is_empty() && first.is_none() {
            return Err(ApiError::from(DaemonError::UnknownOperation(want)).into());
        }
        let (tx, out) = tokio::sync::mpsc::channel::<Result<pb::UpdateEvent, Status>>(64);
        tokio::spawn(async move {
            // Held until the stream ends, however it ends.
            let _slot = slot;
            // A watcher that went away ends here at once, even while nothing happens;
            // the update never notices.
            tokio::select! {
                () = forward(first, rx, &tx, &d) => {}
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let caller = self.policy.check(&req, Need::Change)?;
        let slot = self
            .d
            .cancel(&caller.to_string())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CancelResponse {
            slot: slot.map(|s| s.letter().to_owned()).unwrap_or_default(),
        }))
    }

    async fn reboot(
        &self,
        req: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::RebootResponse>, Status> {
        let caller = self.policy.check(&req, Need::Change)?;
        let r = req.into_inner();
        let method = match pb::RebootMethod::try_from(r.method) {
            Ok(pb::RebootMethod::Unspecified) => None,
            Ok(m) => convert::reboot_method_from(m),
            Err(_) => {
                return Err(ApiError::from(DaemonError::InvalidTarget {
                    field: "method",
                    why: format!("{} is not a RebootMethod", r.method),
                })
                .into())
            }
        };
        let done = self
            .d
            .reboot(r.force, method, &caller.to_string())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RebootResponse {
            method: convert::reboot_method(done.method) as i32,
            fallback: done.fallback.unwrap_or_default(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let caller = self.policy.check(&req, Need::Change)?;
        let r = self
            .d
            .rollback(&caller.to_string())
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RollbackResponse {
            slot: r.slot.map(|s| s.letter().to_owned()).unwrap_or_default(),
            version: r.version.unwrap_or_default(),
        }))
    }

    async fn mark_good(
        &self,
        req: Request<pb::MarkGoodRequest>,
    ) -> Result<Response<pb::MarkGoodResponse>, Status> {
        let caller = self.policy.check(&req, Need::Change)?;
        let committed = self
            .d
            .mark_good(&caller.to_string())
            .await
            .map_err(ApiError::from)?;
        let (slot, version) = match committed {
            Some((slot, version)) => (slot.letter().to_owned(), version),
            None => (String::new(), String::new()),
        };
        Ok(Response::new(pb::MarkGoodResponse { slot, version }))
    }

    async fn list_history(
        &self,
        req: Request<pb::ListHistoryRequest>,
    ) -> Result<Response<pb::ListHistoryResponse>, Status> {
        self.policy.check(&req, Need::Read)?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => 50,
            n => n.min(crate::history::MAX_ENTRIES as u32) as usize,
        };
        let start = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<usize>()
                .map_err(|_| ApiError::InvalidArgument {
                    field: "page_token",
                    why: format!("{:?} is not a token from ListHistory", r.page_token),
                })?
        };
        let mut all = self.d.history().map_err(ApiError::from)?;
        all.reverse();
        let end = (start + size).min(all.len());
        let entries = all
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(status::history_entry)
            .collect();
        let next_page_token = if end < all.len() {
            end.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListHistoryResponse {
            entries,
            next_page_token,
        }))
    }
}

type FoundOp = Option<(crate::daemon::Operation, Option<crate::daemon::OpResult>)>;

/// Sends a watcher the operation's snapshot, then its events until its result.
async fn forward(
    first: FoundOp,
    mut rx: tokio::sync::broadcast::Receiver<OpEvent>,
    tx: &tokio::sync::mpsc::Sender<Result<pb::UpdateEvent, Status>>,
    d: &Daemon,
) {
    let event = |id: &str, kind| pb::UpdateEvent {
        operation_id: id.to_owned(),
        at: Some(status::now()),
        kind: Some(kind),
    };
    // The snapshot, then the result if it ended; false once the watcher is gone or
    // the result was sent.
    let catch_up = |snap: crate::daemon::Operation, result: Option<crate::daemon::OpResult>| {
        let id = snap.id.clone();
        let first = event(&id, Kind::Snapshot(convert::operation(&snap)));
        let last = result.map(|r| event(&id, Kind::Result(convert::result(&r))));
        async move {
            if tx.send(Ok(first)).await.is_err() {
                return false;
            }
            if let Some(r) = last {
                let _ = tx.send(Ok(r)).await;
                return false;
            }
            true
        }
    };
    let mut target = first.as_ref().map(|(s, _)| s.id.clone());
    if let Some((snap, result)) = first {
        if !catch_up(snap, result).await {
            return;
        }
    }
    loop {
        match rx.recv().await {
            Ok(ev) => {
                let id = target.get_or_insert_with(|| ev.operation_id.clone());
                if ev.operation_id != *id {
                    continue;
                }
                let terminal = matches!(ev.kind, crate::daemon::OpEventKind::Result(_));
                // A watcher that went away ends here; the update never notices.
                if tx.send(Ok(convert::event(&ev))).await.is_err() || terminal {
                    return;
                }
            }
            Err(RecvError::Lagged(_)) => {
                let Some(id) = target.clone() else { continue };
                let Some((snap, result)) = d.find(&id) else {
                    return;
                };
                if !catch_up(snap, result).await {
                    return;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
