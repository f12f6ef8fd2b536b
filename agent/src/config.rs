//! Configuration: `/etc/update-agent/agent.toml` plus `agent.toml.d/*.toml` drop-ins,
//! merged key by key (later files win), then validated once into [`Config`]. Every key
//! has a default; an unknown key is an error that names it and the file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/update-agent/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("configuration (after merging {files}) is invalid")]
    Invalid {
        files: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("configuration key `{key}` is invalid: {why}")]
    Value { key: &'static str, why: String },
    #[error(transparent)]
    Auto(#[from] crate::policy::SettingsError),
}

/// The validated configuration; nothing else reads raw config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Product/board line this node accepts payloads for.
    pub compatible: String,
    pub state_dir: PathBuf,
    pub keys_dir: PathBuf,
    /// os-release file of the running system; its VERSION_ID is the running release.
    pub os_release: PathBuf,
    pub slots: SlotsConfig,
    pub boot: BootConfig,
    pub fetch: FetchConfig,
    pub apply: ApplyConfig,
    pub health: crate::health::HealthConfig,
    pub api: ApiConfig,
    pub releases: ReleasesConfig,
    pub trust: TrustConfig,
    pub auto: crate::policy::AutoConfig,
    pub metrics: MetricsConfig,
}

/// Prometheus metrics: an HTTP endpoint and/or a node-exporter textfile. Both off by
/// default.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `address:port` to serve `/metrics` on, e.g. `127.0.0.1:9469`.
    pub listen: Option<String>,
    /// A file for node-exporter's textfile collector, rewritten on every change.
    pub textfile: Option<PathBuf>,
    /// Scrapes served at once; more wait to be accepted.
    pub max_connections: usize,
    /// A request's headers must arrive, and an answer must be taken, within this.
    pub timeout_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            textfile: None,
            max_connections: 8,
            timeout_secs: 10,
        }
    }
}

/// What any one client of the API can hold (docs/security.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiLimits {
    /// Connections held at once on each listener (TCP: more wait to be accepted;
    /// Unix socket: more are closed at once, root's never).
    pub max_connections: usize,
    /// Unix socket connections held at once by one uid (root not counted).
    pub max_connections_per_uid: usize,
    /// A TCP client must finish its TLS handshake within this.
    pub handshake_timeout_secs: u64,
    /// WatchUpdate streams open at once, in all and per peer (uid or certificate).
    pub max_watchers: usize,
    pub max_watchers_per_peer: usize,
    /// Payload and channel checks (CheckForUpdate, StartUpdate's precheck) at once,
    /// and how long one may take before the caller gets DEADLINE_EXCEEDED.
    pub max_checks: usize,
    pub check_timeout_secs: u64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_connections_per_uid: 16,
            handshake_timeout_secs: 10,
            max_watchers: 64,
            max_watchers_per_peer: 8,
            max_checks: 4,
            check_timeout_secs: 60,
        }
    }
}

/// The gRPC API: a Unix socket always, TCP with mutual TLS optionally.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub socket: PathBuf,
    /// Group owning the socket (name or number); its members may read. Empty: keep
    /// the daemon's own group.
    pub socket_group: String,
    /// Groups (names or numbers) whose members may change things, besides root.
    pub admin_groups: Vec<String>,
    /// `address:port` for fleet controllers; needs every `tls_*` key.
    pub tcp_listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA that signs client certificates.
    pub tls_client_ca: Option<PathBuf>,
    /// Client identities allowed in: a certificate's URI or DNS SANs (its subject CN
    /// only when it has no SAN).
    pub tls_allowed_clients: Vec<String>,
    pub limits: ApiLimits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            socket_group: "update-agent".into(),
            admin_groups: Vec::new(),
            tcp_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_allowed_clients: Vec::new(),
            limits: ApiLimits::default(),
        }
    }
}

pub const DEFAULT_SOCKET: &str = "/run/update-agent/agent.sock";

