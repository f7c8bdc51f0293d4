//! After a host crash the files decide (DESIGN.md 10.1): the pivots of
//! live plans probed with their QEMU gone (a monitor socket missing, or a
//! stale one that refuses connections), on real qemu-img-made overlays
//! written by real qemu-io; the live steps after the pivot, and the undo
//! of those before it, against a dead QEMU.

mod common;

use common::*;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use vsnap_steps::live::{self, LiveDisk};
use vsnap_steps::{probe_pivot, qemu_img, settle_pivot, Format, Probe, Step, StepError};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A socket file nobody accepts on: what a killed QEMU leaves.
fn stale_socket(path: &Path) {
    drop(UnixListener::bind(path).unwrap());
    assert!(path.exists());
}

fn qemu_io(image: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 base with data in its first clusters, and an overlay on it
/// made the way vsnap makes one (`CreateOverlay`).
fn base_and_overlay(dir: &Path, name: &str) -> (PathBuf, PathBuf, Step) {
    let base = dir.join(format!("{name}.qcow2"));
    qcow2(&base, 4 * MIB);
    qemu_io(&base, "write -P 0x5a 0 256k");
    let ov = dir.join(format!("{name}.s1.qcow2"));
    let create = Step::CreateOverlay {
        path: ov.clone(),
        backing: base.clone(),
        backing_format: Format::Qcow2,
    };
    apply(&create);
    (base, ov, create)
}

#[test]
fn an_overlay_has_data_only_once_a_cluster_is_written_to_it() {
    let d = tmp();
    let (_, ov, _) = base_and_overlay(d.path(), "a");
    // The backing file's data is not the overlay's.
    assert_eq!(live::overlay_has_data(&ov), Ok(false));
    qemu_io(&ov, "write -P 0x11 1M 4k");
    assert_eq!(live::overlay_has_data(&ov), Ok(true));

    // A zeroed cluster hides the backing file's data as much as a write.
    let (_, ov2, _) = base_and_overlay(d.path(), "b");
    qemu_io(&ov2, "write -z 0 64k");
    assert_eq!(live::overlay_has_data(&ov2), Ok(true));

    // Extended L2 entries (16 bytes, subcluster bitmaps).
    let ov3 = d.path().join("c.s1.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"])
        .arg(&ov3)
        .arg("4M")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(live::overlay_has_data(&ov3), Ok(false));
    qemu_io(&ov3, "write 2M 4k");
    assert_eq!(live::overlay_has_data(&ov3), Ok(true));
}

#[test]
fn an_overlay_that_is_not_vsnaps_qcow2_cannot_decide() {
    let d = tmp();
    // A missing file, a raw file (never guessed to be anything), a symlink.
    let missing = d.path().join("gone.qcow2");
    assert!(live::overlay_has_data(&missing)
        .unwrap_err()
        .contains("is gone"));
    let raw = d.path().join("raw.qcow2");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    assert!(live::overlay_has_data(&raw)
        .unwrap_err()
        .contains("not the qcow2 overlay"));
    let (_, ov, _) = base_and_overlay(d.path(), "a");
    let link = d.path().join("link.qcow2");
    std::os::unix::fs::symlink(&ov, &link).unwrap();
    assert!(live::overlay_has_data(&link)
        .unwrap_err()
        .contains("symlink"));
    // L1 table pointing past the end of the file: cannot tell.
    qemu_io(&ov, "write 0 4k");
    let h = vsnap_steps::qcow2::read(&ov).unwrap();
    let l2 = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&ov).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, h.tables.l1_offset).unwrap();
        u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00
    };
    let f = std::fs::OpenOptions::new().write(true).open(&ov).unwrap();
    f.set_len(l2).unwrap();
    assert!(live::overlay_has_data(&ov)
        .unwrap_err()
        .contains("not a cluster of the file"));
}

/// The plan of a live disk-only snapshot of two disks, as the engine
/// compiles it: overlays, blockdev-add, the transaction (the pivot), cont.
fn transaction_plan(qmp: &Path, overlays: &[(&Step, &Path)]) -> Vec<Step> {
    let mut steps: Vec<Step> = overlays.iter().map(|(s, _)| (*s).clone()).collect();
    let mut disks = Vec::new();
    for (i, (_, ov)) in overlays.iter().enumerate() {
        let node = format!("vsnap-t-{i}");
        steps.push(Step::QmpBlockdevAdd {
            qmp: qmp.to_path_buf(),
            node: node.clone(),
            file_node: format!("{node}f"),
            path: ov.to_path_buf(),
        });
        disks.push(LiveDisk {
            device: format!("vd{i}"),
            node: format!("top{i}"),
            overlay: node,
        });
    }
    steps.push(Step::QmpSnapshotTransaction {
        qmp: qmp.to_path_buf(),
        disks,
    });
    steps.push(Step::QmpCont {
        qmp: qmp.to_path_buf(),
    });
    steps
}

