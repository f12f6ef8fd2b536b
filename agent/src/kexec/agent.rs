//! The agent's reboot: the node's parts handed to [`super::reboot`].

use std::path::Path;

use super::{KernelFiles, KexecOs, Node, RebootError, Rebooting, Refusal, Settings};
use crate::boot::{slot_cmdline, RootVerity};
use crate::reboot_method::RebootMethod;
use crate::slots::Slot;
use crate::update::Agent;

impl Agent {
    /// Reboots the node as `method` asks (see the room's doc): into the armed trial by
    /// kexec when it can, else through the firmware. The update lock is held while the
    /// bootloader's count changes; a lock held elsewhere makes it a firmware reboot.
    pub fn reboot_node(
        &mut self,
        method: RebootMethod,
        os: &dyn KexecOs,
    ) -> Result<Rebooting, RebootError> {
        let settings = Settings::new(&self.cfg.boot);
        let (_lock, state) = match method {
            RebootMethod::Kexec => match self.store.lock() {
                Ok(l) => (Some(l), self.store.load()),
                Err(e) => (None, Err(e)),
            },
            RebootMethod::Firmware => (None, self.store.load()),
        };
        let images = self.store.images();
        let cfg = &self.cfg;
        let layout = &self.layout;
        let settings_ref = &settings;
        let cmdline = |slot: Slot| -> Result<String, Refusal> {
            if cfg.boot.backend != "systemd-boot" {
                super::check_grub_options(settings_ref, slot, &cfg.boot.options)?;
            }
            let label = match slot {
                Slot::A => &cfg.slots.label_a,
                Slot::B => &cfg.slots.label_b,
            };
            let verity = images[slot.index()]
                .as_ref()
                .and_then(|i| i.verity.as_ref())
                .and_then(|v| RootVerity::new(&v.root_hash, v.hash_offset).ok());
            Ok(slot_cmdline(
                label,
                slot,
                verity.as_ref(),
                &cfg.boot.options,
            ))
        };
        let kernel = |slot: Slot| -> Result<KernelFiles, Refusal> {
            if cfg.boot.backend == "systemd-boot" {
                // The copy systemd-boot would load, verified when it was installed.
                let dir = Path::new(crate::boot::systemd_boot::KERNEL_DIR).join(slot.letter());
                return KernelFiles::open(slot, &cfg.boot.esp, &dir);
            }
            // GRUB reads the slot's own /boot; so does the kexec, mounted read-only.
            let device = &layout.partition(slot).device;
            let mount = crate::slots::ReadOnlyMount::new(device, &cfg.state_dir.join("kexec-mnt"))
                .map_err(|source| Refusal::Mount { slot, source })?;
            let mut files = KernelFiles::open(slot, mount.path(), Path::new("boot"))?;
            files.mount = Some(mount);
            Ok(files)
        };
        let node = Node {
            boot: self.boot.as_mut(),
            state,
            state_dir: &cfg.state_dir,
            settings: &settings,
            kernel: &kernel,
            cmdline: &cmdline,
        };
        super::reboot(method, node, os)
    }
}
