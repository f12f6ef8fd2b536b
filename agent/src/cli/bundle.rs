//! `updatectl bundle`: the publisher's verbs.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::payload::generate::{self, Image};
use crate::payload::{sign, FileSource, Manifest, OpKind, Payload, PublisherKey, Trust};
use crate::timefmt;

use super::rebuild::rebuild;
pub use super::rebuild::{human, Rejected};

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Make a new ed25519 signing key pair (NAME.key, mode 0600, and NAME.pub).
    Keygen {
        /// Directory to write the key pair into.
        #[arg(long)]
        out: PathBuf,
        /// Base name of the key files.
        #[arg(long, default_value = "update-agent")]
        name: String,
    },
    /// Build a full payload and one delta per --source from a slot image.
    Create(CreateArgs),
    /// Point a channel at a release in a payload directory: writes the signed
    /// DIR/channels/CHANNEL.json naming VERSION's full payload and its deltas.
    Publish {
        /// Channel name (what nodes follow), e.g. stable.
        #[arg(long)]
        channel: String,
        /// The payload directory `create` wrote (served as the node's releases.url).
        #[arg(long)]
        dir: PathBuf,
        /// The release the channel points at (VERSION.full.uap must be in DIR).
        #[arg(long, required_unless_present = "refresh")]
        version: Option<String>,
        /// Publisher's secret key (PKCS#8 PEM); nodes must trust its public half.
        /// Repeat to sign with several (a channels role with a threshold).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Sign the current document again with a new expiry: same release, same
        /// payloads, the rollout not restarted (nodes refuse older documents, so a
        /// refresh is how a channel stays current without a release).
        #[arg(long, conflicts_with_all = ["version", "waves"])]
        refresh: bool,
        /// Days until nodes refuse the channel document (re-publish before then).
        #[arg(long, default_value_t = 30)]
        expires_in_days: u64,
        /// A rollout wave, AFTER:PERCENT: by AFTER (seconds or e.g. 4h) after
        /// publication, PERCENT of the fleet may start. Repeat; the last must be 100.
        /// None: every node at once.
        #[arg(long = "wave", value_name = "AFTER:PERCENT", value_parser = parse_wave)]
        waves: Vec<crate::policy::wave::Wave>,
    },
    /// Show what a payload holds (does not check signatures).
    Inspect {
        payload: PathBuf,
        /// Print the versioned JSON form instead of text.
        #[arg(long)]
        json: bool,
        /// Also list every operation.
        #[arg(long)]
        ops: bool,
    },
    /// Check signature, expiry and blob; with --source (or for a full payload),
    /// rebuild the target image and compare its sha256.
    Verify {
        payload: PathBuf,
        /// Directory of trusted public keys (*.pub).
        #[arg(long, default_value = sign::DEFAULT_KEYS_DIR)]
        keys: PathBuf,
        /// The image a delta applies to (for a full payload: an image to reuse blocks from).
        #[arg(long)]
        source: Option<PathBuf>,
    },
    /// Add signatures to a payload (each holder of a releases role with a threshold
    /// above one signs in turn); the manifest and the blob are unchanged.
    Sign {
        payload: PathBuf,
        /// Secret key (PKCS#8 PEM); repeat to sign with several.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// The root of trust: which keys sign releases, channels and the next root.
    #[command(subcommand)]
    Root(super::root::RootCommand),
    /// Verify a payload and write the image it produces to a file.
    Apply {
        payload: PathBuf,
        #[arg(long, default_value = sign::DEFAULT_KEYS_DIR)]
        keys: PathBuf,
        #[arg(long)]
        source: Option<PathBuf>,
        /// Where to write the target image (written as a temporary file, renamed when verified).
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new slot image.
    #[arg(long)]
    target: PathBuf,
    /// An image nodes run now; a delta is made from each. The first also steers the
    /// full payload so nodes on it download only what they lack.
    #[arg(long)]
    source: Vec<PathBuf>,
    /// Release version of the target.
    #[arg(long)]
    version: String,
    /// Product/board line the image is for.
    #[arg(long)]
    compatible: String,
    /// Publisher's secret key (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// Directory for the payload files.
    #[arg(long)]
    out: PathBuf,
    /// Refuse nodes running anything older than this version.
    #[arg(long)]
    min_source_version: Option<String>,
    /// Days until nodes refuse the payload.
    #[arg(long, default_value_t = 180)]
    expires_in_days: u64,
    /// Sign the dm-verity tree of the target: nodes build it into the slot after the
    /// image, check its root against the signed one before arming, and boot through it.
    /// The slot must have room for the tree (about 1/128 of the image) after the image.
    #[arg(long)]
    verity: bool,
    /// Byte offset of the tree's superblock in the slot (default: right after the
    /// image). Needs --verity.
    #[arg(long, requires = "verity")]
    verity_hash_offset: Option<u64>,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    /// Accept a target smaller than a source.
    #[arg(long)]
    allow_shrink: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Target output of one PATCH/DATA operation in a delta, KiB (tuning).
    #[arg(long, default_value_t = 2048, hide = true)]
    delta_chunk_kib: u64,
    /// Most reference bytes of one PATCH operation, KiB (tuning; decoders hold this much).
    #[arg(long, default_value_t = 8192, hide = true)]
    max_reference_kib: u64,
    /// Target output of one DATA operation of new content, KiB (tuning).
    #[arg(long, default_value_t = 16384, hide = true)]
    data_chunk_kib: u64,
    /// Build only the deltas, not the full payload (benchmarks).
    #[arg(long, hide = true, conflicts_with = "no_deltas")]
    no_full: bool,
    /// Build only the full payload; --source images only steer it (benchmarks).
    #[arg(long, hide = true)]
    no_deltas: bool,
}

pub fn run(cmd: BundleCommand) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Keygen { out, name } => {
            super::publish::check_name("--name", &name)?;
            let k = sign::keygen(&out, &name)
                .with_context(|| format!("writing key pair to {}", out.display()))?;
            println!(
                "secret key  {}  (keep it off the nodes)",
                k.secret.display()
            );
            println!(
                "public key  {}  (install in {}/)",
                k.public.display(),
                sign::DEFAULT_KEYS_DIR
            );
            println!("fingerprint {}", hex::encode(k.fingerprint));
            Ok(())
        }
        BundleCommand::Create(args) => create(&args),
        BundleCommand::Publish {
            channel,
            dir,
            version,
            keys,
            refresh,
            expires_in_days,
            waves,
        } => super::publish::run(&super::publish::Publish {
            channel: &channel,
            dir: &dir,
            version: if refresh { None } else { version.as_deref() },
            keys: &keys,
            expires_in_days,
            waves,
        }),
        BundleCommand::Inspect { payload, json, ops } => inspect(&payload, json, ops),
        BundleCommand::Root(cmd) => super::root::run(cmd),
        BundleCommand::Sign { payload, keys } => super::sign::run(&payload, &keys),
        BundleCommand::Verify {
            payload,
            keys,
            source,
        } => rebuild(&payload, &keys, source.as_deref(), None),
        BundleCommand::Apply {
            payload,
            keys,
            source,
            output,
        } => rebuild(&payload, &keys, source.as_deref(), Some(&output)),
    }
}

