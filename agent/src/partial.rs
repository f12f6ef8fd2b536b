//! The bytes of frames being downloaded, kept across restarts and power cuts, so an
//! interrupted staging never fetches again what already arrived.
//!
//! One file per operation whose frame is being fetched (or has arrived but is not yet
//! covered by a checkpoint): `STATE_DIR/partial/<manifest sha256>-<op>.part`, holding
//! the first bytes of that frame in order. The name ties the bytes to the payload and
//! the operation, so a different payload never reuses them (its files are removed when
//! a staging opens the store). Bytes are appended as they arrive and fsynced every
//! MiB or `sync_every`; a file is removed once a checkpoint records its operation as
//! done, and all of them when the attempt ends. Why one file per operation rather
//! than only the oldest unwritten one: the workers fetch ahead, and the frame worth
//! keeping is whichever is large, not whichever is oldest; the files in flight are
//! bounded by the apply engine's memory budget (a worker fetches only an operation
//! that holds a reservation) plus what was written since the last checkpoint
//! (`apply.checkpoint_fetched_bytes`).
//!
//! Beside them, `<manifest sha256>.head`: the payload's size and its signed head
//! (header, manifest, signatures), so a restarted staging does not fetch the head
//! again at every start; it is verified again (signatures, expiry) whenever it is used.
//!
//! Nothing here is trusted: a resumed frame is verified like any other (zstd, then the
//! operation's sha256 over its whole output), and a frame that fails after using kept
//! bytes is fetched once more from the network before the operation counts as failed
//! (a power cut can leave a file longer than what reached the disk). Keeping bytes is
//! best effort: a state directory that refuses a file costs durability, never the
//! staging.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::payload::RangeSource;

/// Fsync a file after this many new bytes (or after the store's interval).
const SYNC_BYTES: u64 = 1 << 20;
/// The most head bytes kept (the payload format's limit on manifest and signatures).
const MAX_HEAD: u64 = crate::payload::limits::MAX_MANIFEST_BYTES
    + crate::payload::limits::MAX_SIGNATURE_BYTES
    + crate::payload::container::HEADER_LEN;

#[derive(Debug, thiserror::Error)]
pub enum PartialError {
    #[error("partial downloads directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("partial downloads directory {path} is not a directory (a symlink or a file)")]
    NotDir { path: PathBuf },
}

/// The kept frames of one payload.
#[derive(Debug)]
pub struct Partials {
    dir: PathBuf,
    manifest: String,
    sync_every: Duration,
    /// Bytes of frames in flight that have arrived (kept ones included), until their
    /// operation is written: progress inside an operation.
    in_flight: AtomicU64,
    /// Set once the directory refused a write; logged once.
    broken: AtomicBool,
}

/// Where a frame's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes read from the kept file instead of the network.
    pub kept: u64,
}

