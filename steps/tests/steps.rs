//! Every step against the real qemu-img and real files: apply then probe,
//! apply twice, undo then probe, undo twice, and half-done states.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use vsnap_steps::{fsops, qemu_img, CloneMode, Cx, Format, Probe, Progress, Step, StepError};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn describe_lines() {
    let s = Step::CreateOverlay {
        path: "/a/.vsnap-7-1.x.qcow2.tmp".into(),
        backing: "/a/x.s1.qcow2".into(),
        backing_format: Format::Qcow2,
    };
    assert_eq!(
        s.describe(),
        "create overlay /a/.vsnap-7-1.x.qcow2.tmp backed by /a/x.s1.qcow2 (qcow2)"
    );
    let all = [
        Step::InternalCreate {
            image: "/a/x".into(),
            name: "s1".into(),
        },
        Step::InternalApply {
            image: "/a/x".into(),
            name: "s1".into(),
        },
        Step::InternalDelete {
            image: "/a/x".into(),
            name: "s1".into(),
        },
        Step::HardLink {
            src: "/a/x".into(),
            dst: "/a/y".into(),
        },
        s,
        Step::Clone {
            src: "/a/x".into(),
            dst: "/a/y".into(),
            mode: CloneMode::Reflink,
        },
        Step::Clone {
            src: "/a/x".into(),
            dst: "/a/y".into(),
            mode: CloneMode::Copy,
        },
        Step::Rename {
            from: "/a/x".into(),
            to: "/a/y".into(),
            replace: false,
        },
        Step::Rename {
            from: "/a/x".into(),
            to: "/a/y".into(),
            replace: true,
        },
        Step::Rebase {
            image: "/a/x".into(),
            format: Format::Qcow2,
            new_backing: None,
            old_backing: Some(("/a/b".into(), Format::Raw)),
            unsafe_: false,
        },
        Step::Commit {
            image: "/a/x".into(),
            format: Format::Qcow2,
        },
        Step::RemoveFile {
            path: "/a/x".into(),
        },
        Step::Catalog,
    ];
    let mut seen = std::collections::HashSet::new();
    for s in &all {
        let d = s.describe();
        assert!(!d.is_empty() && !d.contains('\n'), "{d:?}");
        assert!(seen.insert(d.clone()), "duplicate description {d}");
    }
}

#[test]
fn irreversible_steps_refuse_undo() {
    let d = tmp();
    let p = d.path().join("x");
    for s in [
        Step::InternalDelete {
            image: p.clone(),
            name: "s".into(),
        },
        Step::Commit {
            image: p.clone(),
            format: Format::Qcow2,
        },
        Step::RemoveFile { path: p.clone() },
        Step::Rename {
            from: p.clone(),
            to: d.path().join("y"),
            replace: true,
        },
        Step::Rebase {
            image: p.clone(),
            format: Format::Qcow2,
            new_backing: None,
            old_backing: None,
            unsafe_: true,
        },
    ] {
        assert!(!s.reversible());
        assert!(
            matches!(s.undo(&cx()), Err(StepError::Invalid(_))),
            "{}",
            s.describe()
        );
    }
}

#[test]
fn create_overlay() {
    let d = tmp();
    let base = d.path().join("x.s1.qcow2");
    qcow2(&base, 4 * MIB);
    let path = d.path().join("x.qcow2");
    let step = Step::CreateOverlay {
        path: path.clone(),
        backing: base.clone(),
        backing_format: Format::Qcow2,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    let info = qemu_img::info(&path, Format::Qcow2, false).unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.backing.as_deref(), Some(base.as_path()));
    assert_eq!(info.backing_format, Some(Format::Qcow2));
    assert_eq!(info.virtual_size, 4 * MIB);
    assert_eq!(names(d.path()), ["x.qcow2", "x.s1.qcow2"]);

    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(names(d.path()), ["x.qcow2", "x.s1.qcow2"]);

    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    assert_eq!(names(d.path()), ["x.s1.qcow2"]);
    undo(&step);
    assert_eq!(names(d.path()), ["x.s1.qcow2"]);
    assert_eq!(probe(&step), Probe::NotApplied);
}

