//! Where payload bytes come from: `https://`, `http://` (range requests with retries),
//! `file://` or a plain path (air-gapped nodes).
//!
//! The head of the payload (header, manifest, signatures) is fetched with the first
//! request and served from memory after that; every DATA/PATCH operation is one range
//! request. Retries use capped exponential backoff with jitter on connection errors,
//! timeouts, 5xx, 408 and 429; any other 4xx fails at once (retrying a 404 or 403 only
//! delays the real answer).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::Rng as _;

use crate::config::FetchConfig;
use crate::payload::{FileSource, PayloadError, RangeSource};

/// Bytes fetched with the first request; covers the header and the manifest of every
/// payload our generator has produced so far (a larger head costs one more request).
const FIRST_REQUEST: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: unsupported URL scheme (use https://, http://, file:// or a path)")]
    Scheme { url: String },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the server does not answer range requests (got 200 for a range)")]
    NoRanges { url: String },
    #[error("{url}: bad Content-Range {value:?} for bytes {start}-{end}")]
    BadRange {
        url: String,
        value: String,
        start: u64,
        end: u64,
    },
    #[error("{url}: request failed after {attempts} attempts")]
    Transport {
        url: String,
        attempts: u32,
        #[source]
        source: ureq::Error,
    },
    #[error("{url}: short body: {got} of {want} bytes")]
    Short { url: String, got: u64, want: u64 },
    #[error("opening {0}")]
    File(#[source] PayloadError),
    #[error("fetch.ca_file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fetch.ca_file {path}: no certificate in it")]
    CaFileEmpty { path: PathBuf },
    #[error("fetch.ca_file {path}: bad PEM")]
    CaFilePem {
        path: PathBuf,
        #[source]
        source: ureq::Error,
    },
}

impl From<FetchError> for io::Error {
    fn from(e: FetchError) -> Self {
        io::Error::other(e)
    }
}

/// Opens a payload by URL or path.
pub fn open(url: &str, cfg: &FetchConfig) -> Result<Box<dyn RangeSource>, FetchError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Box::new(HttpSource::open(url, cfg)?));
    }
    let path = match url.strip_prefix("file://") {
        Some(p) => PathBuf::from(p),
        None if url.contains("://") => {
            return Err(FetchError::Scheme {
                url: url.to_owned(),
            })
        }
        None => PathBuf::from(url),
    };
    Ok(Box::new(FileSource::open(&path).map_err(FetchError::File)?))
}

/// A payload on a web server, object store or CDN.
#[derive(Debug)]
pub struct HttpSource {
    agent: ureq::Agent,
    url: String,
    name: PathBuf,
    size: u64,
    head: Vec<u8>,
    auth: Option<String>,
    retries: u32,
    backoff: Duration,
    max_backoff: Duration,
    fetched: AtomicU64,
}

impl HttpSource {
    pub fn open(url: &str, cfg: &FetchConfig) -> Result<Self, FetchError> {
        let mut config = ureq::Agent::config_builder()
            .timeout_connect(Some(cfg.connect_timeout()))
            .timeout_global(Some(cfg.request_timeout()))
            .http_status_as_error(false)
            .proxy(ureq::Proxy::try_from_env())
            // An https payload never continues over plain http, and credentials never
            // follow a redirect (they are for the release server's origin only).
            .https_only(url.starts_with("https://"))
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
            .user_agent(concat!("update-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            config = config.tls_config(private_roots(path)?);
        }
        let config = config.build();
        let trusted = cfg
            .auth_origin
            .as_deref()
            .is_some_and(|o| same_origin(url, o));
        let auth = match (&cfg.bearer_token, &cfg.basic_auth) {
            _ if !trusted => None,
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, Some(b)) => Some(format!("Basic {}", BASE64.encode(b))),
            (None, None) => None,
        };
        let mut s = Self {
            agent: config.into(),
            url: url.to_owned(),
            name: PathBuf::from(url),
            size: 0,
            head: Vec::new(),
            auth,
            retries: cfg.retries,
            backoff: Duration::from_millis(cfg.backoff_ms),
            max_backoff: Duration::from_secs(cfg.max_backoff_secs),
            fetched: AtomicU64::new(0),
        };
        let (head, total) = s.range(0, FIRST_REQUEST, true)?;
        s.size = total;
        s.head = head;
        Ok(s)
    }

