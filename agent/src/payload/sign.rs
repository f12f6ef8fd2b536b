//! Keys and signatures: ed25519 over the canonical manifest bytes (and over channel
//! documents, in a domain of their own).
//!
//! Keys are PEM files (PKCS#8 for the secret, SubjectPublicKeyInfo for the public half),
//! the forms `openssl genpkey -algorithm ed25519` produces, so publishers can keep
//! keys in whatever tooling they already trust.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::error::TrustError;

/// What a signature is over. Its context is prepended to the bytes before signing, so
/// a signature over a manifest can never be replayed as one over a channel document,
/// or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Manifest,
    Channel,
    Root,
}

impl Domain {
    fn context(self) -> &'static [u8] {
        match self {
            Self::Manifest => b"update-agent manifest v1\n",
            Self::Channel => b"update-agent channel v1\n",
            Self::Root => b"update-agent root v1\n",
        }
    }

    fn message(self, bytes: &[u8]) -> Vec<u8> {
        let c = self.context();
        let mut msg = Vec::with_capacity(c.len() + bytes.len());
        msg.extend_from_slice(c);
        msg.extend_from_slice(bytes);
        msg
    }
}

/// The default directory of keys a node trusts.
pub const DEFAULT_KEYS_DIR: &str = "/etc/update-agent/keys.d";

/// sha256 of the raw 32-byte public key; names a key in signatures and messages.
pub type Fingerprint = [u8; 32];

pub fn fingerprint(key: &VerifyingKey) -> Fingerprint {
    Sha256::digest(key.as_bytes()).into()
}

/// Short printable form of a fingerprint.
pub fn short(fp: &Fingerprint) -> String {
    hex::encode(&fp[..8])
}

/// One signature as stored in a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    pub key: Fingerprint,
    pub signature: [u8; 64],
}

/// A publisher's secret key.
#[derive(Debug)]
pub struct PublisherKey {
    key: SigningKey,
}

impl PublisherKey {
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let pem = fs::read_to_string(path).map_err(|source| TrustError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| TrustError::ParseKey {
            path: path.to_owned(),
            expected: "secret (PKCS#8)",
        })?;
        Ok(Self { key })
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn sign(&self, manifest: &[u8]) -> SignatureEntry {
        self.sign_as(Domain::Manifest, manifest)
    }

    pub fn sign_as(&self, domain: Domain, bytes: &[u8]) -> SignatureEntry {
        SignatureEntry {
            key: fingerprint(&self.public()),
            signature: self.key.sign(&domain.message(bytes)).to_bytes(),
        }
    }
}

/// Paths written by [`keygen`].
#[derive(Debug)]
pub struct KeyPairPaths {
    pub secret: PathBuf,
    pub public: PathBuf,
    pub fingerprint: Fingerprint,
}

/// Makes a new key pair in `dir` as `NAME.key` (mode 0600) and `NAME.pub`.
/// Existing files are never overwritten: losing a signing key strands a fleet.
pub fn keygen(dir: &Path, name: &str) -> std::io::Result<KeyPairPaths> {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    fs::create_dir_all(dir)?;
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let pub_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    for path in [&secret, &public] {
        if path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} already exists; refusing to overwrite a key",
                    path.display()
                ),
            ));
        }
    }
    write_new(&secret, pem.as_bytes(), 0o600)?;
    write_new(&public, pub_pem.as_bytes(), 0o644)?;
    Ok(KeyPairPaths {
        secret,
        public,
        fingerprint: fingerprint(&key.verifying_key()),
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The set of public keys a node (or `bundle verify`) trusts for one kind of
/// document, and how many of them must sign it.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(Fingerprint, VerifyingKey)>,
    /// Distinct keys of the set whose signatures must verify; 0 and 1 both mean one
    /// (a `keys.d` directory is the one-key case).
    threshold: usize,
}

impl TrustedKeys {
    /// Loads every `*.pub` file in `dir`. A file that does not parse is an error that
    /// names it: a key an operator meant to trust and silently did not is a trap.
    pub fn load_dir(dir: &Path) -> Result<Self, TrustError> {
        let rd = |source| TrustError::ReadKeyDir {
            path: dir.to_owned(),
            source,
        };
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(rd)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(rd)?;
        paths.retain(|p| p.extension().is_some_and(|e| e == "pub"));
        paths.sort();
        let mut keys = Self::default();
        for path in &paths {
            keys.add(Self::load_public(path)?);
        }
        if keys.keys.is_empty() {
            return Err(TrustError::NoTrustedKeys {
                path: dir.to_owned(),
            });
        }
        Ok(keys)
    }

    pub fn load_public(path: &Path) -> Result<VerifyingKey, TrustError> {
        let pem = fs::read_to_string(path).map_err(|source| TrustError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        VerifyingKey::from_public_key_pem(&pem).map_err(|_| TrustError::ParseKey {
            path: path.to_owned(),
            expected: "public (SubjectPublicKeyInfo)",
        })
    }

    /// The same keys, of which `threshold` must sign.
    pub fn with_threshold(mut self, threshold: usize) -> Self {
        self.threshold = threshold;
        self
    }

    pub fn threshold(&self) -> usize {
        self.threshold.max(1)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn fingerprints(&self) -> impl Iterator<Item = &Fingerprint> {
        self.keys.iter().map(|(fp, _)| fp)
    }

    pub fn add(&mut self, key: VerifyingKey) {
        let fp = fingerprint(&key);
        if !self.keys.iter().any(|(f, _)| *f == fp) {
            self.keys.push((fp, key));
        }
    }

    /// Accepts the manifest if signatures by at least the threshold of distinct trusted
    /// keys verify (a key counts once however often it signs). A signature that names
    /// a trusted key but does not verify is a hard failure, never skipped in favour of
    /// another one. Returns the first trusted signer.
    pub fn verify(
        &self,
        manifest: &[u8],
        signatures: &[SignatureEntry],
    ) -> Result<Fingerprint, TrustError> {
        self.verify_as(Domain::Manifest, manifest, signatures)
    }

    pub fn verify_as(
        &self,
        domain: Domain,
        bytes: &[u8],
        signatures: &[SignatureEntry],
    ) -> Result<Fingerprint, TrustError> {
        if signatures.is_empty() {
            return Err(TrustError::Unsigned);
        }
        let msg = domain.message(bytes);
        let mut good: Vec<Fingerprint> = Vec::new();
        for entry in signatures {
            if good.contains(&entry.key) {
                continue;
            }
            if let Some((fp, key)) = self.keys.iter().find(|(fp, _)| *fp == entry.key) {
                let sig = Signature::from_bytes(&entry.signature);
                key.verify_strict(&msg, &sig)
                    .map_err(|_| TrustError::BadSignature {
                        fingerprint: short(fp),
                    })?;
                good.push(*fp);
            }
        }
        let names = |fps: &mut dyn Iterator<Item = &Fingerprint>| {
            fps.map(short).collect::<Vec<_>>().join(", ")
        };
        match good.first() {
            None => Err(TrustError::UntrustedKey {
                fingerprints: names(&mut signatures.iter().map(|s| &s.key)),
            }),
            Some(_) if good.len() < self.threshold() => Err(TrustError::BelowThreshold {
                have: good.len(),
                need: self.threshold(),
                fingerprints: names(&mut good.iter()),
            }),
            Some(first) => Ok(*first),
        }
    }
}
