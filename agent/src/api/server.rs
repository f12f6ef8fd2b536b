//! The listeners: the Unix socket (always) and TCP with mutual TLS (when configured),
//! each serving the agent's service plus the standard gRPC health and reflection
//! services; readiness and the watchdog for systemd.

use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::access::Policy;
use super::pb::update_agent_server::UpdateAgentServer;
use super::service::Service;
use crate::config::{ApiConfig, ApiLimits};
use crate::daemon::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("api.socket_group")]
    SocketGroup(#[source] super::access::AccessError),
    #[error("preparing the API socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("reading {key} {path}")]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr} (api.tcp_listen)")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS for api.tcp_listen")]
    Tls(#[source] tonic::transport::Error),
    #[error("reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
    #[error("listening on {addr} (metrics.listen)")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket: stale sockets are replaced, anything else at the path is not;
/// mode 0660 and the configured group before the first client can get in.
fn bind_unix(path: &Path, group: &str) -> Result<tokio::net::UnixListener, ServeError> {
    let io = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(io)?
        }
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    if !group.is_empty() {
        let gid = super::access::resolve_group(group).map_err(ServeError::SocketGroup)?;
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io(std::io::Error::from(e)))?;
    }
    Ok(listener)
}

fn read(key: &'static str, path: Option<&PathBuf>) -> Result<Vec<u8>, ServeError> {
    let path = path.cloned().unwrap_or_default();
    std::fs::read(&path).map_err(|source| ServeError::TlsFile { key, path, source })
}

/// Serves until `shutdown` resolves. Calls `ready` once every listener is bound.
pub async fn serve(
    daemon: Arc<Daemon>,
    policy: Policy,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(&str),
) -> Result<(), ServeError> {
    let cfg = daemon.cfg.api.clone();
    // One policy in front of every service: health and reflection answer only the
    // peers the agent's own service would.
    let gate = policy.interceptor();
    let service = Service::new(Arc::clone(&daemon), policy);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<UpdateAgentServer<Service>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(super::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServeError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;

    let unix = bind_unix(&cfg.socket, &cfg.socket_group)?;
    let tcp = bind_tcp(&cfg).await?;
    let where_ = match &tcp {
        Some((l, _)) => format!(
            "{} and {}",
            cfg.socket.display(),
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        ),
        None => cfg.socket.display().to_string(),
    };
    let metrics = bind_metrics(daemon.cfg.metrics.listen.as_deref()).await?;
    daemon.start();
    if let Some(l) = metrics {
        tokio::spawn(super::metrics_http::serve(l, Arc::clone(&daemon)));
    }
    ready(&where_);

    let router = |b: &mut Server| {
        use tonic::service::interceptor::InterceptedService as Gated;
        b.add_service(Gated::new(
            UpdateAgentServer::new(service.clone()),
            gate.clone(),
        ))
        .add_service(Gated::new(health_service.clone(), gate.clone()))
        .add_service(Gated::new(reflection_v1.clone(), gate.clone()))
        .add_service(Gated::new(reflection_v1alpha.clone(), gate.clone()))
    };
    run_listeners(router, unix, tcp, &cfg.limits, shutdown).await?;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// The TCP listener and its mutual-TLS settings, when `api.tcp_listen` asks for one.
async fn bind_tcp(
    cfg: &ApiConfig,
) -> Result<Option<(tokio::net::TcpListener, ServerTlsConfig)>, ServeError> {
    let Some(addr) = &cfg.tcp_listen else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Tcp {
            addr: addr.clone(),
            source,
        })?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("api.tls_cert", cfg.tls_cert.as_ref())?,
            read("api.tls_key", cfg.tls_key.as_ref())?,
        ))
        .client_ca_root(Certificate::from_pem(read(
            "api.tls_client_ca",
            cfg.tls_client_ca.as_ref(),
        )?))
        .client_auth_optional(false)
        // A client that connects and says nothing is dropped, not kept.
        .timeout(Duration::from_secs(cfg.limits.handshake_timeout_secs));
    Ok(Some((l, tls)))
}

/// The metrics listener, when `metrics.listen` asks for one.
async fn bind_metrics(addr: Option<&str>) -> Result<Option<tokio::net::TcpListener>, ServeError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    tokio::net::TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| ServeError::Metrics {
            addr: addr.to_owned(),
            source,
        })
}

/// Serves the routes `router` adds on the socket and on TCP (if bound) until
/// `shutdown` resolves, with the connection caps of `limits`.
async fn run_listeners(
    router: impl Fn(&mut Server) -> Router,
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, ServerTlsConfig)>,
    limits: &ApiLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // One shutdown signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Peers that vanished without closing are found by HTTP/2 pings and dropped.
    let builder = || {
        Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
    };
    let unix_server = router(&mut builder()).serve_with_incoming_shutdown(
        super::listen::unix_incoming(
            unix,
            super::listen::UnixCaps {
                total: limits.max_connections,
                per_uid: limits.max_connections_per_uid,
            },
        ),
        stopped(stop_rx.clone()),
    );
    match tcp {
        Some((listener, tls)) => {
            let mut b = builder().tls_config(tls).map_err(ServeError::Tls)?;
            let tcp_server = router(&mut b).serve_with_incoming_shutdown(
                super::listen::tcp_incoming(listener, limits.max_connections, "API TCP listener"),
                stopped(stop_rx),
            );
            let (a, b) = tokio::join!(unix_server, tcp_server);
            a.and(b).map_err(ServeError::Serve)?;
        }
        None => unix_server.await.map_err(ServeError::Serve)?,
    }
    Ok(())
}

/// Tells systemd we are up, and feeds its watchdog from the runtime (a wedged
/// runtime stops the feeding and systemd restarts us). Does nothing outside systemd.
pub fn notify_ready(where_: &str) {
    let status = format!("serving on {where_}");
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
    );
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}