/// The overlay's size is given to qemu-img (which then opens no backing
/// file): the backing's virtual size as QEMU sees it, a raw file's length
/// rounded up to 512 bytes. Compared with qemu-img's own answer.
#[test]
fn overlay_size_is_the_backing_size_qemu_img_would_find() {
    let d = tmp();
    for (name, len) in [("a.raw", 1000usize), ("b.raw", 4 << 20)] {
        let base = d.path().join(name);
        std::fs::write(&base, vec![0u8; len]).unwrap();
        let ours = d.path().join(format!("{name}.ours"));
        qemu_img::create_overlay(&ours, &base, Format::Raw).unwrap();
        let theirs = d.path().join(format!("{name}.theirs"));
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&theirs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let size = |p: &Path| {
            qemu_img::info(p, Format::Qcow2, false)
                .unwrap()
                .virtual_size
        };
        assert_eq!(size(&ours), size(&theirs), "{name}");
    }
}

/// `qemu-io -f FMT -c "write -P BYTE 0 64k" PATH`.
fn qemu_io_write_byte(path: &Path, fmt: &str, byte: u8) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", fmt, "-c", &format!("write -P {byte} 0 64k")])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Whether the first 64 KiB of `path` (opened as FMT) are all BYTE.
fn qemu_io_reads_byte(path: &Path, fmt: &str, byte: u8) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", fmt, "-c", &format!("read -P {byte} 0 64k")])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed")
}