#[test]
fn a_transaction_with_qemu_gone_is_decided_by_its_overlays() {
    let d = tmp();
    let (_, ova, ca) = base_and_overlay(d.path(), "a");
    let (_, ovb, cb) = base_and_overlay(d.path(), "b");
    // A stale socket (killed QEMU) and no socket at all: both "gone".
    let stale = d.path().join("qmp.sock");
    stale_socket(&stale);
    let missing = d.path().join("nothing.sock");
    for qmp in [&stale, &missing] {
        assert!(live::gone(qmp).unwrap());
        let steps = transaction_plan(qmp, &[(&ca, &ova), (&cb, &ovb)]);
        let pivot = steps.len() - 2;
        assert!(vsnap_steps::pivot_decided_from_files(&steps[pivot]));
        // Before any guest write: not applied, and rolling back loses nothing.
        assert_eq!(
            probe_pivot(&steps, pivot, &cx()).unwrap(),
            Probe::NotApplied
        );
        // The pivot's own probe, without its plan, cannot tell.
        assert!(matches!(probe(&steps[pivot]), Probe::Unknown(_)));
        assert_eq!(
            settle_pivot(&steps, pivot, false).unwrap(),
            Vec::<String>::new()
        );
    }
    // One overlay with data decides for both (the transaction is atomic).
    qemu_io(&ovb, "write 3M 512");
    let steps = transaction_plan(&stale, &[(&ca, &ova), (&cb, &ovb)]);
    let pivot = steps.len() - 2;
    assert_eq!(probe_pivot(&steps, pivot, &cx()).unwrap(), Probe::Applied);
    assert_eq!(
        settle_pivot(&steps, pivot, true).unwrap(),
        Vec::<String>::new()
    );
    // After the pivot, cont against a dead QEMU is done: nothing to resume.
    apply(&steps[pivot + 1]);
    // A vanished overlay: undecidable, even though the other has data.
    std::fs::remove_file(&ova).unwrap();
    match probe_pivot(&steps, pivot, &cx()).unwrap() {
        Probe::Unknown(why) => assert!(why.contains("is gone"), "{why}"),
        p => panic!("{p:?}"),
    }
}

#[test]
fn a_monitor_that_answers_oddly_is_not_gone() {
    let d = tmp();
    let (_, ova, ca) = base_and_overlay(d.path(), "a");
    let sock = d.path().join("odd.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"this is not QMP\n").unwrap();
    });
    let steps = transaction_plan(&sock, &[(&ca, &ova)]);
    let pivot = steps.len() - 2;
    // Not gone: an error (recovery reports it, needs attention), never a
    // decision from the files.
    let e = probe_pivot(&steps, pivot, &cx()).unwrap_err();
    assert!(matches!(e, StepError::QmpProtocol { .. }), "{e}");
    t.join().unwrap();
}

#[test]
fn snapshot_save_with_qemu_gone_is_decided_by_the_snapshot_tables() {
    let d = tmp();
    let imgs: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let p = d.path().join(format!("{n}.qcow2"));
            qcow2(&p, 4 * MIB);
            qemu_io(&p, "write 0 64k");
            p
        })
        .collect();
    let qmp = d.path().join("qmp.sock");
    stale_socket(&qmp);
    let steps = vec![
        Step::QmpStop { qmp: qmp.clone() },
        Step::QmpSnapshotSaveFiles {
            qmp: qmp.clone(),
            job: "vsnap-j".into(),
            tag: "s1".into(),
            vmstate: "n0".into(),
            devices: vec!["n0".into(), "n1".into(), "n2".into()],
            images: imgs.clone(),
        },
        Step::QmpQuit { qmp: qmp.clone() },
    ];
    // None: not applied.
    assert_eq!(probe(&steps[1]), Probe::NotApplied);
    // QEMU died between the entries: a partial snapshot is not applied,
    // and settling deletes its entries (offline), idempotently.
    for i in &imgs[..2] {
        qemu_img::snapshot(i, qemu_img::SnapshotOp::Create, "s1").unwrap();
    }
    assert_eq!(probe_pivot(&steps, 1, &cx()).unwrap(), Probe::NotApplied);
    let notes = settle_pivot(&steps, 1, false).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    for i in &imgs {
        assert!(!qemu_img::snapshot_names(i, true)
            .unwrap()
            .contains(&"s1".to_string()));
        assert!(qemu_img::check(i, Format::Qcow2).unwrap().clean);
    }
    assert_eq!(
        settle_pivot(&steps, 1, false).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(probe(&steps[1]), Probe::NotApplied);
    // The undo before the pivot succeeds against the dead QEMU.
    undo(&steps[0]);
    // In every disk: applied; the quit after it is done (QEMU is gone).
    for i in &imgs {
        qemu_img::snapshot(i, qemu_img::SnapshotOp::Create, "s1").unwrap();
    }
    assert_eq!(probe_pivot(&steps, 1, &cx()).unwrap(), Probe::Applied);
    assert_eq!(settle_pivot(&steps, 1, true).unwrap(), Vec::<String>::new());
    assert_eq!(probe(&steps[2]), Probe::Applied);
    apply(&steps[2]);
    // A disk that vanished: undecidable.
    std::fs::remove_file(&imgs[2]).unwrap();
    match probe(&steps[1]) {
        Probe::Unknown(why) => assert!(why.contains("is gone"), "{why}"),
        p => panic!("{p:?}"),
    }
}

