//! Channels: a small signed document on the payload server that names the current
//! release of a product line and where its payloads are. Nodes follow one; the API's
//! CheckForUpdate and StartUpdate resolve a channel name through it.
//!
//! The file (`CHANNEL.json` in `channels/` beside the payloads) is JSON:
//!
//! ```json
//! {"signed": "<base64 of the body>", "signatures": [{"key": "<hex fingerprint>", "signature": "<base64>"}]}
//! ```
//!
//! The body is JSON too, and its exact bytes are what is signed (ed25519, same keys as
//! payloads, in a domain of its own so neither kind of signature can pass for the
//! other). Body fields are only ever added; readers ignore fields they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::payload::sign::{Domain, PublisherKey};
use crate::payload::{TrustError, TrustedKeys};
use crate::policy::wave::{self, Wave, WaveError};
use crate::trust::envelope::{self, EnvelopeError};

pub const FORMAT: &str = "update-agent.channel.v1";
/// A channel document is small; anything larger is not one.
pub const MAX_LEN: u64 = 1 << 20;

/// What a channel says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    pub format: String,
    pub channel: String,
    pub compatible: String,
    /// The current release of the line.
    pub version: String,
    /// Seconds since the epoch.
    pub published: u64,
    pub expires: u64,
    /// The full payload, relative to the channel document's directory's parent
    /// (the payload directory) or absolute.
    pub full: String,
    /// Deltas by the sha256 (hex) of the image they apply to.
    #[serde(default)]
    pub deltas: BTreeMap<String, String>,
    /// The rollout schedule (empty: every node at once); see `policy::wave`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// What each payload named above is (by its path as written in `full` and
    /// `deltas`): a node refuses a payload at that place that is anything else, so a
    /// mirror cannot pair this document with another release's signed payload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub payloads: BTreeMap<String, PayloadPin>,
    /// When the rollout began (the waves count from here); absent: `published`. A
    /// refreshed document (`bundle publish --refresh`) is published again later
    /// without restarting its rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_start: Option<u64>,
}

