//! The tree against the real `veritysetup format` and `veritysetup verify`: the same
//! bytes for the same salt and uuid, on sizes around every level boundary.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::*;

const VERITYSETUP: &str = "/usr/sbin/veritysetup";

/// A hash area in a file (the test's slot).
struct FileArea(File);

impl Area for FileArea {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
}

/// Data that differs in every block, with some all-zero blocks among it.
fn image(blocks: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; (blocks * BLOCK) as usize];
    for (i, blk) in v.chunks_exact_mut(BLOCK as usize).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        for b in blk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

fn veritysetup(args: &[&str]) -> String {
    let out = Command::new(VERITYSETUP)
        .args(args)
        .output()
        .expect("running veritysetup (cryptsetup-bin; integration/setup.sh installs it)");
    assert!(
        out.status.success(),
        "veritysetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn root_hash_line(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .expect("veritysetup printed a root hash")
}

/// Writes `data` with room for its tree after a gap of `gap` blocks, and returns the
/// geometry and the file's path.
fn slot_file(dir: &Path, name: &str, data: &[u8], gap: u64) -> (Geometry, std::path::PathBuf) {
    let blocks = data.len() as u64 / BLOCK;
    let geo = Geometry::new(blocks, (blocks + gap) * BLOCK).expect("geometry");
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write image");
    OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len(geo.end()))
        .expect("size the slot");
    (geo, p)
}

#[test]
fn same_tree_and_root_as_veritysetup_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Around each level boundary: 1 block (no tree), one hash block full, one over,
    // two levels full (128 * 128), one over.
    for (i, blocks) in [1u64, 2, 127, 128, 129, 300, 16384, 16385]
        .into_iter()
        .enumerate()
    {
        let data = image(blocks, i as u64 + 1);
        let (salt, uuid) = derive_salt_uuid(&[i as u8; 32]);
        let gap = u64::from(i % 2 == 1);
        let (geo, ours) = slot_file(dir.path(), &format!("ours-{blocks}"), &data, gap);
        let (_, theirs) = slot_file(dir.path(), &format!("theirs-{blocks}"), &data, gap);

        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ours)
            .expect("open");
        let area = FileArea(f);
        let mut b = Builder::new(geo.clone(), salt.clone(), &area);
        // Odd pieces, so blocks straddle the calls.
        for piece in data.chunks(5000) {
            b.feed(piece).expect("feed");
        }
        let root = b.finish(&uuid).expect("finish");

        let t = theirs.to_string_lossy().into_owned();
        let out = veritysetup(&[
            "format",
            &t,
            &t,
            &format!("--data-blocks={blocks}"),
            &format!("--hash-offset={}", geo.hash_offset),
            &format!("--salt={}", hex::encode(&salt)),
            &format!("--uuid={}", uuid_text(&uuid)),
        ]);
        assert_eq!(hex::encode(root), root_hash_line(&out), "{blocks} blocks");
        let (a, b) = (
            std::fs::read(&ours).expect("read"),
            std::fs::read(&theirs).expect("read"),
        );
        assert_eq!(a.len(), b.len(), "{blocks} blocks: slot sizes");
        assert!(a == b, "{blocks} blocks: the hash areas differ");
        // The in-memory publisher path agrees.
        let mem = root_of(&mut data.as_slice(), &geo, &salt, &uuid).expect("root_of");
        assert_eq!(mem, root, "{blocks} blocks: root_of");
        // And the tree computed again from veritysetup's device, as its superblock says.
        let f = File::open(&theirs).expect("open theirs");
        let again = root_of_device(&|buf, off| f.read_exact_at(buf, off), geo.hash_offset)
            .expect("root_of_device");
        assert_eq!(again, root, "{blocks} blocks: root_of_device");
    }
}

