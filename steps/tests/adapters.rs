//! The adapters against real programs and real filesystems: qemu-img
//! queries, lock conflicts, reflink on btrfs, copies that do not fit.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::{clone, fsops, qcow2, qemu_img, CloneMode, Format, Probe, Step, StepError};

#[test]
fn detect_format_reads_the_magic_only() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("a.qcow2");
    qcow2(&q, MIB);
    assert_eq!(qemu_img::detect_format(&q).unwrap(), Format::Qcow2);
    let r = d.path().join("a.raw");
    qemu_img::create(&r, Format::Raw, MIB).unwrap();
    assert_eq!(qemu_img::detect_format(&r).unwrap(), Format::Raw);
    let short = d.path().join("short");
    std::fs::write(&short, b"QF").unwrap();
    assert_eq!(qemu_img::detect_format(&short).unwrap(), Format::Raw);
    let empty = d.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(qemu_img::detect_format(&empty).unwrap(), Format::Raw);
    assert!(matches!(
        qemu_img::detect_format(&d.path().join("missing")),
        Err(StepError::Io { .. })
    ));
}

#[test]
fn info_and_check() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("a.qcow2");
    qcow2(&q, 3 * MIB);
    let i = qemu_img::info(&q, Format::Qcow2, false).unwrap();
    assert_eq!(
        (i.format.as_str(), i.virtual_size, i.backing.clone()),
        ("qcow2", 3 * MIB, None)
    );
    assert_eq!(qemu_img::info(&q, Format::Qcow2, true).unwrap(), i);
    // the format is what we say, not what qemu guesses
    assert_eq!(
        qemu_img::info(&q, Format::Raw, false).unwrap().format,
        "raw"
    );

    let c = qemu_img::check(&q, Format::Qcow2).unwrap();
    assert!(c.clean && c.corruptions == 0 && c.leaks == 0, "{c:?}");
    assert!(c.output.contains("check-errors"));

    let r = d.path().join("a.raw");
    qemu_img::create(&r, Format::Raw, MIB).unwrap();
    assert!(qemu_img::check(&r, Format::Raw).unwrap().clean);
    // a raw file is not qcow2
    assert!(matches!(
        qemu_img::info(&r, Format::Qcow2, false),
        Err(StepError::Command { .. })
    ));

    match qemu_img::info(&d.path().join("missing.qcow2"), Format::Qcow2, false) {
        Err(e @ StepError::Command { .. }) => {
            let s = e.to_string();
            assert!(
                s.starts_with("qemu-img failed on ") && s.contains("missing.qcow2"),
                "{s}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn check_reports_leaks() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("leaky.qcow2");
    qcow2(&q, 4 * MIB);
    qemu_img::io_write_pattern(&q, Format::Qcow2, 0, MIB, 1).unwrap();
    assert!(qemu_img::check(&q, Format::Qcow2).unwrap().clean);
    // A leak is a cluster with a refcount that nothing references (what a
    // crash between a refcount update and an L2 update leaves). Make one:
    // append a cluster and give it refcount 1 in the first refcount block.
    let mut bytes = std::fs::read(&q).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
        16,
        "cluster_bits"
    );
    assert_eq!(
        u32::from_be_bytes(bytes[96..100].try_into().unwrap()),
        4,
        "refcount_order"
    );
    let cluster = bytes.len().div_ceil(65536);
    bytes.resize((cluster + 1) * 65536, 0);
    let block = be64(&bytes, be64(&bytes, 48) as usize) as usize;
    let entry = block + 2 * cluster;
    assert_eq!(&bytes[entry..entry + 2], [0, 0]);
    bytes[entry..entry + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&q, &bytes).unwrap();
    let c = qemu_img::check(&q, Format::Qcow2).unwrap();
    assert!(!c.clean, "{c:?}");
    assert_eq!(c.leaks, 1, "{}", c.output);
    assert_eq!(c.corruptions, 0);
}

#[test]
fn io_patterns() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("p.qcow2");
    qcow2(&q, 2 * MIB);
    assert!(qemu_img::io_read_pattern(&q, Format::Qcow2, 0, 4096, 0).unwrap());
    assert!(!qemu_img::io_read_pattern(&q, Format::Qcow2, 0, 4096, 0x33).unwrap());
    qemu_img::io_write_pattern(&q, Format::Qcow2, 4096, 8192, 0x33).unwrap();
    assert!(qemu_img::io_read_pattern(&q, Format::Qcow2, 4096, 8192, 0x33).unwrap());
    assert!(!qemu_img::io_read_pattern(&q, Format::Qcow2, 0, 8192, 0x33).unwrap());
    // out of range: an error, not a "no"
    assert!(qemu_img::io_read_pattern(&q, Format::Qcow2, 4 * MIB, 4096, 0).is_err());
    assert!(qemu_img::io_write_pattern(&q, Format::Qcow2, 4 * MIB, 4096, 0).is_err());
}

