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

// ------------------------------------------------- relative backing file

/// A qcow2 whose backing file is a relative name (`base.qcow2`), cloned
/// (copy/reflink snapshot) into another directory: the clone would name a
/// backing file that does not exist there. vsnap refuses before anything
/// is touched, naming the backing file and what to do; in the image's own
/// directory (the default) the same snapshot works and reverts.
#[test]
fn copy_to_another_directory_keeps_a_relative_backing_file_resolvable() {
    let tmp = TempDir::new("relbacking");
    let state = tmp.join("state");
    let vm = tmp.join("vm");
    let other = tmp.join("other");
    std::fs::create_dir(&vm).unwrap();
    std::fs::create_dir(&other).unwrap();
    let base = vm.join("base.qcow2");
    qemu_img_create(&base, "qcow2", 4 * MIB);
    qemu_io_write(&base, "qcow2", 0, MIB, 0x31);
    let top = vm.join("top.qcow2");
    let out = Out::from_command(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    out.ok();
    qemu_io_write(&top, "qcow2", MIB, MIB, 0x32);
    let images: Vec<&Path> = vec![&top];
    for kind in ["copy", "reflink"] {
        let before = world(&state, &[&vm, &other], &images);
        let out = vsnap(
            &state,
            &[
                "vol",
                "snapshot",
                "create",
                p(&top),
                "s1",
                "--kind",
                kind,
                "--file",
                p(&other.join("top.s1.qcow2")),
            ],
        );
        if kind == "reflink" && out.stderr.contains("cannot make reflinks") {
            continue; // not on this filesystem; the copy case stands
        }
        out.expect_code(2)
            .stderr_has(&["relative backing file", "base.qcow2", p(&other)]);
        assert_unchanged(&before, &world(&state, &[&vm, &other], &images));
    }
    // Beside the image the relative name resolves alike: fine.
    vsnap(
        &state,
        &["vol", "snapshot", "create", p(&top), "s1", "--kind", "copy"],
    )
    .ok();
    qemu_io_write(&top, "qcow2", MIB, MIB, 0x33);
    vsnap(&state, &["vol", "snapshot", "revert", p(&top), "s1"]).ok();
    assert!(
        qemu_io_reads(&top, "qcow2", 0, MIB, 0x31),
        "base data through the backing file"
    );
    assert!(qemu_io_reads(&top, "qcow2", MIB, MIB, 0x32));
    vsnap(&state, &["vol", "check", p(&top)]).ok();
}
