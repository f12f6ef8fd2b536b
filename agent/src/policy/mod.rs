//! Unattended patching: which release to stage and when (channel, interval with
//! jitter, rollout waves), and when a staged release may reboot the node (strategy,
//! maintenance windows, FleetLock). Decisions are pure functions in [`decide`]; the
//! daemon's loop that acts on them is `daemon::auto`.

pub mod decide;
pub mod wave;
pub mod window;

use jiff::SignedDuration;
use serde::{Deserialize, Serialize};

pub use window::{WindowConfig, Windows};

/// How a staged release gets its reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebootStrategy {
    /// As soon as it is staged.
    Immediate,
    /// Inside the next maintenance window.
    Window,
    /// When the FleetLock server grants a slot (inside a window, if any are set).
    #[serde(rename = "fleetlock")]
    FleetLock,
    /// Never by itself: an operator or a controller reboots.
    Never,
}

impl RebootStrategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::Window => "window",
            Self::FleetLock => "fleetlock",
            Self::Never => "never",
        }
    }
}

/// `[auto]` in agent.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoConfig {
    /// Check, stage and reboot without being asked.
    pub enabled: bool,
    /// The channel this node follows (needs `[releases] url`).
    pub channel: String,
    /// Time between checks, e.g. `6h`.
    pub check_interval: String,
    /// Up to this much is added at random to each interval, e.g. `30m`.
    pub check_jitter: String,
    pub reboot: RebootStrategy,
    /// IANA time zone of the windows, or `localtime`.
    pub time_zone: String,
    pub windows: Vec<WindowConfig>,
    /// Source of the node's stable identity (rollout position, FleetLock id).
    pub machine_id: std::path::PathBuf,
    pub fleetlock: FleetLockConfig,
    pub halt: HaltConfig,
    /// These keys parsed, once, when the configuration is loaded.
    #[serde(skip)]
    pub parsed: Parsed,
}

/// [`Settings`] as built when the configuration was loaded, shared. It is a function
/// of the keys beside it, so it compares equal to any other: `AutoConfig`'s equality
/// is that of its keys.
#[derive(Debug, Clone, Default)]
pub struct Parsed(Option<std::sync::Arc<Settings>>);

impl PartialEq for Parsed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Parsed {}

impl AutoConfig {
    /// Parses these keys (`releases_url`: `[releases] url`) and keeps the result, so
    /// later readers share it.
    pub fn parse(&mut self, releases_url: Option<&str>) -> Result<(), SettingsError> {
        self.parsed = Parsed(Some(std::sync::Arc::new(Settings::new(
            self,
            releases_url,
        )?)));
        Ok(())
    }

    /// The settings parsed at load, or parsed now for a configuration built in code.
    pub fn settings(
        &self,
        releases_url: Option<&str>,
    ) -> Result<std::sync::Arc<Settings>, SettingsError> {
        match &self.parsed.0 {
            Some(s) => Ok(std::sync::Arc::clone(s)),
            None => Ok(std::sync::Arc::new(Settings::new(self, releases_url)?)),
        }
    }
}

impl Default for AutoConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            channel: "stable".into(),
            check_interval: "6h".into(),
            check_jitter: "30m".into(),
            reboot: RebootStrategy::Window,
            time_zone: "UTC".into(),
            windows: Vec::new(),
            machine_id: "/etc/machine-id".into(),
            fleetlock: FleetLockConfig::default(),
            halt: HaltConfig::default(),
            parsed: Parsed::default(),
        }
    }
}

/// `[auto.fleetlock]`: the reboot manager (Zincati's FleetLock protocol).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetLockConfig {
    /// Base URL of the server, e.g. `http://fleetlock.kube-system.svc:8080`.
    pub url: Option<String>,
    /// The group whose reboot slots this node competes for.
    pub group: String,
    /// First retry delay after a refusal or an error; doubles up to `max_backoff`.
    pub backoff: String,
    pub max_backoff: String,
    /// After a commit the slot is kept this long (healthy all along) before it goes
    /// back to the group, so the next node reboots only once this one proved itself.
    pub soak: String,
}

impl Default for FleetLockConfig {
    fn default() -> Self {
        Self {
            url: None,
            group: "default".into(),
            backoff: "5s".into(),
            max_backoff: "5m".into(),
            soak: "0s".into(),
        }
    }
}

/// `[auto.halt]`: hold the rollout while the fleet's Prometheus has a matching alert
/// firing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaltConfig {
    /// Base URL of the Prometheus server, e.g. `http://prometheus:9090`.
    pub prometheus: Option<String>,
    /// Alert names that halt the rollout: a regex anchored at both ends.
    pub alerts: String,
    /// Label name to regex (anchored); every one must match too.
    pub labels: std::collections::BTreeMap<String, String>,
    /// What an unreachable or garbled Prometheus means.
    pub on_error: OnError,
    /// The longest one query may take, answer included.
    pub timeout: String,
    /// How often a held node asks again.
    pub recheck: String,
}

impl Default for HaltConfig {
    fn default() -> Self {
        Self {
            prometheus: None,
            alerts: String::new(),
            labels: std::collections::BTreeMap::new(),
            on_error: OnError::Hold,
            timeout: "10s".into(),
            recheck: "1m".into(),
        }
    }
}

/// What the node does when it cannot learn which alerts fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Wait as if an alert fired (the default: no news is not good news).
    Hold,
    /// Go on as if none fired.
    Proceed,
}

/// `[auto.halt]` parsed.
#[derive(Debug, Clone)]
pub struct HaltSettings {
    pub prometheus: String,
    pub matcher: crate::halt::Matcher,
    pub on_error: OnError,
    pub timeout: std::time::Duration,
    pub recheck: SignedDuration,
}