#[test]
fn relative_paths_are_plain_files() {
    // A file whose name looks like a protocol is still just that file.
    let d = tempfile::tempdir().unwrap();
    let odd = d.path().join("json:{}");
    qcow2(&odd, MIB);
    assert_eq!(
        qemu_img::info(&odd, Format::Qcow2, false)
            .unwrap()
            .virtual_size,
        MIB
    );
}

/// `qemu-io -f qcow2 IMG` waiting on a pipe for commands: it holds the
/// image's write lock. Killed on drop.
struct Holder(Child);

impl Holder {
    /// Start qemu-io and wait until it has the image open (its answer to a
    /// `read`), without racing it for the lock with qemu-img.
    fn start(img: &Path) -> Holder {
        use std::io::{BufRead, BufReader, Write};
        for _ in 0..10 {
            let mut child = qemu_img::child_command("qemu-io")
                .args(["-f", "qcow2"])
                .arg(img)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-io");
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "read 0 512").unwrap();
            child.stdin = Some(stdin);
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut h = Holder(child);
            let mut line = String::new();
            loop {
                line.clear();
                if out.read_line(&mut line).unwrap() == 0 {
                    break; // exited
                }
                if line.contains("read 512/512 bytes") {
                    return h;
                }
                if line.contains("no file open") {
                    break;
                }
            }
            drop(h.0.kill());
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("qemu-io could not open {}", img.display());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn lock_conflict_is_in_use() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    qcow2(&base, 2 * MIB);
    let img = d.path().join("vm.qcow2");
    apply(&Step::CreateOverlay {
        path: img.clone(),
        backing: base.clone(),
        backing_format: Format::Qcow2,
    });
    assert!(!qcow2::qemu_holds(&img).unwrap());
    assert!(!qcow2::qemu_holds(&base).unwrap());
    let holder = Holder::start(&img);
    // QEMU's image locks, seen natively: the image (written) and its
    // backing file (read, writes not shared) are both held.
    assert!(qcow2::qemu_holds(&img).unwrap());
    assert!(qcow2::qemu_holds(&base).unwrap());
    assert!(matches!(
        qemu_img::image_info(&img, Format::Qcow2, false),
        Err(StepError::InUse { path }) if path == img
    ));
    assert!(matches!(
        qemu_img::snapshot_names(&img, false),
        Err(StepError::InUse { .. })
    ));

    let e = qemu_img::info(&img, Format::Qcow2, false).unwrap_err();
    assert!(
        matches!(&e, StepError::InUse { path } if path == &img),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "image {} is in use by another process (a running QEMU?); stop it or use the live domain commands",
            img.display()
        )
    );
    // read-only queries may share
    assert_eq!(
        qemu_img::info(&img, Format::Qcow2, true)
            .unwrap()
            .backing
            .as_deref(),
        Some(base.as_path())
    );
    assert!(qemu_img::snapshot_names(&img, true).unwrap().is_empty());

