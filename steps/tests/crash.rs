//! Crashes inside steps (`--features failpoints`): a child process applies
//! a step and is SIGKILLed at one of the step's crash points; the parent
//! then checks that probe, apply and undo cope with what it left.
//!
//! Run with `cargo test -p vsnap-steps --features failpoints --test crash`.
#![cfg(feature = "failpoints")]

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use vsnap_steps::{fsops, qemu_img, CloneMode, Format, Probe, Step};

const STEP_ENV: &str = "VSNAP_STEPS_TEST_CRASH_STEP";

/// The child side: applies the step in `STEP_ENV` (and, with
/// `VSNAP_CRASH_AT` set, dies on the way). Does nothing in a normal run.
#[test]
fn crash_child() {
    let Ok(json) = std::env::var(STEP_ENV) else {
        return;
    };
    let step: Step = serde_json::from_str(&json).unwrap();
    apply(&step);
}

/// Apply `step` in a child that crashes at `point`; assert it died there.
fn apply_crashing_at(step: &Step, point: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(STEP_ENV, serde_json::to_string(step).unwrap())
        .env("VSNAP_CRASH_AT", point)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{} did not die at {point}: {}\n{}",
        step.describe(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn no_temps(dir: &Path) {
    let n = names(dir);
    assert!(
        !n.iter().any(|n| fsops::is_vsnap_temp(n)),
        "temporary files left: {n:?}"
    );
}

/// Crash at `point`, then: the probe says `after_crash`; apply finishes
/// it; undo (if any) takes it back; a second crash and an undo straight
/// after it also end in NotApplied.
fn check(dir: &Path, setup: &dyn Fn() -> Step, point: &str, after_crash: Probe) {
    let step = setup();
    apply_crashing_at(&step, point);
    // Recovery is a new process: it knows no file from an earlier run.
    fsops::forget_all();
    assert_eq!(probe(&step), after_crash, "probe after a crash at {point}");
    apply(&step);
    assert_eq!(
        probe(&step),
        Probe::Applied,
        "after apply following a crash at {point}"
    );
    no_temps(dir);
    if step.reversible() {
        undo(&step);
        assert_eq!(probe(&step), Probe::NotApplied);
        apply_crashing_at(&step, point);
        fsops::forget_all();
        undo(&step);
        assert_eq!(
            probe(&step),
            Probe::NotApplied,
            "undo after a crash at {point}"
        );
        no_temps(dir);
    }
}

#[test]
fn create_overlay_crashes() {
    for (point, seen) in [
        ("step.create-overlay.before-rename", Probe::NotApplied),
        ("step.create-overlay.before-dirsync", Probe::Applied),
    ] {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        qcow2(&base, MIB);
        let path = d.path().join("top.qcow2");
        let setup = || Step::CreateOverlay {
            path: path.clone(),
            backing: base.clone(),
            backing_format: Format::Qcow2,
        };
        check(d.path(), &setup, point, seen);
        assert_eq!(names(d.path()), ["base.qcow2"]);
    }
}

#[test]
fn external_freeze_crashes() {
    for (point, seen) in [
        ("step.external-freeze.linked", Probe::NotApplied),
        ("step.create-overlay.before-rename", Probe::NotApplied),
        ("step.external-freeze.before-dirsync", Probe::Applied),
    ] {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("a.qcow2");
        qcow2(&image, MIB);
        let setup = || Step::ExternalFreeze {
            image: image.clone(),
            file: d.path().join("a.s1.qcow2"),
            overlay: d.path().join("a.new"),
            format: Format::Qcow2,
        };
        check(d.path(), &setup, point, seen);
        assert_eq!(names(d.path()), ["a.qcow2"], "after a crash at {point}");
    }
}

#[test]
fn clone_crash_before_fsync() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("a.raw");
    qemu_img::create(&src, Format::Raw, 3 * MIB).unwrap();
    let dst = d.path().join("b.raw");
    let setup = || Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Copy,
    };
    check(d.path(), &setup, "step.clone.before-fsync", Probe::Applied);
    assert_eq!(names(d.path()), ["a.raw"]);

    let fs = LoopMount::new("btrfs", "256M");
    let src = fs.mnt.join("a.raw");
    qemu_img::create(&src, Format::Raw, 3 * MIB).unwrap();
    qemu_img::io_write_pattern(&src, Format::Raw, 0, MIB, 0x17).unwrap();
    let dst = fs.mnt.join("b.raw");
    let setup = || Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Reflink,
    };
    check(&fs.mnt, &setup, "step.clone.before-fsync", Probe::Applied);
    assert_eq!(names(&fs.mnt), ["a.raw"]);
}

