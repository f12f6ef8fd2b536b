//! `updatectl bundle sign`: adds signatures to a payload, so a releases role with a
//! threshold above one can be met: each key holder signs the manifest in turn. The
//! manifest and blob are not touched; the signature block grows, and the blob moves
//! to the next 4 KiB boundary when it no longer fits before it (a new file is written
//! beside the old one and renamed over it only when complete).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::payload::container::head_bytes;
use crate::payload::limits::MAX_SIGNATURES;
use crate::payload::{FileSource, Payload, PublisherKey, RangeSource, Trust};

pub fn run(payload: &Path, keys: &[PathBuf]) -> anyhow::Result<()> {
    let keys = keys
        .iter()
        .map(|k| PublisherKey::load(k))
        .collect::<Result<Vec<_>, _>>()?;
    let src = FileSource::open(payload)?;
    let p = Payload::open(&src, Trust::InspectOnly)?;
    let mut manifest = vec![0u8; p.manifest_len as usize];
    src.read_range(crate::payload::container::HEADER_LEN, &mut manifest)
        .with_context(|| format!("reading {}", payload.display()))?;
    let mut sigs = p.signatures.clone();
    for k in &keys {
        let s = k.sign(&manifest);
        sigs.retain(|old| old.key != s.key);
        sigs.push(s);
    }
    anyhow::ensure!(
        sigs.len() as u64 <= MAX_SIGNATURES,
        "{}: {} signatures, more than the format's {MAX_SIGNATURES}",
        payload.display(),
        sigs.len()
    );
    let head = head_bytes(&manifest, &sigs)?;
    let tmp = payload.with_extension("uap.signing");
    let write = || -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&tmp)?;
        out.write_all(&head)?;
        let mut old = File::open(payload)?;
        old.seek(SeekFrom::Start(p.blob_offset))?;
        io::copy(&mut old, &mut out)?;
        out.sync_all()?;
        fs::rename(&tmp, payload)?;
        let dir = payload.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    };
    write().with_context(|| format!("writing {}", payload.display()))?;
    println!(
        "{}: {} signature{}",
        payload.display(),
        sigs.len(),
        if sigs.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
