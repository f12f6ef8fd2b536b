//! Halting a rollout on the fleet's own alerts: before the unattended loop starts a
//! staging or reboots, it asks Prometheus (`GET /api/v1/alerts`) which alerts fire
//! and holds while one matches. Prometheus is a trust boundary (docs/security.md):
//! its answer can only hold the node or let it go on by the rules it already
//! follows, so everything read from it is bounded (time, bytes, text shown).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

/// At most this many bytes of an answer are read; a bigger one is an error. Large
/// fleets with many firing alerts answer in well under this.
pub const MAX_BODY: u64 = 4 << 20;

/// Alert names and label values are shown in status and the journal cut to this
/// many characters, control characters escaped.
const SHOWN: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum HaltError {
    #[error("Prometheus {url} unreachable or too slow")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("Prometheus {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("Prometheus {url} answered more than {max} bytes")]
    TooBig { url: String, max: u64 },
    #[error("Prometheus {url}: the answer broke off or came too slowly")]
    Read {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Prometheus {url} answered something that is not an alerts list")]
    Garbage {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Prometheus {url} answered status {status:?}: {error}")]
    Failed {
        url: String,
        status: String,
        error: String,
    },
}

/// Which alerts halt the rollout: a name pattern and label patterns, each a regex
/// anchored at both ends, as Prometheus's own `=~` matchers are.
#[derive(Debug, Clone)]
pub struct Matcher {
    name: Regex,
    labels: Vec<(String, Regex)>,
}

/// A pattern that does not compile: which one and why.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not a regular expression")]
pub struct PatternError {
    pub what: String,
    #[source]
    pub source: regex::Error,
}

fn anchored(what: &str, re: &str) -> Result<Regex, PatternError> {
    Regex::new(&format!("^(?:{re})$")).map_err(|source| PatternError {
        what: what.to_owned(),
        source,
    })
}

impl Matcher {
    pub fn new(name: &str, labels: &BTreeMap<String, String>) -> Result<Self, PatternError> {
        Ok(Self {
            name: anchored("alerts", name)?,
            labels: labels
                .iter()
                .map(|(k, v)| Ok((k.clone(), anchored(&format!("labels.{k}"), v)?)))
                .collect::<Result<_, PatternError>>()?,
        })
    }

    /// Whether a firing alert with these labels holds the rollout. A label the alert
    /// lacks matches as the empty string, as in Prometheus.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| labels.get(k).map_or("", String::as_str);
        self.name.is_match(get("alertname"))
            && self.labels.iter().all(|(k, re)| re.is_match(get(k)))
    }
}

/// A firing alert that holds the rollout, as people see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// `Name{label="value",...}`, escaped and cut.
    pub alert: String,
    /// Firing alerts that match, this one included.
    pub count: usize,
}

#[derive(Debug, Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Debug, Deserialize)]
struct Data {
    alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
struct Alert {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    state: String,
}

/// Text from outside made safe for one line of status: control characters escaped,
/// cut to `SHOWN` characters.
fn shown(s: &str) -> String {
    cut(s.chars().flat_map(char::escape_debug))
}

fn cut(mut chars: impl Iterator<Item = char>) -> String {
    let mut out: String = chars.by_ref().take(SHOWN).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

fn describe(labels: &BTreeMap<String, String>) -> String {
    let name = labels.get("alertname").map_or("", String::as_str);
    let rest: Vec<String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "alertname")
        .map(|(k, v)| format!("{}=\"{}\"", shown(k), shown(v)))
        .collect();
    let all = if rest.is_empty() {
        shown(name)
    } else {
        format!("{}{{{}}}", shown(name), rest.join(","))
    };
    cut(all.chars())
}

/// The first matching firing alert in an answer of `/api/v1/alerts` (`url` names the
/// server in errors).
pub fn first_match(url: &str, body: &[u8], m: &Matcher) -> Result<Option<Holding>, HaltError> {
    let a: Answer = serde_json::from_slice(body).map_err(|source| HaltError::Garbage {
        url: url.to_owned(),
        source,
    })?;
    let data = match (a.status.as_str(), a.data) {
        ("success", Some(d)) => d,
        (status, _) => {
            return Err(HaltError::Failed {
                url: url.to_owned(),
                status: shown(status),
                error: shown(&a.error),
            })
        }
    };
    let mut hits = data
        .alerts
        .iter()
        .filter(|x| x.state == "firing" && m.matches(&x.labels));
    Ok(hits.next().map(|first| Holding {
        alert: describe(&first.labels),
        count: 1 + hits.count(),
    }))
}

/// A Prometheus server asked for its firing alerts.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    agent: ureq::Agent,
}

impl Client {
    /// `base` is the server's URL (`http://prometheus:9090`); `timeout` bounds a whole
    /// query, connection and body included.
    pub fn new(base: &str, timeout: Duration) -> Self {
        Self {
            url: format!("{}/api/v1/alerts", base.trim_end_matches('/')),
            agent: crate::fleetlock::short_calls(timeout),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The first firing alert that `m` matches, if any.
    pub fn holding(&self, m: &Matcher) -> Result<Option<Holding>, HaltError> {
        let url = &self.url;
        let mut resp = self
            .agent
            .get(url)
            .header("accept", "application/json")
            .call()
            .map_err(|source| HaltError::Transport {
                url: url.clone(),
                source: Box::new(source),
            })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(HaltError::Status {
                url: url.clone(),
                status,
            });
        }
        // One byte past the cap tells a body at the cap from a bigger one.
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(MAX_BODY + 1)
            .read_to_end(&mut body)
            .map_err(|source| HaltError::Read {
                url: url.clone(),
                source,
            })?;
        if body.len() as u64 > MAX_BODY {
            return Err(HaltError::TooBig {
                url: url.clone(),
                max: MAX_BODY,
            });
        }
        first_match(url, &body, m)
    }
}

#[cfg(test)]
mod tests;