#[test]
fn veritysetup_verify_accepts_a_resumed_build_and_rejects_a_changed_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = 1000u64;
    let data = image(blocks, 9);
    let (salt, uuid) = derive_salt_uuid(&[9; 32]);
    let (geo, p) = slot_file(dir.path(), "slot", &data, 0);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    let area = FileArea(f.try_clone().expect("clone"));
    let read_data = |buf: &mut [u8], off: u64| f.read_exact_at(buf, off);
    // Stop at unaligned places, the way a killed read-back leaves it: only what a
    // flush wrote survives, and the next builder picks up from the position.
    let mut at = 0u64;
    for stop in [70_000u64, 70_001, 600_000, 2_000_000, 4_096_000] {
        let mut b =
            Builder::resume(geo.clone(), salt.clone(), &area, at, &read_data).expect("resume");
        b.feed(&data[at as usize..stop as usize]).expect("feed");
        b.flush().expect("flush");
        at = b.position();
        assert_eq!(at, stop);
    }
    let mut b = Builder::resume(geo.clone(), salt.clone(), &area, at, &read_data).expect("resume");
    b.feed(&data[at as usize..]).expect("feed");
    let root = b.finish(&uuid).expect("finish");
    let want = root_of(&mut data.as_slice(), &geo, &salt, &uuid).expect("root_of");
    assert_eq!(root, want);

    let s = p.to_string_lossy().into_owned();
    let off = format!("--hash-offset={}", geo.hash_offset);
    let verify = |root: &str| {
        Command::new(VERITYSETUP)
            .args(["verify", &s, &s, root, &off])
            .output()
            .expect("running veritysetup")
    };
    let ok = verify(&hex::encode(root));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    f.write_all_at(b"x", 123 * BLOCK + 7).expect("corrupt");
    let bad = verify(&hex::encode(root));
    assert!(
        !bad.status.success(),
        "a changed data block must fail verify"
    );
}

#[test]
fn a_superblock_that_is_not_ours_is_refused() {
    let g = Geometry::new(8, 8 * BLOCK).expect("geometry");
    let good = superblock(&g, &[7; 32], &[1; 16]).expect("superblock");
    let read = |sb: Vec<u8>| {
        move |buf: &mut [u8], off: u64| {
            let at = off as usize - 8 * BLOCK as usize;
            buf.copy_from_slice(&sb[at..at + buf.len()]);
            Ok(())
        }
    };
    let d = read_superblock(&read(good.clone()), g.hash_offset).expect("ours");
    assert_eq!(
        (d.geometry, d.salt, d.uuid),
        (g.clone(), vec![7; 32], [1; 16])
    );
    for (at, byte) in [(0, b'X'), (12, 0), (32, b'm'), (65, 2), (81, 9)] {
        let mut bad = good.clone();
        bad[at] = byte;
        assert!(
            read_superblock(&read(bad), g.hash_offset).is_err(),
            "byte {at}"
        );
    }
}

#[test]
fn geometry_refuses_what_cannot_be_laid_out() {
    assert!(Geometry::new(0, 4096).is_err());
    assert!(
        Geometry::new(10, 10 * BLOCK + 1).is_err(),
        "unaligned offset"
    );
    assert!(
        Geometry::new(10, 9 * BLOCK).is_err(),
        "hash area inside the data"
    );
    let g = Geometry::new(262_144, 262_144 * BLOCK).expect("1 GiB");
    // 1 GiB: 2048 leaf blocks, 16 above, 1 top, and the superblock: about 8 MiB.
    assert_eq!(g.levels(), 3);
    assert_eq!(g.hash_bytes(), (1 + 1 + 16 + 2048) * BLOCK);
    assert!(superblock(&g, &[0; 257], &[0; 16]).is_err());
}

#[test]
fn a_builder_refuses_more_or_less_data_than_its_tree_covers() {
    let g = Geometry::new(2, 2 * BLOCK).expect("geometry");
    let area = MemArea::new(&g);
    let mut b = Builder::new(g.clone(), vec![1], &area);
    assert!(b.feed(&[0u8; 3 * BLOCK as usize]).is_err());
    let mut b = Builder::new(g, vec![1], &area);
    b.feed(&[0u8; BLOCK as usize]).expect("one block");
    assert!(b.finish(&[0; 16]).is_err());
}
