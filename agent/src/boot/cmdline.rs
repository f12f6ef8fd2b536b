//! The kernel command line of a slot: one function for the systemd-boot entry, the
//! kexec path, and (checked by a test against the script) the GRUB fragment's
//! `ua_boot_slot`, so the three cannot drift apart.

use super::RootVerity;
use crate::slots::Slot;

/// `root=… [dm-verity words] updateagent.slot=S [options]`: the words every boot of
/// `slot` gets, in the order the GRUB fragment writes them. `label` is the slot's GPT
/// PARTLABEL; `options` the further arguments (`boot.options`, GRUB's `ua_cmdline`).
pub fn slot_cmdline(label: &str, slot: Slot, verity: Option<&RootVerity>, options: &str) -> String {
    let root = match verity {
        Some(v) => v.kernel_args(label),
        None => format!("root=PARTLABEL={label}"),
    };
    let mut line = format!("{root} updateagent.slot={slot}");
    if !options.trim().is_empty() {
        line.push(' ');
        line.push_str(options.trim());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_verity_roots() {
        assert_eq!(
            slot_cmdline("root-b", Slot::B, None, " ro quiet "),
            "root=PARTLABEL=root-b updateagent.slot=b ro quiet"
        );
        let v = RootVerity::new(&"ab".repeat(32), 4096).expect("hash");
        let line = slot_cmdline("root-a", Slot::A, Some(&v), "");
        assert!(
            line.starts_with("root=/dev/mapper/root roothash=abab"),
            "{line}"
        );
        assert!(
            line.ends_with("hash-offset=4096,restart-on-corruption updateagent.slot=a"),
            "{line}"
        );
    }

    /// The GRUB fragment builds the same line in its own script language: its words,
    /// with the fragment's variables for the label, hash and offset, must be ours.
    #[test]
    fn grub_fragment_builds_the_same_line() {
        let cfg = include_str!("../../../bootloader-hooks/grub/update-agent.cfg");
        let verity = super::super::verity_words("${ua_rh}", "${ua_ho}", "${ua_label}");
        let (root, rest) = verity.split_once(' ').expect("two parts");
        assert_eq!(root, "root=/dev/mapper/root");
        assert!(
            cfg.contains(&format!("set ua_root=\"{root}\"")),
            "verity root"
        );
        assert!(
            cfg.contains(&format!("set ua_verity=\"{rest}\"")),
            "verity words"
        );
        assert!(
            cfg.contains("set ua_root=\"root=PARTLABEL=${ua_label}\""),
            "plain root"
        );
        assert!(
            cfg.contains("\"$ua_root\" $ua_verity \"updateagent.slot=$1\" $ua_cmdline"),
            "the order of the words on the linux line"
        );
    }
}