/// The root of trust and how long a signed document may claim to live.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// The root of trust shipped in the image; when neither it nor a followed root
    /// in `state_dir` exists, `keys_dir` is trusted instead (docs/security.md).
    pub root: PathBuf,
    /// A channel document, payload or root that claims to stay valid longer than
    /// this many days from now is refused (0: no cap): a leaked key cannot mint a
    /// document that outlives its revocation by decades.
    pub max_channel_days: u64,
    pub max_payload_days: u64,
    pub max_root_days: u64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            root: crate::trust::root::DEFAULT_ROOT.into(),
            max_channel_days: 90,
            max_payload_days: 400,
            max_root_days: 1830,
        }
    }
}

/// Where releases are published (the directory `updatectl bundle create` wrote,
/// served over HTTP): `URL/VERSION.full.uap` and `URL/VERSION.from-<sha16>.uap`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReleasesConfig {
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApplyConfig {
    /// Persist progress (after an fsync of the slot) at least this often, so a killed
    /// agent resumes close to where it stopped.
    pub checkpoint_ms: u64,
    /// ... or after this many bytes written, whichever comes first.
    pub checkpoint_bytes: u64,
    /// ... or after this many bytes downloaded: on a slow link, what cost the network
    /// is made durable at once instead of waiting for the next operation to finish.
    pub checkpoint_fetched_bytes: u64,
    /// Bytes of frames, references and outputs in flight (bounds memory).
    pub memory_budget: u64,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            checkpoint_ms: 1000,
            checkpoint_bytes: 64 << 20,
            checkpoint_fetched_bytes: 4 << 20,
            memory_budget: 40 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SlotsConfig {
    /// GPT partition labels.
    pub label_a: String,
    pub label_b: String,
    pub label_esp: String,
    /// Where the kernel command line is read from (tests point this at a file).
    pub cmdline: PathBuf,
    /// The block device mounted at `/`; by default found from `stat /`. Tests set it.
    pub root_device: Option<PathBuf>,
    /// Limit discovery to partitions of this disk (e.g. `/dev/loop3`); default: the
    /// disk holding the booted slot.
    pub disk: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    pub connect_timeout_secs: u64,
    /// Stall guard, inactivity: no byte for this long drops the connection; the range
    /// resumes from the next byte not yet received. Default 30.
    pub stall_timeout_secs: Option<u64>,
    /// Stall guard, throughput: fewer than `min_throughput_bytes` in
    /// `min_throughput_secs` is a stall too (0 bytes: off).
    pub min_throughput_bytes: u64,
    pub min_throughput_secs: u64,
    /// One staging run (a `stage`, a `resume`, an API operation) requests nothing
    /// after this many seconds; what arrived is kept for the next run (0: no deadline).
    pub staging_deadline_secs: u64,
    /// The old name of `stall_timeout_secs` (it bounded a whole request, so a large
    /// frame could not arrive on a slow link); still read, as `stall_timeout_secs`.
    pub request_timeout_secs: Option<u64>,
    /// Attempts in a row that bring no new byte (or are too slow) before a range fails.
    pub retries: u32,
    /// First retry delay; doubles up to `max_backoff_secs`, with jitter.
    pub backoff_ms: u64,
    pub max_backoff_secs: u64,
    /// Operations fetched ahead of the writer.
    pub parallel: usize,
    /// `Authorization: Bearer …` for private repositories.
    pub bearer_token: Option<String>,
    /// `user:password` for HTTP basic authentication.
    pub basic_auth: Option<String>,
    /// PEM file of the CAs to trust for https release servers and mirrors, instead
    /// of the public web PKI (a private PKI).
    pub ca_file: Option<PathBuf>,
    /// The origin that may receive the credentials above: `[releases] url`, filled in
    /// at load (not a key of its own, so no drop-in can point credentials elsewhere).
    #[serde(skip)]
    pub auth_origin: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            compatible: String::new(),
            state_dir: "/var/lib/update-agent".into(),
            keys_dir: crate::payload::sign::DEFAULT_KEYS_DIR.into(),
            os_release: "/etc/os-release".into(),
            slots: SlotsConfig::default(),
            boot: BootConfig::default(),
            fetch: FetchConfig::default(),
            apply: ApplyConfig::default(),
            health: crate::health::HealthConfig::default(),
            api: ApiConfig::default(),
            releases: ReleasesConfig::default(),
            trust: TrustConfig::default(),
            auto: crate::policy::AutoConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for SlotsConfig {
    fn default() -> Self {
        Self {
            label_a: "root-a".into(),
            label_b: "root-b".into(),
            label_esp: "esp".into(),
            cmdline: "/proc/cmdline".into(),
            root_device: None,
            disk: None,
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout_secs: 15,
            stall_timeout_secs: None,
            // 256 KiB a minute (~35 kbit/s): a 1 Mbit/s link moves 29 times that, a
            // 128 kbit/s one 3.7 times; a mirror that trickles is left within a minute.
            min_throughput_bytes: 256 << 10,
            min_throughput_secs: 60,
            // A day: ~10 GB at 1 Mbit/s, far more than any payload; reaching it loses
            // nothing (the next run continues), it only reports a staging that is stuck.
            staging_deadline_secs: 86_400,
            request_timeout_secs: None,
            retries: 6,
            backoff_ms: 500,
            max_backoff_secs: 30,
            parallel: 2,
            bearer_token: None,
            basic_auth: None,
            ca_file: None,
            auth_origin: None,
        }
    }
}

impl FetchConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    /// The inactivity timeout: `stall_timeout_secs`, or the deprecated
    /// `request_timeout_secs` when only that is set, or 30 s.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(
            self.stall_timeout_secs
                .or(self.request_timeout_secs)
                .unwrap_or(30),
        )
    }
    /// A bound for small requests fetched whole (FleetLock calls): the stall timeout.
    pub fn request_timeout(&self) -> Duration {
        self.stall_timeout()
    }
}

