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
    let mut f = File::create(&tmp).map_err(at(&tmp))?;
    f.write_all(bytes).map_err(at(&tmp))?;
    f.sync_all().map_err(at(&tmp))?;
    fs::rename(&tmp, path).map_err(at(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at(dir))?;
    Ok(())
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
}
