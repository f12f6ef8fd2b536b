use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn record(dir: &Path, name: &str, text: &str, time: SystemTime) {
    std::fs::create_dir_all(dir).expect("dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    set_time(&p, time);
}

fn set_time(p: &Path, time: SystemTime) {
    std::fs::File::open(p)
        .and_then(|f| f.set_modified(time))
        .expect("mtime");
}

// What efi-pstore left of the lab's scenario 3 (a root without an init): the newest
// text is Part1; the initramfs's error is in the part before it.
const PANIC_PART2: &str = "Panic#1 Part2\n\
<6>[    4.704039] EXT4-fs (dm-0): mounted filesystem with ordered data mode. Quota mode: none.\n\
<10>[    4.710000] ua-initrd: FATAL: no /sbin/init on the root file system (/dev/mapper/root)\n";
const PANIC_PART1: &str = "Panic#1 Part1\n\
<6>[    4.723164] sysrq: Trigger a crash\n\
<0>[    4.723551] Kernel panic - not syncing: sysrq triggered crash\n\
<4>[    4.723922] CPU: 0 PID: 1 Comm: init Tainted: G           OE      6.1.0-57-cloud-amd64 #1\n\
<4>[    4.724672] Call Trace:\n";
const VERITY: &str = "Shutdown#1 Part1\n\
<3>[    4.788434] device-mapper: verity: 259:3: data block 20085 is corrupted\n\
<6>[    4.829229] ACPI: PM: Preparing to enter system sleep state S5\n\
<0>[    4.836248] reboot: Restarting system with command 'dm-verity device corrupted'\n";
const PLAIN: &str = "Shutdown#1 Part1\n\
<6>[   80.1] systemd-shutdown[1]: Rebooting.\n<0>[   80.2] reboot: Restarting system\n";

#[test]
fn a_panic_is_told_with_the_error_before_it_across_parts() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    record(&kernel, "dmesg-efi-170000001012001", PANIC_PART1, at(10));
    record(&kernel, "dmesg-efi-170000001022001", PANIC_PART2, at(10));
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(
        w.lines,
        [
            "ua-initrd: FATAL: no /sbin/init on the root file system (/dev/mapper/root)",
            "Kernel panic - not syncing: sysrq triggered crash"
        ]
    );
    assert_eq!(w.at, at(10));
    assert!(w.file.ends_with("dmesg-efi-170000001012001"), "{w:?}");
    let d = w.describe();
    assert!(
        d.starts_with("the kernel's last words (pstore record of 2023-11-14T22:13:30Z")
            && d.ends_with(
                "(/dev/mapper/root)\" then \"Kernel panic - not syncing: sysrq triggered crash\""
            ),
        "{d}"
    );
}

#[test]
fn a_verity_restart_is_told_and_a_plain_shutdown_is_not() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    record(&kernel, "dmesg-efi-1", VERITY, at(10));
    // Newer, and says nothing: a clean restart's dump (printk.always_kmsg_dump=1).
    record(&kernel, "dmesg-efi-2", PLAIN, at(12));
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(
        w.lines,
        [
            "device-mapper: verity: 259:3: data block 20085 is corrupted",
            "reboot: Restarting system with command 'dm-verity device corrupted'"
        ]
    );
    std::fs::remove_file(kernel.join("dmesg-efi-1")).expect("rm");
    assert_eq!(last_words(&kernel, &archive, at(0)), None);
}

#[test]
fn only_records_written_since_count_wherever_they_are() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    // Before the last check: another story.
    record(&kernel, "dmesg-efi-1", PANIC_PART1, at(5));
    assert_eq!(last_words(&kernel, &archive, at(6)), None);
    // systemd-pstore's folder: the parts keep the record's time, dmesg.txt (their
    // join, oldest part first) and the folder take the move's.
    let folder = archive.join("170000001");
    record(
        &folder,
        "dmesg-efi-170000001012001",
        "Panic#1 Part1\nnot this\n",
        at(15),
    );
    record(&folder, "dmesg.txt", VERITY, at(25));
    set_time(&folder, at(25));
    let w = last_words(&kernel, &archive, at(6)).expect("told");
    assert!(w.lines[0].contains("data block 20085"), "{w:?}");
    assert!(w.file.ends_with("170000001/dmesg.txt"), "{w:?}");
    assert_eq!(w.at, at(15), "the record's time, not the move's");
    // Moved recently, but written before: not about these boots.
    assert_eq!(last_words(&kernel, &archive, at(16)), None);
    // EFI keeps whole seconds: a record of the same second as `since` counts.
    let half = at(15) + Duration::from_millis(500);
    assert!(last_words(&kernel, &archive, half).is_some());
}