impl Partials {
    /// The directory for partial downloads under `state_dir`.
    pub fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join("partial")
    }

    /// Opens (creating it, mode 0700) the store for the payload whose manifest has
    /// sha256 `manifest_sha256` (hex), removing every file not of that payload.
    pub fn open(
        state_dir: &Path,
        manifest_sha256: &str,
        sync_every: Duration,
    ) -> Result<Self, PartialError> {
        let dir = Self::dir(state_dir);
        let err = |source| PartialError::Dir {
            path: dir.clone(),
            source,
        };
        match fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| (e.kind(), e))
        {
            Ok(()) | Err((io::ErrorKind::AlreadyExists, _)) => {}
            Err((_, e)) => return Err(err(e)),
        }
        // Never follow a planted link out of the state directory.
        if !fs::symlink_metadata(&dir).map_err(err)?.is_dir() {
            return Err(PartialError::NotDir { path: dir });
        }
        let s = Self {
            dir: dir.clone(),
            manifest: manifest_sha256.to_owned(),
            sync_every,
            in_flight: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        };
        s.remove_where(|m, _| m != Some(s.manifest.as_str()))
            .map_err(err)?;
        Ok(s)
    }

    /// Removes the whole store (the attempt ended: staged, failed or cancelled).
    pub fn remove_all(state_dir: &Path) -> io::Result<()> {
        match fs::remove_dir_all(Self::dir(state_dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes of the frames being fetched that have arrived so far.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn path(&self, op: usize) -> PathBuf {
        self.dir.join(format!("{}-{op}.part", self.manifest))
    }

    fn head_path(dir: &Path, manifest: &str) -> PathBuf {
        dir.join(format!("{manifest}.head"))
    }

    /// Keeps the payload's size and its first `head.len()` bytes (once; best effort,
    /// like every kept byte).
    pub fn keep_head(&self, size: u64, head: &[u8]) {
        let path = Self::head_path(&self.dir, &self.manifest);
        if path.exists() {
            return;
        }
        let mut bytes = Vec::with_capacity(8 + head.len());
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(head);
        if let Err((p, e)) = crate::durable::replace(&path, &bytes) {
            tracing::warn!(path = %p.display(), error = %e, "cannot keep the payload's head; a restart fetches it again");
        }
    }

    /// The size and head [`Partials::keep_head`] kept for the payload whose manifest
    /// has sha256 `manifest_sha256`, if any. Unchecked: the caller verifies them.
    pub fn kept_head(state_dir: &Path, manifest_sha256: &str) -> Option<(u64, Vec<u8>)> {
        let path = Self::head_path(&Self::dir(state_dir), manifest_sha256);
        let file = File::open(path).ok()?;
        // Bounded: a head is a manifest and its signatures, never the payload.
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(file, MAX_HEAD + 8), &mut bytes).ok()?;
        let (size, head) = bytes.split_first_chunk::<8>()?;
        Some((u64::from_le_bytes(*size), head.to_vec()))
    }

    /// Removes the files of operations before `first`: a checkpoint made them durable
    /// in the slot.
    pub fn keep_from(&self, first: usize) {
        let r = self.remove_where(|m, op| {
            m == Some(self.manifest.as_str()) && op.is_some_and(|op| op < first)
        });
        if let Err(e) = r {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove kept partial downloads");
        }
    }

    /// An operation whose `len`-byte frame was fetched is written (or given up): its
    /// bytes leave the in-flight figure.
    pub fn written(&self, len: u64) {
        self.in_flight.fetch_sub(len, Ordering::Relaxed);
    }

    /// Forgets what was kept of `op` (its `len`-byte frame did not verify).
    pub fn discard(&self, op: usize, len: u64) {
        self.written(len);
        match fs::remove_file(self.path(op)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(op, error = %e, "cannot remove a kept partial download");
            }
            _ => {}
        }
    }

    /// Removes files for which `drop(manifest, op)` says so; names that are not ours
    /// at all get `(None, None)`.
    fn remove_where(&self, drop: impl Fn(Option<&str>, Option<usize>) -> bool) -> io::Result<()> {
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let (m, op) = parse_name(&name.to_string_lossy());
            if drop(m.as_deref(), op) {
                match fs::remove_file(e.path()) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Fills `buf` with operation `op`'s frame, at `offset` in `src`: the kept bytes
    /// first, then the rest from `src`, appended to the kept file as it arrives.
    pub fn fetch(
        &self,
        src: &dyn RangeSource,
        op: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<Fetched> {
        let file = self.open_file(op);
        let kept = file.as_ref().map_or(0, |f| read_kept(f, buf));
        self.in_flight.fetch_add(kept as u64, Ordering::Relaxed);
        let mut w = Appender {
            store: self,
            op,
            file,
            at: kept as u64,
            unsynced: 0,
            synced: Instant::now(),
        };
        let r = if kept == buf.len() {
            Ok(())
        } else {
            src.read_range_streaming(offset + kept as u64, &mut buf[kept..], &mut |piece| {
                self.in_flight
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                w.append(piece);
            })
        };
        // Whatever happened, what arrived goes to the disk now: a power cut after a
        // failed attempt must not cost it.
        w.sync();
        // A fetched frame stays in flight until its operation is written (`written`);
        // a failed one leaves now. `at` counts the kept bytes and every one that arrived.
        if r.is_err() {
            self.in_flight.fetch_sub(w.at, Ordering::Relaxed);
        }
        r.map(|()| Fetched { kept: kept as u64 })
    }

    fn open_file(&self, op: usize) -> Option<File> {
        let path = self.path(op);
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
            .and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(f)
                } else {
                    Err(io::Error::other("not a regular file"))
                }
            });
        match r {
            Ok(f) => Some(f),
            Err(e) => {
                self.refused(&path, &e);
                None
            }
        }
    }

    fn refused(&self, path: &Path, e: &io::Error) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep a partial download; an interruption will fetch its frame again");
        }
    }
}

