//! What this node trusts, and keeping it current: the newest root of trust it has
//! verified (shipped in the image, or followed since and kept in the state
//! directory), or, on a node without a root, the keys of `keys.d` (each alone enough,
//! for releases and channels alike: the simple one-key case).
//!
//! Following: before it trusts anything new from the release server, the node asks
//! for `RELEASES_URL/root/N+1.json` and, while the server has one, verifies it against
//! the root it holds ([`Root::open_next`]), keeps it (crash-safe) and asks for the
//! next. A 404 ends the chain. The newest root must be unexpired, or the node takes
//! no update (it keeps running what it runs) until the publisher signs a new one.

use std::io;
use std::path::{Path, PathBuf};

use super::root::{RoleName, Root, RootError, MAX_LEN};
use crate::config::FetchConfig;
use crate::fetch::{self, FetchError};
use crate::payload::{TrustError, TrustedKeys};

/// Most links followed in one go: a server that never stops answering is not
/// followed forever (the next check carries on from where this one stopped).
pub const MAX_STEPS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum NodeTrustError {
    #[error("trusted keys")]
    Keys(#[source] TrustError),
    #[error("reading the root of trust {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the root of trust {path} is not trusted")]
    Root {
        path: PathBuf,
        #[source]
        source: RootError,
    },
    #[error("fetching root version {version} from {url}")]
    Fetch {
        version: u64,
        url: String,
        #[source]
        source: Box<FetchError>,
    },
    #[error("reading root version {version} from {url}")]
    Body {
        version: u64,
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("root version {version} at {url} is {len} bytes, more than the limit of {MAX_LEN}")]
    TooLarge { version: u64, url: String, len: u64 },
    #[error("root version {version} at {url} does not follow root {current}")]
    Next {
        version: u64,
        current: u64,
        url: String,
        #[source]
        source: RootError,
    },
    #[error("keeping root version {version} in {path}")]
    Save {
        version: u64,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no update is trusted until the publisher signs a new root")]
    Expired(#[source] RootError),
    #[error(
        "{what} claims to stay valid until {expires}, {days} days from now; this node \
         accepts at most {max} ({key})"
    )]
    Lifetime {
        what: String,
        expires: u64,
        days: u64,
        max: u64,
        key: &'static str,
    },
    #[error(
        "channel {channel}: this document was published at {published}, before the one \
         this node already accepted (published {seen}, release {seen_version}); an old \
         document replayed"
    )]
    Replayed {
        channel: String,
        published: u64,
        seen: u64,
        seen_version: String,
    },
    #[error(
        "{url} is not the payload the channel names: manifest sha256 {found}, {found_size} \
         bytes; the channel says {expected}, {expected_size} bytes"
    )]
    NotPinned {
        url: String,
        found: String,
        found_size: u64,
        expected: String,
        expected_size: u64,
    },
    #[error("{url} holds release {payload}, but the channel that names it says {channel}")]
    WrongVersion {
        url: String,
        payload: String,
        channel: String,
    },
    #[error("channel marks {path}")]
    Marks {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("channel marks {path} are corrupt")]
    MarksCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Refuses a document that claims to live more than `max_days` from `now` (0: no cap).
pub fn lifetime(
    what: impl FnOnce() -> String,
    expires: u64,
    now: u64,
    max_days: u64,
    key: &'static str,
) -> Result<(), NodeTrustError> {
    let max = max_days.saturating_mul(86_400);
    if max_days == 0 || expires <= now.saturating_add(max) {
        return Ok(());
    }
    Err(NodeTrustError::Lifetime {
        what: what(),
        expires,
        days: (expires - now) / 86_400,
        max: max_days,
        key,
    })
}

/// What status and metrics show of the root of trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootFacts {
    pub version: u64,
    /// Seconds since the epoch.
    pub expires: u64,
}

/// The keys this node trusts right now.
#[derive(Debug, Clone)]
pub struct NodeTrust {
    root: Option<Root>,
    releases: TrustedKeys,
    channels: TrustedKeys,
    /// Where followed roots are kept.
    kept: PathBuf,
    /// `trust.max_root_days`.
    max_root_days: u64,
}