#[test]
fn rename_hard_link_remove_crashes() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let b = d.path().join("b");
    std::fs::write(&a, b"a").unwrap();
    let rename = || Step::Rename {
        from: a.clone(),
        to: b.clone(),
        replace: false,
    };
    check(
        d.path(),
        &rename,
        "step.rename.before-dirsync",
        Probe::Applied,
    );
    assert_eq!(names(d.path()), ["a"]);

    let link = || Step::HardLink {
        src: a.clone(),
        dst: b.clone(),
    };
    check(
        d.path(),
        &link,
        "step.hard-link.before-dirsync",
        Probe::Applied,
    );
    assert_eq!(names(d.path()), ["a"]);

    std::fs::write(&b, b"b").unwrap();
    let replace = || Step::Rename {
        from: b.clone(),
        to: a.clone(),
        replace: true,
    };
    check(
        d.path(),
        &replace,
        "step.rename.before-dirsync",
        Probe::Applied,
    );
    assert_eq!(std::fs::read(&a).unwrap(), b"b");

    let remove = || Step::RemoveFile { path: a.clone() };
    check(
        d.path(),
        &remove,
        "step.remove-file.before-dirsync",
        Probe::Applied,
    );
    assert!(names(d.path()).is_empty());
}

#[test]
fn qemu_img_steps_crash_before_running() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    qcow2(&base, 2 * MIB);
    qemu_img::io_write_pattern(&base, Format::Qcow2, 0, MIB, 0x3c).unwrap();
    let top = d.path().join("top.qcow2");
    apply(&Step::CreateOverlay {
        path: top.clone(),
        backing: base.clone(),
        backing_format: Format::Qcow2,
    });

    let snap = || Step::InternalCreate {
        image: top.clone(),
        name: "s1".into(),
    };
    check(d.path(), &snap, "step.internal.before", Probe::NotApplied);
    assert!(qemu_img::snapshot_names(&top, false).unwrap().is_empty());

    let rebase = || Step::Rebase {
        image: top.clone(),
        format: Format::Qcow2,
        new_backing: None,
        old_backing: Some((base.clone(), Format::Qcow2)),
        unsafe_: false,
    };
    check(d.path(), &rebase, "step.rebase.before", Probe::NotApplied);
    let info = qemu_img::info(&top, Format::Qcow2, false).unwrap();
    assert_eq!(info.backing.as_deref(), Some(base.as_path()));
    assert!(qemu_img::io_read_pattern(&top, Format::Qcow2, 0, MIB, 0x3c).unwrap());
}

/// An overlay onto a block device, killed after the device's head was
/// saved (nothing written yet) and after the overlay was written: probe,
/// apply and undo cope, and the undo puts the device's bytes back exactly.
#[test]
fn overlay_on_device_crashes() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    qcow2(&base, 4 * MIB);
    let dev = LoopDev::new(8 << 20, 0xab);
    let saved = d.path().join("devhead.d.s1.vda");
    let len = vsnap_steps::device::overlay_bytes(&base, Format::Qcow2)
        .unwrap()
        .len();
    let before = dev.head(len);
    let setup = || Step::OverlayOnDevice {
        device: dev.dev.clone(),
        backing: base.clone(),
        backing_format: Format::Qcow2,
        saved: saved.clone(),
    };
    for (point, after) in [
        ("step.overlay-on-device.saved", Probe::NotApplied),
        ("step.overlay-on-device.written", Probe::Applied),
    ] {
        check(d.path(), &setup, point, after);
        assert_eq!(dev.head(len), before, "the device's head after {point}");
        assert!(!saved.exists());
    }
}