#[test]
fn a_dump_is_its_run_of_parts_even_across_a_second() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    // Part1 (the newest text) is written first; Part2 a second later.
    record(&kernel, "dmesg-efi-170000001012001", PANIC_PART1, at(10));
    record(&kernel, "dmesg-efi-170000001122001", PANIC_PART2, at(11));
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(w.lines.len(), 2, "{w:?}");
    assert!(w.lines[0].contains("no /sbin/init"), "{w:?}");
    // An oops, then a panic in the same second: two dumps, the newest told. Its own
    // text names the oops before the panic ("Fatal exception" says only that).
    let d = tempfile::tempdir().expect("tmp");
    let kernel = d.path().join("pstore");
    record(
        &kernel,
        "dmesg-efi-1",
        "Oops#1 Part1\n<1>[ 9.0] BUG: unable to handle page fault for address: 0000000000001000\n",
        at(10),
    );
    record(
        &kernel,
        "dmesg-efi-2",
        "Panic#2 Part1\n<1>[ 9.0] BUG: unable to handle page fault for address: 0000000000001000\n\
         <4>[ 9.0] Oops: 0000 [#1] PREEMPT SMP NOPTI\n<4>[ 9.1] RIP: 0010:x+0x1/0x2\n\
         <0>[ 9.2] Kernel panic - not syncing: Fatal exception\n",
        at(10),
    );
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(
        w.lines,
        [
            "BUG: unable to handle page fault for address: 0000000000001000",
            "Kernel panic - not syncing: Fatal exception"
        ]
    );
    assert!(w.file.ends_with("dmesg-efi-2"), "{w:?}");
}

#[test]
fn a_kernel_that_names_its_callers_is_read_too() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    record(
        &kernel,
        "dmesg-ramoops-0",
        "Panic#1 Part1\n<0>[    4.723551][    T1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n",
        at(10),
    );
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(
        w.lines,
        ["Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"]
    );
}

#[test]
fn what_any_root_process_can_write_is_bounded_and_cleaned() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    let long = format!(
        "<2>[ 1.0] evil\u{1b}[2J\u{7}{}\n<0>[ 1.1] Kernel panic - not syncing: x\n",
        "A".repeat(5000)
    );
    record(&kernel, "dmesg-ramoops-0", &long, at(10));
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(w.lines[0].chars().count(), MAX_LINE);
    assert!(w.lines[0].starts_with("evil[2J"), "{w:?}");
    assert!(!w.lines[0].chars().any(char::is_control));
    // Links are not followed; other files are not records.
    std::fs::remove_file(kernel.join("dmesg-ramoops-0")).expect("rm");
    record(d.path(), "elsewhere", PANIC_PART1, at(10));
    std::os::unix::fs::symlink(d.path().join("elsewhere"), kernel.join("dmesg-efi-9"))
        .expect("link");
    record(&kernel, "console-ramoops-0", PANIC_PART1, at(10));
    assert_eq!(last_words(&kernel, &archive, at(0)), None);
    // A FIFO does not block the check; a big file is read from its end.
    nix::unistd::mkfifo(&kernel.join("dmesg-efi-7"), nix::sys::stat::Mode::S_IRUSR).expect("fifo");
    assert_eq!(last_words(&kernel, &archive, at(0)), None);
    let big = format!(
        "Panic#1 Part1\n{}<0>[ 1.1] Kernel panic - not syncing: at the end\n",
        "<6>[ 1.0] noise\n".repeat(20_000)
    );
    record(&kernel, "dmesg-efi-8", &big, at(10));
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(w.lines, ["Kernel panic - not syncing: at the end"]);
    // Missing directories are no records, not an error.
    assert_eq!(
        last_words(&d.path().join("none"), &d.path().join("none2"), at(0)),
        None
    );
}

#[test]
fn an_oops_without_a_panic_is_told() {
    let d = tempfile::tempdir().expect("tmp");
    let (kernel, archive) = (d.path().join("pstore"), d.path().join("archive"));
    record(
        &kernel,
        "dmesg-efi-3",
        "Oops#1 Part1\n<1>[ 9.0] BUG: kernel NULL pointer dereference, address: 0000000000000008\n<4>[ 9.1] #PF: supervisor read access in kernel mode\n",
        at(10),
    );
    let w = last_words(&kernel, &archive, at(0)).expect("told");
    assert_eq!(
        w.lines,
        ["BUG: kernel NULL pointer dereference, address: 0000000000000008"]
    );
}
