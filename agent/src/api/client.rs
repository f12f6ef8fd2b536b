//! Connecting to the agent: over its Unix socket (updatectl's default), or over TCP
//! with mutual TLS (fleet controllers, the VM lab).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb::update_agent_client::UpdateAgentClient;

pub type Client = UpdateAgentClient<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach update-agent at {path} (is update-agent.service running? see `systemctl status update-agent`)")]
    Unix {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The handshake (TCP, TLS, HTTP/2) did not finish in time: a host that drops
    /// packets, or a proxy or NAT that accepts for a host that is not there yet.
    #[error("cannot reach update-agent at {address}: no answer within {after:?}")]
    Timeout { address: String, after: Duration },
    #[error("cannot reach update-agent at {address}")]
    Tcp {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Connects over the Unix socket at `path` (the URI is a placeholder gRPC needs).
pub async fn unix(path: &Path) -> Result<Client, ConnectError> {
    let p = path.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|source| ConnectError::Unix {
            path: path.to_owned(),
            source,
        })?;
    Ok(UpdateAgentClient::new(channel))
}

/// Client side of mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA that signed the agent's server certificate.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to expect in the server certificate (default: the address's host).
    pub server_name: Option<String>,
}

/// Connects to `address` (`https://host:port`) with a client certificate, giving up
/// after `within` (a fleet controller must not hang on one unreachable node).
pub async fn tls(
    address: &str,
    files: &TlsFiles,
    within: Duration,
) -> Result<Client, ConnectError> {
    tls_channel(address, files, within)
        .await
        .map(UpdateAgentClient::new)
}

/// The channel [`tls`] makes, for the standard services beside ours (health,
/// reflection).
pub async fn tls_channel(
    address: &str,
    files: &TlsFiles,
    within: Duration,
) -> Result<Channel, ConnectError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| ConnectError::Read {
            path: path.clone(),
            source,
        })
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca)?))
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(name) = &files.server_name {
        tls = tls.domain_name(name.clone());
    }
    let err = |source| ConnectError::Tcp {
        address: address.to_owned(),
        source,
    };
    let endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(err)?
        .tls_config(tls)
        .map_err(err)?;
    // The whole handshake, not only TCP's: through QEMU's user network (or a NAT) the
    // TCP connect succeeds at once and the TLS handshake is what waits.
    let channel = tokio::time::timeout(within, endpoint.connect())
        .await
        .map_err(|_| ConnectError::Timeout {
            address: address.to_owned(),
            after: within,
        })?
        .map_err(err)?;
    Ok(channel)
}
