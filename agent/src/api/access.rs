//! Who may do what.
//!
//! Unix socket: the file's mode (0660, group `update-agent`) decides who may connect
//! at all; every peer that connects may read. Changing things needs uid 0 or a group
//! from `api.admin_groups`, judged from the peer's credentials (`SO_PEERCRED`, and the
//! supplementary groups of that process).
//!
//! TCP: the TLS layer admits only clients with a certificate from `api.tls_client_ca`;
//! a client whose certificate names no identity from `api.tls_allowed_clients` (subject
//! CN, DNS or URI SAN) is refused every call.

use std::path::Path;

use tonic::transport::server::UdsConnectInfo;

use super::ApiError;
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
    proc_dir: std::path::PathBuf,
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
            proc_dir: "/proc".into(),
        })
    }

    /// Decides a call; `Ok` names the caller.
    pub fn check<T>(&self, req: &tonic::Request<T>, need: Need) -> Result<Caller, ApiError> {
        if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
            let Some(cred) = info.peer_cred else {
                return Err(ApiError::PermissionDenied(
                    "the socket peer's credentials are unknown".into(),
                ));
            };
            let caller = Caller::Local {
                uid: cred.uid(),
                pid: cred.pid(),
            };
            if need == Need::Read || cred.uid() == 0 {
                return Ok(caller);
            }
            let mut groups = vec![cred.gid()];
            if let Some(pid) = cred.pid() {
                groups.extend(supplementary_groups(&self.proc_dir, pid));
            }
            if groups.iter().any(|g| self.admin_gids.contains(g)) {
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

/// Supplementary groups of a process, from `/proc/PID/status`. The connection is
/// open while this runs, so the process (and its pid) is still the peer's.
fn supplementary_groups(proc_dir: &Path, pid: i32) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("status")) else {
        return Vec::new();
    };
    text.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A certificate's subject CNs and DNS/URI subject alternative names.
pub fn identities(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => ids.push((*d).to_owned()),
                GeneralName::URI(u) => ids.push((*u).to_owned()),
                _ => {}
            }
        }
    }
    ids
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

    #[test]
    fn supplementary_groups_from_proc() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("77")).expect("mkdir");
        std::fs::write(
            d.path().join("77/status"),
            "Name:\tx\nGid:\t5\t5\t5\t5\nGroups:\t10 27 1001 \n",
        )
        .expect("write");
        assert_eq!(supplementary_groups(d.path(), 77), vec![10, 27, 1001]);
        assert!(supplementary_groups(d.path(), 78).is_empty());
    }
}
