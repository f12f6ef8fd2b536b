//! `GET /metrics` over plain HTTP on `metrics.listen` (meant for 127.0.0.1 or a node
//! address a Prometheus agent scrapes). Read-only and rendered per request; any other
//! path is 404 and any other method 405.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::service::Daemon;

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

pub async fn serve(listener: tokio::net::TcpListener, d: Arc<Daemon>) {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                pause = std::time::Duration::from_millis(100);
                stream
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
                continue;
            }
        };
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
            // A client that never finishes its request is dropped, not kept forever.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