/// Reads what `f` holds of a frame into the start of `buf`; a file longer than the
/// frame is not ours to trust and starts over.
fn read_kept(f: &File, buf: &mut [u8]) -> usize {
    let len = f.metadata().map_or(0, |m| m.len());
    let n = match usize::try_from(len) {
        Ok(n) if n <= buf.len() => n,
        _ => 0,
    };
    if n == 0 || f.read_exact_at(&mut buf[..n], 0).is_err() {
        let _ = f.set_len(0);
        return 0;
    }
    n
}

/// Appends arriving bytes to a kept file, fsyncing now and then.
struct Appender<'a> {
    store: &'a Partials,
    op: usize,
    file: Option<File>,
    at: u64,
    unsynced: u64,
    synced: Instant,
}

impl Appender<'_> {
    fn append(&mut self, piece: &[u8]) {
        let at = self.at;
        self.at += piece.len() as u64;
        let Some(f) = &self.file else { return };
        if let Err(e) = f.write_all_at(piece, at) {
            self.store.refused(&self.store.path(self.op), &e);
            // A hole would make the file lie about its bytes: stop keeping this frame.
            let _ = f.set_len(at.min(f.metadata().map_or(0, |m| m.len())));
            self.file = None;
            return;
        }
        self.unsynced += piece.len() as u64;
        if self.unsynced >= SYNC_BYTES || self.synced.elapsed() >= self.store.sync_every {
            self.sync();
        }
    }

    fn sync(&mut self) {
        if self.unsynced == 0 {
            return;
        }
        if let Some(f) = &self.file {
            if f.sync_data().is_ok() && self.at == self.unsynced {
                // The first bytes of a new file: its name must survive a power cut too.
                let _ = File::open(&self.store.dir).and_then(|d| d.sync_all());
            }
        }
        self.unsynced = 0;
        self.synced = Instant::now();
    }
}

