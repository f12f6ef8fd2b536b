//! Where payload bytes come from: `https://`, `http://` (range requests with retries),
//! `file://` or a plain path (air-gapped nodes).
//!
//! The head of the payload (header, manifest, signatures) is fetched with the first
//! request and served from memory after that; every DATA/PATCH operation is one range
//! request. Bytes are kept as they arrive: a dropped connection, a reset or a stall
//! resumes with a range request from the next byte not yet received, so nothing is
//! requested twice. A stall is no byte for `stall_timeout_secs` (the transport's
//! per-read timeout) or fewer than `min_throughput_bytes` in `min_throughput_secs`
//! ([`stall`]); nothing bounds a whole request, so a large frame arrives on any link
//! that keeps moving. Retries use capped exponential backoff with jitter on connection
//! errors, stalls, 5xx, 408 and 429, and an attempt that brought new bytes starts the
//! count again; any other 4xx fails at once (retrying a 404 or 403 only delays the
//! real answer). Past the staging deadline nothing more is requested.

use std::io;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::Rng as _;

use crate::config::FetchConfig;
use crate::payload::{FileSource, PayloadError, RangeSource};

mod origin;
mod stall;
use origin::private_roots;
pub use origin::same_origin;
use stall::Throughput;

/// Bytes fetched with the first request; covers the header and the manifest of every
/// payload our generator has produced so far (a larger head costs one more request).
pub const FIRST_REQUEST: u64 = 64 << 10;

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
    #[error("{url}: the connection failed after {received} bytes of the body")]
    Body {
        url: String,
        received: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "{url}: too slow: {bytes} bytes in {secs} s, under the minimum of {min_bytes} \
         bytes in {window_secs} s (fetch.min_throughput_bytes, fetch.min_throughput_secs)"
    )]
    TooSlow {
        url: String,
        bytes: u64,
        secs: u64,
        min_bytes: u64,
        window_secs: u64,
    },
    #[error(
        "{url}: the staging deadline passed ({secs} s, fetch.staging_deadline_secs); \
         what arrived is kept for the next attempt"
    )]
    Deadline { url: String, secs: u64 },
    #[error(
        "{url}: the payload changed on the server: {now} bytes now, {was} when this \
         staging began"
    )]
    Changed { url: String, was: u64, now: u64 },
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
    open_kept(url, cfg, None)
}

/// [`open`], but a remote payload whose first bytes an earlier process kept
/// (`kept`: the payload's size and its first bytes) is not asked for them again: a
/// node restarted every few seconds would otherwise fetch its head at every start.
/// They are checked like fetched ones (the caller verifies the signature), and a
/// server whose payload no longer has that size fails the first range
/// ([`FetchError::Changed`]).
pub fn open_kept(
    url: &str,
    cfg: &FetchConfig,
    kept: Option<(u64, Vec<u8>)>,
) -> Result<Box<dyn RangeSource>, FetchError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Box::new(match kept {
            Some((size, head)) => HttpSource::with_head(url, cfg, size, head)?,
            None => HttpSource::open(url, cfg)?,
        }));
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
    min_bytes: u64,
    min_window: Duration,
    /// No range is requested past this (set when the source is opened).
    deadline: Option<(Instant, u64)>,
}

impl HttpSource {
    pub fn open(url: &str, cfg: &FetchConfig) -> Result<Self, FetchError> {
        let mut s = Self::new(url, cfg)?;
        let mut head = vec![0u8; FIRST_REQUEST as usize];
        let (len, total) = s.range_into(0, &mut head, true, &mut |_| {})?;
        head.truncate(len);
        s.size = total;
        s.head = head;
        Ok(s)
    }

    /// A source whose size and first bytes are already known: no request is made.
    pub fn with_head(
        url: &str,
        cfg: &FetchConfig,
        size: u64,
        head: Vec<u8>,
    ) -> Result<Self, FetchError> {
        let mut s = Self::new(url, cfg)?;
        s.size = size;
        s.head = head;
        Ok(s)
    }

