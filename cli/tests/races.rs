//! The image directory as an adversary or an accident shapes it: files
//! replaced under vsnap (symlinks, other files, a racing process), a
//! relative backing file, a full btrfs. Real `vsnap`, real `qemu-img`,
//! real loop-mounted filesystems, a real second process.
//!
//! Needs root (mounts), qemu-img, qemu-io, mkfs.btrfs.

mod common;

use common::*;
use std::path::Path;

/// Fill the filesystem of `dir` completely with a file `name`.
fn fill(dir: &Path, name: &str) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let small = [0x5au8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

// ------------------------------------------------------------ full btrfs

/// A nearly full btrfs is not "a filesystem that cannot make reflinks":
/// a reflink snapshot there either works (a clone shares extents, it needs
/// metadata room only) or fails saying the filesystem is full, never
/// "cannot make reflinks ... use --kind copy" (which could not fit either).
#[test]
fn nearly_full_btrfs_is_reported_as_full_not_as_unable_to_reflink() {
    let tmp = TempDir::new("fullbtrfs");
    let state = tmp.join("state");
    let mnt = Mount::btrfs(&tmp.join("fs.img"), &tmp.join("mnt"), "128M");
    let vm = mnt.mnt.join("vm");
    std::fs::create_dir(&vm).unwrap();
    let img = vm.join("r.img");
    qemu_img_create(&img, "raw", 4 * MIB);
    qemu_io_write(&img, "raw", 0, MIB, 0x22);
    fill(&vm, "filler");
    for args in [
        &[
            "vol",
            "snapshot",
            "create",
            p(&img),
            "s1",
            "--kind",
            "reflink",
        ][..],
        // without --kind a raw image on btrfs gets a reflink snapshot
        &["vol", "snapshot", "create", p(&img), "s2"][..],
    ] {
        let out = vsnap(&state, args);
        assert!(
            !out.stderr.contains("cannot make reflinks"),
            "a full btrfs is not a filesystem without reflinks: {}",
            out.stderr
        );
        if out.code != 0 {
            out.expect_code(2).stderr_has(&["full", "free space"]);
        }
    }
    let list = vsnap(&state, &["--json", "vol", "snapshot", "list", p(&img)])
        .ok()
        .json();
    let n = list.as_array().map_or(0, Vec::len);
    vsnap(&state, &["vol", "check", p(&img)]).ok();
    assert!(n >= 1, "a reflink works on a full btrfs: {list}");
    assert!(qemu_io_reads(&img, "raw", 0, MIB, 0x22));
    drop(mnt);
}
