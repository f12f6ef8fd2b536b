//! The signed JSON envelope channel documents and roots share:
//!
//! ```json
//! {"signed": "<base64 of the body>", "signatures": [{"key": "<hex fingerprint>", "signature": "<base64>"}]}
//! ```
//!
//! The body's exact bytes are what is signed, so no canonical JSON is needed: the
//! reader verifies the bytes it was given and only then parses them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::payload::sign::Domain;
use crate::payload::sign::{PublisherKey, SignatureEntry};

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    signed: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnvelopeSignature {
    key: String,
    signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("document is {len} bytes, more than the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("document is not valid JSON of the expected shape")]
    Malformed(#[source] serde_json::Error),
    #[error("field `{0}` is not valid base64/hex of the right length")]
    Encoding(&'static str),
    #[error("more than {max} signatures")]
    TooManySignatures { max: usize },
}

/// Most signatures an envelope may carry (a root of a few keys needs a handful).
pub const MAX_SIGNATURES: usize = 32;

/// Splits `bytes` into the signed body and its signatures; nothing is trusted yet.
/// `max` bounds what is parsed at all: these documents come from the network.
pub fn open(bytes: &[u8], max: u64) -> Result<(Vec<u8>, Vec<SignatureEntry>), EnvelopeError> {
    if bytes.len() as u64 > max {
        return Err(EnvelopeError::TooLarge {
            len: bytes.len() as u64,
            max,
        });
    }
    let env: Envelope = serde_json::from_slice(bytes).map_err(EnvelopeError::Malformed)?;
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(EnvelopeError::TooManySignatures {
            max: MAX_SIGNATURES,
        });
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64
        .decode(&env.signed)
        .map_err(|_| EnvelopeError::Encoding("signed"))?;
    let sigs = env
        .signatures
        .iter()
        .map(|s| {
            let key: [u8; 32] = hex::decode(&s.key)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or(EnvelopeError::Encoding("signatures.key"))?;
            let signature: [u8; 64] = b64
                .decode(&s.signature)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or(EnvelopeError::Encoding("signatures.signature"))?;
            Ok(SignatureEntry { key, signature })
        })
        .collect::<Result<Vec<_>, EnvelopeError>>()?;
    Ok((body, sigs))
}

/// Wraps `body` and its signatures into a file's bytes.
pub fn seal(body: &[u8], sigs: &[SignatureEntry]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = Envelope {
        signed: b64.encode(body),
        signatures: sigs
            .iter()
            .map(|s| EnvelopeSignature {
                key: hex::encode(s.key),
                signature: b64.encode(s.signature),
            })
            .collect(),
    };
    // Serialising strings cannot fail.
    let mut out = serde_json::to_vec_pretty(&env).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Signs `body` in `domain` with every key in `keys`.
pub fn sign_all(domain: Domain, body: &[u8], keys: &[&PublisherKey]) -> Vec<SignatureEntry> {
    keys.iter().map(|k| k.sign_as(domain, body)).collect()
}

/// Adds signatures to a sealed document (a second signer of a threshold role signs
/// what the first produced), replacing any earlier signature by the same key.
pub fn add_signatures(
    bytes: &[u8],
    max: u64,
    domain: Domain,
    keys: &[&PublisherKey],
) -> Result<Vec<u8>, EnvelopeError> {
    let (body, mut sigs) = open(bytes, max)?;
    for s in sign_all(domain, &body, keys) {
        sigs.retain(|old| old.key != s.key);
        sigs.push(s);
    }
    Ok(seal(&body, &sigs))
}