#[test]
fn live_steps_against_a_dead_qemu() {
    let d = tmp();
    let qmp = d.path().join("qmp.sock");
    stale_socket(&qmp);
    let agent = d.path().join("qga.sock");
    stale_socket(&agent);
    // Undo before the pivot: no node to delete, no guest to resume or thaw.
    undo(&Step::QmpBlockdevAdd {
        qmp: qmp.clone(),
        node: "vsnap-x-0".into(),
        file_node: "vsnap-x-0f".into(),
        path: d.path().join("ov.qcow2"),
    });
    undo(&Step::QmpStop { qmp: qmp.clone() });
    undo(&Step::AgentFreeze {
        agent: agent.clone(),
    });
    // After the pivot: cont, thaw and quit are done.
    apply(&Step::QmpCont { qmp: qmp.clone() });
    apply(&Step::AgentThaw {
        agent: d.path().join("no-agent.sock"),
    });
    apply(&Step::AgentThaw { agent });
    apply(&Step::QmpQuit { qmp: qmp.clone() });
    // The memory stream under its temporary name, with no QEMU to say it
    // completed, is not complete; its undo removes it.
    let tmp_mem = d.path().join(".vsnap-t-1.m.mem.tmp");
    std::fs::write(&tmp_mem, b"QEVM and then some").unwrap();
    let mig = Step::QmpMigrateToFile {
        qmp,
        fdname: "vsnap-t".into(),
        path: tmp_mem.clone(),
    };
    assert_eq!(probe(&mig), Probe::NotApplied);
    undo(&mig);
    assert!(!tmp_mem.exists());
}

/// Leak one cluster in the qcow2 `image` the way a killed writer does: a
/// data cluster allocated (refcount 1) whose L2 entry never made it out.
fn leak_a_cluster(image: &Path) {
    use std::os::unix::fs::FileExt;
    qemu_io(image, "write 0 4k");
    let h = vsnap_steps::qcow2::read(image).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, h.tables.l1_offset).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&[0u8; 8], l2).unwrap();
    drop(f);
    let c = qemu_img::check(image, Format::Qcow2).unwrap();
    assert_eq!((c.leaks, c.corruptions), (1, 0), "{}", c.output);
}

#[test]
fn leaks_are_freed_only_in_images_nobody_holds() {
    let d = tmp();
    let (base, ov, create) = base_and_overlay(d.path(), "a");
    let qmp = d.path().join("qmp.sock");
    stale_socket(&qmp);
    let steps = transaction_plan(&qmp, &[(&create, &ov)]);
    let pivot = steps.len() - 2;
    // Back: the image the overlay was made on is the one kept.
    leak_a_cluster(&base);
    leak_a_cluster(&ov);
    // Held by a process (qemu-io, interactive: QEMU's image locks):
    // left alone.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !vsnap_steps::qcow2::qemu_holds(&base).unwrap() {
        assert!(t.elapsed().as_secs() < 10, "qemu-io never locked the image");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        settle_pivot(&steps, pivot, false).unwrap(),
        Vec::<String>::new()
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let notes = settle_pivot(&steps, pivot, false).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("freed 1 leaked cluster(s)"), "{notes:?}");
    assert!(qemu_img::check(&base, Format::Qcow2).unwrap().clean);
    assert_eq!(qemu_img::check(&ov, Format::Qcow2).unwrap().leaks, 1);
    // Forward: the overlay is the one kept.
    let notes = settle_pivot(&steps, pivot, true).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(qemu_img::check(&ov, Format::Qcow2).unwrap().clean);
    // Clean: nothing to do, nothing said.
    assert_eq!(
        settle_pivot(&steps, pivot, true).unwrap(),
        Vec::<String>::new()
    );
}
