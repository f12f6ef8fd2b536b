//! Who may do what.
//!
//! Unix socket: the file's mode (0660, group `update-agent`) decides who may connect
//! at all; every peer that connects may read. Changing things needs uid 0 or a group
//! from `api.admin_groups`, judged from the credentials the kernel recorded at
//! connect(2) (`SO_PEERCRED` and `SO_PEERGROUPS`, read once at accept: listen.rs).
//!
//! TCP: the TLS layer admits only clients with a certificate from `api.tls_client_ca`;
//! a client whose certificate names no identity from `api.tls_allowed_clients` (URI or
//! DNS SANs; the subject CN only for a certificate without SANs) is refused every call
//! of every service, health and reflection included ([`Policy::interceptor`]).

use super::error::ApiError;
use super::listen::LocalPeer;
use crate::config::ApiConfig;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Change,
}

/// Who called, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Local { uid: u32, pid: Option<i32> },
    Remote { identity: String },
}

impl Caller {
    /// Whose share of per-peer limits a call counts against: a uid or a certificate
    /// identity (not a pid: one user's processes share one share).
    pub fn peer_key(&self) -> String {
        match self {
            Self::Local { uid, .. } => format!("uid {uid}"),
            Self::Remote { identity } => format!("client {identity}"),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local { uid, pid } => match pid {
                Some(p) => write!(f, "uid {uid} (pid {p})"),
                None => write!(f, "uid {uid}"),
            },
            Self::Remote { identity } => write!(f, "client {identity}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("api.admin_groups: no group named {0:?}")]
    UnknownGroup(String),
    #[error("api.admin_groups: looking up group {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Policy {
    admin_gids: Vec<u32>,
    allowed_clients: Vec<String>,
}

/// A group given by name or number.
pub fn resolve_group(name: &str) -> Result<u32, AccessError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(AccessError::UnknownGroup(name.to_owned())),
        Err(source) => Err(AccessError::Lookup {
            name: name.to_owned(),
            source,
        }),
    }
}

impl Policy {
    pub fn new(cfg: &ApiConfig) -> Result<Self, AccessError> {
        Ok(Self {
            admin_gids: cfg
                .admin_groups
                .iter()
                .map(|g| resolve_group(g))
                .collect::<Result<_, _>>()?,
            allowed_clients: cfg.tls_allowed_clients.clone(),
        })
    }

    /// The read check as a tonic interceptor, put in front of every service of a
    /// listener (ours, health, reflection): no call of any service reaches a peer the
    /// policy does not admit.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
        let policy = self.clone();
        move |req: tonic::Request<()>| {
            policy.check(&req, Need::Read)?;
            Ok(req)
        }
    }

    /// Decides a call; `Ok` names the caller.
    pub fn check<T>(&self, req: &tonic::Request<T>, need: Need) -> Result<Caller, ApiError> {
        if let Some(peer) = req.extensions().get::<LocalPeer>() {
            let caller = Caller::Local {
                uid: peer.uid,
                pid: peer.pid,
            };
            if need == Need::Read || peer.uid == 0 {
                return Ok(caller);
            }
            let mut groups = std::iter::once(&peer.gid).chain(&peer.groups);
            if groups.any(|g| self.admin_gids.contains(g)) {
                return Ok(caller);
            }
            return Err(ApiError::PermissionDenied(format!(
                "{caller} may read but not change updates: only root or a member of \
                 api.admin_groups may (run updatectl with sudo)"
            )));
        }
        if let Some(certs) = req.peer_certs() {
            let ids = certs
                .first()
                .map(|c| identities(c.as_ref()))
                .unwrap_or_default();
            return match ids.iter().find(|id| self.allowed_clients.contains(id)) {
                Some(id) => Ok(Caller::Remote {
                    identity: id.clone(),
                }),
                None => Err(ApiError::PermissionDenied(format!(
                    "client certificate identities {ids:?} are not in api.tls_allowed_clients"
                ))),
            };
        }
        Err(ApiError::PermissionDenied(
            "no peer credentials and no client certificate".into(),
        ))
    }
}

/// A certificate's identities: its URI SANs (SPIFFE IDs and the like) and DNS SANs.
/// The subject CN counts only for a certificate with no subject alternative names at
/// all, as RFC 6125 has it: a CA that writes SANs vouches for those, and a CN beside
/// them is not checked by every CA. A certificate whose SAN extension cannot be parsed
/// has no identity.
pub fn identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(u) => Some((*u).to_owned()),
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(resolve_group("4242").expect("number"), 4242);
        assert_eq!(resolve_group("root").expect("root exists"), 0);
        assert!(matches!(
            resolve_group("no-such-group-here"),
            Err(AccessError::UnknownGroup(_))
        ));
    }
}
