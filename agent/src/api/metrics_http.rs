//! `GET /metrics` over plain HTTP on `metrics.listen` (meant for 127.0.0.1 or a node
//! address a Prometheus agent scrapes). Read-only and rendered per request; any other
//! path is 404 and any other method 405.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_stream::StreamExt as _;

use crate::daemon::Daemon;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn answer(d: &Daemon, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status, text: String| {
        let mut r = Response::new(Full::new(Bytes::from(text)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "see /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match d.metrics() {
        Ok(text) => {
            let mut r = plain(StatusCode::OK, text);
            if let Ok(v) = hyper::header::HeaderValue::from_str(CONTENT_TYPE) {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}\n", crate::update::error_chain(&e)),
        ),
    }
}

/// Serves `/metrics`: at most `metrics.max_connections` clients at once (the rest
/// wait in the kernel's backlog), one request per connection, and each connection
/// closed after `metrics.timeout_secs` whatever it is doing (a client that sends
/// slowly, pipelines requests or never reads the answer holds nothing for longer).
pub async fn serve(listener: tokio::net::TcpListener, d: Arc<Daemon>) {
    let timeout = Duration::from_secs(d.cfg.metrics.timeout_secs);
    if let Ok(a) = listener.local_addr() {
        if !a.ip().is_loopback() {
            tracing::warn!(address = %a, "metrics.listen is not a loopback address: anyone who can reach it reads this node's update state (plain HTTP, no authentication)");
        }
    }
    let mut incoming =
        super::listen::tcp_incoming(listener, d.cfg.metrics.max_connections, "metrics endpoint");
    while let Some(Ok(stream)) = incoming.next().await {
        let d = Arc::clone(&d);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let d = Arc::clone(&d);
                async move {
                    // Rendering reads state files: off the runtime's thread.
                    let r = tokio::task::spawn_blocking(move || answer(&d, &req))
                        .await
                        .unwrap_or_else(|_| {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"internal error\n")));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            r
                        });
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(timeout, conn).await;
        });
    }
}