fn create(a: &CreateArgs) -> anyhow::Result<()> {
    super::publish::check_name("--version", &a.version)?;
    super::publish::check_name("--compatible", &a.compatible)?;
    if let Some(v) = &a.min_source_version {
        super::publish::check_name("--min-source-version", v)?;
    }
    if let Some(jobs) = a.jobs {
        rayon::ThreadPoolBuilder::new()
            .num_threads(jobs.max(1))
            .build_global()
            .context("starting worker threads")?;
    }
    // Fail on a missing key before minutes of work, not after.
    let key = PublisherKey::load(&a.key)?;
    let target = Image::open(&a.target)?;
    let verity = if a.verity {
        Some(generate::verity_of(&target, a.verity_hash_offset)?)
    } else {
        None
    };
    let sources = a
        .source
        .iter()
        .map(|p| Image::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let created = timefmt::now();
    let mut opts = generate::Options::new(
        &a.compatible,
        &a.version,
        created,
        created + a.expires_in_days.max(1) * 86_400,
    );
    opts.min_source_version.clone_from(&a.min_source_version);
    opts.verity = verity;
    opts.level = a.level;
    opts.allow_shrink = a.allow_shrink;
    opts.delta_chunk = a.delta_chunk_kib << 10;
    opts.max_reference = a.max_reference_kib << 10;
    opts.data_chunk = a.data_chunk_kib << 10;

    let started = std::time::Instant::now();
    if !a.no_full {
        let full_path = a.out.join(format!("{}.full.uap", a.version));
        let s = generate::create_full(&target, sources.first(), &opts, &key, &full_path)?;
        print_summary(&s, None, started.elapsed().as_secs_f64());
    }
    for src in sources.iter().filter(|_| !a.no_deltas) {
        let t = std::time::Instant::now();
        let sha = src.sha256();
        let path = a.out.join(format!(
            "{}.from-{}.uap",
            a.version,
            &hex::encode(sha)[..16]
        ));
        let s = generate::create_delta(&target, src, &opts, &key, &path)?;
        print_summary(&s, Some(&src.path), t.elapsed().as_secs_f64());
    }
    Ok(())
}

fn parse_wave(s: &str) -> Result<crate::policy::wave::Wave, String> {
    let bad = || format!("{s:?} is not AFTER:PERCENT (e.g. 0:5, 4h:25, 2d:100)");
    let (after, percent) = s.split_once(':').ok_or_else(bad)?;
    let after_secs = match after.trim().parse::<u64>() {
        Ok(n) => n,
        Err(_) => {
            let d = crate::policy::window::parse_duration(after)
                .or_else(|| {
                    // Days are the natural unit for a fleet's schedule.
                    let days: u64 = after.trim().strip_suffix('d')?.parse().ok()?;
                    Some(jiff::SignedDuration::from_hours(
                        i64::try_from(days * 24).ok()?,
                    ))
                })
                .ok_or_else(bad)?;
            u64::try_from(d.as_secs()).map_err(|_| bad())?
        }
    };
    let percent = percent.trim().parse::<f64>().map_err(|_| bad())?;
    Ok(crate::policy::wave::Wave {
        after_secs,
        percent,
    })
}

fn print_summary(s: &generate::Summary, from: Option<&Path>, secs: f64) {
    let what = match from {
        Some(p) => format!("delta from {}", p.display()),
        None => "full payload".to_owned(),
    };
    println!(
        "{}  {}  {} in {} operations ({:.1} s)",
        s.path.display(),
        what,
        human(s.payload_bytes),
        s.operations,
        secs
    );
}

/// Per-kind totals for `inspect`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct KindStats {
    pub kind: &'static str,
    pub operations: usize,
    /// Target bytes the operations of this kind write.
    pub target_bytes: u64,
    /// Blob bytes they carry.
    pub data_bytes: u64,
}