impl Config {
    /// Loads `path` (if it exists) and `path.d/*.toml` in name order.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut files = Vec::new();
        if path.exists() {
            files.push(path.to_owned());
        }
        let dropins = PathBuf::from(format!("{}.d", path.display()));
        if dropins.is_dir() {
            let rd = |source| ConfigError::Read {
                path: dropins.clone(),
                source,
            };
            let mut v: Vec<PathBuf> = fs::read_dir(&dropins)
                .map_err(rd)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(rd)?;
            v.retain(|p| p.extension().is_some_and(|e| e == "toml"));
            v.sort();
            files.extend(v);
        }
        let mut merged = toml::Table::new();
        for f in &files {
            let text = fs::read_to_string(f).map_err(|source| ConfigError::Read {
                path: f.clone(),
                source,
            })?;
            let t: toml::Table = text.parse().map_err(|source| ConfigError::Syntax {
                path: f.clone(),
                source,
            })?;
            merge(&mut merged, t);
        }
        let names = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let cfg: Self =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|source| ConfigError::Invalid {
                    files: if names.is_empty() {
                        "no files".into()
                    } else {
                        names
                    },
                    source,
                })?;
        cfg.finish()
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|source| ConfigError::Invalid {
            files: "inline".into(),
            source,
        })?;
        cfg.finish()
    }

    /// Checks the merged settings and derives what follows from them.
    fn finish(mut self) -> Result<Self, ConfigError> {
        self.validate()?;
        self.fetch.auth_origin = self.releases.url.clone();
        let url = self.releases.url.clone();
        self.auto.parse(url.as_deref())?;
        Ok(self)
    }

    /// The rules, in the order their errors are reported: the node, fetching,
    /// memory, the API and metrics, credentials.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_node()?;
        self.validate_fetch()?;
        if self.apply.memory_budget < (4 << 20) {
            return bad("apply.memory_budget", "must be at least 4 MiB");
        }
        self.validate_api()?;
        self.validate_credentials()
    }

    /// The product line, the slots' labels, the bootloader.
    fn validate_node(&self) -> Result<(), ConfigError> {
        if self.compatible.is_empty() {
            return bad("compatible", "must be set to this node's product line");
        }
        if self.slots.label_a == self.slots.label_b {
            return bad("slots.label_b", "must differ from slots.label_a");
        }
        self.boot.validate()?;
        Ok(())
    }

    /// Parallel requests, the stall timeout and the throughput floor.
    fn validate_fetch(&self) -> Result<(), ConfigError> {
        if self.fetch.parallel == 0 || self.fetch.parallel > 16 {
            return bad("fetch.parallel", "must be between 1 and 16");
        }
        let f = &self.fetch;
        if f.request_timeout_secs.is_some() && f.stall_timeout_secs.is_some() {
            return bad(
                "fetch.request_timeout_secs",
                "is the old name of fetch.stall_timeout_secs; set only one",
            );
        }
        if f.stall_timeout().is_zero() {
            return bad("fetch.stall_timeout_secs", "must be at least 1");
        }
        if f.min_throughput_bytes > 0 && f.min_throughput_secs == 0 {
            return bad(
                "fetch.min_throughput_secs",
                "must be at least 1 (or set fetch.min_throughput_bytes = 0 to turn the rule off)",
            );
        }
        Ok(())
    }

    /// TCP only with mutual TLS, the caps and timeouts of the API and metrics, the
    /// metrics address.
    fn validate_api(&self) -> Result<(), ConfigError> {
        if self.api.tcp_listen.is_some() {
            let a = &self.api;
            if a.tls_cert.is_none() || a.tls_key.is_none() || a.tls_client_ca.is_none() {
                return bad(
                    "api.tcp_listen",
                    "needs api.tls_cert, api.tls_key and api.tls_client_ca (no TCP without mutual TLS)",
                );
            }
            if a.tls_allowed_clients.is_empty() {
                return bad(
                    "api.tls_allowed_clients",
                    "must name the client identities allowed over TCP",
                );
            }
        }
        let l = &self.api.limits;
        for (key, v) in [
            ("api.limits.max_connections", l.max_connections),
            (
                "api.limits.max_connections_per_uid",
                l.max_connections_per_uid,
            ),
            ("api.limits.max_watchers", l.max_watchers),
            ("api.limits.max_watchers_per_peer", l.max_watchers_per_peer),
            ("api.limits.max_checks", l.max_checks),
            ("metrics.max_connections", self.metrics.max_connections),
        ] {
            if v == 0 || v > 4096 {
                return bad(key, "must be between 1 and 4096");
            }
        }
        for (key, v) in [
            (
                "api.limits.handshake_timeout_secs",
                l.handshake_timeout_secs,
            ),
            ("api.limits.check_timeout_secs", l.check_timeout_secs),
            ("metrics.timeout_secs", self.metrics.timeout_secs),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if let Some(l) = &self.metrics.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    "metrics.listen",
                    "must be address:port, e.g. 127.0.0.1:9469",
                );
            }
        }
        Ok(())
    }

    /// Credentials only with a release server to send them to, in their form.
    fn validate_credentials(&self) -> Result<(), ConfigError> {
        if (self.fetch.bearer_token.is_some() || self.fetch.basic_auth.is_some())
            && self.releases.url.is_none()
        {
            return bad(
                "fetch.bearer_token",
                "credentials are only sent to the release server: set [releases] url",
            );
        }
        if let Some(b) = &self.fetch.basic_auth {
            if !b.contains(':') {
                return bad("fetch.basic_auth", "must be user:password");
            }
        }
        Ok(())
    }
}

/// A value error naming `key`.
fn bad(key: &'static str, why: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Value {
        key,
        why: why.to_owned(),
    })
}

/// Merges `from` into `into`: tables recursively, anything else replaced.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

mod boot;
pub use boot::BootConfig;

#[cfg(test)]
mod tests;