/// The identity of a payload file: the sha256 of its manifest (which its signature
/// covers and which pins every byte it writes) and its length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadPin {
    pub manifest_sha256: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("channel document is not valid JSON of the expected shape")]
    Malformed(#[source] serde_json::Error),
    #[error("channel document: field `{0}` is not valid base64/hex of the right length")]
    Encoding(&'static str),
    #[error("channel document carries more than {max} signatures")]
    TooManySignatures { max: usize },
    #[error("channel document is {len} bytes, more than the limit of {MAX_LEN}")]
    TooLarge { len: u64 },
    #[error("channel signature not accepted")]
    Trust(#[source] TrustError),
    #[error("channel document has format {found:?}; this agent reads {FORMAT:?}")]
    Format { found: String },
    #[error("the document is for channel {found:?}, not {wanted:?}")]
    WrongChannel { wanted: String, found: String },
    #[error("channel {channel} is for {found:?}, this node is {node:?}")]
    Incompatible {
        channel: String,
        found: String,
        node: String,
    },
    #[error("channel {channel} has a bad wave schedule")]
    Waves {
        channel: String,
        #[source]
        source: WaveError,
    },
    #[error("channel {channel} expired at {expires} (now {now}); the publisher must re-sign it")]
    Expired {
        channel: String,
        expires: u64,
        now: u64,
    },
}

impl Channel {
    /// Signs the body and wraps it into the file's bytes.
    pub fn sign(&self, key: &PublisherKey) -> Vec<u8> {
        self.sign_by(&[key])
    }

    /// Signs the body with every key of `keys` (a channels role with a threshold).
    pub fn sign_by(&self, keys: &[&PublisherKey]) -> Vec<u8> {
        // Serialising strings and maps of strings cannot fail.
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        envelope::seal(&body, &envelope::sign_all(Domain::Channel, &body, keys))
    }

    /// Checks the signature first, then reads the body and checks it is the channel
    /// asked for, for this node, and current.
    pub fn open(
        bytes: &[u8],
        keys: &TrustedKeys,
        wanted: &str,
        compatible: &str,
        now: u64,
    ) -> Result<Self, ChannelError> {
        let (body, sigs) = envelope::open(bytes, MAX_LEN).map_err(|e| match e {
            EnvelopeError::TooLarge { len, .. } => ChannelError::TooLarge { len },
            EnvelopeError::Malformed(e) => ChannelError::Malformed(e),
            EnvelopeError::Encoding(field) => ChannelError::Encoding(field),
            EnvelopeError::TooManySignatures { max } => ChannelError::TooManySignatures { max },
        })?;
        keys.verify_as(Domain::Channel, &body, &sigs)
            .map_err(ChannelError::Trust)?;
        let c: Channel = serde_json::from_slice(&body).map_err(ChannelError::Malformed)?;
        if c.format != FORMAT {
            return Err(ChannelError::Format { found: c.format });
        }
        if c.channel != wanted {
            return Err(ChannelError::WrongChannel {
                wanted: wanted.to_owned(),
                found: c.channel,
            });
        }
        if c.compatible != compatible {
            return Err(ChannelError::Incompatible {
                channel: c.channel,
                found: c.compatible,
                node: compatible.to_owned(),
            });
        }
        if let Err(source) = wave::validate(&c.waves) {
            return Err(ChannelError::Waves {
                channel: c.channel,
                source,
            });
        }
        if now >= c.expires {
            return Err(ChannelError::Expired {
                channel: c.channel,
                expires: c.expires,
                now,
            });
        }
        Ok(c)
    }

    /// Payload URLs for a node running the image with `image_sha256` (when known):
    /// its delta first, then the full payload. `base` is the payload directory's URL.
    pub fn urls(&self, base: &str, image_sha256: Option<&str>) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = image_sha256.and_then(|h| self.deltas.get(h)) {
            v.push(join(base, d));
        }
        v.push(join(base, &self.full));
        v
    }

    /// Every payload's URL under `base` with its pin.
    pub fn pins(&self, base: &str) -> BTreeMap<String, PayloadPin> {
        self.payloads
            .iter()
            .map(|(path, pin)| (join(base, path), pin.clone()))
            .collect()
    }

    /// Every payload URL the document names (the full payload and every delta).
    pub fn all_urls(&self, base: &str) -> Vec<String> {
        std::iter::once(&self.full)
            .chain(self.deltas.values())
            .map(|p| join(base, p))
            .collect()
    }

    /// When the waves count from.
    pub fn rollout_start(&self) -> u64 {
        self.rollout_start.unwrap_or(self.published)
    }
}

/// Where a channel's document lives under a payload directory's URL.
fn join(base: &str, p: &str) -> String {
    if p.contains("://") || p.starts_with('/') {
        p.to_owned()
    } else {
        format!("{}/{p}", base.trim_end_matches('/'))
    }
}

pub fn document_url(base: &str, channel: &str) -> String {
    format!("{}/channels/{channel}.json", base.trim_end_matches('/'))
}

/// A channel name: what may appear in a file name and a URL path.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn sample() -> Channel {
        Channel {
            format: FORMAT.into(),
            channel: "stable".into(),
            compatible: "azl3".into(),
            version: "2.0".into(),
            published: 100,
            expires: 1000,
            full: "2.0.full.uap".into(),
            deltas: [("ab".repeat(32), "2.0.from-abababababababab.uap".into())].into(),
            waves: vec![
                Wave {
                    after_secs: 0,
                    percent: 5.0,
                },
                Wave {
                    after_secs: 3600,
                    percent: 100.0,
                },
            ],
            payloads: [(
                "2.0.full.uap".into(),
                PayloadPin {
                    manifest_sha256: "cd".repeat(32),
                    size: 1234,
                },
            )]
            .into(),
            rollout_start: None,
        }
    }

    fn keys(k: &PublisherKey) -> TrustedKeys {
        let mut t = TrustedKeys::default();
        t.add(k.public());
        t
    }

    #[test]
    fn signed_round_trip_and_every_refusal() {
        let k = PublisherKey::from_seed([7; 32]);
        let t = keys(&k);
        let bytes = sample().sign(&k);
        let c = Channel::open(&bytes, &t, "stable", "azl3", 500).expect("opens");
        assert_eq!(c, sample());
        assert_eq!(
            c.urls("http://h/p/", Some(&"ab".repeat(32))),
            vec![
                "http://h/p/2.0.from-abababababababab.uap",
                "http://h/p/2.0.full.uap"
            ]
        );
        assert_eq!(c.urls("http://h/p", None), vec!["http://h/p/2.0.full.uap"]);

        let other = keys(&PublisherKey::from_seed([8; 32]));
        assert!(matches!(
            Channel::open(&bytes, &other, "stable", "azl3", 500),
            Err(ChannelError::Trust(TrustError::UntrustedKey { .. }))
        ));
        assert!(matches!(
            Channel::open(&bytes, &t, "beta", "azl3", 500),
            Err(ChannelError::WrongChannel { .. })
        ));
        assert!(matches!(
            Channel::open(&bytes, &t, "stable", "other", 500),
            Err(ChannelError::Incompatible { .. })
        ));
        assert!(matches!(
            Channel::open(&bytes, &t, "stable", "azl3", 1000),
            Err(ChannelError::Expired { .. })
        ));
        // A body changed after signing: the signature no longer covers it.
        let text = String::from_utf8(bytes).expect("utf8");
        let env: serde_json::Value = serde_json::from_str(&text).expect("json");
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = b64
            .decode(env["signed"].as_str().expect("signed"))
            .expect("b64");
        let forged = String::from_utf8(body).expect("utf8").replace("2.0", "6.6");
        let forged = text.replace(
            env["signed"].as_str().expect("signed"),
            &b64.encode(forged.as_bytes()),
        );
        assert!(matches!(
            Channel::open(forged.as_bytes(), &t, "stable", "azl3", 500),
            Err(ChannelError::Trust(TrustError::BadSignature { .. }))
        ));
        // A manifest signature cannot pass for a channel one (domains differ).
        let body = serde_json::to_vec_pretty(&sample()).expect("json");
        let wrong = k.sign(&body);
        let bytes = envelope::seal(&body, &[wrong]);
        assert!(matches!(
            Channel::open(&bytes, &t, "stable", "azl3", 500),
            Err(ChannelError::Trust(TrustError::BadSignature { .. }))
        ));
        assert!(matches!(
            Channel::open(b"{}", &t, "stable", "azl3", 500),
            Err(ChannelError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_body_fields_are_ignored() {
        let k = PublisherKey::from_seed([7; 32]);
        let mut body: serde_json::Value = serde_json::to_value(sample()).expect("value");
        body["rings"] = serde_json::json!([{"after_secs": 0, "share": 0.05}]);
        let body = serde_json::to_vec(&body).expect("json");
        let sig = k.sign_as(Domain::Channel, &body);
        let b64 = base64::engine::general_purpose::STANDARD;
        let env = serde_json::json!({
            "signed": b64.encode(&body),
            "signatures": [{"key": hex::encode(sig.key), "signature": b64.encode(sig.signature)}],
        });
        let c = Channel::open(
            &serde_json::to_vec(&env).expect("json"),
            &keys(&k),
            "stable",
            "azl3",
            1,
        )
        .expect("newer body fields are fine");
        assert_eq!(c.version, "2.0");
        assert!(valid_name("stable") && valid_name("azl3-prod_1.x"));
        assert!(!valid_name("") && !valid_name("../x") && !valid_name(".hidden"));
    }
}
