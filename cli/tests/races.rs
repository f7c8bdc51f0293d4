//! The image directory as an adversary or an accident shapes it: files
//! replaced under vsnap (symlinks, other files, a racing process), a
//! relative backing file, a full btrfs. Real `vsnap`, real `qemu-img`,
//! real loop-mounted filesystems, a real second process.
//!
//! Needs root (mounts), qemu-img, qemu-io, mkfs.btrfs.

mod common;

use common::*;
use std::path::{Path, PathBuf};

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
    qemu_img_create_overlay(&top, "base.qcow2");
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

// ------------------------------------------- replaced snapshot files

/// A snapshot's file replaced by a symlink (to another VM's image) or by
/// another file under the same name: `vol check` reports it, revert and
/// delete refuse it (exit 2, nothing touched: the image and the link's
/// target keep their bytes); the file put back, everything works again.
/// The same for the frozen file of an external snapshot and for the
/// image path itself.
#[test]
fn replaced_snapshot_files_are_reported_and_never_followed() {
    let tmp = TempDir::new("replaced");
    let state = tmp.join("state");
    let vm = tmp.join("vm");
    let other = tmp.join("other");
    std::fs::create_dir(&vm).unwrap();
    std::fs::create_dir(&other).unwrap();
    let img = vm.join("r.img");
    qemu_img_create(&img, "raw", 4 * MIB);
    qemu_io_write(&img, "raw", 0, MIB, 0x22);
    let victim = other.join("victim.img");
    qemu_img_create(&victim, "raw", 4 * MIB);
    qemu_io_write(&victim, "raw", 0, MIB, 0x77);
    vsnap(
        &state,
        &["vol", "snapshot", "create", p(&img), "s1", "--kind", "copy"],
    )
    .ok();
    vsnap(&state, &["vol", "check", p(&img)]).ok();
    qemu_io_write(&img, "raw", 0, MIB, 0x23);
    let file = vm.join("r.s1.img");
    let kept = other.join("r.s1.img.kept");
    std::fs::rename(&file, &kept).unwrap();

    let refused = |what: &str| {
        let (hi, hv) = (hash_file(&img), hash_file(&victim));
        vsnap(&state, &["vol", "check", p(&img)])
            .expect_code(1)
            .stdout_has(&[p(&file), "not the file vsnap made", what]);
        for args in [
            &["vol", "snapshot", "revert", p(&img), "s1"][..],
            &["vol", "snapshot", "delete", p(&img), "s1"][..],
        ] {
            vsnap(&state, args).expect_code(2).stderr_has(&[
                p(&file),
                "not the file vsnap made",
                what,
            ]);
        }
        assert_eq!(hash_file(&img), hi, "the image is untouched");
        assert_eq!(hash_file(&victim), hv, "the link's target is untouched");
        assert!(file.exists(), "the replaced file is left alone");
    };
    // 1. a symlink to another VM's image
    std::os::unix::fs::symlink(&victim, &file).unwrap();
    refused("symlink");
    // 2. another file under the same name (same size, other bytes)
    std::fs::remove_file(&file).unwrap();
    std::fs::copy(&victim, &file).unwrap();
    refused("replaced");
    // 3. the same bytes as vsnap's file, another inode: still not vsnap's
    std::fs::remove_file(&file).unwrap();
    std::fs::copy(&kept, &file).unwrap();
    refused("replaced");
    // vsnap's own file back: consistent, and the revert brings s1 back
    std::fs::remove_file(&file).unwrap();
    std::fs::rename(&kept, &file).unwrap();
    vsnap(&state, &["vol", "check", p(&img)]).ok();
    vsnap(&state, &["vol", "snapshot", "revert", p(&img), "s1"]).ok();
    assert!(qemu_io_reads(&img, "raw", 0, MIB, 0x22));
    assert!(qemu_io_reads(&victim, "raw", 0, MIB, 0x77));

    // External: the frozen file replaced by a symlink to a qcow2 elsewhere.
    let q = vm.join("q.qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    qemu_io_write(&q, "qcow2", 0, MIB, 0x41);
    let qvictim = other.join("victim.qcow2");
    qemu_img_create(&qvictim, "qcow2", 4 * MIB);
    qemu_io_write(&qvictim, "qcow2", 0, MIB, 0x42);
    vsnap(
        &state,
        &[
            "vol",
            "snapshot",
            "create",
            p(&q),
            "e1",
            "--kind",
            "external",
        ],
    )
    .ok();
    let frozen = vm.join("q.e1.qcow2");
    let frozen_kept = other.join("q.e1.kept");
    std::fs::rename(&frozen, &frozen_kept).unwrap();
    std::os::unix::fs::symlink(&qvictim, &frozen).unwrap();
    let hv = hash_file(&qvictim);
    vsnap(&state, &["vol", "check", p(&q)])
        .expect_code(1)
        .stdout_has(&[p(&frozen), "symlink"]);
    vsnap(&state, &["vol", "snapshot", "revert", p(&q), "e1"])
        .expect_code(2)
        .stderr_has(&[p(&frozen), "not the file vsnap made"]);
    vsnap(&state, &["vol", "snapshot", "delete", p(&q), "e1"])
        .expect_code(2)
        .stderr_has(&[p(&frozen), "not the file vsnap made"]);
    assert_eq!(hash_file(&qvictim), hv);
    std::fs::remove_file(&frozen).unwrap();
    std::fs::rename(&frozen_kept, &frozen).unwrap();
    vsnap(&state, &["vol", "check", p(&q)]).ok();

    // The image path itself replaced by a symlink: reported, refused.
    let img_kept = other.join("r.img.kept");
    std::fs::rename(&img, &img_kept).unwrap();
    std::os::unix::fs::symlink(&victim, &img).unwrap();
    let hv = hash_file(&victim);
    vsnap(&state, &["vol", "check", p(&img)])
        .expect_code(1)
        .stdout_has(&["image path", p(&img), "symlink"]);
    for args in [
        &["vol", "snapshot", "create", p(&img), "s2", "--kind", "copy"][..],
        &["vol", "snapshot", "revert", p(&img), "s1"][..],
    ] {
        vsnap(&state, args)
            .expect_code(2)
            .stderr_has(&[p(&img), "symlink"]);
    }
    assert_eq!(hash_file(&victim), hv);
    std::fs::remove_file(&img).unwrap();
    std::fs::rename(&img_kept, &img).unwrap();
    vsnap(&state, &["vol", "check", p(&img)]).ok();
}

// ------------------------------------------------ files restored by hand

/// A copy of `from` under the name `to` with a new inode (as a restore
/// from backup, or a move across filesystems, makes it).
fn restore_copy(from: &Path, to: &Path) {
    let tmp = to.with_extension("restoring");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Snapshot files restored from a backup get new inodes: every command
/// refuses them as replaced and names `vol adopt-files`. adopt-files
/// refuses (exit 2, nothing recorded: the commands still refuse) a
/// whole-file snapshot whose content is not what vsnap made, a file with a
/// second hard link, a symlink and an image that is no volume of the
/// state directory; with
/// the right files it adopts them (one catalog write) and revert, delete
/// and `vol check` work again.
#[test]
fn adopt_files_takes_back_restored_snapshot_files_and_refuses_others() {
    let tmp = TempDir::new("adopt");
    let state = tmp.join("state");
    let vm = tmp.join("vm");
    let backup = tmp.join("backup");
    std::fs::create_dir(&vm).unwrap();
    std::fs::create_dir(&backup).unwrap();
    let img = vm.join("r.img");
    qemu_img_create(&img, "raw", 4 * MIB);
    qemu_io_write(&img, "raw", 0, MIB, 0x22);
    let q = vm.join("q.qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    qemu_io_write(&q, "qcow2", 0, MIB, 0x41);
    for (image, name, kind) in [
        (&img, "s1", "copy"),
        (&img, "s2", "copy"),
        (&q, "e1", "external"),
    ] {
        vsnap(
            &state,
            &["vol", "snapshot", "create", p(image), name, "--kind", kind],
        )
        .ok();
        qemu_io_write(
            image,
            if kind == "copy" { "raw" } else { "qcow2" },
            0,
            MIB,
            0x23,
        );
    }
    let (s1, s2, e1) = (
        vm.join("r.s1.img"),
        vm.join("r.s2.img"),
        vm.join("q.e1.qcow2"),
    );
    // The backup, then the restore: same bytes, new inodes.
    for f in [&s1, &s2, &e1] {
        let b = backup.join(f.file_name().unwrap());
        std::fs::copy(f, &b).unwrap();
        restore_copy(&b, f);
    }
    let still_refused = || {
        for (image, name, file) in [(&img, "s1", &s1), (&q, "e1", &e1)] {
            vsnap(&state, &["vol", "snapshot", "revert", p(image), name])
                .expect_code(2)
                .stderr_has(&[p(file), "not the file vsnap made", "vsnap vol adopt-files"]);
        }
    };
    still_refused();
    let adopt = |image: &Path| vsnap(&state, &["--json", "vol", "adopt-files", p(image)]);
    let refused = |image: &Path, words: &[&str]| {
        let files = tree_state(&vm);
        adopt(image).expect_code(2).stderr_has(words);
        assert_same_files(&[files], &[tree_state(&vm)]);
        still_refused();
    };

    // 1. s2's file is another copy's content (same size, other bytes).
    restore_copy(&backup.join("r.s1.img"), &s2);
    refused(&img, &["nothing adopted", p(&s2), "content differs"]);
    restore_copy(&backup.join("r.s2.img"), &s2);
    // 2. s1's file has a second name.
    let second = backup.join("second-name");
    std::fs::hard_link(&s1, &second).unwrap();
    refused(&img, &["nothing adopted", p(&s1), "hard links"]);
    std::fs::remove_file(&second).unwrap();
    // 3. e1's frozen file is a symlink to the backup.
    std::fs::remove_file(&e1).unwrap();
    std::os::unix::fs::symlink(backup.join("q.e1.qcow2"), &e1).unwrap();
    refused(&q, &["nothing adopted", p(&e1), "symlink"]);
    std::fs::remove_file(&e1).unwrap();
    restore_copy(&backup.join("q.e1.qcow2"), &e1);
    // 4. not a volume of this state directory
    let stranger = vm.join("stranger.img");
    qemu_img_create(&stranger, "raw", MIB);
    refused(
        &stranger,
        &[p(&stranger), "not a volume of this state directory"],
    );
    // The right files: adopted, and everything works again.
    let r = adopt(&img).ok().json();
    let adopted: Vec<&str> = r["adopted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(adopted, ["s1", "s2"], "{r}");
    assert_eq!(r["unchanged"], 0, "{r}");
    let r = adopt(&q).ok().json();
    assert_eq!(r["adopted"].as_array().unwrap().len(), 1, "{r}");
    // A second run has nothing to adopt.
    let r = adopt(&img).ok().json();
    assert_eq!(
        (r["adopted"].as_array().unwrap().len(), &r["unchanged"]),
        (0, &serde_json::json!(2)),
        "{r}"
    );
    vsnap(&state, &["vol", "check", p(&img)]).ok();
    vsnap(&state, &["vol", "check", p(&q)]).ok();
    vsnap(&state, &["vol", "snapshot", "revert", p(&img), "s1"]).ok();
    assert!(qemu_io_reads(&img, "raw", 0, MIB, 0x22));
    vsnap(&state, &["vol", "snapshot", "delete", p(&img), "s2"]).ok();
    assert!(!s2.exists(), "delete removes the adopted file");
    vsnap(&state, &["vol", "snapshot", "revert", p(&q), "e1"]).ok();
    assert!(qemu_io_reads(&q, "qcow2", 0, MIB, 0x41));
}

// ------------------------------------------------------ a racing process

/// Not a test of its own: the body of the racing process that
/// [`racing_process_swapping_temporaries_for_symlinks`] starts (this test
/// binary again, with `VSNAP_SWAPPER_DIR` set). Until `STOP` appears in
/// that directory, it replaces whatever vsnap-named file it sees there
/// (`.vsnap-*`) with a symlink to a victim file outside, or with a file of
/// its own, by an atomic rename over it, as fast as it can.
#[test]
fn swapper_process() {
    let Some(dir) = std::env::var_os("VSNAP_SWAPPER_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let victims: Vec<PathBuf> = std::env::var("VSNAP_SWAPPER_VICTIMS")
        .unwrap()
        .split(':')
        .map(PathBuf::from)
        .collect();
    let mut n: u64 = 0;
    let mut swaps: u64 = 0;
    // Never outlives its test: STOP, a minute, or its parent gone.
    let parent = std::os::unix::process::parent_id();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !dir.join("STOP").exists()
        && std::time::Instant::now() < end
        && std::os::unix::process::parent_id() == parent
    {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(".vsnap-") {
                continue;
            }
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_symlink()) {
                continue;
            }
            // Half of vsnap's names are left alone (decided by name, so
            // that some operations run undisturbed and others do not).
            let h = name
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
            if h % 2 == 0 {
                continue;
            }
            let planted = dir.join(format!(".swap-{n}"));
            if n.is_multiple_of(5) {
                // a regular file of its own
                if std::fs::write(&planted, b"not vsnap's").is_err() {
                    continue;
                }
            } else if std::os::unix::fs::symlink(&victims[(n as usize) % victims.len()], &planted)
                .is_err()
            {
                continue;
            }
            if std::fs::rename(&planted, e.path()).is_ok() {
                swaps += 1;
            } else {
                let _ = std::fs::remove_file(&planted);
            }
        }
    }
    std::fs::write(dir.join("SWAPS"), swaps.to_string()).unwrap();
}

/// What the swapper must never reach: files outside the image directory.
fn victim_hashes(victims: &[PathBuf]) -> Vec<u64> {
    victims.iter().map(|v| hash_file(v)).collect()
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// A second process swaps vsnap's temporary files in the image directory
/// for symlinks to victim files outside it (and for files of its own), in
/// a loop, while vsnap creates, reverts and deletes internal, external
/// and copy snapshots of three images, many times. Whatever vsnap
/// reports: the victims never change, the image paths are never symlinks
/// (nor anything but vsnap's images), an operation reported done did what
/// it says (the image holds the reverted data), an operation reported
/// "rolled back, nothing changed" changed no image byte; at the end, the
/// planted files removed, `vol check` finds every volume consistent.
#[test]
fn racing_process_swapping_temporaries_for_symlinks() {
    let tmp = TempDir::new("race");
    let state = tmp.join("state");
    let vm = tmp.join("vm");
    let other = tmp.join("other");
    std::fs::create_dir(&vm).unwrap();
    std::fs::create_dir(&other).unwrap();
    let victims = vec![other.join("victim.qcow2"), other.join("victim.img")];
    qemu_img_create(&victims[0], "qcow2", 4 * MIB);
    qemu_io_write(&victims[0], "qcow2", 0, MIB, 0x7a);
    qemu_img_create(&victims[1], "raw", 4 * MIB);
    qemu_io_write(&victims[1], "raw", 0, MIB, 0x7b);
    let hv = victim_hashes(&victims);

    // (image, format, kind)
    let images = [
        (vm.join("q.qcow2"), "qcow2", "internal"),
        (vm.join("e.qcow2"), "qcow2", "external"),
        (vm.join("r.img"), "raw", "copy"),
    ];
    for (img, fmt, _) in &images {
        qemu_img_create(img, fmt, 4 * MIB);
        qemu_io_write(img, fmt, 0, 64 * 1024, 0x10);
    }

    let swapper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "swapper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VSNAP_SWAPPER_DIR", &vm)
        .env(
            "VSNAP_SWAPPER_VICTIMS",
            victims
                .iter()
                .map(|v| v.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    /// Stops the racing process however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut swapper = Stop(swapper);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(25);
    let mut codes = std::collections::BTreeMap::<(String, i32), u32>::new();
    let mut round = 0u32;
    while std::time::Instant::now() < deadline {
        round += 1;
        for (img, fmt, kind) in &images {
            let pattern = 0x20 + (round % 0x40) as u8;
            let name = format!("s{round}");
            // create: the image keeps its bytes either way (a snapshot reads them)
            qemu_io_write(img, fmt, 0, 64 * 1024, pattern);
            let before = hash_file(img);
            let out = vsnap(
                &state,
                &["vol", "snapshot", "create", p(img), &name, "--kind", kind],
            );
            *codes
                .entry((format!("create {kind}"), out.code))
                .or_default() += 1;
            assert!(out.code == 0 || out.code == 2 || out.code == 1, "{out:?}");
            assert!(
                !is_symlink(img),
                "{} became a symlink: {out:?}",
                img.display()
            );
            if out.code == 2 && *kind != "external" {
                assert_eq!(
                    hash_file(img),
                    before,
                    "exit 2 said nothing changed: {out:?}"
                );
            }
            if *fmt == "qcow2" {
                let b = std::fs::read(img).unwrap();
                assert!(
                    b.starts_with(b"QFI\xfb"),
                    "{} is not a qcow2 image: {out:?}",
                    img.display()
                );
            }
            if out.code == 2 || out.code == 0 {
                assert!(qemu_io_reads(img, fmt, 0, 64 * 1024, pattern), "{out:?}");
            }
            // write over it, then revert to it: done means the data is back
            qemu_io_write(img, fmt, 0, 64 * 1024, 0x01);
            if out.code == 0 {
                let before = hash_file(img);
                let out = vsnap(&state, &["vol", "snapshot", "revert", p(img), &name]);
                *codes
                    .entry((format!("revert {kind}"), out.code))
                    .or_default() += 1;
                assert!(
                    !is_symlink(img),
                    "{} became a symlink: {out:?}",
                    img.display()
                );
                match out.code {
                    0 => assert!(
                        qemu_io_reads(img, fmt, 0, 64 * 1024, pattern),
                        "revert said done: {out:?}"
                    ),
                    2 => assert_eq!(
                        hash_file(img),
                        before,
                        "exit 2 said nothing changed: {out:?}"
                    ),
                    1 => {}
                    c => panic!("exit {c}: {out:?}"),
                }
                // and delete it again (its data stays in the image)
                let out = vsnap(&state, &["vol", "snapshot", "delete", p(img), &name]);
                *codes
                    .entry((format!("delete {kind}"), out.code))
                    .or_default() += 1;
                assert!(
                    !is_symlink(img),
                    "{} became a symlink: {out:?}",
                    img.display()
                );
                assert!(out.code <= 2, "{out:?}");
            }
            assert_eq!(
                victim_hashes(&victims),
                hv,
                "a victim outside the directory changed"
            );
        }
    }
    std::fs::write(vm.join("STOP"), b"").unwrap();
    swapper.0.wait().unwrap();
    let swaps: u64 = std::fs::read_to_string(vm.join("SWAPS"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("{round} rounds, {swaps} swaps by the racing process; exit codes: {codes:?}");
    assert!(swaps > 0, "the racing process swapped nothing");
    assert_eq!(victim_hashes(&victims), hv);

    // What the swapper planted is its own; vsnap leaves it alone. Without
    // it, every volume is consistent (after recovering what needed it).
    for e in std::fs::read_dir(&vm).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let t = e.file_type().unwrap();
        // (vsnap's own symlink, the ownership claim `.vsnap-owner.*`, stays)
        let planted = (t.is_symlink()
            && std::fs::read_link(e.path()).is_ok_and(|l| victims.contains(&l)))
            || name == "STOP"
            || name == "SWAPS"
            || name.starts_with(".swap-")
            || (name.starts_with(".vsnap-") && std::fs::read(e.path()).unwrap() == b"not vsnap's");
        if planted {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    vsnap_recover(&state, &[]);
    for (img, _, _) in &images {
        assert!(!is_symlink(img));
        vsnap(&state, &["vol", "check", p(img)]).ok();
    }
}
