//! Bootloader backends behind one trait. The agent only ever asks for these five
//! things; each backend keeps its own state format (grubenv, BLS entry names, ...).

mod cmdline;
pub mod grub;
pub mod systemd_boot;

pub use cmdline::slot_cmdline;

#[cfg(test)]
pub(crate) mod parity_tests;

use crate::slots::Slot;

/// A slot's root mounted through dm-verity: what its boot entry hands the kernel, in
/// systemd's names (`roothash=`, `systemd.verity_root_data=`, `..._hash=`,
/// `..._options=`), data and tree on the slot's own partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootVerity {
    /// 64 hex digits.
    root_hash: String,
    /// Where the tree's superblock sits on the partition.
    hash_offset: u64,
}

impl RootVerity {
    /// Refuses anything but a sha256 in hex: the value goes into a GRUB script and a
    /// kernel command line, where only hex digits are harmless.
    pub fn new(root_hash: &str, hash_offset: u64) -> Result<Self, BootError> {
        if root_hash.len() != 64 || !root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BootError::BadArgument(
                "a dm-verity root hash is not 64 hex digits",
            ));
        }
        Ok(Self {
            root_hash: root_hash.to_ascii_lowercase(),
            hash_offset,
        })
    }

    pub fn root_hash(&self) -> &str {
        &self.root_hash
    }

    pub fn hash_offset(&self) -> u64 {
        self.hash_offset
    }

    /// The kernel arguments for a root on the partition labelled `label`, in place of
    /// `root=PARTLABEL=label`. A verity error on the running root restarts the node,
    /// so the bootloader's counter (or the next boot's agent) sees it.
    pub fn kernel_args(&self, label: &str) -> String {
        verity_words(&self.root_hash, &self.hash_offset.to_string(), label)
    }
}

/// The words of a dm-verity root; strings so the GRUB fragment's test can put the
/// script's variables in (see `cmdline`).
fn verity_words(root_hash: &str, hash_offset: &str, label: &str) -> String {
    format!(
        "root=/dev/mapper/root roothash={root_hash} systemd.verity_root_data=PARTLABEL={label} \
         systemd.verity_root_hash=PARTLABEL={label} \
         systemd.verity_root_options=hash-offset={hash_offset},restart-on-corruption"
    )
}

/// What a backend reports about the boot state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BootStatus {
    /// The slot that boots when no trial is pending (or once a trial runs out of tries).
    pub default: Slot,
    /// A slot armed for trial boots and the tries it has left.
    pub trial: Option<(Slot, u8)>,
    /// Whether each slot may be booted at all: `[a, b]`.
    pub bootable: [bool; 2],
    /// Boots of the default slot left before the bootloader tries the other one
    /// (`None`: the backend keeps no such guard, or it is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_boots_left: Option<u8>,
    /// The default slot the bootloader gave up on when its guard ran out: the other slot
    /// is running, and the agent has not acted on it yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fell_back_from: Option<Slot>,
    /// The backend's raw state, for `updatectl status` and bug reports.
    pub raw: String,
}

/// Whether [`BootControl::prepare`] must still run for `slot` before `arm_trial`: the
/// backend needs the release's files and the slot is not bootable yet. Staging begins by
/// marking the slot unbootable and only `arm_trial` makes it bootable again, so a
/// bootable slot was armed by an earlier run that stopped (power cut, kill) before its
/// state said so; preparing it again would be refused, since systemd-boot never stages
/// over an entry, and would leave the update stuck.
pub fn needs_prepare(boot: &dyn BootControl, slot: Slot) -> Result<bool, BootError> {
    Ok(boot.needs_release_files() && !boot.status()?.is_bootable(slot))
}

impl BootStatus {
    pub fn is_bootable(&self, slot: Slot) -> bool {
        self.bootable[slot.index()]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("reading boot state {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing boot state {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("boot state {path} is malformed: {what}")]
    Malformed {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("boot state {path} does not fit: {what}")]
    TooLarge {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("cannot {action} slot {slot}: {why}")]
    Refused {
        action: &'static str,
        slot: Slot,
        why: &'static str,
    },
    #[error("bad boot argument: {0}")]
    BadArgument(&'static str),
}

/// The contract every bootloader backend implements. Each call changes the state in
/// memory and commits it with one durable write (fsynced), so a power cut leaves
/// either the old state or the new one.
pub trait BootControl: Send + Sync {
    fn name(&self) -> &'static str;
    fn status(&self) -> Result<BootStatus, BootError>;
    /// Makes `slot` unbootable (before anything is written into it). Refused for the
    /// default slot: the node must always have something to boot.
    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError>;
    /// Marks `slot` bootable and arms it for `tries` trial boots; the default slot stays
    /// the fallback until `commit`.
    fn arm_trial(&mut self, slot: Slot, tries: u8) -> Result<(), BootError>;
    /// Makes `slot` the default and clears any trial.
    fn commit(&mut self, slot: Slot) -> Result<(), BootError>;
    /// Makes `slot` the default, clears any trial (the other slot stays as it is).
    fn rollback_to(&mut self, slot: Slot) -> Result<(), BootError>;
    /// Records how the kernel is to find `slot`'s root, before `prepare` and `arm_trial`:
    /// through dm-verity, or (`None`) the partition itself. GRUB keeps it in grubenv;
    /// systemd-boot writes it into the entry `prepare` stages next.
    fn set_root(&mut self, slot: Slot, verity: Option<&RootVerity>) -> Result<(), BootError>;
    /// Sets the default slot's boot guard back to `boots` once a boot of it (`slot`, the
    /// running slot) reached the agent: after that many boots of the default that never
    /// come back to this call, the bootloader boots the other slot (unless it is
    /// unbootable) and says so in [`BootStatus::fell_back_from`]. `slot` may also be
    /// the guarded default whose last boot this is (systemd-boot then already names the
    /// other slot as the default). `0` turns the guard off. Returns whether the backend
    /// keeps a guard at all; without one a default that stops booting is retried
    /// forever.
    fn guard_default(&mut self, _slot: Slot, _boots: u8) -> Result<bool, BootError> {
        Ok(false)
    }
    /// Counts one trial boot of `slot` down exactly as the bootloader does before it
    /// starts a trial kernel (GRUB: `ua_tries` 3 → 2; systemd-boot: the entry's
    /// `+3` → `+2-1`), for a boot that bypasses the bootloader (kexec). Returns the
    /// tries left after this one. Refused when `slot` is not the armed trial or has no
    /// try left (the bootloader would fall back instead).
    fn consume_try(&mut self, slot: Slot) -> Result<u8, BootError>;
    /// Whether `prepare` needs the release's files (its file system mounted).
    fn needs_release_files(&self) -> bool {
        false
    }
    /// Takes what the bootloader needs from a verified release before `arm_trial`
    /// (systemd-boot: the kernel and initrd onto the ESP). `root` is the release's file
    /// system, mounted read-only. GRUB reads the slot itself and needs nothing.
    fn prepare(
        &mut self,
        _slot: Slot,
        _version: &str,
        _root: &std::path::Path,
    ) -> Result<(), BootError> {
        Ok(())
    }
}
