//! FleetLock client: the HTTP protocol Zincati speaks to a reboot manager, so that
//! at most N nodes of a group reboot at once. Two calls, both POSTs of
//! `{"client_params": {"id": ..., "group": ...}}` with the `fleet-lock-protocol: true`
//! header, both idempotent on the server:
//!
//! * `/v1/pre-reboot` takes (or confirms) a reboot slot: 200 means reboot now;
//! * `/v1/steady-state` releases it (200 also when nothing was held).
//!
//! A refusal carries `{"kind": ..., "value": ...}`. Each call here is one attempt;
//! the daemon's loop retries with backoff. Because release is idempotent, the agent
//! never needs to remember whether it holds a slot: it releases at every start until
//! the server says 200, then whenever a boot ends in a commit or a rollback.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum FleetLockError {
    #[error("FleetLock server {url}: {kind}: {value}")]
    Refused {
        url: String,
        status: u16,
        kind: String,
        value: String,
    },
    #[error("FleetLock server {url} answered {status} without a FleetLock error body")]
    BadResponse { url: String, status: u16 },
    #[error("FleetLock server {url} unreachable")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
}

#[derive(Debug, Serialize)]
struct Body<'a> {
    client_params: ClientParams<'a>,
}

#[derive(Debug, Serialize)]
struct ClientParams<'a> {
    id: &'a str,
    group: &'a str,
}

#[derive(Debug, Deserialize)]
struct Refusal {
    kind: String,
    value: String,
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    group: String,
    id: String,
    agent: ureq::Agent,
}

/// The node's FleetLock id: derived from the machine id in a domain of our own, the
/// way systemd's app-specific ids are, so the machine id itself never leaves the node.
pub fn node_id(machine_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"update-agent fleetlock id\0");
    h.update(machine_id.trim().as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// An HTTP agent for short calls to the fleet's services (FleetLock, Prometheus):
/// `timeout` bounds a whole call, body included; statuses are the caller's to read;
/// proxy from the environment.
pub fn short_calls(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(ureq::Proxy::try_from_env())
        .user_agent(concat!("update-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

impl Client {
    pub fn new(base: &str, group: &str, id: String, timeout: Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            group: group.to_owned(),
            id,
            agent: short_calls(timeout),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Takes a reboot slot (or confirms the one this node holds).
    pub fn pre_reboot(&self) -> Result<(), FleetLockError> {
        self.post("pre-reboot")
    }

    /// Releases this node's slot, if it holds one.
    pub fn steady_state(&self) -> Result<(), FleetLockError> {
        self.post("steady-state")
    }

    fn post(&self, op: &str) -> Result<(), FleetLockError> {
        let url = format!("{}/v1/{op}", self.base);
        let body = Body {
            client_params: ClientParams {
                id: &self.id,
                group: &self.group,
            },
        };
        let transport = |source| FleetLockError::Transport {
            url: url.clone(),
            source: Box::new(source),
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = self
            .agent
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(transport)?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(());
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        match serde_json::from_str::<Refusal>(&text) {
            Ok(r) => Err(FleetLockError::Refused {
                url,
                status,
                kind: r.kind,
                value: r.value,
            }),
            Err(_) => Err(FleetLockError::BadResponse { url, status }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_do_not_reveal_the_machine_id() {
        let m = "0123456789abcdef0123456789abcdef";
        let id = node_id(m);
        assert_eq!(id, node_id(&format!("{m}\n")));
        assert_eq!(id.len(), 32);
        assert_ne!(id, m);
        assert_ne!(id, node_id("fedcba9876543210fedcba9876543210"));
    }
}