    let rebase = Step::Rebase {
        image: img.clone(),
        format: Format::Qcow2,
        new_backing: None,
        old_backing: Some((base.clone(), Format::Qcow2)),
        unsafe_: false,
    };
    assert_eq!(probe(&rebase), Probe::NotApplied);
    assert!(matches!(rebase.apply(&cx()), Err(StepError::InUse { .. })));
    let snap = Step::InternalCreate {
        image: img.clone(),
        name: "s".into(),
    };
    assert!(matches!(snap.apply(&cx()), Err(StepError::InUse { .. })));
    assert!(matches!(
        qemu_img::check(&img, Format::Qcow2),
        Err(StepError::InUse { .. })
    ));
    assert!(matches!(
        qemu_img::io_write_pattern(&img, Format::Qcow2, 0, 512, 1),
        Err(StepError::InUse { .. })
    ));
    // a new overlay on an image in use works (qemu-img reads the backing's
    // size with a shared lock): what a live external snapshot does first
    let top = d.path().join("vm.s1.qcow2");
    let overlay = Step::CreateOverlay {
        path: top.clone(),
        backing: img.clone(),
        backing_format: Format::Qcow2,
    };
    apply(&overlay);
    assert_eq!(probe(&overlay), Probe::Applied);
    undo(&overlay);
    drop(holder);

    assert!(!qcow2::qemu_holds(&img).unwrap());
    assert!(!qcow2::qemu_holds(&base).unwrap());
    apply(&rebase);
    assert_eq!(probe(&rebase), Probe::Applied);
}

