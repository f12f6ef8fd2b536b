//! `updatectl bundle root`: the publisher's verbs for the root of trust. A root file
//! is always the signed envelope, with as many signatures as it has so far; any edit
//! of the body drops them (they no longer cover it), and `sign` adds them back.
//! docs/security.md has the rotation runbook.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;

use crate::payload::sign::{Domain, PublisherKey, TrustedKeys};
use crate::timefmt;
use crate::trust::envelope;
use crate::trust::root::{short_hex, RoleName, Root, RootBody, MAX_LEN};

#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Start root version 1 (unsigned): the keys of each role, threshold 1 each.
    Init {
        /// Where to write it, e.g. DIR/root/1.json (nodes ship a copy in the image).
        #[arg(long)]
        out: PathBuf,
        /// Public keys that may sign the next root (repeat).
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        /// Public keys that may sign payloads (repeat).
        #[arg(long = "releases-key", required = true)]
        releases_keys: Vec<PathBuf>,
        /// Public keys that may sign channel documents (repeat).
        #[arg(long = "channels-key", required = true)]
        channels_keys: Vec<PathBuf>,
        /// Days until nodes stop trusting it (sign a newer root before then).
        #[arg(long, default_value_t = 365)]
        expires_in_days: u64,
    },
    /// Start the next version of ROOT (unsigned, same keys) at --out.
    Next {
        root: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        expires_in_days: u64,
    },
    /// Let a public key act for a role.
    AddKey {
        root: PathBuf,
        #[arg(long, value_parser = parse_role)]
        role: RoleName,
        #[arg(long)]
        key: PathBuf,
    },
    /// Take a key (by fingerprint, at least 8 hex digits) out of a role.
    RemoveKey {
        root: PathBuf,
        #[arg(long, value_parser = parse_role)]
        role: RoleName,
        #[arg(long)]
        fingerprint: String,
    },
    /// How many of a role's keys must sign.
    Threshold {
        root: PathBuf,
        #[arg(long, value_parser = parse_role)]
        role: RoleName,
        threshold: usize,
    },
    /// Add signatures by secret keys (repeat --key).
    Sign {
        root: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Check a root: alone (signed by its own root threshold), or as the link after
    /// --previous (signed by the previous root's threshold too, version one more).
    Verify {
        root: PathBuf,
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<RoleName, String> {
    RoleName::parse(s).ok_or_else(|| format!("{s:?}: a role is root, releases or channels"))
}

pub fn run(cmd: RootCommand) -> anyhow::Result<()> {
    match cmd {
        RootCommand::Init {
            out,
            root_keys,
            releases_keys,
            channels_keys,
            expires_in_days,
        } => {
            let mut body = RootBody::new(1, expiry(expires_in_days));
            for (role, paths) in [
                (RoleName::Root, &root_keys),
                (RoleName::Releases, &releases_keys),
                (RoleName::Channels, &channels_keys),
            ] {
                for p in paths {
                    body.add_key(role, &TrustedKeys::load_public(p)?);
                }
            }
            write_new(&out, &body)
        }
        RootCommand::Next {
            root,
            out,
            expires_in_days,
        } => {
            let (mut body, _) = read(&root)?;
            body.version += 1;
            body.expires = expiry(expires_in_days);
            write_new(&out, &body)
        }
        RootCommand::AddKey { root, role, key } => edit(&root, |b| {
            let fp = b.add_key(role, &TrustedKeys::load_public(&key)?);
            println!("{} may now sign for {}", short_hex(&fp), role.name());
            Ok(())
        }),
        RootCommand::RemoveKey {
            root,
            role,
            fingerprint,
        } => edit(&root, |b| {
            let fp = b.remove_key(role, &fingerprint).with_context(|| {
                format!("no single key of role {} starts with {fingerprint:?} (give at least 8 hex digits)", role.name())
            })?;
            println!("{} no longer signs for {}", short_hex(&fp), role.name());
            Ok(())
        }),
        RootCommand::Threshold {
            root,
            role,
            threshold,
        } => edit(&root, |b| {
            b.role_mut(role).threshold = threshold;
            Ok(())
        }),
        RootCommand::Sign { root, keys } => sign(&root, &keys),
        RootCommand::Verify { root, previous } => verify(&root, previous.as_deref()),
    }
}

/// A new root's body written unsigned at `out`, which must not exist yet.
fn write_new(out: &Path, body: &RootBody) -> anyhow::Result<()> {
    if out.exists() {
        anyhow::bail!(
            "{} already exists; refusing to overwrite a root",
            out.display()
        );
    }
    write(out, body, &[])
}

/// `root sign`: the keys' signatures added to the root in place.
fn sign(root: &Path, keys: &[PathBuf]) -> anyhow::Result<()> {
    let bytes = std::fs::read(root).with_context(|| format!("reading {}", root.display()))?;
    let keys = keys
        .iter()
        .map(|p| PublisherKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&PublisherKey> = keys.iter().collect();
    let signed = envelope::add_signatures(&bytes, MAX_LEN, Domain::Root, &refs)
        .with_context(|| format!("root {}", root.display()))?;
    crate::durable::replace(root, &signed)
        .map_err(|(_, e)| e)
        .with_context(|| format!("writing {}", root.display()))
}

/// `root verify`: the root opened as trusted, or as the link after `previous`; an
/// expired root is shown with a warning.
fn verify(root: &Path, previous: Option<&Path>) -> anyhow::Result<()> {
    let bytes = std::fs::read(root).with_context(|| format!("reading {}", root.display()))?;
    let r = match previous {
        Some(prev) => {
            let pb = std::fs::read(prev).with_context(|| format!("reading {}", prev.display()))?;
            let p = Root::open_trusted(&pb)
                .with_context(|| format!("previous root {}", prev.display()))?;
            p.open_next(&bytes)
        }
        None => Root::open_trusted(&bytes),
    }
    .with_context(|| format!("root {}", root.display()))?;
    print_root(&r);
    if let Err(e) = r.current(timefmt::now()) {
        println!("warning      {e}");
    }
    Ok(())
}

fn expiry(days: u64) -> u64 {
    timefmt::now() + days * 86_400
}

fn read(path: &Path) -> anyhow::Result<(RootBody, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (body, _) =
        envelope::open(&bytes, MAX_LEN).with_context(|| format!("root {}", path.display()))?;
    let parsed: RootBody =
        serde_json::from_slice(&body).with_context(|| format!("root {}: body", path.display()))?;
    Ok((parsed, bytes))
}

fn write(path: &Path, body: &RootBody, keys: &[&PublisherKey]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::durable::replace(path, &body.sign(keys))
        .map_err(|(_, e)| e)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "root version {} written to {} (unsigned: sign it with `updatectl bundle root sign`)",
        body.version,
        path.display()
    );
    Ok(())
}

/// Changes the body; the signatures no longer cover it, so they go.
fn edit(path: &Path, f: impl FnOnce(&mut RootBody) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let (mut body, _) = read(path)?;
    f(&mut body)?;
    write(path, &body, &[])
}

fn print_root(r: &Root) {
    let b = r.body();
    println!("root version {}", b.version);
    println!("expires      {}", timefmt::rfc3339(b.expires));
    for role in RoleName::ALL {
        let keys = r.role(role);
        let fps: Vec<String> = keys
            .fingerprints()
            .map(crate::payload::sign::short)
            .collect();
        println!(
            "{:<12} {} of {}: {}",
            role.name(),
            keys.threshold(),
            keys.len(),
            fps.join(", ")
        );
    }
}
