//! The signed root of trust: which keys may sign releases (payload manifests) and
//! channel documents, how many of them must, and which keys may replace the root
//! itself. Our own small format with the semantics of TUF's root.json (versioned,
//! expiring, threshold-signed, rotated by a chain in which each link is signed by a
//! threshold of the old root's keys and of its own), without the rest of a TUF
//! repository: payloads and channels are already signed documents of their own.
//!
//! The file is the signed envelope of [`super::envelope`] in the `Root` domain; its
//! body:
//!
//! ```json
//! {"format": "update-agent.root.v1", "version": 2, "expires": 1830000000,
//!  "keys": {"<hex fingerprint>": "<base64 of the 32-byte ed25519 key>"},
//!  "roles": {"root":     {"keys": ["<fingerprint>", ...], "threshold": 2},
//!            "releases": {"keys": [...], "threshold": 1},
//!            "channels": {"keys": [...], "threshold": 1}}}
//! ```

use std::collections::BTreeMap;

use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::envelope::{self, EnvelopeError};
use crate::payload::sign::{fingerprint, short, Domain, PublisherKey, TrustedKeys};
use crate::payload::TrustError;

pub const FORMAT: &str = "update-agent.root.v1";
/// Where the image ships its root of trust.
pub const DEFAULT_ROOT: &str = "/usr/share/update-agent/root.json";
/// A root is a few keys; anything larger is not one (it is read from the network
/// before its signatures are checked).
pub const MAX_LEN: u64 = 64 << 10;
/// Most keys a root may name.
pub const MAX_KEYS: usize = 64;

/// A role: the keys that act for it and how many must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Hex fingerprints (sha256 of the raw key), each in [`RootBody::keys`].
    pub keys: Vec<String>,
    pub threshold: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    pub root: Role,
    pub releases: Role,
    pub channels: Role,
}

/// What a root says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootBody {
    pub format: String,
    pub version: u64,
    /// Seconds since the epoch.
    pub expires: u64,
    /// Every key of every role: hex fingerprint → base64 of the raw key.
    pub keys: BTreeMap<String, String>,
    pub roles: Roles,
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("root document")]
    Envelope(#[source] EnvelopeError),
    #[error("root document body is not valid JSON of the expected shape")]
    Malformed(#[source] serde_json::Error),
    #[error("root document has format {found:?}; this agent reads {FORMAT:?}")]
    Format { found: String },
    #[error("root version {version}: key {fingerprint} is not a valid ed25519 key or does not match its fingerprint")]
    BadKey { version: u64, fingerprint: String },
    #[error("root version {version} names {count} keys, more than {MAX_KEYS}")]
    TooManyKeys { version: u64, count: usize },
    #[error(
        "root version {version}: role {role} names key {fingerprint}, which is not in its key list"
    )]
    UnknownKey {
        version: u64,
        role: &'static str,
        fingerprint: String,
    },
    #[error("root version {version}: role {role} needs {threshold} of {keys} keys; a threshold must be 1 to the number of keys")]
    BadThreshold {
        version: u64,
        role: &'static str,
        threshold: usize,
        keys: usize,
    },
    #[error("root version {version} is not signed by enough of the {by} root's keys")]
    Signatures {
        version: u64,
        by: &'static str,
        #[source]
        source: TrustError,
    },
    #[error("root version {found} cannot follow version {current}: roots are followed one version at a time")]
    NotNext { current: u64, found: u64 },
    #[error("root version {version} expired at {expires} (now {now}); the publisher must sign a new root")]
    Expired {
        version: u64,
        expires: u64,
        now: u64,
    },
}

/// A root whose signatures have been checked.
#[derive(Debug, Clone)]
pub struct Root {
    body: RootBody,
    /// The document's bytes, kept to persist it exactly as verified.
    bytes: Vec<u8>,
}

