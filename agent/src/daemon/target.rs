//! What a request asks for (a `Source`), resolved into a `Target` (payload URLs to
//! try, a channel to read first), and the precheck that opens the first payload of a
//! target that exists, on a blocking thread under the check cap and deadline.

use std::sync::Arc;
use std::time::Duration;

use super::{blocking, Daemon, DaemonError};
use crate::update::{error_chain, Agent, Checked};

/// Where an update should come from, as a caller names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The node's own channel (agent.toml `auto.channel`).
    None,
    Channel(String),
    Version(String),
    Url(String),
    Path(String),
}

/// The resolved target of StartUpdate or CheckForUpdate.
#[derive(Debug, Clone)]
pub struct Target {
    /// Identifies "the same target" for idempotency.
    pub(super) key: String,
    /// Payload locations to try in order (a delta for this node first, when known).
    pub(super) urls: Vec<String>,
    /// Set when a version was asked for: not finding it is NOT_FOUND.
    pub(super) version: Option<String>,
    /// A channel to read first (it names the version and the payloads): the channel's
    /// name and the release directory's URL.
    channel: Option<(String, String)>,
}

impl Target {
    /// A release a channel named, with its payload URLs already chosen.
    pub fn for_release(channel: &str, urls: Vec<String>, version: &str) -> Self {
        Self {
            key: format!("channel {channel}"),
            urls,
            version: Some(version.to_owned()),
            channel: None,
        }
    }
}

/// What CheckForUpdate answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// Empty when the release is available; else why not.
    pub reason: String,
    pub version: String,
    pub running_version: String,
    pub url: String,
    pub delta: bool,
    pub download_bytes: u64,
}

impl Daemon {
    /// Resolves `source`; `field` names the request field a bad version is blamed on.
    pub fn resolve(&self, field: &'static str, source: Source) -> Result<Target, DaemonError> {
        let invalid = |field, why: String| DaemonError::InvalidTarget { field, why };
        let no_server =
            "this node has no release server (agent.toml [releases] url); give a url instead";
        match source {
            // The node's own channel (agent.toml auto.channel), where it has a release
            // server to read it from.
            Source::None if self.cfg.releases.url.is_some() => {
                self.resolve(field, Source::Channel(self.cfg.auto.channel.clone()))
            }
            Source::None => Err(invalid(
                "source",
                "name a channel, a version, a url or a path (this node has no [releases] url, so no channel of its own)".into(),
            )),
            Source::Channel(name) => {
                if !crate::channel::valid_name(&name) {
                    return Err(invalid(
                        "channel",
                        format!("{name:?} is not a channel name (letters, digits, . _ -)"),
                    ));
                }
                let Some(base) = self.cfg.releases.url.clone() else {
                    return Err(invalid("channel", no_server.into()));
                };
                Ok(Target {
                    key: format!("channel {name}"),
                    urls: Vec::new(),
                    version: None,
                    channel: Some((name, base)),
                })
            }
            Source::Url(u) if u.trim().is_empty() => Err(invalid("url", "is empty".into())),
            Source::Url(u) => {
                if !(u.starts_with("http://")
                    || u.starts_with("https://")
                    || u.starts_with("file://"))
                {
                    return Err(invalid(
                        "url",
                        format!("{u:?} is not an http://, https:// or file:// URL"),
                    ));
                }
                Ok(Target {
                    key: format!("url {u}"),
                    urls: vec![u],
                    version: None,
                    channel: None,
                })
            }
            Source::Path(p) => {
                if !p.starts_with('/') {
                    return Err(invalid(
                        "path",
                        format!("{p:?} is not an absolute path on the node"),
                    ));
                }
                Ok(Target {
                    key: format!("path {p}"),
                    urls: vec![p],
                    version: None,
                    channel: None,
                })
            }
            Source::Version(v) => {
                if v.is_empty() || v.contains('/') || v.chars().any(char::is_whitespace) {
                    return Err(invalid(field, format!("{v:?} is not a release version")));
                }
                let Some(base) = self.cfg.releases.url.as_deref() else {
                    return Err(invalid(field, no_server.into()));
                };
                let base = base.trim_end_matches('/');
                let mut urls = Vec::new();
                // The delta built from the image this node runs, when the agent knows
                // which image that is (it records every image it writes and verifies).
                if let Some(h) = self.booted_image() {
                    if let Some(short) = h.get(..16) {
                        urls.push(format!("{base}/{v}.from-{short}.uap"));
                    }
                }
                urls.push(format!("{base}/{v}.full.uap"));
                Ok(Target {
                    key: format!("version {v}"),
                    urls,
                    version: Some(v),
                    channel: None,
                })
            }
        }
    }