/// vsnap writes its overlays natively: the very bytes `qemu-img create
/// -f qcow2 -u -b BACKING -F FMT IMAGE SIZE` writes (QEMU 7.2, the
/// version setup.sh installs; with another qemu-img the same image as
/// `qemu-img info` and `qemu-img check` see it), for sizes with no L1
/// entry, one, many and an L1 table of several clusters, raw and qcow2
/// backings, a long and a non-UTF-8 backing name; and QEMU reads the
/// backing's data through it.
#[test]
fn native_overlays_are_what_qemu_img_writes() {
    use std::os::unix::ffi::OsStrExt;
    let d = tmp();
    let version = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .unwrap();
    let v72 = String::from_utf8_lossy(&version.stdout).starts_with("qemu-img version 7.2");
    let long = d.path().join("b".repeat(200));
    let odd = d
        .path()
        .join(std::ffi::OsStr::from_bytes(b"back\xffing.raw"));
    let raw = d.path().join("base.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    qemu_io_write_byte(&raw, "raw", 0x44);
    let q = d.path().join("base.qcow2");
    qcow2(&q, 4 * MIB);
    for b in [&long, &odd] {
        std::fs::copy(&raw, b).unwrap();
    }
    let cases: Vec<(&Path, Format, u64)> = vec![
        (&raw, Format::Raw, 0),
        (&raw, Format::Raw, 512),
        (&raw, Format::Raw, 1 << 20),
        (&q, Format::Qcow2, 4 * MIB),
        (&raw, Format::Raw, 10 << 30),
        (&raw, Format::Raw, 10 << 40),
        (&long, Format::Raw, 1 << 20),
        (&odd, Format::Raw, 1 << 20),
    ];
    for (i, (backing, fmt, size)) in cases.into_iter().enumerate() {
        let ours = d.path().join(format!("ours{i}.qcow2"));
        let f = std::fs::File::create(&ours).unwrap();
        vsnap_steps::qcow2::write_overlay(&f, backing.as_os_str().as_bytes(), fmt.as_str(), size)
            .unwrap();
        drop(f);
        let theirs = d.path().join(format!("theirs{i}.qcow2"));
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
            .arg(backing)
            .args(["-F", fmt.as_str()])
            .arg(&theirs)
            .arg(size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let what = format!("case {i}: {} {fmt} {size}", backing.display());
        if v72 {
            assert!(
                std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                "{what}: not the bytes qemu-img writes"
            );
        }
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(&ours)
            .output()
            .unwrap();
        assert!(check.status.success(), "{what}: qemu-img check: {check:?}");
        let (a, b) = (
            qemu_img::info(&ours, Format::Qcow2, false).unwrap(),
            qemu_img::info(&theirs, Format::Qcow2, false).unwrap(),
        );
        assert_eq!(
            (a.virtual_size, &a.backing, a.backing_format),
            (b.virtual_size, &b.backing, b.backing_format),
            "{what}"
        );
    }
    // The data below shows through (case 2: the raw base, 1 MiB).
    assert!(qemu_io_reads_byte(
        &d.path().join("ours2.qcow2"),
        "qcow2",
        0x44
    ));
}

#[test]
fn create_overlay_on_raw_backing_and_after_a_crash() {
    let d = tmp();
    let base = d.path().join("disk.raw");
    qemu_img::create(&base, Format::Raw, 2 * MIB).unwrap();
    qemu_img::io_write_pattern(&base, Format::Raw, 0, 65536, 0x5c).unwrap();
    let path = d.path().join("top.qcow2");
    let temp = fsops::temp_path(&path, "part");
    // what a crash before the rename leaves: a half-written temp
    std::fs::write(&temp, b"QFI\xfbgarbage").unwrap();
    let step = Step::CreateOverlay {
        path: path.clone(),
        backing: base.clone(),
        backing_format: Format::Raw,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert!(!temp.exists());
    assert_eq!(probe(&step), Probe::Applied);
    let info = qemu_img::info(&path, Format::Qcow2, false).unwrap();
    assert_eq!(info.backing_format, Some(Format::Raw));
    assert_eq!(info.virtual_size, 2 * MIB);
    assert!(qemu_img::io_read_pattern(&path, Format::Qcow2, 0, 65536, 0x5c).unwrap());

    // undo after a crash that left both the file and a temp
    std::fs::write(&temp, b"x").unwrap();
    undo(&step);
    assert_eq!(names(d.path()), ["disk.raw"]);
}

#[test]
fn create_overlay_wrong_backing_probes_not_applied_and_relative_is_refused() {
    let d = tmp();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    qcow2(&a, MIB);
    qcow2(&b, MIB);
    let path = d.path().join("top.qcow2");
    let on_a = Step::CreateOverlay {
        path: path.clone(),
        backing: a.clone(),
        backing_format: Format::Qcow2,
    };
    let on_b = Step::CreateOverlay {
        path: path.clone(),
        backing: b.clone(),
        backing_format: Format::Qcow2,
    };
    apply(&on_a);
    assert_eq!(probe(&on_a), Probe::Applied);
    assert_eq!(probe(&on_b), Probe::NotApplied);
    // a garbage file at path
    std::fs::write(&path, b"not an image").unwrap();
    assert!(matches!(probe(&on_a), Probe::Unknown(_)));

    let rel = Step::CreateOverlay {
        path: d.path().join("r.qcow2"),
        backing: PathBuf::from("a.qcow2"),
        backing_format: Format::Qcow2,
    };
    assert!(matches!(rel.apply(&cx()), Err(StepError::Invalid(_))));
    assert!(!d.path().join("r.qcow2").exists());
}

#[test]
fn create_overlay_through_a_symlinked_dir_probes_applied() {
    let d = tmp();
    let real = d.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let base = real.join("base.qcow2");
    qcow2(&base, MIB);
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let path = real.join("top.qcow2");
    apply(&Step::CreateOverlay {
        path: path.clone(),
        backing: base,
        backing_format: Format::Qcow2,
    });
    // the same backing named through the symlink: canonicalized compare
    let via_link = Step::CreateOverlay {
        path,
        backing: link.join("base.qcow2"),
        backing_format: Format::Qcow2,
    };
    assert_eq!(probe(&via_link), Probe::Applied);
}

#[test]
fn clone_copy_with_progress() {
    let d = tmp();
    let src = d.path().join("src.qcow2");
    qcow2(&src, 8 * MIB);
    qemu_img::io_write_pattern(&src, Format::Qcow2, MIB, 3 * MIB, 0x7e).unwrap();
    let dst = d.path().join("dst.qcow2");
    let step = Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Copy,
    };
    assert_eq!(probe(&step), Probe::NotApplied);

    let seen: Mutex<Vec<Progress>> = Mutex::new(Vec::new());
    let record = |p: &Progress| seen.lock().unwrap().push(p.clone());
    let cx = Cx {
        progress: &record,
        resumed: false,
    };
    step.apply(&cx).unwrap();
    let len = std::fs::metadata(&src).unwrap().len();
    {
        let seen = seen.lock().unwrap();
        assert!(!seen.is_empty(), "progress never reported");
        let last = seen.last().unwrap();
        assert_eq!((last.done_bytes, last.total_bytes), (len, len));
        assert!(
            last.what.contains("src.qcow2") && last.what.contains("dst.qcow2"),
            "{}",
            last.what
        );
    }
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert!(qemu_img::io_read_pattern(&dst, Format::Qcow2, MIB, 3 * MIB, 0x7e).unwrap());
    assert!(qemu_img::check(&dst, Format::Qcow2).unwrap().clean);

    step.apply(&cx).unwrap();
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());

    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    assert!(!dst.exists());
    undo(&step);
    assert_eq!(names(d.path()), ["src.qcow2"]);
}

#[test]
fn clone_copy_replaces_a_stale_partial_and_reports_every_64_mib() {
    let d = tmp();
    let src = d.path().join("big.raw");
    qemu_img::create(&src, Format::Raw, 72 * MIB).unwrap();
    qemu_img::io_write_pattern(&src, Format::Raw, 70 * MIB, MIB, 0x42).unwrap();
    let dst = d.path().join("big.copy.raw");
    std::fs::write(&dst, b"stale partial").unwrap();
    let step = Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Copy,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    let seen: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let record = |p: &Progress| seen.lock().unwrap().push(p.done_bytes);
    step.apply(&Cx {
        progress: &record,
        resumed: false,
    })
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), [64 * MIB, 72 * MIB]);
    assert_eq!(probe(&step), Probe::Applied);
    assert!(qemu_img::io_read_pattern(&dst, Format::Raw, 70 * MIB, MIB, 0x42).unwrap());
    assert!(qemu_img::io_read_pattern(&dst, Format::Raw, 0, MIB, 0).unwrap());
}

