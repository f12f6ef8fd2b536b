//! The GRUB script fragment (`grub-script-check`) and the `/etc/grub.d` helper.

use super::*;

fn hooks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bootloader-hooks/grub")
}

fn script_check(file: &Path) -> std::process::Output {
    Command::new(tool(GRUB_SCRIPT_CHECK))
        .arg(file)
        .output()
        .expect("running grub-script-check")
}

#[test]
fn grub_fragment_passes_grub_script_check() {
    let fragment = hooks_dir().join("update-agent.cfg");
    let out = script_check(&fragment);
    assert!(
        out.status.success(),
        "grub-script-check {}: {}",
        fragment.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // The script loads exactly the variables this module owns.
    let text = fs::read_to_string(&fragment).expect("reading the fragment");
    let load = format!("load_env -f \"$ua_env\" {}", OWNED_VARS.join(" "));
    assert!(text.contains(&load), "the fragment has no `{load}`");
    // The checker does catch errors (so a pass above means something).
    let dir = tmp();
    let broken = dir.path().join("broken.cfg");
    fs::write(&broken, "if [ x ]; then\n  echo never closed\n").expect("writing");
    assert!(!script_check(&broken).status.success());
}

/// A partition in a fake sysfs: (disk, number, PARTNAME).
type Part<'a> = (&'a str, u32, &'a str);

/// A fake /sys/class/block holding `parts`.
fn fake_sysfs(root: &Path, parts: &[Part<'_>]) -> PathBuf {
    let class = root.join("class/block");
    fs::create_dir_all(&class).expect("mkdir");
    for &(disk, n, label) in parts {
        let name = format!("{disk}p{n}");
        let dev = root.join("devices").join(disk).join(&name);
        fs::create_dir_all(&dev).expect("mkdir");
        fs::write(dev.join("partition"), format!("{n}\n")).expect("write");
        fs::write(
            dev.join("uevent"),
            format!("MAJOR=259\nDEVNAME={name}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={label}\n"),
        )
        .expect("write");
        std::os::unix::fs::symlink(format!("../../devices/{disk}/{name}"), class.join(&name))
            .expect("symlink");
    }
    class
}

fn run_helper(sysfs: &Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new("/bin/sh")
        .arg(hooks_dir().join("09_update-agent"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("UA_SYSFS_BLOCK", sysfs)
        .env("UA_GRUB_FRAGMENT", hooks_dir().join("update-agent.cfg"))
        .envs(env.iter().copied())
        .output()
        .expect("running 09_update-agent")
}

#[test]
fn grub_d_helper_fills_in_the_partitions() {
    let dir = tmp();
    let sysfs = fake_sysfs(
        dir.path(),
        &[
            ("nvme0n1", 1, "esp"),
            ("nvme0n1", 2, "state"),
            ("nvme0n1", 3, "root-a"),
            ("nvme0n1", 4, "root-b"),
            ("sda", 1, "data"),
        ],
    );
    let out = run_helper(
        &sysfs,
        &[
            ("GRUB_CMDLINE_LINUX", "console=ttyS0  quiet"),
            ("GRUB_CMDLINE_LINUX_DEFAULT", "it's"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "set ua_a_part='gpt3'",
        "set ua_b_part='gpt4'",
        "set ua_a_label='root-a'",
        "set ua_cmdline='ro console=ttyS0 quiet it'\\''s'",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("load_env -f"));
    let cfg = dir.path().join("grub.cfg");
    fs::write(&cfg, &out.stdout).expect("writing generated cfg");
    let check = script_check(&cfg);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Explicit partitions skip the search (image builds).
    let out = run_helper(
        &dir.path().join("nowhere"),
        &[
            ("UA_A_PART", "gpt5"),
            ("UA_B_PART", "gpt6"),
            ("UA_GRUB_DISK", "hd1"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("set ua_a_part='gpt5'\nset ua_b_part='gpt6'\n"));
    assert!(stdout.contains("set ua_disk='hd1'\n"));
}

#[test]
fn grub_d_helper_refuses_to_guess() {
    let dir = tmp();
    let refuses = |name: &str, parts: &[Part<'_>], env: &[(&str, &str)], want: &str| {
        let sysfs = fake_sysfs(&dir.path().join(name), parts);
        let out = run_helper(&sysfs, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: succeeded");
        assert!(stderr.contains(want), "{name}: {stderr}");
    };
    refuses(
        "none",
        &[("sda", 1, "esp")],
        &[],
        "no partition labelled root-a",
    );
    refuses(
        "two",
        &[
            ("sda", 2, "root-a"),
            ("sda", 3, "root-b"),
            ("sdb", 2, "root-a"),
            ("sdb", 3, "root-b"),
        ],
        &[],
        "more than one partition labelled root-a",
    );
    refuses(
        "split",
        &[("sda", 2, "root-a"), ("sdb", 3, "root-b")],
        &[],
        "root-a is on sda but root-b on sdb",
    );
    refuses("half", &[], &[("UA_A_PART", "gpt2")], "set both");
    // Two disks, but UA_DISK says which.
    let sysfs = fake_sysfs(
        &dir.path().join("chosen"),
        &[
            ("sda", 2, "root-a"),
            ("sda", 3, "root-b"),
            ("sdb", 5, "root-a"),
            ("sdb", 6, "root-b"),
        ],
    );
    let out = run_helper(&sysfs, &[("UA_DISK", "sdb")]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("set ua_a_part='gpt5'\nset ua_b_part='gpt6'\n"));
}