impl Root {
    /// A root trusted by where it came from (shipped in the image, or persisted by
    /// this node after verifying it): it must still be well formed and signed by a
    /// threshold of its own root keys. Expiry is not checked here (see [`Root::current`]).
    pub fn open_trusted(bytes: &[u8]) -> Result<Self, RootError> {
        let (root, body, sigs) = Self::parse(bytes)?;
        root.role(RoleName::Root)
            .verify_as(Domain::Root, &body, &sigs)
            .map_err(|source| RootError::Signatures {
                version: root.body.version,
                by: "its own",
                source,
            })?;
        Ok(root)
    }

    /// The next root of the chain: version exactly one more, signed by a threshold of
    /// this root's root keys and of its own (so a rotation needs the old keys, and the
    /// new keys prove they are held).
    pub fn open_next(&self, bytes: &[u8]) -> Result<Self, RootError> {
        let (next, body, sigs) = Self::parse(bytes)?;
        let version = next.body.version;
        if version != self.body.version + 1 {
            return Err(RootError::NotNext {
                current: self.body.version,
                found: version,
            });
        }
        for (by, keys) in [
            ("previous", self.role(RoleName::Root)),
            ("its own", next.role(RoleName::Root)),
        ] {
            keys.verify_as(Domain::Root, &body, &sigs)
                .map_err(|source| RootError::Signatures {
                    version,
                    by,
                    source,
                })?;
        }
        Ok(next)
    }

    fn parse(
        bytes: &[u8],
    ) -> Result<(Self, Vec<u8>, Vec<crate::payload::sign::SignatureEntry>), RootError> {
        let (body_bytes, sigs) = envelope::open(bytes, MAX_LEN).map_err(RootError::Envelope)?;
        let body: RootBody = serde_json::from_slice(&body_bytes).map_err(RootError::Malformed)?;
        if body.format != FORMAT {
            return Err(RootError::Format { found: body.format });
        }
        let root = Self {
            body,
            bytes: bytes.to_vec(),
        };
        root.validate()?;
        Ok((root, body_bytes, sigs))
    }

    fn validate(&self) -> Result<(), RootError> {
        let version = self.body.version;
        if self.body.keys.len() > MAX_KEYS {
            return Err(RootError::TooManyKeys {
                version,
                count: self.body.keys.len(),
            });
        }
        for (fp, key) in &self.body.keys {
            if decode_key(fp, key).is_none() {
                return Err(RootError::BadKey {
                    version,
                    fingerprint: fp.clone(),
                });
            }
        }
        for (role, r) in self.roles() {
            if let Some(fp) = r.keys.iter().find(|k| !self.body.keys.contains_key(*k)) {
                return Err(RootError::UnknownKey {
                    version,
                    role,
                    fingerprint: fp.clone(),
                });
            }
            if r.threshold == 0 || r.threshold > r.keys.len() {
                return Err(RootError::BadThreshold {
                    version,
                    role,
                    threshold: r.threshold,
                    keys: r.keys.len(),
                });
            }
        }
        Ok(())
    }

