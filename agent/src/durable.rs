//! Crash-safe file replacement, the one write discipline for every small document the
//! agent and the publisher tools keep (state, history, channel documents), and the
//! extra step a rename on the ESP (vfat) needs.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` so that a power cut leaves the old file or the new
/// one, never a mix: write a temporary file beside it, fsync it, rename it over, fsync
/// the directory. On failure, names the file the failing step was working on.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), (PathBuf, io::Error)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let at = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    let mut f = create_new(&tmp).map_err(at(&tmp))?;
    f.write_all(bytes).map_err(at(&tmp))?;
    f.sync_all().map_err(at(&tmp))?;
    fs::rename(&tmp, path).map_err(at(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at(dir))?;
    Ok(())
}

/// Creates `tmp` as a new file, never through a symlink or over a file someone else
/// put there (`O_EXCL | O_NOFOLLOW`): whoever can write the directory (a node-exporter
/// textfile directory, say) cannot make a root process write through a link planted at
/// the temporary name. A leftover from a crash is removed (unlink never follows links)
/// and the create tried again; one that keeps coming back is an error.
fn create_new(tmp: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(tmp)
    };
    for _ in 0..3 {
        match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::remove_file(tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            r => return r,
        }
    }
    open()
}

/// Makes a file just renamed durable under its new name. Linux's vfat writes a renamed
/// file's directory entry with start cluster 0 and size 0 and fills both in only when
/// the file's inode is written back (up to ~30 s later, or at its fsync): an fsync of
/// the directory alone makes the *empty* entry durable, and a power cut before the
/// writeback leaves the file empty, its clusters lost (an empty grubenv, or a
/// systemd-boot default entry that boots nothing: VM lab scenario 4). So every rename
/// on the ESP fsyncs the file at its new name, which writes its entry, before the
/// caller fsyncs the directory.
pub fn sync_renamed(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_and_names_the_failing_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("doc.json");
        super::replace(&p, b"one").expect("write");
        super::replace(&p, b"two").expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(
            std::fs::read_dir(d.path()).expect("dir").count(),
            1,
            "no temp left"
        );
        let (at, _) = super::replace(&d.path().join("missing/doc.json"), b"x").expect_err("no dir");
        assert!(at.ends_with(".doc.json.tmp"), "{}", at.display());
    }

    /// Hardening finding 6: a symlink planted at the temporary name (by whoever can
    /// write the directory) is never written through.
    #[test]
    fn never_writes_through_a_planted_symlink() {
        let d = tempfile::tempdir().expect("tempdir");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let p = d.path().join("update_agent.prom");
        std::os::unix::fs::symlink(&victim, d.path().join(".update_agent.prom.tmp"))
            .expect("plant");
        super::replace(&p, b"metrics").expect("replace");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(std::fs::read(&p).expect("new"), b"metrics");
        assert!(!std::fs::symlink_metadata(&p)
            .expect("meta")
            .file_type()
            .is_symlink());
        // A stale temporary from a crash is replaced too.
        std::fs::write(d.path().join(".update_agent.prom.tmp"), b"stale").expect("stale");
        super::replace(&p, b"again").expect("replace");
        assert_eq!(std::fs::read(&p).expect("new"), b"again");
    }
}
