//! Admission: a payload opened and checked (signature, expiry, compatible, version
//! rules) before anything is written.

use sha2::{Digest, Sha256};

use crate::fetch;
use crate::partial::Partials;
use crate::payload::{codec, Payload, RangeSource, Trust};
use crate::state::Staging;
use crate::timefmt;

use super::{error_chain, Agent, UpdateError};

/// An opened, trusted payload: its byte source, the parsed payload, and the canonical
/// manifest bytes (whose sha256 identifies the attempt across restarts).
pub(super) type Opened = (Box<dyn RangeSource>, Payload, Vec<u8>);

impl Agent {
    /// Opens the payload at `url` and applies every policy check that does not need
    /// the slot (signature, expiry, compatible, version rules); writes nothing.
    pub fn check(&self, url: &str, allow_downgrade: bool) -> Result<Checked, UpdateError> {
        let (src, p, _) = self.open_checked(url, allow_downgrade, None)?;
        let m = &p.manifest;
        // A remote payload's head, for the staging that follows: all the opening request
        // brought (the first frame usually starts in it), so that staging need not ask
        // the server for any of it again.
        let head = src
            .is_remote()
            .then(|| {
                let len = p.head_len().max(fetch::FIRST_REQUEST.min(src.size()));
                let mut head = vec![0u8; len as usize];
                src.read_range(0, &mut head)
                    .ok()
                    .map(|()| (src.size(), head))
            })
            .flatten();
        Ok(Checked {
            url: url.to_owned(),
            version: m.version.clone(),
            delta: m.is_delta(),
            download_bytes: src.size(),
            head,
        })
    }

    /// Opens a payload and applies every policy check that does not need the slot.
    /// `kept`: the payload's size and head from an earlier opening (a check moments
    /// before), checked again here like fetched bytes, so they are not fetched twice.
    pub(super) fn open_checked(
        &self,
        url: &str,
        allow_downgrade: bool,
        kept: Option<(u64, Vec<u8>)>,
    ) -> Result<Opened, UpdateError> {
        self.follow_root()?;
        let src = fetch::open_kept(url, &self.cfg.fetch, kept)?;
        let opened = self.check_opened(src, allow_downgrade)?;
        // A payload at a place a channel named must be the one it named.
        let (src, p, mbytes) = &opened;
        crate::trust::marks::Marks::load(&self.cfg.state_dir)?.check(
            url,
            &hex::encode(Sha256::digest(mbytes)),
            src.size(),
            &p.manifest.version,
        )?;
        Ok(opened)
    }

    /// Reopens the payload of an interrupted staging, from its kept head when there is
    /// one (verified again like a fetched one) and from the network otherwise.
    pub(super) fn reopen(&self, s: &Staging) -> Result<Opened, UpdateError> {
        if let Some(kept) = Partials::kept_head(&self.cfg.state_dir, &s.manifest_sha256) {
            let opened = fetch::open_kept(&s.url, &self.cfg.fetch, Some(kept))
                .map_err(UpdateError::from)
                .and_then(|src| self.check_opened(src, true));
            match opened {
                Ok(o) if hex::encode(Sha256::digest(&o.2)) == s.manifest_sha256 => return Ok(o),
                Ok(_) => tracing::warn!(
                    "the kept payload head is of another manifest; fetching it again"
                ),
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "the kept payload head did not open; fetching it again")
                }
            }
        }
        self.open_checked(&s.url, true, None)
    }

    fn check_opened(
        &self,
        src: Box<dyn RangeSource>,
        allow_downgrade: bool,
    ) -> Result<Opened, UpdateError> {
        let trust = self.trust();
        let now = timefmt::now();
        trust.current(now)?;
        let p = Payload::open(
            src.as_ref(),
            Trust::Keys {
                keys: trust.releases(),
                now,
            },
        )?;
        let m = &p.manifest;
        crate::trust::node::lifetime(
            || format!("payload {}", m.version),
            m.expires,
            now,
            self.cfg.trust.max_payload_days,
            "trust.max_payload_days",
        )?;
        if m.compatible != self.cfg.compatible {
            return Err(UpdateError::Incompatible {
                payload: m.compatible.clone(),
                node: self.cfg.compatible.clone(),
            });
        }
        match self.running_version() {
            Some(running) => {
                if !allow_downgrade && crate::version::compare(&m.version, &running).is_lt() {
                    return Err(UpdateError::Downgrade {
                        from: running,
                        to: m.version.clone(),
                    });
                }
                if let Some(min) = &m.min_source_version {
                    if crate::version::compare(&running, min).is_lt() {
                        return Err(UpdateError::SourceTooOld {
                            to: m.version.clone(),
                            minimum: min.clone(),
                            running,
                        });
                    }
                }
            }
            None if allow_downgrade => {}
            None => {
                return Err(UpdateError::UnknownRunning {
                    path: self.cfg.os_release.clone(),
                })
            }
        }
        self.fits_slot(m)?;
        let manifest_bytes = codec::encode(m);
        Ok((src, p, manifest_bytes))
    }

    /// The image, and its dm-verity tree when it has one, fit the inactive slot.
    pub(super) fn fits_slot(&self, m: &crate::payload::Manifest) -> Result<(), UpdateError> {
        let slot = self.layout.inactive();
        let slot_size = self.layout.partition(slot).size;
        if m.target_size > slot_size {
            return Err(UpdateError::TargetTooLarge {
                version: m.version.clone(),
                size: m.target_size,
                slot,
                slot_size,
            });
        }
        let Some(v) = &m.verity else { return Ok(()) };
        let geo = v
            .geometry(m.target_size)
            .map_err(crate::apply::ApplyError::VerityParams)?;
        if geo.end() > slot_size {
            return Err(UpdateError::TreeDoesNotFit {
                version: m.version.clone(),
                size: m.target_size,
                tree_bytes: geo.hash_bytes(),
                tree_end: geo.end(),
                slot,
                slot_size,
            });
        }
        Ok(())
    }
}

/// What [`Agent::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub url: String,
    pub version: String,
    pub delta: bool,
    /// Bytes fetched at most: the head and every blob (reused blocks cost less).
    pub download_bytes: u64,
    /// A remote payload's size and verified head, handed to [`Agent::stage_as`].
    pub head: Option<(u64, Vec<u8>)>,
}