    /// Bytes received from the server so far.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// GETs bytes `start .. start+len` (clamped to the end when `clamp`), with retries.
    /// Returns the bytes and the total size from Content-Range.
    fn range(&self, start: u64, len: u64, clamp: bool) -> Result<(Vec<u8>, u64), FetchError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.range_once(start, len, clamp) {
                Ok(r) => return Ok(r),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) if attempt > self.retries => return Err(e),
                Err(Attempt::Retry(_)) => {
                    let exp = self.backoff.saturating_mul(1 << (attempt - 1).min(16));
                    let cap = exp.min(self.max_backoff);
                    // Full jitter in [cap/2, cap]: nodes that failed together retry apart.
                    let wait = cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
                    std::thread::sleep(wait);
                }
            }
        }
    }

    fn range_once(&self, start: u64, len: u64, clamp: bool) -> Result<(Vec<u8>, u64), Attempt> {
        let end = start + len - 1;
        let mut req = self
            .agent
            .get(&self.url)
            .header("Range", &format!("bytes={start}-{end}"));
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let transport = |source: ureq::Error, attempts| FetchError::Transport {
            url: self.url.clone(),
            attempts,
            source,
        };
        let mut resp = req.call().map_err(|e| match e {
            // A redirect from https to http: asking again gets the same answer.
            ureq::Error::RequireHttpsOnly(_) => Attempt::Fatal(transport(e, 1)),
            e => Attempt::Retry(transport(e, self.retries + 1)),
        })?;
        let status = resp.status().as_u16();
        let fail = FetchError::Status {
            url: self.url.clone(),
            status,
        };
        match status {
            206 => {}
            200 => {
                return Err(Attempt::Fatal(FetchError::NoRanges {
                    url: self.url.clone(),
                }))
            }
            408 | 429 | 500..=599 => return Err(Attempt::Retry(fail)),
            _ => return Err(Attempt::Fatal(fail)),
        }
        let value = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bad = || {
            Attempt::Fatal(FetchError::BadRange {
                url: self.url.clone(),
                value: value.clone(),
                start,
                end,
            })
        };
        // "bytes START-END/TOTAL"
        let (got_start, got_end, total) = parse_content_range(&value).ok_or_else(bad)?;
        let want_end = if clamp {
            end.min(total.saturating_sub(1))
        } else {
            end
        };
        if got_start != start || got_end != want_end {
            return Err(bad());
        }
        let want = got_end - got_start + 1;
        let body = resp
            .body_mut()
            .with_config()
            .limit(want + 1)
            .read_to_vec()
            .map_err(|e| Attempt::Retry(transport(e, self.retries + 1)))?;
        self.fetched.fetch_add(body.len() as u64, Ordering::Relaxed);
        if body.len() as u64 != want {
            return Err(Attempt::Retry(FetchError::Short {
                url: self.url.clone(),
                got: body.len() as u64,
                want,
            }));
        }
        Ok((body, total))
    }
}

enum Attempt {
    Retry(FetchError),
    Fatal(FetchError),
}

/// TLS that trusts only the CAs in `path` (a private release server's PKI), instead of
/// the public web PKI.
fn private_roots(path: &Path) -> Result<ureq::tls::TlsConfig, FetchError> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let pem = std::fs::read(path).map_err(|source| FetchError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(source) => {
                return Err(FetchError::CaFilePem {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    if certs.is_empty() {
        return Err(FetchError::CaFileEmpty {
            path: path.to_owned(),
        });
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&certs))
        .build())
}

/// Scheme, host and port of a URL (the port made explicit).
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = match (uri.port_u16(), scheme.as_str()) {
        (Some(p), _) => p,
        (None, "https") => 443,
        (None, "http") => 80,
        _ => return None,
    };
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

/// Whether `url` is on the same origin (scheme, host, port) as `base`: only then does
/// it get the release server's credentials.
pub fn same_origin(url: &str, base: &str) -> bool {
    matches!((origin(url), origin(base)), (Some(a), Some(b)) if a == b)
}

fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

impl RangeSource for HttpSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if offset + len <= self.head.len() as u64 {
            buf.copy_from_slice(&self.head[offset as usize..(offset + len) as usize]);
            return Ok(());
        }
        let (bytes, _) = self.range(offset, len, false)?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn name(&self) -> &Path {
        &self.name
    }

    fn bytes(&self, offset: u64, len: usize) -> io::Result<std::borrow::Cow<'_, [u8]>> {
        let end = offset + len as u64;
        if end <= self.head.len() as u64 {
            return Ok(std::borrow::Cow::Borrowed(
                &self.head[offset as usize..end as usize],
            ));
        }
        if len == 0 {
            return Ok(std::borrow::Cow::Owned(Vec::new()));
        }
        // A head larger than the first response: fetched once, into the buffer the
        // caller gets (not fetched and then copied).
        let (bytes, _) = self.range(offset, len as u64, false)?;
        Ok(std::borrow::Cow::Owned(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn credentials_stay_on_the_release_origin() {
        let base = "https://updates.example.com/azl3/";
        assert!(same_origin(
            "https://updates.example.com/azl3/2.0.full.uap",
            base
        ));
        assert!(same_origin("https://UPDATES.example.com:443/other", base));
        assert!(!same_origin(
            "http://updates.example.com/azl3/2.0.full.uap",
            base
        ));
        assert!(!same_origin("https://updates.example.com:8443/x", base));
        assert!(!same_origin(
            "https://updates.example.com.evil.test/x",
            base
        ));
        assert!(!same_origin(
            "https://evil.test/?https://updates.example.com/",
            base
        ));
        assert!(!same_origin("file:///root/secret", base));
        assert!(!same_origin("/root/secret", base));
    }
}