/// `[auto]` checked and parsed once.
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub channel: String,
    pub interval: SignedDuration,
    pub jitter: SignedDuration,
    pub reboot: RebootStrategy,
    pub windows: Windows,
    pub fleetlock_backoff: SignedDuration,
    pub fleetlock_max_backoff: SignedDuration,
    pub soak: SignedDuration,
    pub halt: Option<HaltSettings>,
}

/// What is wrong with `[auto]`: the key and why.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration key `auto.{key}` is invalid: {why}")]
    Value { key: &'static str, why: String },
    #[error("configuration key `auto.halt.{}` is invalid", .source.what)]
    Pattern {
        #[source]
        source: crate::halt::PatternError,
    },
    #[error("configuration key `auto.{key}` is invalid")]
    Windows {
        key: &'static str,
        #[source]
        source: window::WindowError,
    },
}

impl Settings {
    pub fn new(c: &AutoConfig, releases_url: Option<&str>) -> Result<Self, SettingsError> {
        let bad = |key, why: String| SettingsError::Value { key, why };
        let dur = |key, s: &str, min: SignedDuration| {
            window::parse_duration(s)
                .filter(|d| *d >= min)
                .ok_or_else(|| {
                    bad(
                        key,
                        format!("{s:?} is not a duration of at least {min:#} (e.g. 6h, 30m)"),
                    )
                })
        };
        let windows =
            Windows::new(&c.time_zone, &c.windows).map_err(|source| SettingsError::Windows {
                key: if matches!(source, window::WindowError::TimeZone { .. }) {
                    "time_zone"
                } else {
                    "windows"
                },
                source,
            })?;
        let s = Self {
            enabled: c.enabled,
            channel: c.channel.clone(),
            interval: dur(
                "check_interval",
                &c.check_interval,
                SignedDuration::from_mins(1),
            )?,
            jitter: dur("check_jitter", &c.check_jitter, SignedDuration::ZERO)?,
            reboot: c.reboot,
            windows,
            fleetlock_backoff: dur(
                "fleetlock.backoff",
                &c.fleetlock.backoff,
                SignedDuration::from_millis(100),
            )?,
            fleetlock_max_backoff: dur(
                "fleetlock.max_backoff",
                &c.fleetlock.max_backoff,
                SignedDuration::from_secs(1),
            )?,
            soak: dur("fleetlock.soak", &c.fleetlock.soak, SignedDuration::ZERO)?,
            halt: halt_settings(&c.halt)?,
        };
        if !crate::channel::valid_name(&c.channel) {
            return Err(bad(
                "channel",
                format!("{:?} is not a channel name", c.channel),
            ));
        }
        if c.enabled && releases_url.is_none() {
            return Err(bad(
                "enabled",
                "needs [releases] url, where the channel document is published".into(),
            ));
        }
        if c.reboot == RebootStrategy::Window && c.enabled && s.windows.is_empty() {
            return Err(bad(
                "reboot",
                "\"window\" needs at least one [[auto.windows]]".into(),
            ));
        }
        if c.reboot == RebootStrategy::FleetLock && c.enabled && c.fleetlock.url.is_none() {
            return Err(bad(
                "reboot",
                "\"fleetlock\" needs auto.fleetlock.url".into(),
            ));
        }
        let g = &c.fleetlock.group;
        if g.is_empty()
            || g.len() > 64
            || !g
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '.' || ch == '-')
        {
            return Err(bad(
                "fleetlock.group",
                format!("{g:?} is not a group name (1-64 of A-Z a-z 0-9 . -, as Zincati allows)"),
            ));
        }
        if let Some(u) = &c.fleetlock.url {
            http_url("fleetlock.url", u)?;
        }
        Ok(s)
    }
}

fn http_url(key: &'static str, u: &str) -> Result<(), SettingsError> {
    if u.starts_with("http://") || u.starts_with("https://") {
        Ok(())
    } else {
        Err(SettingsError::Value {
            key,
            why: format!("{u:?} is not an http:// or https:// URL"),
        })
    }
}

/// `[auto.halt]` checked: `None` without a Prometheus URL.
fn halt_settings(h: &HaltConfig) -> Result<Option<HaltSettings>, SettingsError> {
    let Some(url) = &h.prometheus else {
        return Ok(None);
    };
    http_url("halt.prometheus", url)?;
    if h.alerts.is_empty() {
        return Err(SettingsError::Value {
            key: "halt.alerts",
            why:
                "needs a pattern of the alert names that halt the rollout (e.g. \"UpdateAgent.*\")"
                    .into(),
        });
    }
    let matcher = crate::halt::Matcher::new(&h.alerts, &h.labels)
        .map_err(|source| SettingsError::Pattern { source })?;
    let dur = |key, s: &str, min: SignedDuration, max: SignedDuration| {
        window::parse_duration(s)
            .filter(|d| *d >= min && *d <= max)
            .ok_or_else(|| SettingsError::Value {
                key,
                why: format!("{s:?} is not a duration from {min:#} to {max:#}"),
            })
    };
    let timeout = dur(
        "halt.timeout",
        &h.timeout,
        SignedDuration::from_millis(100),
        SignedDuration::from_mins(5),
    )?;
    Ok(Some(HaltSettings {
        prometheus: url.clone(),
        matcher,
        on_error: h.on_error,
        timeout: std::time::Duration::try_from(timeout).unwrap_or_default(),
        recheck: dur(
            "halt.recheck",
            &h.recheck,
            SignedDuration::from_secs(1),
            SignedDuration::from_hours(24),
        )?,
    }))
}
