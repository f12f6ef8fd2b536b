//! `updatectl bundle publish`: point a channel at a release, or refresh it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::channel::{Channel, PayloadPin};
use crate::payload::{codec, FileSource, Payload, PublisherKey, Trust};
use crate::timefmt;

/// What to publish.
#[derive(Debug)]
pub struct Publish<'a> {
    pub channel: &'a str,
    pub dir: &'a Path,
    /// The release; None: refresh the current document.
    pub version: Option<&'a str>,
    pub keys: &'a [PathBuf],
    pub expires_in_days: u64,
    pub waves: Vec<crate::policy::wave::Wave>,
}

pub fn run(p: &Publish<'_>) -> anyhow::Result<()> {
    anyhow::ensure!(
        crate::channel::valid_name(p.channel),
        "--channel {:?} must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with a dot",
        p.channel
    );
    let keys = p
        .keys
        .iter()
        .map(|k| PublisherKey::load(k))
        .collect::<Result<Vec<_>, _>>()?;
    let out_dir = p.dir.join("channels");
    let out = out_dir.join(format!("{}.json", p.channel));
    let now = timefmt::now();
    let expires = now + p.expires_in_days.max(1) * 86_400;
    let doc = match p.version {
        Some(version) => fresh(p, version, now, expires)?,
        None => {
            let mut doc = current(&out)?;
            doc.rollout_start = Some(doc.rollout_start());
            doc.published = now.max(doc.published + 1);
            doc.expires = expires;
            doc
        }
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let refs: Vec<&PublisherKey> = keys.iter().collect();
    crate::durable::replace(&out, &doc.sign_by(&refs)).map_err(|(path, e)| {
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    })?;
    println!(
        "channel {} -> {} ({}, {} delta{}), expires {}: {}",
        p.channel,
        doc.version,
        doc.compatible,
        doc.deltas.len(),
        if doc.deltas.len() == 1 { "" } else { "s" },
        timefmt::rfc3339(doc.expires),
        out.display()
    );
    Ok(())
}

/// The channel's current document, read without checking its signature (the
/// publisher's own file; the new signatures are what nodes check).
fn current(path: &Path) -> anyhow::Result<Channel> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading {} (--refresh needs a published channel)",
            path.display()
        )
    })?;
    let (body, _) = crate::trust::envelope::open(&bytes, crate::channel::MAX_LEN)
        .with_context(|| format!("channel document {}", path.display()))?;
    serde_json::from_slice(&body).with_context(|| format!("channel document {}", path.display()))
}

/// A document for `version`: its full payload, every delta in the directory, and the
/// pin of each.
fn fresh(p: &Publish<'_>, version: &str, now: u64, expires: u64) -> anyhow::Result<Channel> {
    crate::policy::wave::validate(&p.waves).context("--wave")?;
    check_name("--version", version)?;
    let full_name = format!("{version}.full.uap");
    let (full, full_pin) = open(&p.dir.join(&full_name))?;
    let compatible = full.manifest.compatible.clone();
    anyhow::ensure!(
        full.manifest.version == version && !full.manifest.is_delta(),
        "{} is not the full payload of {version}",
        p.dir.join(&full_name).display()
    );
    let mut payloads = BTreeMap::from([(full_name.clone(), full_pin)]);
    let mut deltas = BTreeMap::new();
    let prefix = format!("{version}.from-");
    let entries =
        std::fs::read_dir(p.dir).with_context(|| format!("reading {}", p.dir.display()))?;
    for e in entries {
        let name = e
            .with_context(|| format!("reading {}", p.dir.display()))?
            .file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(&prefix) && name.ends_with(".uap")) {
            continue;
        }
        let path = p.dir.join(name.as_ref());
        let (d, pin) = open(&path)?;
        let Some(src) = &d.manifest.source else {
            anyhow::bail!(
                "{} is named like a delta but is a full payload",
                path.display()
            );
        };
        anyhow::ensure!(
            d.manifest.version == version && d.manifest.compatible == compatible,
            "{} is {} for {}, not {version} for {compatible}",
            path.display(),
            d.manifest.version,
            d.manifest.compatible
        );
        deltas.insert(hex::encode(src.sha256), name.clone().into_owned());
        payloads.insert(name.into_owned(), pin);
    }
    Ok(Channel {
        format: crate::channel::FORMAT.into(),
        channel: p.channel.to_owned(),
        compatible,
        version: version.to_owned(),
        published: now,
        expires,
        full: full_name,
        deltas,
        waves: p.waves.clone(),
        payloads,
        rollout_start: None,
    })
}

fn open(path: &Path) -> anyhow::Result<(Payload, PayloadPin)> {
    let src = FileSource::open(path)?;
    let p = Payload::open(&src, Trust::InspectOnly)?;
    let pin = PayloadPin {
        manifest_sha256: hex::encode(Sha256::digest(codec::encode(&p.manifest))),
        size: std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len(),
    };
    Ok((p, pin))
}

/// Versions and product names end up in file names and on status screens.
pub(super) fn check_name(what: &str, v: &str) -> anyhow::Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c))
        && !v.starts_with('.');
    anyhow::ensure!(
        ok,
        "{what} {v:?} must be 1-128 characters of A-Z a-z 0-9 . _ + ~ - and not start with a dot"
    );
    Ok(())
}
