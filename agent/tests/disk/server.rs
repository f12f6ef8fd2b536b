//! A payload server on 127.0.0.1 that can misbehave: 500s, bodies cut short (once
//! or on every connection after N bytes), stalls, a slow link, a flipped byte.

use super::*;

#[derive(Default, Clone, Debug)]
pub(crate) struct Faults {
    /// Answer this many requests with 500 first.
    pub(crate) errors_500: u32,
    /// Cut this many responses off mid-body.
    pub(crate) drops: u32,
    /// Flip a byte in this many range responses (not the first request).
    pub(crate) corrupt: u32,
    /// Sleep before each response.
    pub(crate) delay_ms: u64,
    /// Stall this many range responses (not the first request) for 3 s mid-body.
    pub(crate) stalls: u32,
    /// After this many range responses, answer every further one with 503 (0: never).
    pub(crate) break_after: u64,
    /// Close every connection after this many bytes of a response body (0: never).
    pub(crate) cut_after: u64,
    /// Send range bodies (not the first request's) at this many bytes a second (0: at
    /// once): a slow link.
    pub(crate) rate: u64,
}

pub(crate) struct Server {
    pub(crate) port: u16,
    pub(crate) faults: Arc<Mutex<Faults>>,
    /// Body bytes written to the socket (cut and partial responses included), and
    /// range responses served.
    pub(crate) served: Arc<AtomicU64>,
    pub(crate) ranges: Arc<AtomicU64>,
}

impl Server {
    pub(crate) fn start(dir: PathBuf) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let served = Arc::new(AtomicU64::new(0));
        let ranges = Arc::new(AtomicU64::new(0));
        let (f2, s2, r2) = (
            Arc::clone(&faults),
            Arc::clone(&served),
            Arc::clone(&ranges),
        );
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (dir, f, s, r) = (
                    dir.clone(),
                    Arc::clone(&f2),
                    Arc::clone(&s2),
                    Arc::clone(&r2),
                );
                std::thread::spawn(move || {
                    let _ = serve(c, &dir, &f, &s, &r);
                });
            }
        });
        Self {
            port,
            faults,
            served,
            ranges,
        }
    }

    pub(crate) fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    pub(crate) fn set(&self, f: Faults) {
        *self.faults.lock().expect("faults") = f;
    }
}

fn serve(
    mut c: TcpStream,
    dir: &Path,
    faults: &Mutex<Faults>,
    served: &AtomicU64,
    ranges: &AtomicU64,
) -> std::io::Result<()> {
    loop {
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            if c.read(&mut b)? == 0 {
                return Ok(());
            }
            req.push(b[0]);
        }
        let text = String::from_utf8_lossy(&req).into_owned();
        let path = text
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_owned();
        let headers: HashMap<String, String> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut f = faults.lock().expect("faults").clone();
        std::thread::sleep(Duration::from_millis(f.delay_ms));
        let respond = |c: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
            write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
                body.len()
            )?;
            c.write_all(body)
        };
        if f.break_after > 0 && ranges.load(Ordering::Relaxed) >= f.break_after {
            respond(&mut c, "503 Service Unavailable", "", b"down")?;
            continue;
        }
        if f.errors_500 > 0 {
            f.errors_500 -= 1;
            *faults.lock().expect("faults") = f;
            respond(&mut c, "500 Internal Server Error", "", b"oops")?;
            continue;
        }
        let Ok(data) = fs::read(dir.join(&path)) else {
            respond(&mut c, "404 Not Found", "", b"no")?;
            continue;
        };
        let Some((a, z)) = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, z)| Some((a.parse::<usize>().ok()?, z.parse::<usize>().ok()?)))
        else {
            respond(&mut c, "200 OK", "", &data)?;
            continue;
        };
        let z = z.min(data.len() - 1);
        let mut body = data[a..=z].to_vec();
        let cr = format!("Content-Range: bytes {a}-{z}/{}\r\n", data.len());
        if f.drops > 0 {
            f.drops -= 1;
            *faults.lock().expect("faults") = f;
            write!(
                c,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n",
                body.len()
            )?;
            c.write_all(&body[..body.len() / 2])?;
            served.fetch_add(body.len() as u64 / 2, Ordering::Relaxed);
            return Ok(());
        }
        if f.stalls > 0 && a > 0 {
            f.stalls -= 1;
            *faults.lock().expect("faults") = f;
            write!(
                c,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n",
                body.len()
            )?;
            c.write_all(&body[..body.len() / 2])?;
            served.fetch_add(body.len() as u64 / 2, Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
        if f.corrupt > 0 && a > 0 {
            f.corrupt -= 1;
            *faults.lock().expect("faults") = f.clone();
            let mid = body.len() / 2;
            body[mid] ^= 0x55;
        }
        ranges.fetch_add(1, Ordering::Relaxed);
        write!(
            c,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n",
            body.len()
        )?;
        let rate = if a > 0 { f.rate } else { 0 };
        let cut = f.cut_after > 0 && body.len() as u64 > f.cut_after;
        let end = if cut {
            f.cut_after as usize
        } else {
            body.len()
        };
        send_body(&mut c, &body[..end], rate, served)?;
        if cut {
            return Ok(());
        }
    }
}

/// Writes `body`, at `rate` bytes a second when not 0 (20 slices a second), counting
/// what reached the socket.
fn send_body(c: &mut TcpStream, body: &[u8], rate: u64, served: &AtomicU64) -> std::io::Result<()> {
    let slice = if rate == 0 {
        body.len().max(1)
    } else {
        (rate as usize / 20).max(1)
    };
    let started = Instant::now();
    let mut sent = 0usize;
    for piece in body.chunks(slice) {
        if rate > 0 {
            // Paced from the start, so a slow reader does not slow the link further.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        c.write_all(piece)?;
        sent += piece.len();
        served.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}