/// The stable `inspect --json` document (schema 1, see docs/payload-format.md).
#[derive(Debug, serde::Serialize)]
pub struct InspectJson {
    pub schema: u32,
    pub path: PathBuf,
    pub payload_bytes: u64,
    pub head_bytes: u64,
    pub manifest_bytes: u64,
    pub kind: &'static str,
    pub compatible: String,
    pub version: String,
    pub min_source_version: Option<String>,
    pub created: String,
    pub expires: String,
    pub block_size: u32,
    pub target_size: u64,
    pub target_sha256: String,
    pub verity: Option<VerityJson>,
    pub source_size: Option<u64>,
    pub source_sha256: Option<String>,
    pub blob_size: u64,
    pub blob_sha256: String,
    pub signed_by: Vec<String>,
    pub operations: Vec<KindStats>,
}

/// The dm-verity parameters, as `bundle inspect --json` prints them.
#[derive(Debug, serde::Serialize)]
pub struct VerityJson {
    pub root_hash: String,
    pub salt: String,
    pub uuid: String,
    /// Where the superblock sits in the slot.
    pub hash_offset: u64,
    /// Superblock and tree.
    pub hash_bytes: u64,
}

pub fn kind_stats(m: &Manifest) -> Vec<KindStats> {
    [OpKind::Zero, OpKind::Copy, OpKind::Data, OpKind::Patch]
        .into_iter()
        .map(|k| {
            let mut s = KindStats {
                kind: k.name(),
                ..KindStats::default()
            };
            for op in m.operations.iter().filter(|o| o.kind == k) {
                s.operations += 1;
                s.target_bytes += m.bytes(op.dst_blocks());
                s.data_bytes += op.data_len;
            }
            s
        })
        .collect()
}