#[test]
fn clone_probe_without_source() {
    let d = tmp();
    let step = Step::Clone {
        src: d.path().join("gone"),
        dst: d.path().join("dst"),
        mode: CloneMode::Copy,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    std::fs::write(d.path().join("dst"), b"x").unwrap();
    assert!(matches!(probe(&step), Probe::Unknown(_)));
    assert!(step.apply(&cx()).is_err());
}

#[test]
fn rename_without_replace() {
    let d = tmp();
    let from = d.path().join(".vsnap-x.tmp");
    let to = d.path().join("x.mem");
    std::fs::write(&from, b"state").unwrap();
    let step = Step::Rename {
        from: from.clone(),
        to: to.clone(),
        replace: false,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(std::fs::read(&to).unwrap(), b"state");
    apply(&step);
    assert_eq!(names(d.path()), ["x.mem"]);
    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    assert_eq!(names(d.path()), [".vsnap-x.tmp"]);
    undo(&step);
    assert_eq!(names(d.path()), [".vsnap-x.tmp"]);
    assert_eq!(std::fs::read(&from).unwrap(), b"state");

    // crash between link and unlink: apply finishes, undo takes it back
    std::fs::hard_link(&from, &to).unwrap();
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(names(d.path()), ["x.mem"]);
    std::fs::hard_link(&to, &from).unwrap();
    undo(&step);
    assert_eq!(names(d.path()), [".vsnap-x.tmp"]);

    // never clobbers a different `to`
    std::fs::write(&to, b"someone else's").unwrap();
    assert!(step.apply(&cx()).is_err());
    assert_eq!(std::fs::read(&to).unwrap(), b"someone else's");
    assert_eq!(std::fs::read(&from).unwrap(), b"state");
    // and undo leaves both alone
    undo(&step);
    assert_eq!(std::fs::read(&to).unwrap(), b"someone else's");
    assert_eq!(std::fs::read(&from).unwrap(), b"state");
}

#[test]
fn rename_with_replace() {
    let d = tmp();
    let from = d.path().join("new");
    let to = d.path().join("cur");
    std::fs::write(&from, b"new").unwrap();
    std::fs::write(&to, b"old").unwrap();
    let step = Step::Rename {
        from: from.clone(),
        to: to.clone(),
        replace: true,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(std::fs::read(&to).unwrap(), b"new");
    apply(&step);
    assert_eq!(names(d.path()), ["cur"]);
    assert_eq!(std::fs::read(&to).unwrap(), b"new");
    assert!(matches!(step.undo(&cx()), Err(StepError::Invalid(_))));
    std::fs::remove_file(&to).unwrap();
    assert!(matches!(probe(&step), Probe::Unknown(_)));
}

#[test]
fn hard_link() {
    let d = tmp();
    let src = d.path().join("a");
    let dst = d.path().join("b");
    std::fs::write(&src, b"a").unwrap();
    let step = Step::HardLink {
        src: src.clone(),
        dst: dst.clone(),
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    assert!(fsops::same_inode(&src, &dst).unwrap());
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    assert_eq!(names(d.path()), ["a"]);
    undo(&step);
    assert_eq!(names(d.path()), ["a"]);

    // a different file at dst: refused, and undo does not remove it
    std::fs::write(&dst, b"other").unwrap();
    assert!(step.apply(&cx()).is_err());
    undo(&step);
    assert_eq!(std::fs::read(&dst).unwrap(), b"other");
}

fn chain(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.qcow2");
    let child = d.join("child.qcow2");
    qcow2(&base, 4 * MIB);
    qemu_img::io_write_pattern(&base, Format::Qcow2, 0, MIB, 0xab).unwrap();
    apply(&Step::CreateOverlay {
        path: child.clone(),
        backing: base.clone(),
        backing_format: Format::Qcow2,
    });
    qemu_img::io_write_pattern(&child, Format::Qcow2, 2 * MIB, MIB, 0xcd).unwrap();
    (base, child)
}

#[test]
fn rebase_safe_keeps_data_and_undoes() {
    let d = tmp();
    let (base, child) = chain(d.path());
    let step = Step::Rebase {
        image: child.clone(),
        format: Format::Qcow2,
        new_backing: None,
        old_backing: Some((base.clone(), Format::Qcow2)),
        unsafe_: false,
    };
    assert!(step.reversible());
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(
        qemu_img::info(&child, Format::Qcow2, false)
            .unwrap()
            .backing,
        None
    );
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);

    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    let info = qemu_img::info(&child, Format::Qcow2, false).unwrap();
    assert_eq!(info.backing.as_deref(), Some(base.as_path()));
    assert_eq!(info.backing_format, Some(Format::Qcow2));
    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    assert!(qemu_img::io_read_pattern(&child, Format::Qcow2, 0, MIB, 0xab).unwrap());

    apply(&step);
    std::fs::remove_file(&base).unwrap();
    assert!(qemu_img::io_read_pattern(&child, Format::Qcow2, 0, MIB, 0xab).unwrap());
    assert!(qemu_img::io_read_pattern(&child, Format::Qcow2, 2 * MIB, MIB, 0xcd).unwrap());
    assert!(!qemu_img::io_read_pattern(&child, Format::Qcow2, 0, MIB, 0xcd).unwrap());
    assert!(qemu_img::check(&child, Format::Qcow2).unwrap().clean);
}

#[test]
fn rebase_onto_another_backing() {
    let d = tmp();
    let (base, child) = chain(d.path());
    // a copy of base under another name; unsafe rebase onto it
    let other = d.path().join("other.qcow2");
    std::fs::copy(&base, &other).unwrap();
    let step = Step::Rebase {
        image: child.clone(),
        format: Format::Qcow2,
        new_backing: Some((other.clone(), Format::Qcow2)),
        old_backing: Some((base.clone(), Format::Qcow2)),
        unsafe_: true,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    apply(&step);
    let info = qemu_img::info(&child, Format::Qcow2, false).unwrap();
    assert_eq!(info.backing.as_deref(), Some(other.as_path()));
    std::fs::remove_file(&base).unwrap();
    assert!(qemu_img::io_read_pattern(&child, Format::Qcow2, 0, MIB, 0xab).unwrap());

    let rel = Step::Rebase {
        image: child,
        format: Format::Qcow2,
        new_backing: Some(("other.qcow2".into(), Format::Qcow2)),
        old_backing: None,
        unsafe_: true,
    };
    assert!(matches!(rel.apply(&cx()), Err(StepError::Invalid(_))));
}

#[test]
fn internal_create_apply_delete() {
    let d = tmp();
    let img = d.path().join("vm.qcow2");
    qcow2(&img, 4 * MIB);
    qemu_img::io_write_pattern(&img, Format::Qcow2, 0, MIB, 0x11).unwrap();

    let create = Step::InternalCreate {
        image: img.clone(),
        name: "s1".into(),
    };
    assert_eq!(probe(&create), Probe::NotApplied);
    apply(&create);
    assert_eq!(probe(&create), Probe::Applied);
    apply(&create);
    assert_eq!(qemu_img::snapshot_names(&img, false).unwrap(), ["s1"]);

    qemu_img::io_write_pattern(&img, Format::Qcow2, 0, MIB, 0x22).unwrap();
    assert!(!qemu_img::io_read_pattern(&img, Format::Qcow2, 0, MIB, 0x11).unwrap());

    let apply_s1 = Step::InternalApply {
        image: img.clone(),
        name: "s1".into(),
    };
    assert!(matches!(probe(&apply_s1), Probe::Unknown(_)));
    apply(&apply_s1);
    assert!(qemu_img::io_read_pattern(&img, Format::Qcow2, 0, MIB, 0x11).unwrap());
    apply(&apply_s1);
    assert!(qemu_img::io_read_pattern(&img, Format::Qcow2, 0, MIB, 0x11).unwrap());
    undo(&apply_s1);
    undo(&apply_s1);

    // undo of create: the snapshot goes, twice is fine
    let create2 = Step::InternalCreate {
        image: img.clone(),
        name: "s2".into(),
    };
    apply(&create2);
    assert_eq!(qemu_img::snapshot_names(&img, true).unwrap(), ["s1", "s2"]);
    undo(&create2);
    assert_eq!(probe(&create2), Probe::NotApplied);
    undo(&create2);
    assert_eq!(qemu_img::snapshot_names(&img, false).unwrap(), ["s1"]);

    let delete = Step::InternalDelete {
        image: img.clone(),
        name: "s1".into(),
    };
    assert_eq!(probe(&delete), Probe::NotApplied);
    apply(&delete);
    assert_eq!(probe(&delete), Probe::Applied);
    apply(&delete);
    assert!(qemu_img::snapshot_names(&img, false).unwrap().is_empty());
    assert!(matches!(delete.undo(&cx()), Err(StepError::Invalid(_))));
    assert!(qemu_img::check(&img, Format::Qcow2).unwrap().clean);

    // apply of a missing snapshot fails with qemu's message
    match apply_s1.apply(&cx()) {
        Err(StepError::Command {
            program, message, ..
        }) => {
            assert_eq!(program, "qemu-img");
            assert!(!message.is_empty() && message == message.trim());
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
}

#[test]
fn internal_snapshots_of_an_oddly_named_image() {
    let d = tmp();
    let img = d.path().join("vm,file=x.qcow2");
    qcow2(&img, MIB);
    let create = Step::InternalCreate {
        image: img.clone(),
        name: "before upgrade".into(),
    };
    apply(&create);
    assert_eq!(probe(&create), Probe::Applied);
    assert_eq!(
        qemu_img::snapshot_names(&img, false).unwrap(),
        ["before upgrade"]
    );
    undo(&create);
    assert_eq!(probe(&create), Probe::NotApplied);
}

#[test]
fn commit_into_backing() {
    let d = tmp();
    let (base, child) = chain(d.path());
    let step = Step::Commit {
        image: child.clone(),
        format: Format::Qcow2,
    };
    assert!(matches!(probe(&step), Probe::Unknown(_)));
    apply(&step);
    assert!(qemu_img::io_read_pattern(&base, Format::Qcow2, 2 * MIB, MIB, 0xcd).unwrap());
    apply(&step);
    assert!(qemu_img::io_read_pattern(&base, Format::Qcow2, 2 * MIB, MIB, 0xcd).unwrap());
    assert!(qemu_img::io_read_pattern(&base, Format::Qcow2, 0, MIB, 0xab).unwrap());
    assert!(matches!(step.undo(&cx()), Err(StepError::Invalid(_))));
}

#[test]
fn remove_file_and_catalog() {
    let d = tmp();
    let p = d.path().join("freed.qcow2");
    std::fs::write(&p, b"x").unwrap();
    let step = Step::RemoveFile { path: p.clone() };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    apply(&step);
    assert!(names(d.path()).is_empty());

    assert_eq!(probe(&Step::Catalog), Probe::NotApplied);
    apply(&Step::Catalog);
    undo(&Step::Catalog);
    assert_eq!(probe(&Step::Catalog), Probe::NotApplied);
}

#[test]
fn steps_serialize() {
    let s = Step::Rebase {
        image: "/a/x".into(),
        format: Format::Qcow2,
        new_backing: Some(("/a/b".into(), Format::Raw)),
        old_backing: None,
        unsafe_: false,
    };
    let j = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Step>(&j).unwrap(), s);
}