/// The native reader gives what `qemu-img info` gives, on the images vsnap
/// meets: fresh, v2 (compat 0.10) and v3, with internal snapshots (long,
/// odd and many names), overlays with absolute and relative backing names,
/// and raw files. (qemu-img 7.2 makes no overlay without a backing
/// format any more.)
#[test]
fn native_image_info_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    let v3 = d.path().join("v3.qcow2");
    qcow2(&v3, 3 * MIB);
    images.push((v3.clone(), Format::Qcow2));
    let v2 = d.path().join("v2.qcow2");
    run_ok(
        qemu_img::child_command("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=4096",
            ])
            .arg(&v2)
            .arg("5M"),
    );
    let long = "l".repeat(300);
    for img in [&v3, &v2] {
        for name in ["s1", "with space", "ünïcode", long.as_str(), "a,b"] {
            qemu_img::snapshot(img, qemu_img::SnapshotOp::Create, name).unwrap();
        }
    }
    images.push((v2.clone(), Format::Qcow2));
    let many = d.path().join("many.qcow2");
    qcow2(&many, MIB);
    for i in 0..150 {
        qemu_img::snapshot(&many, qemu_img::SnapshotOp::Create, &format!("snap-{i}")).unwrap();
    }
    qemu_img::snapshot(&many, qemu_img::SnapshotOp::Delete, "snap-7").unwrap();
    images.push((many, Format::Qcow2));
    let abs = d.path().join("abs.qcow2");
    qemu_img::create_overlay(&abs, &v3, Format::Qcow2).unwrap();
    images.push((abs, Format::Qcow2));
    let rel = d.path().join("rel.qcow2");
    run_ok(
        qemu_img::child_command("qemu-img")
            .current_dir(d.path())
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "v2.qcow2",
                "-F",
                "qcow2",
                "rel.qcow2",
            ]),
    );
    images.push((rel, Format::Qcow2));
    let raw = d.path().join("r.raw");
    qemu_img::create(&raw, Format::Raw, 7 * MIB + 512).unwrap();
    images.push((raw.clone(), Format::Raw));
    images.push((v3.clone(), Format::Raw));

    for (img, fmt) in &images {
        let want = qemu_img::info(img, *fmt, true).unwrap();
        let got = qemu_img::image_info(img, *fmt, false).unwrap();
        assert_eq!(got, want, "{} as {fmt:?}", img.display());
    }
    // QEMU keeps 255 bytes of a name (vsnap's names stop at 200).
    assert_eq!(
        qemu_img::snapshot_names(&v2, false).unwrap(),
        ["s1", "with space", "ünïcode", &long[..255], "a,b"]
    );
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn children_die_with_the_spawning_thread() {
    use std::os::unix::process::ExitStatusExt;
    let t = std::thread::spawn(|| qemu_img::child_command("sleep").arg("30").spawn().unwrap());
    let mut child = t.join().unwrap();
    let start = Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn copy_that_does_not_fit_leaves_nothing() {
    let fs = LoopMount::new("ext4", "8M");
    let before = names(&fs.mnt);
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big.raw");
    qemu_img::create(&src, Format::Raw, 16 * MIB).unwrap();
    let dst = fs.mnt.join("big.raw");
    let step = Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Copy,
    };
    match step.apply(&cx()) {
        Err(StepError::NoSpace {
            path,
            needed,
            available,
        }) => {
            assert_eq!(path, dst);
            assert_eq!(needed, 16 * MIB);
            assert!(available < needed);
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert_eq!(names(&fs.mnt), before);
    assert_eq!(probe(&step), Probe::NotApplied);
    match clone::copy(&src, &dst, &|_| {}) {
        Err(e @ StepError::NoSpace { .. }) => assert!(e.to_string().contains("not enough space")),
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert_eq!(names(&fs.mnt), before);

    // what fits is copied
    let small = d.path().join("small.raw");
    qemu_img::create(&small, Format::Raw, MIB).unwrap();
    qemu_img::io_write_pattern(&small, Format::Raw, 0, MIB, 0x61).unwrap();
    let ok = Step::Clone {
        src: small,
        dst: fs.mnt.join("small.raw"),
        mode: CloneMode::Copy,
    };
    apply(&ok);
    assert_eq!(probe(&ok), Probe::Applied);
    assert!(
        qemu_img::io_read_pattern(&fs.mnt.join("small.raw"), Format::Raw, 0, MIB, 0x61).unwrap()
    );
}

#[test]
fn reflink_unsupported_on_ext4_leaves_nothing() {
    let fs = LoopMount::new("ext4", "16M");
    assert!(!clone::reflink_supported(&fs.mnt));
    let before = names(&fs.mnt);
    let src = fs.mnt.join("a.raw");
    std::fs::write(&src, vec![7u8; 65536]).unwrap();
    let dst = fs.mnt.join("b.raw");
    match clone::reflink(&src, &dst) {
        Err(e @ StepError::ReflinkUnsupported { .. }) => {
            assert!(e.to_string().contains("--kind copy"), "{e}")
        }
        other => panic!("expected ReflinkUnsupported, got {other:?}"),
    }
    assert!(!dst.exists());
    let step = Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Reflink,
    };
    assert!(matches!(
        step.apply(&cx()),
        Err(StepError::ReflinkUnsupported { .. })
    ));
    assert!(!dst.exists());
    let mut after = names(&fs.mnt);
    after.retain(|n| n != "a.raw");
    assert_eq!(after, before);
    assert!(!names(&fs.mnt).iter().any(|n| fsops::is_vsnap_temp(n)));
}

#[test]
fn reflink_on_btrfs() {
    let fs = LoopMount::new("btrfs", "256M");
    assert!(clone::reflink_supported(&fs.mnt));
    assert!(
        names(&fs.mnt).is_empty(),
        "probe files left: {:?}",
        names(&fs.mnt)
    );

    let src = fs.mnt.join("vm.qcow2");
    qcow2(&src, 16 * MIB);
    qemu_img::io_write_pattern(&src, Format::Qcow2, 0, 4 * MIB, 0x99).unwrap();
    let dst = fs.mnt.join("vm.s1.qcow2");
    let step = Step::Clone {
        src: src.clone(),
        dst: dst.clone(),
        mode: CloneMode::Reflink,
    };
    assert_eq!(probe(&step), Probe::NotApplied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    apply(&step);
    assert_eq!(probe(&step), Probe::Applied);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    // copy-on-write: writing the clone leaves the source alone
    qemu_img::io_write_pattern(&dst, Format::Qcow2, 0, MIB, 0x11).unwrap();
    assert!(qemu_img::io_read_pattern(&src, Format::Qcow2, 0, 4 * MIB, 0x99).unwrap());
    assert!(qemu_img::io_read_pattern(&dst, Format::Qcow2, 0, MIB, 0x11).unwrap());
    undo(&step);
    assert_eq!(probe(&step), Probe::NotApplied);
    undo(&step);
    assert_eq!(names(&fs.mnt), ["vm.qcow2"]);

    // reflink across filesystems is "unsupported", leaving nothing
    let d = tempfile::tempdir().unwrap();
    let other = d.path().join("x");
    assert!(matches!(
        clone::reflink(&src, &other),
        Err(StepError::ReflinkUnsupported { .. })
    ));
    assert!(!other.exists());
}