    fn roles(&self) -> [(&'static str, &Role); 3] {
        let r = &self.body.roles;
        [
            ("root", &r.root),
            ("releases", &r.releases),
            ("channels", &r.channels),
        ]
    }

    /// The keys of `role` and its threshold.
    pub fn role(&self, role: RoleName) -> TrustedKeys {
        let r = match role {
            RoleName::Root => &self.body.roles.root,
            RoleName::Releases => &self.body.roles.releases,
            RoleName::Channels => &self.body.roles.channels,
        };
        let mut keys = TrustedKeys::default();
        for fp in &r.keys {
            if let Some(k) = self.body.keys.get(fp).and_then(|b| decode_key(fp, b)) {
                keys.add(k);
            }
        }
        keys.with_threshold(r.threshold)
    }

    /// Errors when the root has expired at `now`: a node then takes no update until
    /// a newer root is published (it keeps running what it runs).
    pub fn current(&self, now: u64) -> Result<(), RootError> {
        if now >= self.body.expires {
            return Err(RootError::Expired {
                version: self.body.version,
                expires: self.body.expires,
                now,
            });
        }
        Ok(())
    }

    pub fn version(&self) -> u64 {
        self.body.version
    }

    pub fn expires(&self) -> u64 {
        self.body.expires
    }

    pub fn body(&self) -> &RootBody {
        &self.body
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Which role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleName {
    Root,
    Releases,
    Channels,
}

impl RoleName {
    pub const ALL: [Self; 3] = [Self::Root, Self::Releases, Self::Channels];

    pub fn name(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Releases => "releases",
            Self::Channels => "channels",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }
}

fn decode_key(fp: &str, b64: &str) -> Option<VerifyingKey> {
    let raw: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()?
        .try_into()
        .ok()?;
    let key = VerifyingKey::from_bytes(&raw).ok()?;
    (hex::encode(fingerprint(&key)) == fp).then_some(key)
}

impl RootBody {
    /// An empty root of `version` (roles without keys: add them, then sign).
    pub fn new(version: u64, expires: u64) -> Self {
        let empty = || Role {
            keys: Vec::new(),
            threshold: 1,
        };
        Self {
            format: FORMAT.to_owned(),
            version,
            expires,
            keys: BTreeMap::new(),
            roles: Roles {
                root: empty(),
                releases: empty(),
                channels: empty(),
            },
        }
    }

    pub fn role_mut(&mut self, role: RoleName) -> &mut Role {
        match role {
            RoleName::Root => &mut self.roles.root,
            RoleName::Releases => &mut self.roles.releases,
            RoleName::Channels => &mut self.roles.channels,
        }
    }

    /// Lets `key` act for `role`; returns its fingerprint (hex).
    pub fn add_key(&mut self, role: RoleName, key: &VerifyingKey) -> String {
        let fp = hex::encode(fingerprint(key));
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
        self.keys.insert(fp.clone(), b64);
        let r = self.role_mut(role);
        if !r.keys.contains(&fp) {
            r.keys.push(fp.clone());
        }
        fp
    }

    /// Takes the key whose fingerprint starts with `prefix` (at least 8 hex digits)
    /// out of `role`, and out of the root altogether when no role names it any more.
    /// Returns the full fingerprint, or None when no single key matches.
    pub fn remove_key(&mut self, role: RoleName, prefix: &str) -> Option<String> {
        if prefix.len() < 8 {
            return None;
        }
        let r = self.role_mut(role);
        let mut hits = r.keys.iter().filter(|k| k.starts_with(prefix));
        let fp = hits.next()?.clone();
        if hits.next().is_some() {
            return None;
        }
        r.keys.retain(|k| *k != fp);
        r.threshold = r.threshold.min(r.keys.len()).max(1);
        if !RoleName::ALL
            .iter()
            .any(|&n| self.role_ref(n).keys.contains(&fp))
        {
            self.keys.remove(&fp);
        }
        Some(fp)
    }

    fn role_ref(&self, role: RoleName) -> &Role {
        match role {
            RoleName::Root => &self.roles.root,
            RoleName::Releases => &self.roles.releases,
            RoleName::Channels => &self.roles.channels,
        }
    }

    /// The body's bytes, signed by `keys`, sealed: a root file.
    pub fn sign(&self, keys: &[&PublisherKey]) -> Vec<u8> {
        // Serialising maps of strings cannot fail.
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        envelope::seal(&body, &envelope::sign_all(Domain::Root, &body, keys))
    }
}

/// The short form of a hex fingerprint, for messages.
pub fn short_hex(fp: &str) -> String {
    let raw: Option<[u8; 32]> = hex::decode(fp).ok().and_then(|v| v.try_into().ok());
    raw.map_or_else(|| fp.chars().take(16).collect(), |r| short(&r))
}