    /// CheckForUpdate: what `source` would bring, and whether StartUpdate would take it.
    pub async fn check(self: &Arc<Self>, source: Source) -> Result<CheckOutcome, DaemonError> {
        let target = self.resolve("version", source)?;
        let running = crate::update::running_version(&self.cfg.os_release).unwrap_or_default();
        let (checked, policy) = self
            .checked(move |agent| {
                let checked = precheck(agent, &target, true)?;
                // The same checks StartUpdate will make, without the downgrade allowance.
                let policy = agent
                    .check(&checked.url, false)
                    .err()
                    .map(|e| error_chain(&e));
                Ok((checked, policy))
            })
            .await?;
        let newer =
            running.is_empty() || crate::version::compare(&checked.version, &running).is_gt();
        let reason = match (&policy, newer) {
            (Some(why), _) => why.clone(),
            (None, false) => format!(
                "{} is not newer than the running {running}",
                checked.version
            ),
            (None, true) => String::new(),
        };
        Ok(CheckOutcome {
            reason,
            version: checked.version,
            running_version: running,
            url: checked.url,
            delta: checked.delta,
            download_bytes: checked.download_bytes,
        })
    }

    /// Runs a payload or channel check on a blocking thread, at most
    /// `api.limits.max_checks` at once and for at most `check_timeout_secs`: past the
    /// deadline the caller is answered and the thread ends with its fetch's timeouts.
    pub(super) async fn checked<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Agent) -> Result<T, DaemonError> + Send + 'static,
    ) -> Result<T, DaemonError> {
        let limit = self.cfg.api.limits.max_checks;
        let permit =
            Arc::clone(&self.checks)
                .try_acquire_owned()
                .map_err(|_| DaemonError::TooMany {
                    what: "payload checks",
                    limit,
                    key: "api.limits.max_checks",
                })?;
        let checker = Arc::clone(&self.checker);
        let secs = self.cfg.api.limits.check_timeout_secs;
        let work = blocking(move || {
            let _permit = permit;
            f(&checker)
        });
        tokio::time::timeout(Duration::from_secs(secs), work)
            .await
            .map_err(|_| DaemonError::CheckTimeout { secs })?
    }
}

/// Opens and checks the first payload of `target` that exists (blocking).
pub(super) fn precheck(
    agent: &Agent,
    target: &Target,
    allow_downgrade: bool,
) -> Result<Checked, DaemonError> {
    let mut target = target.clone();
    if let Some((name, base)) = &target.channel {
        let c = agent.open_channel(base, name)?;
        target.urls = c.urls(base, agent.booted_image_sha256().as_deref());
        target.version = Some(c.version);
    }
    let mut last = None;
    for url in &target.urls {
        match agent.check(url, allow_downgrade).map_err(DaemonError::from) {
            Ok(c) => return Ok(c),
            // Not there: try the next location (a delta may not be published).
            Err(DaemonError::NotFound(e)) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    match (last, &target.version) {
        (Some(e), Some(v)) => Err(DaemonError::VersionNotFound {
            version: v.clone(),
            url: target.urls.last().cloned().unwrap_or_default(),
            source: Box::new(e),
        }),
        (Some(e), None) => Err(DaemonError::NotFound(e)),
        (None, _) => Err(DaemonError::Worker),
    }
}
