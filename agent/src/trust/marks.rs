//! What this node has accepted from each channel: the newest document's publication
//! time and release (a replayed older document is refused, naming them), and the
//! payloads it named with their pins (a payload at one of those URLs that is not the
//! one named is refused). One small JSON file, `STATE_DIR/channels.json`, replaced
//! crash-safely; a missing file is a node that has accepted nothing yet.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::node::NodeTrustError;
use crate::channel::{Channel, PayloadPin};

/// The newest document accepted from one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelMark {
    pub published: u64,
    pub version: String,
    /// Every payload URL the document names, so a payload there must be of its
    /// release.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Payload URL → pin, from that document (documents from before pins have none).
    #[serde(default)]
    pub pins: BTreeMap<String, PayloadPin>,
}

#[derive(Debug, Clone, Default)]
pub struct Marks {
    path: PathBuf,
    channels: BTreeMap<String, ChannelMark>,
}

impl Marks {
    pub fn load(state_dir: &Path) -> Result<Self, NodeTrustError> {
        let path = state_dir.join("channels.json");
        let channels = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| NodeTrustError::MarksCorrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(NodeTrustError::Marks { path, source }),
        };
        Ok(Self { path, channels })
    }

    /// Records `c` (fetched from under `base`) as the newest document of its channel,
    /// or refuses it as older than one already accepted. Saved when it changed.
    pub fn accept(&mut self, c: &Channel, base: &str) -> Result<(), NodeTrustError> {
        if let Some(seen) = self.channels.get(&c.channel) {
            // Two different documents may not share a publication time either: the
            // publisher's tool never signs two in the same second for one channel.
            if c.published < seen.published
                || (c.published == seen.published && c.version != seen.version)
            {
                return Err(NodeTrustError::Replayed {
                    channel: c.channel.clone(),
                    published: c.published,
                    seen: seen.published,
                    seen_version: seen.version.clone(),
                });
            }
        }
        let mark = ChannelMark {
            published: c.published,
            version: c.version.clone(),
            urls: c.all_urls(base),
            pins: c.pins(base),
        };
        if self.channels.get(&c.channel) == Some(&mark) {
            return Ok(());
        }
        self.channels.insert(c.channel.clone(), mark);
        // Serialising maps of strings and numbers cannot fail.
        let bytes = serde_json::to_vec_pretty(&self.channels).unwrap_or_default();
        save(&self.path, &bytes)
    }

    /// The release, and the pin if it has one, that the newest accepted document of
    /// any channel gives `url`.
    pub fn pin(&self, url: &str) -> Option<(&str, Option<&PayloadPin>)> {
        self.channels.values().find_map(|m| {
            m.urls
                .iter()
                .any(|u| u == url)
                .then(|| (m.version.as_str(), m.pins.get(url)))
        })
    }

    /// Checks a payload opened from `url` against its pin, if it has one.
    pub fn check(
        &self,
        url: &str,
        manifest_sha256: &str,
        size: u64,
        version: &str,
    ) -> Result<(), NodeTrustError> {
        let Some((channel_version, pin)) = self.pin(url) else {
            return Ok(());
        };
        if let Some(pin) = pin.filter(|p| p.manifest_sha256 != manifest_sha256 || p.size != size) {
            return Err(NodeTrustError::NotPinned {
                url: url.to_owned(),
                found: manifest_sha256.to_owned(),
                found_size: size,
                expected: pin.manifest_sha256.clone(),
                expected_size: pin.size,
            });
        }
        if channel_version != version {
            return Err(NodeTrustError::WrongVersion {
                url: url.to_owned(),
                payload: version.to_owned(),
                channel: channel_version.to_owned(),
            });
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` crash-safely, creating the state directory when a check
/// comes before any staging has.
pub(super) fn save(path: &Path, bytes: &[u8]) -> Result<(), NodeTrustError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| NodeTrustError::Marks {
            path: dir.to_owned(),
            source,
        })?;
    }
    crate::durable::replace(path, bytes)
        .map_err(|(path, source)| NodeTrustError::Marks { path, source })
}