impl NodeTrust {
    /// The newest of the shipped root (`shipped`, when the file exists) and the one
    /// kept in `state_dir`; `keys_dir` when neither exists.
    pub fn load(
        cfg: &crate::config::TrustConfig,
        state_dir: &Path,
        keys_dir: &Path,
    ) -> Result<Self, NodeTrustError> {
        let shipped = cfg.root.as_path();
        let kept = state_dir.join("root.json");
        let mut best: Option<Root> = None;
        for path in [shipped, kept.as_path()] {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(NodeTrustError::Read {
                        path: path.to_owned(),
                        source,
                    })
                }
            };
            let root = Root::open_trusted(&bytes).map_err(|source| NodeTrustError::Root {
                path: path.to_owned(),
                source,
            })?;
            if best.as_ref().is_none_or(|b| root.version() > b.version()) {
                best = Some(root);
            }
        }
        match best {
            Some(root) => Ok(Self::from_root(root, kept, cfg.max_root_days)),
            None => {
                let keys = TrustedKeys::load_dir(keys_dir).map_err(NodeTrustError::Keys)?;
                Ok(Self {
                    root: None,
                    releases: keys.clone(),
                    channels: keys,
                    kept,
                    max_root_days: cfg.max_root_days,
                })
            }
        }
    }

    fn from_root(root: Root, kept: PathBuf, max_root_days: u64) -> Self {
        Self {
            releases: root.role(RoleName::Releases),
            channels: root.role(RoleName::Channels),
            root: Some(root),
            kept,
            max_root_days,
        }
    }

    /// Keys for payload manifests.
    pub fn releases(&self) -> &TrustedKeys {
        &self.releases
    }

    /// Keys for channel documents.
    pub fn channels(&self) -> &TrustedKeys {
        &self.channels
    }

    pub fn root(&self) -> Option<&Root> {
        self.root.as_ref()
    }

    /// The root's version and expiry (seconds since the epoch), for status and
    /// metrics; None on a node that trusts its keys directory.
    pub fn root_facts(&self) -> Option<RootFacts> {
        self.root.as_ref().map(|r| RootFacts {
            version: r.version(),
            expires: r.expires(),
        })
    }

    /// Follows the chain of roots under `base` (the release server) as far as it goes;
    /// then the newest must be current at `now`. Returns the versions followed. A
    /// node without a root has nothing to follow.
    pub fn follow(
        &mut self,
        base: &str,
        cfg: &FetchConfig,
        now: u64,
    ) -> Result<Vec<u64>, NodeTrustError> {
        let Some(mut root) = self.root.clone() else {
            return Ok(Vec::new());
        };
        let mut followed = Vec::new();
        for _ in 0..MAX_STEPS {
            let version = root.version() + 1;
            let url = format!("{}/root/{version}.json", base.trim_end_matches('/'));
            let Some(bytes) = fetch_root(&url, version, cfg)? else {
                break;
            };
            let next = root
                .open_next(&bytes)
                .map_err(|source| NodeTrustError::Next {
                    version,
                    current: root.version(),
                    url: url.clone(),
                    source,
                })?;
            if let Some(dir) = self.kept.parent() {
                std::fs::create_dir_all(dir).map_err(|source| NodeTrustError::Save {
                    version,
                    path: dir.to_owned(),
                    source,
                })?;
            }
            crate::durable::replace(&self.kept, next.bytes()).map_err(|(path, source)| {
                NodeTrustError::Save {
                    version,
                    path,
                    source,
                }
            })?;
            tracing::info!(version, url = %url, "followed the root of trust to version {version}");
            followed.push(version);
            root = next;
            *self = Self::from_root(root.clone(), self.kept.clone(), self.max_root_days);
        }
        self.current(now)?;
        Ok(followed)
    }

    /// Errors when the root has expired at `now` (a node on `keys.d` has no expiry of
    /// its own: each document carries one).
    pub fn current(&self, now: u64) -> Result<(), NodeTrustError> {
        let Some(r) = &self.root else {
            return Ok(());
        };
        r.current(now).map_err(NodeTrustError::Expired)?;
        lifetime(
            || format!("root version {}", r.version()),
            r.expires(),
            now,
            self.max_root_days,
            "trust.max_root_days",
        )
    }
}

/// The root at `url`, or None when the server has none (404, or no such file).
fn fetch_root(
    url: &str,
    version: u64,
    cfg: &FetchConfig,
) -> Result<Option<Vec<u8>>, NodeTrustError> {
    let err = |source| NodeTrustError::Fetch {
        version,
        url: url.to_owned(),
        source: Box::new(source),
    };
    let src = match fetch::open(url, cfg) {
        Ok(s) => s,
        Err(FetchError::Status { status: 404, .. }) => return Ok(None),
        Err(FetchError::File(crate::payload::PayloadError::Io { source, .. }))
            if source.kind() == io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(e) => return Err(err(e)),
    };
    let len = src.size();
    if len > MAX_LEN {
        return Err(NodeTrustError::TooLarge {
            version,
            url: url.to_owned(),
            len,
        });
    }
    let mut buf = vec![0u8; len as usize];
    src.read_range(0, &mut buf)
        .map_err(|source| NodeTrustError::Body {
            version,
            url: url.to_owned(),
            source,
        })?;
    Ok(Some(buf))
}