    fn new(url: &str, cfg: &FetchConfig) -> Result<Self, FetchError> {
        let mut config = ureq::Agent::config_builder()
            .timeout_connect(Some(cfg.connect_timeout()))
            // Inactivity, not a budget for the whole request: each read from the socket
            // (headers or body) waits at most this long for a byte.
            .timeout_per_read(Some(cfg.stall_timeout()))
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
        Ok(Self {
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
            min_bytes: cfg.min_throughput_bytes,
            min_window: Duration::from_secs(cfg.min_throughput_secs),
            deadline: (cfg.staging_deadline_secs > 0).then(|| {
                (
                    Instant::now() + Duration::from_secs(cfg.staging_deadline_secs),
                    cfg.staging_deadline_secs,
                )
            }),
        })
    }

    /// Bytes received from the server so far.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// GETs `buf.len()` bytes at `start` into `buf` (fewer when `clamp` and the payload
    /// ends first), handing each piece to `arrived` as it comes in. An interrupted
    /// response is resumed from the next byte not yet received. Returns the bytes
    /// filled and the payload's total size.
    fn range_into(
        &self,
        start: u64,
        buf: &mut [u8],
        clamp: bool,
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(usize, u64), FetchError> {
        let mut got = 0usize;
        // The range's length once a response said where the payload ends.
        let mut want = buf.len();
        let mut total = 0u64;
        let mut fails = 0u32;
        loop {
            self.check_deadline()?;
            let before = got;
            let r = self.range_once(start, &mut buf[..want], clamp, &mut got, arrived);
            let e = match r {
                Ok(Some((len, t))) => {
                    // The first answer of a clamped range says how much there is.
                    want = len;
                    total = t;
                    if got == want {
                        return Ok((got, total));
                    }
                    continue;
                }
                Ok(None) => return Ok((got, total)),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => e,
            };
            // New bytes are progress: the count of failures starts again, and the next
            // attempt goes out at once. A server too slow to count as progress does not.
            let slow = matches!(e, FetchError::TooSlow { .. });
            if got > before && !slow {
                fails = 0;
                tracing::debug!(url = %self.url, received = got, of = want, error = %e, "resuming a range");
                continue;
            }
            fails += 1;
            if fails > self.retries {
                return Err(e);
            }
            let exp = self.backoff.saturating_mul(1 << (fails - 1).min(16));
            let cap = exp.min(self.max_backoff);
            // Full jitter in [cap/2, cap]: nodes that failed together retry apart.
            let wait = cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
            std::thread::sleep(wait);
        }
    }

    fn check_deadline(&self) -> Result<(), FetchError> {
        match self.deadline {
            Some((at, secs)) if Instant::now() >= at => Err(FetchError::Deadline {
                url: self.url.clone(),
                secs,
            }),
            _ => Ok(()),
        }
    }

    /// One GET for the part of `buf` after `*got` (at `start + *got`), streamed into
    /// `buf` with `*got` advanced as bytes arrive. Returns, when the response said,
    /// the range's length (clamped to the payload's end) and the payload's size;
    /// `None` when a clamped range turned out to be already complete.
    fn range_once(
        &self,
        start: u64,
        buf: &mut [u8],
        clamp: bool,
        got: &mut usize,
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<(usize, u64)>, Attempt> {
        if *got >= buf.len() {
            return Ok(None);
        }
        let from = start + *got as u64;
        let end = start + buf.len() as u64 - 1;
        let mut resp = self.get_range(from, end)?;
        let value = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let (got_end, total) = self.check_range(&value, from, end, clamp)?;
        let len =
            usize::try_from(got_end + 1 - start).map_err(|_| self.bad_range(&value, from, end))?;
        let want = got_end - from + 1;
        let mut body = resp.body_mut().with_config().limit(want).reader();
        self.stream(&mut body, &mut buf[..len], got, want, arrived)?;
        // Let the reader see the end of the body, so the connection can be reused.
        let _ = body.read(&mut [0u8; 1]);
        Ok(Some((len, total)))
    }

    /// The GET of bytes `from..=end` (with the release server's credentials), and its
    /// answer if it is a 206; what else it is decides whether to try again.
    fn get_range(&self, from: u64, end: u64) -> Result<ureq::http::Response<ureq::Body>, Attempt> {
        let mut req = self
            .agent
            .get(&self.url)
            .header("Range", &format!("bytes={from}-{end}"));
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let transport = |source: ureq::Error, attempts| FetchError::Transport {
            url: self.url.clone(),
            attempts,
            source,
        };
        let resp = req.call().map_err(|e| match e {
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
            206 => Ok(resp),
            200 => Err(Attempt::Fatal(FetchError::NoRanges {
                url: self.url.clone(),
            })),
            408 | 429 | 500..=599 => Err(Attempt::Retry(fail)),
            _ => Err(Attempt::Fatal(fail)),
        }
    }

    /// The Content-Range `value` ("bytes START-END/TOTAL") of an answer to a request
    /// for `from..=end` (the end `clamp`ed to the payload's): the range's end and the
    /// payload's size, if it is the range asked for, of this payload.
    fn check_range(
        &self,
        value: &str,
        from: u64,
        end: u64,
        clamp: bool,
    ) -> Result<(u64, u64), Attempt> {
        let (got_start, got_end, total) =
            parse_content_range(value).ok_or_else(|| self.bad_range(value, from, end))?;
        let want_end = if clamp {
            end.min(total.saturating_sub(1))
        } else {
            end
        };
        if got_start != from || got_end != want_end || got_end < got_start {
            return Err(self.bad_range(value, from, end));
        }
        // Known from the first request or kept from an earlier process: a range of a
        // payload of another size is of another payload.
        if self.size != 0 && total != self.size {
            return Err(Attempt::Fatal(FetchError::Changed {
                url: self.url.clone(),
                was: self.size,
                now: total,
            }));
        }
        Ok((got_end, total))
    }

    fn bad_range(&self, value: &str, start: u64, end: u64) -> Attempt {
        Attempt::Fatal(FetchError::BadRange {
            url: self.url.clone(),
            value: value.to_owned(),
            start,
            end,
        })
    }

    /// `body` (`want` bytes) read into `buf` after `*got` until `buf` is full, `*got`
    /// advanced and `arrived` told as bytes come; the staging deadline and the
    /// throughput floor are checked as they do.
    fn stream(
        &self,
        body: &mut dyn io::Read,
        buf: &mut [u8],
        got: &mut usize,
        want: u64,
        arrived: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Attempt> {
        let len = buf.len();
        let mut pace = Throughput::new(self.min_bytes, self.min_window, Instant::now());
        let received_before = *got;
        while *got < len {
            let n = match body.read(&mut buf[*got..len]) {
                Ok(0) => {
                    return Err(Attempt::Retry(FetchError::Short {
                        url: self.url.clone(),
                        got: (*got - received_before) as u64,
                        want,
                    }))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Attempt::Retry(FetchError::Body {
                        url: self.url.clone(),
                        received: (*got - received_before) as u64,
                        source,
                    }))
                }
            };
            arrived(&buf[*got..*got + n]);
            *got += n;
            self.fetched.fetch_add(n as u64, Ordering::Relaxed);
            self.check_deadline().map_err(Attempt::Fatal)?;
            if let Err(short) = pace.record(n as u64, Instant::now()) {
                return Err(Attempt::Retry(FetchError::TooSlow {
                    url: self.url.clone(),
                    bytes: short.bytes,
                    secs: short.elapsed.as_secs(),
                    min_bytes: self.min_bytes,
                    window_secs: self.min_window.as_secs(),
                }));
            }
        }
        Ok(())
    }
}

enum Attempt {
    Retry(FetchError),
    Fatal(FetchError),
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
        self.read_range_streaming(offset, buf, &mut |_| {})
    }

    fn read_range_streaming(
        &self,
        offset: u64,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // What the first request brought is not requested again, even as the start of
        // a range that goes on past it (the first frame usually does).
        let from_head = self
            .head
            .len()
            .saturating_sub(usize::try_from(offset).unwrap_or(usize::MAX))
            .min(buf.len());
        if from_head > 0 {
            let at = offset as usize;
            buf[..from_head].copy_from_slice(&self.head[at..at + from_head]);
            arrived(&buf[..from_head]);
        }
        if from_head < buf.len() {
            self.range_into(
                offset + from_head as u64,
                &mut buf[from_head..],
                false,
                arrived,
            )?;
        }
        Ok(())
    }

    fn is_remote(&self) -> bool {
        true
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
        let mut bytes = vec![0u8; len];
        self.read_range_streaming(offset, &mut bytes, &mut |_| {})?;
        Ok(std::borrow::Cow::Owned(bytes))
    }
}

#[cfg(test)]
mod resume_tests;

#[cfg(test)]
mod tests;
