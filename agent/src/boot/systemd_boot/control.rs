//! The backend behind the agent's [`BootControl`] calls: status from the ESP, and each
//! change planned on the pure state and carried out crash-safe.

use std::path::Path;

use super::{fs, BootFile, SystemdBoot, INITRD_NAME, KERNEL_NAME};
use crate::boot::{BootControl, BootError, BootStatus, RootVerity};
use crate::slots::Slot;

impl BootControl for SystemdBoot {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn needs_release_files(&self) -> bool {
        true
    }

    fn set_root(&mut self, slot: Slot, verity: Option<&RootVerity>) -> Result<(), BootError> {
        self.roots[slot.index()] = verity.cloned();
        Ok(())
    }

    /// Copies `/boot/vmlinuz` (and `/boot/initrd.img` when present) of the release,
    /// whose slot was verified byte for byte, onto the ESP and stages its entry.
    fn prepare(&mut self, slot: Slot, version: &str, root: &Path) -> Result<(), BootError> {
        let digest = |p: &Path| -> Result<[u8; 32], BootError> {
            let f = std::fs::File::open(p).map_err(|source| BootError::Read {
                path: p.to_owned(),
                source,
            })?;
            crate::hashio::sha256_of(f).map_err(|source| BootError::Read {
                path: p.to_owned(),
                source,
            })
        };
        // Resolved inside the slot: a symlink in the release cannot point the copy
        // at a file of the running system.
        let find = |name: &str| {
            let rel = Path::new("boot").join(name);
            fs::resolve_in_root(root, &rel).map_err(|source| BootError::Read {
                path: root.join(&rel),
                source,
            })
        };
        let kernel_path = find(KERNEL_NAME)?.ok_or_else(|| BootError::Read {
            path: root.join("boot").join(KERNEL_NAME),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let initrd_path = find(INITRD_NAME)?;
        let kernel = BootFile {
            path: &kernel_path,
            sha256: digest(&kernel_path)?,
        };
        let initrd_sha = match &initrd_path {
            Some(p) => Some(digest(p)?),
            None => None,
        };
        let initrd = initrd_path
            .as_deref()
            .zip(initrd_sha)
            .map(|(path, sha256)| BootFile { path, sha256 });
        self.stage(slot, version, &kernel, initrd.as_ref())
    }

    fn status(&self) -> Result<BootStatus, BootError> {
        let tree = self.read()?;
        let mut raw = tree.state.names();
        raw.extend(tree.foreign.iter().map(|f| f.name.clone()));
        tree.state
            .status(raw.join(" "))
            .map_err(|e| e.at(&self.entries_dir()))
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        // The slot's own files may be broken: removing them is the cure.
        let tree = self.read_checked(Some(slot), None);
        self.update(tree, |s| s.mark_unbootable(slot))
    }

    fn arm_trial(&mut self, slot: Slot, tries: u8) -> Result<(), BootError> {
        let tree = self.read_checked(None, Some(slot));
        self.update(tree, |s| s.arm_trial(slot, tries))
    }

    fn consume_try(&mut self, slot: Slot) -> Result<u8, BootError> {
        let tree = self.read();
        self.update(tree, |s| s.consume_try(slot))?;
        Ok(self.status()?.trial.map_or(0, |(_, left)| left))
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let tree = self.read();
        self.update(tree, |s| s.commit(slot))
    }

    fn rollback_to(&mut self, slot: Slot) -> Result<(), BootError> {
        let tree = self.read();
        self.update(tree, |s| s.rollback_to(slot))
    }

    fn guard_default(&mut self, slot: Slot, boots: u8) -> Result<bool, BootError> {
        let tree = self.read();
        self.update(tree, |s| s.guard_default(slot, boots))?;
        Ok(true)
    }
}
