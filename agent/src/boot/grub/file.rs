//! The file backend: one grubenv file, read, changed by one transition and written
//! in place.
//!
//! GRUB's `save_env` writes the block's disk sectors directly, so the file must keep its
//! size and allocation: every call re-reads the file (other tools may have changed it),
//! applies one transition, and writes the 1024 bytes at offset 0 of the same file
//! (never truncated or replaced), then `sync_all`. Nothing is written when the bytes do
//! not change. Only [`Grub::create`] makes a new file (temporary file, fsync, rename,
//! fsync of the directory). While the content fits in the first 512 bytes (it does
//! unless other tools store a lot), the second sector is `#` padding before and after
//! a write, so even a device that tears a 1024-byte write between sectors leaves the
//! old block or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::env::{EnvError, GrubEnv, BLOCK_SIZE};
use super::state::GrubState;
use crate::boot::{BootControl, BootError, BootStatus, RootVerity};
use crate::slots::Slot;

/// The GRUB backend over one grubenv file.
#[derive(Debug)]
pub struct Grub {
    pub(super) path: PathBuf,
}

impl Grub {
    /// Opens an existing grubenv and checks it (block and agent variables). A missing
    /// file is a [`BootError::Read`] with `NotFound`: creating one is [`Grub::create`]'s job.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, BootError> {
        let grub = Self { path: path.into() };
        let (_, env) = grub.read_block()?;
        GrubState::from_env(&env).map_err(|e| e.at(&grub.path))?;
        Ok(grub)
    }

    /// Creates a grubenv that boots `default` (the other slot marked unbootable). Refuses
    /// to replace an existing file. The result is byte-identical to `grub-editenv F
    /// create` followed by `grub-editenv F set` of the five variables.
    pub fn create(path: impl Into<PathBuf>, default: Slot) -> Result<Self, BootError> {
        let path = path.into();
        let werr = |source| BootError::Write {
            path: path.clone(),
            source,
        };
        match fs::symlink_metadata(&path) {
            Ok(_) => {
                return Err(werr(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a grubenv already exists; Grub::create never replaces one",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(werr(e)),
        }
        let mut env = GrubEnv::new();
        GrubState::initial(default)
            .apply_to(&mut env)
            .map_err(|e| e.at(&path))?;
        let block = env.to_bytes().map_err(|e| e.at(&path))?;

        let Some(file_name) = path.file_name() else {
            return Err(werr(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the grubenv path has no file name",
            )));
        };
        let mut tmp_name = file_name.to_owned();
        tmp_name.push(".new");
        let tmp = path.with_file_name(tmp_name);
        // Temporary file then rename, so a crash never leaves a short grubenv behind.
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&block)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path))
            .and_then(|()| crate::durable::sync_renamed(&path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(werr(e));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(werr)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The block as it is on disk now.
    pub fn env(&self) -> Result<GrubEnv, BootError> {
        self.read_block().map(|(_, env)| env)
    }

    fn read_block(&self) -> Result<([u8; BLOCK_SIZE], GrubEnv), BootError> {
        let rerr = |source| BootError::Read {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(rerr)?;
        let len = file.metadata().map_err(rerr)?.len();
        if len != BLOCK_SIZE as u64 {
            return Err(EnvError::Malformed("size is not 1024 bytes").at(&self.path));
        }
        let mut block = [0u8; BLOCK_SIZE];
        file.read_exact(&mut block).map_err(rerr)?;
        let env = GrubEnv::parse(&block).map_err(|e| e.at(&self.path))?;
        Ok((block, env))
    }

    /// In place: same file, same size, offset 0, then fsync.
    fn write_block(&self, block: &[u8; BLOCK_SIZE]) -> Result<(), BootError> {
        // Never hand GRUB a block it cannot read, whatever produced it.
        GrubEnv::parse(block).map_err(|e| e.at(&self.path))?;
        let werr = |source| BootError::Write {
            path: self.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(werr)?;
        let len = file.metadata().map_err(werr)?.len();
        if len != BLOCK_SIZE as u64 {
            // Replaced or resized since we read it: writing would change its size.
            return Err(EnvError::Malformed("size is not 1024 bytes").at(&self.path));
        }
        file.write_all_at(block, 0).map_err(werr)?;
        file.sync_all().map_err(werr)
    }

    fn update(
        &mut self,
        change: impl FnOnce(GrubState) -> Result<GrubState, BootError>,
    ) -> Result<(), BootError> {
        let (old, mut env) = self.read_block()?;
        let state = GrubState::from_env(&env).map_err(|e| e.at(&self.path))?;
        let next = change(state)?;
        next.apply_to(&mut env).map_err(|e| e.at(&self.path))?;
        let block = env.to_bytes().map_err(|e| e.at(&self.path))?;
        if block != old {
            self.write_block(&block)?;
        }
        Ok(())
    }
}

impl BootControl for Grub {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn status(&self) -> Result<BootStatus, BootError> {
        let env = self.env()?;
        let state = GrubState::from_env(&env).map_err(|e| e.at(&self.path))?;
        Ok(state.status(env.owned_raw()))
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        self.update(|s| s.mark_unbootable(slot))
    }

    fn arm_trial(&mut self, slot: Slot, tries: u8) -> Result<(), BootError> {
        self.update(|s| s.arm_trial(slot, tries))
    }

    fn consume_try(&mut self, slot: Slot) -> Result<u8, BootError> {
        self.update(|s| s.consume_try(slot))?;
        Ok(self.status()?.trial.map_or(0, |(_, left)| left))
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        self.update(|s| s.commit(slot))
    }

    fn rollback_to(&mut self, slot: Slot) -> Result<(), BootError> {
        self.update(|s| s.rollback_to(slot))
    }

    fn guard_default(&mut self, slot: Slot, boots: u8) -> Result<bool, BootError> {
        self.update(|s| s.guard_default(slot, boots))?;
        Ok(true)
    }

    /// `ua_X_roothash` and `ua_X_hashoff` in the block (set, or removed for a plain
    /// root), read by the fragment when it boots slot X; the A/B variables untouched.
    fn set_root(&mut self, slot: Slot, verity: Option<&RootVerity>) -> Result<(), BootError> {
        let (old, mut env) = self.read_block()?;
        let (hash, off) = (format!("ua_{slot}_roothash"), format!("ua_{slot}_hashoff"));
        match verity {
            Some(v) => {
                env.set(&hash, v.root_hash())
                    .map_err(|e| e.at(&self.path))?;
                env.set(&off, &v.hash_offset().to_string())
                    .map_err(|e| e.at(&self.path))?;
            }
            None => {
                env.unset(&hash);
                env.unset(&off);
            }
        }
        let block = env.to_bytes().map_err(|e| e.at(&self.path))?;
        if block != old {
            self.write_block(&block)?;
        }
        Ok(())
    }
}
