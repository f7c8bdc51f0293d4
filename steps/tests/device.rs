//! An overlay written onto a block device (`<disk type='block'>` targets):
//! real loop devices, real qemu-img and qemu-io. Needs root.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use vsnap_steps::{device, fsops, Format, Probe, Step};

fn step(dev: &Path, backing: &Path, saved: &Path) -> Step {
    Step::OverlayOnDevice {
        device: dev.to_path_buf(),
        backing: backing.to_path_buf(),
        backing_format: Format::Qcow2,
        saved: saved.to_path_buf(),
    }
}

fn qemu_io(args: &[&str], path: &Path) -> String {
    let out = Command::new("qemu-io")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Apply writes a qcow2 overlay onto the device that QEMU opens, backed by
/// the image (its data shows through), `qemu-img check` clean; the
/// device's first bytes are saved first; apply again changes nothing;
/// undo puts the device's bytes back exactly and removes the saved copy.
#[test]
fn overlay_on_a_block_device_applies_and_undoes_exactly() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    qcow2(&base, 4 * MIB);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 0 64k"], &base);
    let dev = LoopDev::new(8 << 20, 0xab);
    let saved = d.path().join("devhead.d.s1.vda");
    let s = step(&dev.dev, &base, &saved);
    let len = device::overlay_bytes(&base, Format::Qcow2).unwrap().len();
    let before = dev.head(len + 4096);

    assert_eq!(probe(&s), Probe::NotApplied);
    apply(&s);
    assert_eq!(probe(&s), Probe::Applied);
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        before[..len],
        "the device's head, saved"
    );
    let info = vsnap_steps::qemu_img::info(&dev.dev, Format::Qcow2, false).unwrap();
    assert_eq!(info.backing.as_deref(), Some(base.as_path()));
    assert_eq!(info.virtual_size, 4 * MIB);
    let out = Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&dev.dev)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img check: {out:?}");
    let read = qemu_io(&["-f", "qcow2", "-c", "read -P 0x44 0 64k"], &dev.dev);
    assert!(!read.contains("Pattern verification failed"), "{read}");
    // Past the metadata the device is untouched.
    assert_eq!(dev.head(len + 4096)[len..], before[len..]);

    apply(&s);
    assert_eq!(probe(&s), Probe::Applied);
    assert_eq!(std::fs::read(&saved).unwrap(), before[..len]);

    undo(&s);
    assert_eq!(dev.head(len + 4096), before, "the device's bytes are back");
    assert!(!saved.exists(), "the saved copy is removed");
    assert_eq!(probe(&s), Probe::NotApplied);
    undo(&s);
    assert_eq!(dev.head(len + 4096), before);
}

/// What the step refuses, before writing anything: a symlink to the
/// device, a regular file, a device smaller than the overlay's metadata,
/// a mounted device.
#[test]
fn overlay_on_device_refuses_links_files_small_and_busy_devices() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    qcow2(&base, 4 * MIB);
    let saved = d.path().join("saved");
    let refused = |dev: &Path, words: &[&str]| {
        let e = step(dev, &base, &saved)
            .apply(&cx())
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(e.contains(w), "{}: {e:?} lacks {w:?}", dev.display());
        }
        assert!(!saved.exists(), "nothing saved");
    };
    let dev = LoopDev::new(8 << 20, 0xab);
    let before = dev.head(1 << 20);
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&dev.dev, &link).unwrap();
    refused(&link, &["symlink", "real path"]);
    let file = d.path().join("file.img");
    std::fs::write(&file, vec![0u8; 8 << 20]).unwrap();
    refused(&file, &["not a block device"]);
    assert_eq!(dev.head(1 << 20), before);
    let small = LoopDev::new(64 << 10, 0xcd);
    let small_before = small.head(64 << 10);
    refused(&small.dev, &["larger device"]);
    assert_eq!(small.head(64 << 10), small_before);
    // Mounted: the exclusive open fails.
    let fs = LoopDev::new(16 << 20, 0);
    let out = Command::new("mkfs.ext4")
        .args(["-q"])
        .arg(&fs.dev)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new("mount")
        .arg(&fs.dev)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let head = fs.head(1 << 20);
    refused(&fs.dev, &["in use"]);
    assert_eq!(fs.head(1 << 20), head);
    let _ = Command::new("umount").arg(&mnt).status();
    // nothing of ours left
    assert!(!names(d.path())
        .iter()
        .any(|n| fsops::is_vsnap_temp(n) || n == "saved"));
}
