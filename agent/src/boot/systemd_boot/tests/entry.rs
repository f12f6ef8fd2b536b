//! Tests of `entry.rs`: entry contents, and the templates in `bootloader-hooks/`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::boot::systemd_boot::entry::{
    entry_text, has_default, has_sort_key, key_values, EntryConfig,
};
use crate::boot::systemd_boot::test_util::{cfg, A, B};

#[test]
fn entry_text_is_what_systemd_boot_reads() {
    let cfg = EntryConfig {
        title: "Azure Linux".into(),
        root_labels: ["root-a".into(), "root-b".into()],
        options: " ro console=ttyS0 panic=-1 ".into(),
    };
    let text = entry_text(&cfg, B, "3.0.20240601", true, None);
    assert_eq!(
        text,
        "title Azure Linux 3.0.20240601 (slot b)\n\
         version 3.0.20240601\n\
         linux /update-agent/b/vmlinuz\n\
         initrd /update-agent/b/initrd.img\n\
         options root=PARTLABEL=root-b updateagent.slot=b ro console=ttyS0 panic=-1\n"
    );
    let kv: Vec<(&str, &str)> = key_values(&text).collect();
    assert_eq!(kv[0], ("title", "Azure Linux 3.0.20240601 (slot b)"));
    assert_eq!(
        kv[4],
        (
            "options",
            "root=PARTLABEL=root-b updateagent.slot=b ro console=ttyS0 panic=-1"
        )
    );
    let bare = EntryConfig {
        options: String::new(),
        ..cfg.clone()
    };
    assert_eq!(
        entry_text(&bare, A, "1", false, None),
        "title Azure Linux 1 (slot a)\nversion 1\nlinux /update-agent/a/vmlinuz\noptions root=PARTLABEL=root-a updateagent.slot=a\n"
    );
    assert!(EntryConfig::default().validate().is_ok());
    for bad in [
        EntryConfig {
            title: " ".into(),
            ..cfg.clone()
        },
        EntryConfig {
            title: "a\nb".into(),
            ..cfg.clone()
        },
        EntryConfig {
            root_labels: ["root a".into(), "root-b".into()],
            ..cfg.clone()
        },
        EntryConfig {
            root_labels: ["root-a".into(), String::new()],
            ..cfg.clone()
        },
        EntryConfig {
            options: "ro\ninitrd /evil".into(),
            ..cfg
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert!(
        has_sort_key("title x\n  sort-key debian\n")
            && !has_sort_key("# sort-key x\ntitle sort-key\n")
    );
    assert!(has_default("timeout 0\ndefault @saved\n") && !has_default("timeout 0\n#default x\n"));
}

fn hooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bootloader-hooks/systemd-boot")
}

#[test]
fn hook_templates_match_the_code() {
    let loader = fs::read_to_string(hooks_dir().join("loader.conf")).expect("loader.conf template");
    assert!(
        !has_default(&loader),
        "the loader.conf template sets default"
    );
    assert!(
        key_values(&loader).any(|kv| kv == ("timeout", "0")),
        "{loader}"
    );
    let template = fs::read_to_string(hooks_dir().join("entry.conf.in")).expect("entry template");
    let cfg = cfg();
    for (slot, initrd) in [(A, true), (B, false)] {
        let mut text = template
            .replace("@TITLE@", &cfg.title)
            .replace("@VERSION@", "2.0")
            .replace("@SLOT@", slot.letter())
            .replace("@ROOT_LABEL@", &cfg.root_labels[slot.index()])
            .replace("@OPTIONS@", &cfg.options);
        if !initrd {
            text = text
                .lines()
                .filter(|l| !l.starts_with("initrd "))
                .map(|l| format!("{l}\n"))
                .collect();
        }
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(text, entry_text(&cfg, slot, "2.0", initrd, None));
    }
}

#[test]
fn entry_text_with_a_verity_root() {
    let v = crate::boot::RootVerity::new(&"ab".repeat(32), 4096 * 1000).expect("verity");
    let text = entry_text(&cfg(), B, "2.0", true, Some(&v));
    let options = key_values(&text)
        .find(|(k, _)| *k == "options")
        .map(|(_, o)| o.to_owned())
        .expect("options");
    assert!(
        options.starts_with(&format!(
            "root=/dev/mapper/root roothash={} systemd.verity_root_data=PARTLABEL=root-b \
             systemd.verity_root_hash=PARTLABEL=root-b \
             systemd.verity_root_options=hash-offset=4096000,restart-on-corruption \
             updateagent.slot=b",
            "ab".repeat(32)
        )),
        "{options}"
    );
}
