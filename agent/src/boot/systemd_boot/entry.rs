//! Entry contents.

use super::{INITRD_NAME, KERNEL_DIR, KERNEL_NAME};
use crate::boot::RootVerity;
use crate::slots::Slot;

/// What goes into an entry besides the slot and the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryConfig {
    /// Shown in the menu, followed by the version and the slot.
    pub title: String,
    /// GPT PARTLABELs of the slots, `[a, b]`, for `root=PARTLABEL=`.
    pub root_labels: [String; 2],
    /// Further kernel arguments, after `root=` and `updateagent.slot=`.
    pub options: String,
}

impl Default for EntryConfig {
    fn default() -> Self {
        Self {
            title: "update-agent".into(),
            root_labels: ["root-a".into(), "root-b".into()],
            options: "ro".into(),
        }
    }
}

impl EntryConfig {
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.title.trim().is_empty() || self.title.chars().any(char::is_control) {
            return Err("the entry title is empty or has control characters");
        }
        let label_ok =
            |l: &String| !l.is_empty() && !l.chars().any(|c| c.is_control() || c.is_whitespace());
        if !self.root_labels.iter().all(label_ok) {
            return Err("a root partition label is empty or has spaces or control characters");
        }
        if self.options.chars().any(char::is_control) {
            return Err("the kernel options have control characters");
        }
        Ok(())
    }
}

/// `/update-agent/<slot>/<file>`: a path on the ESP as entries name it.
fn esp_path(slot: Slot, file: &str) -> String {
    format!("/{KERNEL_DIR}/{slot}/{file}")
}

/// The entry for `slot`. `version` must have no control characters. With `verity` the
/// root is mounted through dm-verity (see [`RootVerity::kernel_args`]).
pub fn entry_text(
    cfg: &EntryConfig,
    slot: Slot,
    version: &str,
    initrd: bool,
    verity: Option<&RootVerity>,
) -> String {
    let mut t = format!(
        "title {} {version} (slot {slot})\nversion {version}\nlinux {}\n",
        cfg.title,
        esp_path(slot, KERNEL_NAME)
    );
    if initrd {
        t.push_str(&format!("initrd {}\n", esp_path(slot, INITRD_NAME)));
    }
    let label = &cfg.root_labels[slot.index()];
    let line = crate::boot::slot_cmdline(label, slot, verity, &cfg.options);
    t.push_str(&format!("options {line}\n"));
    t
}

/// `key value` lines as systemd-boot reads them (`#` comments, leading blanks skipped).
pub(super) fn key_values(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(['\n', '\r'])
        .map(|l| l.trim_start_matches([' ', '\t']))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once([' ', '\t']) {
            Some((k, v)) => (k, v.trim_matches([' ', '\t'])),
            None => (l, ""),
        })
}

pub(super) fn has_sort_key(text: &str) -> bool {
    key_values(text).any(|(k, _)| k == "sort-key")
}

pub(super) fn has_default(loader_conf: &str) -> bool {
    key_values(loader_conf).any(|(k, _)| k == "default")
}