fn inspect(path: &Path, json: bool, list_ops: bool) -> anyhow::Result<()> {
    let src = FileSource::open(path)?;
    let p = Payload::open(&src, Trust::InspectOnly)?;
    let doc = inspect_doc(path, &p);
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print_inspected(path, &doc);
    if list_ops {
        print_operations(&p.manifest);
    }
    Ok(())
}

/// What `inspect` knows of a payload, as the JSON document says it.
fn inspect_doc(path: &Path, p: &Payload) -> InspectJson {
    let m = &p.manifest;
    InspectJson {
        schema: 2,
        path: path.to_owned(),
        payload_bytes: p.blob_offset + m.blob_size,
        head_bytes: p.head_len(),
        manifest_bytes: p.manifest_len,
        kind: if m.is_delta() { "delta" } else { "full" },
        compatible: m.compatible.clone(),
        version: m.version.clone(),
        min_source_version: m.min_source_version.clone(),
        created: timefmt::rfc3339(m.created),
        expires: timefmt::rfc3339(m.expires),
        block_size: m.block_size,
        target_size: m.target_size,
        target_sha256: hex::encode(m.target_sha256),
        verity: m.verity.as_ref().map(|v| VerityJson {
            root_hash: hex::encode(v.root_hash),
            salt: hex::encode(&v.salt),
            uuid: crate::verity::uuid_text(&v.uuid),
            hash_offset: v.hash_offset,
            hash_bytes: v.geometry(m.target_size).map_or(0, |g| g.hash_bytes()),
        }),
        source_size: m.source.as_ref().map(|s| s.size),
        source_sha256: m.source.as_ref().map(|s| hex::encode(s.sha256)),
        blob_size: m.blob_size,
        blob_sha256: hex::encode(m.blob_sha256),
        signed_by: p.signatures.iter().map(|s| hex::encode(s.key)).collect(),
        operations: kind_stats(m),
    }
}

/// The summary for people: kind, versions, dates, target, signers, layout and the
/// operations by kind.
fn print_inspected(path: &Path, doc: &InspectJson) {
    println!(
        "payload      {} ({})",
        path.display(),
        human(doc.payload_bytes)
    );
    match (&doc.source_sha256, doc.source_size) {
        (Some(sha), Some(size)) => println!("kind         delta from sha256:{sha} ({size} bytes)"),
        _ => println!("kind         full"),
    }
    println!("compatible   {}", doc.compatible);
    println!(
        "version      {} (from: {})",
        doc.version,
        doc.min_source_version
            .as_deref()
            .map_or("any version".to_owned(), |v| format!("{v} or newer"))
    );
    println!("created      {}   expires {}", doc.created, doc.expires);
    println!(
        "target       {} bytes, sha256:{}",
        doc.target_size, doc.target_sha256
    );
    match &doc.verity {
        Some(v) => println!(
            "verity       root {} salt {}\n             tree at byte {} ({} bytes), uuid {}",
            v.root_hash, v.salt, v.hash_offset, v.hash_bytes, v.uuid
        ),
        None => println!("verity       none"),
    }
    println!(
        "signed by    {} (not checked here; use `updatectl bundle verify`)",
        doc.signed_by
            .iter()
            .map(|s| &s[..16])
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "layout       {} before the blob (manifest {}), blob {}",
        human(doc.head_bytes),
        human(doc.manifest_bytes),
        human(doc.blob_size)
    );
    println!(
        "operations   {:<6} {:>7} {:>12} {:>12}",
        "kind", "count", "writes", "data"
    );
    for s in &doc.operations {
        println!(
            "             {:<6} {:>7} {:>12} {:>12}",
            s.kind,
            s.operations,
            human(s.target_bytes),
            human(s.data_bytes)
        );
    }
}

/// One line per operation (`--list-ops`).
fn print_operations(m: &Manifest) {
    println!(
        "\n{:>6} {:<6} {:>10} {:>8} {:>10} {:>8} {:>12}",
        "op", "kind", "writes", "extents", "source", "extents", "data"
    );
    for (i, op) in m.operations.iter().enumerate() {
        println!(
            "{:>6} {:<6} {:>10} {:>8} {:>10} {:>8} {:>12}",
            i,
            op.kind.name(),
            human(m.bytes(op.dst_blocks())),
            op.dst.len(),
            human(m.bytes(op.src_blocks())),
            op.src.len(),
            op.data_len
        );
    }
}