/// `<manifest>-<op>.part` → its parts.
fn parse_name(name: &str) -> (Option<String>, Option<usize>) {
    if let Some(m) = name.strip_suffix(".head") {
        return (Some(m.to_owned()), None);
    }
    let Some((m, op)) = name.strip_suffix(".part").and_then(|n| n.rsplit_once('-')) else {
        return (None, None);
    };
    (Some(m.to_owned()), op.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A remote source that hands bytes over in 1,000-byte pieces and can fail after a
    /// number of them; it records what was asked of it.
    struct Flaky {
        data: Vec<u8>,
        fail_after: Mutex<Option<usize>>,
        asked: Mutex<Vec<(u64, usize)>>,
    }

    impl Flaky {
        fn new(len: usize) -> Self {
            Self {
                data: (0..len).map(|i| (i % 251) as u8).collect(),
                fail_after: Mutex::new(None),
                asked: Mutex::new(Vec::new()),
            }
        }
        fn asked(&self) -> Vec<(u64, usize)> {
            std::mem::take(&mut *self.asked.lock().expect("asked"))
        }
    }

    impl RangeSource for Flaky {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_range(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.read_range_streaming(offset, buf, &mut |_| {})
        }
        fn name(&self) -> &Path {
            Path::new("flaky")
        }
        fn is_remote(&self) -> bool {
            true
        }
        fn read_range_streaming(
            &self,
            offset: u64,
            buf: &mut [u8],
            arrived: &mut dyn FnMut(&[u8]),
        ) -> io::Result<()> {
            self.asked.lock().expect("asked").push((offset, buf.len()));
            let limit = self.fail_after.lock().expect("fail").take();
            let src = &self.data[offset as usize..offset as usize + buf.len()];
            for (i, (d, s)) in buf.chunks_mut(1000).zip(src.chunks(1000)).enumerate() {
                if limit.is_some_and(|l| i * 1000 >= l) {
                    return Err(io::Error::other("connection reset"));
                }
                d.copy_from_slice(s);
                arrived(d);
            }
            Ok(())
        }
    }

    const M1: &str = "aaaa";
    const M2: &str = "bbbb";

    fn files(state: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(Partials::dir(state))
            .map(|d| {
                d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn an_interrupted_frame_resumes_from_its_kept_bytes_in_a_new_store() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = Flaky::new(100_000);
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        let mut buf = vec![0u8; 50_000];
        *src.fail_after.lock().expect("f") = Some(20_000);
        assert!(p.fetch(&src, 3, 10_000, &mut buf).is_err());
        assert_eq!(
            p.in_flight(),
            0,
            "a failed fetch leaves the in-flight figure"
        );
        assert_eq!(src.asked(), [(10_000, 50_000)]);
        // A new process: the store is opened again for the same payload.
        drop(p);
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        let mut buf = vec![0u8; 50_000];
        assert_eq!(
            p.fetch(&src, 3, 10_000, &mut buf).expect("fetch"),
            Fetched { kept: 20_000 }
        );
        assert_eq!(src.asked(), [(30_000, 30_000)], "only what had not arrived");
        assert!(buf == src.data[10_000..60_000]);
        assert_eq!(p.in_flight(), 50_000, "in flight until written");
        p.written(50_000);
        assert_eq!(p.in_flight(), 0);
        // Complete and not yet covered by a checkpoint: nothing to fetch at all.
        let mut again = vec![0u8; 50_000];
        p.fetch(&src, 3, 10_000, &mut again).expect("fetch");
        assert_eq!(src.asked(), []);
        assert!(again == buf);
    }

    #[test]
    fn files_are_tied_to_the_payload_and_the_operation() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = Flaky::new(100_000);
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        for op in [1, 2, 5] {
            p.fetch(&src, op, 0, &mut [0u8; 3000]).expect("fetch");
        }
        fs::write(Partials::dir(d.path()).join("junk"), b"x").expect("junk");
        p.keep_from(2);
        assert_eq!(files(d.path()), ["aaaa-2.part", "aaaa-5.part", "junk"]);
        // Another payload: nothing of the first is kept, nor anything not ours.
        let p = Partials::open(d.path(), M2, Duration::from_secs(1)).expect("open");
        assert!(files(d.path()).is_empty(), "{:?}", files(d.path()));
        let mut buf = vec![0u8; 3000];
        assert_eq!(p.fetch(&src, 5, 0, &mut buf).expect("f").kept, 0);
        Partials::remove_all(d.path()).expect("remove");
        assert!(!Partials::dir(d.path()).exists());
    }

    #[test]
    fn the_head_is_kept_until_the_attempt_ends_and_only_for_its_payload() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(Partials::kept_head(d.path(), M1), None);
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        p.keep_head(123_456, b"signed head");
        p.keep_head(1, b"a second call keeps the first");
        let kept = Some((123_456, b"signed head".to_vec()));
        assert_eq!(Partials::kept_head(d.path(), M1), kept);
        assert_eq!(Partials::kept_head(d.path(), M2), None);
        p.keep_from(usize::MAX);
        assert_eq!(Partials::kept_head(d.path(), M1), kept, "not a frame");
        drop(p);
        let _ = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("reopen");
        assert_eq!(Partials::kept_head(d.path(), M1), kept, "same payload");
        let _ = Partials::open(d.path(), M2, Duration::from_secs(1)).expect("open");
        assert_eq!(Partials::kept_head(d.path(), M1), None, "another payload");
        // Shorter than its size field: nothing.
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        fs::write(Partials::head_path(&p.dir, M1), b"1234").expect("torn");
        assert_eq!(Partials::kept_head(d.path(), M1), None);
    }

    #[test]
    fn a_kept_file_longer_than_its_frame_is_not_trusted() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = Flaky::new(10_000);
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        fs::write(p.path(0), vec![9u8; 6000]).expect("torn");
        let mut buf = vec![0u8; 5000];
        assert_eq!(p.fetch(&src, 0, 0, &mut buf).expect("fetch").kept, 0);
        assert!(buf == src.data[..5000]);
        assert_eq!(fs::read(p.path(0)).expect("kept"), buf);
    }

    #[test]
    fn links_are_never_followed() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = Flaky::new(10_000);
        let outside = d.path().join("outside");
        fs::write(&outside, b"keep me").expect("outside");
        let p = Partials::open(d.path(), M1, Duration::from_secs(1)).expect("open");
        std::os::unix::fs::symlink(&outside, p.path(0)).expect("link");
        let mut buf = vec![0u8; 5000];
        // The frame still arrives; it is only not kept.
        assert_eq!(p.fetch(&src, 0, 0, &mut buf).expect("fetch").kept, 0);
        assert!(buf == src.data[..5000]);
        assert_eq!(fs::read(&outside).expect("outside"), b"keep me");
        // A planted directory link is refused as the store itself.
        let d2 = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(d.path(), Partials::dir(d2.path())).expect("link");
        let e = Partials::open(d2.path(), M1, Duration::from_secs(1)).expect_err("link");
        assert!(matches!(e, PartialError::NotDir { .. }), "{e}");
    }
}
