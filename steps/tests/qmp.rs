//! The QMP client against a real QEMU (qemu-system-x86_64, TCG, no guest
//! code needed: `-S` keeps the CPUs in prelaunch until `cont`).

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};
use vsnap_steps::qmp::{blockdev_snapshot_action, qcow2_overlay_args, Qmp};
use vsnap_steps::{qemu_img, Format, StepError};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);

/// A QEMU child with one qcow2 disk (`f0` file node, `d0` qcow2 node,
/// device `vda`) and its QMP socket; killed (and reaped) on drop, also when
/// the test panics.
struct Vm {
    child: Child,
    sock: PathBuf,
    img: PathBuf,
    dir: tempfile::TempDir,
}

impl Vm {
    fn start() -> Vm {
        Vm::start_prepared(|_| {})
    }

    /// `prepare(dir)` runs before QEMU starts (and holds its image locks).
    fn start_prepared(prepare: impl FnOnce(&Path)) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        qemu_img::create(&img, Format::Qcow2, 16 * MIB).unwrap();
        prepare(dir.path());
        let sock = dir.path().join("qmp.sock");
        let log = std::fs::File::create(dir.path().join("qemu.log")).unwrap();
        let child = qemu_img::child_command("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-S", "-m", "64"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f0",
                img.display()
            ))
            .args(["-blockdev", "driver=qcow2,file=f0,node-name=d0"])
            .args(["-device", "virtio-blk-pci,drive=d0,id=vda"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
        let mut vm = Vm {
            child,
            sock,
            img,
            dir,
        };
        vm.wait_listening();
        vm
    }

    /// Bounded poll until QEMU listens on the socket (read from
    /// /proc/net/unix, so no connection is spent on it).
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let want = self.sock.to_str().unwrap().to_string();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("QEMU exited ({st}) before listening: {}", self.log());
            }
            let table = std::fs::read_to_string("/proc/net/unix").unwrap();
            // Flags 00010000 = __SO_ACCEPTCON: a listening socket.
            if table.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 8 && f[3] == "00010000" && f[7] == want
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU does not listen on {want} after 60s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.sock, T).unwrap_or_else(|e| panic!("connect: {e}; {}", self.log()))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A SIGSTOPped QEMU dies of SIGKILL too.
        self.kill();
    }
}

/// The node of `query-named-block-nodes` named `name`.
fn node<'a>(nodes: &'a Value, name: &str) -> Option<&'a Value> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
}

fn snapshot_tags(q: &mut Qmp, node_name: &str) -> Vec<String> {
    let nodes = q.query_named_block_nodes().unwrap();
    let n = node(&nodes, node_name).unwrap();
    n["image"]["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn greeting_records_the_version_and_query_version_agrees() {
    let vm = Vm::start();
    let mut q = vm.qmp();
    assert_eq!(q.path(), vm.sock);
    let v = q.version().clone();
    assert!(v.triple() >= (6, 0, 0), "{v:?}");
    assert_eq!(q.query_version().unwrap(), v.triple());
    assert!(format!("{q:?}").contains("major"));
}

#[test]
fn stop_and_cont_queue_stop_and_resume_events_with_timestamps() {
    let vm = Vm::start();
    let mut q = vm.qmp();
    assert_eq!(q.query_status().unwrap(), (false, "prelaunch".to_string()));
    assert!(q.events().is_empty());

    let before = SystemTime::now();
    q.cont().unwrap();
    // RESUME came before cont's reply: already queued, no wait needed.
    let resume = q.events();
    assert_eq!(
        resume.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["RESUME"]
    );
    assert_eq!(q.query_status().unwrap(), (true, "running".to_string()));

    q.stop().unwrap();
    let stop = q.wait_event("STOP", T).unwrap();
    assert_eq!(q.query_status().unwrap(), (false, "paused".to_string()));
    let after = SystemTime::now();

    let (r, s) = (resume[0].timestamp, stop.timestamp);
    assert!(r <= s, "{r:?} {s:?}");
    let slack = Duration::from_secs(1);
    assert!(r.to_system_time() + slack >= before && s.to_system_time() <= after + slack);
    assert!(r.microseconds < 1_000_000 && s.microseconds < 1_000_000);
    assert!(s.since(&r) < Duration::from_secs(60));
    assert_eq!(r.since(&s), Duration::ZERO);

    // stop of a paused guest: success, and no event (nothing changed)
    q.stop().unwrap();
    assert!(q.poll_events().unwrap().is_empty());
    assert_eq!(q.query_status().unwrap(), (false, "paused".to_string()));
}

#[test]
fn an_unknown_command_fails_naming_the_command_and_qemus_message() {
    let vm = Vm::start();
    let mut q = vm.qmp();
    let e = q.execute("no-such-command", Value::Null).unwrap_err();
    match &e {
        StepError::Qmp {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("no-such-command") && msg.contains("has not been found"),
        "{msg}"
    );
    // bad arguments: QEMU's message again
    let e = q
        .execute("blockdev-del", json!({"node-name": "nope"}))
        .unwrap_err();
    assert!(
        e.to_string().contains("blockdev-del") && e.to_string().contains("nope"),
        "{e}"
    );
    // arguments must be an object
    assert!(matches!(
        q.execute("query-status", json!([1])),
        Err(StepError::Invalid(_))
    ));
    // the connection is still usable
    assert_eq!(q.query_status().unwrap().1, "prelaunch");
}

#[test]
fn replies_are_matched_by_id_across_a_timeout_and_interleaved_events() {
    let vm = Vm::start();
    let mut q = vm.qmp();
    // QEMU stopped (SIGSTOP): cont is written but not answered in time.
    vm.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let e = q
        .execute_with_timeout("cont", Value::Null, Duration::from_millis(300))
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    match &e {
        StepError::QmpTimeout { what, .. } => assert_eq!(what, "cont"),
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string().contains("did not answer cont within 0.3s"),
        "{e}"
    );
    vm.signal(libc::SIGCONT);
    // The stream now holds RESUME, cont's late reply (old id), then ours.
    assert_eq!(q.query_status().unwrap(), (true, "running".to_string()));
    let v = q.query_version().unwrap();
    assert_eq!(v, q.version().triple());
    // RESUME was queued on the way; wait_event takes it from the queue.
    let t1 = Instant::now();
    let resume = q.wait_event("RESUME", Duration::from_millis(1)).unwrap();
    assert!(t1.elapsed() < Duration::from_millis(500));
    assert_eq!(resume.data, Value::Null);
    assert!(q.events().is_empty());

    // Several events between commands keep their order.
    q.stop().unwrap();
    q.cont().unwrap();
    q.stop().unwrap();
    let names: Vec<String> = q.events().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["STOP", "RESUME", "STOP"]);
}

#[test]
fn wait_event_is_bounded() {
    let vm = Vm::start();
    let mut q = vm.qmp();
    let t0 = Instant::now();
    let e = q
        .wait_event("NO_SUCH_EVENT", Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(e, StepError::QmpTimeout { .. }), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(q.query_status().is_ok());
}

#[test]
fn blockdev_add_transaction_of_blockdev_snapshot_and_blockdev_del() {
    let mut overlay = PathBuf::new();
    let mut spare = PathBuf::new();
    let vm = Vm::start_prepared(|dir| {
        // prepared before QEMU holds the base image's lock
        overlay = dir.join("disk.ov1.qcow2");
        spare = dir.join("spare.qcow2");
        qemu_img::create_overlay(&overlay, &dir.join("disk.qcow2"), Format::Qcow2).unwrap();
        qemu_img::create(&spare, Format::Qcow2, MIB).unwrap();
    });
    let mut q = vm.qmp();
    q.cont().unwrap();

    q.blockdev_add(qcow2_overlay_args("ov1", "ov1-file", &overlay))
        .unwrap();
    // the same node name twice: QEMU's error, nothing changes
    let e = q
        .blockdev_add(qcow2_overlay_args("ov1", "ov1-file2", &overlay))
        .unwrap_err();
    assert!(e.to_string().contains("blockdev-add"), "{e}");

    // a transaction with one bad action does nothing at all
    let e = q
        .transaction(vec![
            blockdev_snapshot_action("d0", "ov1"),
            blockdev_snapshot_action("d0", "no-such-node"),
        ])
        .unwrap_err();
    assert!(matches!(&e, StepError::Qmp { command, .. } if command == "transaction"));
    let blk = q.query_block().unwrap();
    assert_eq!(blk[0]["inserted"]["node-name"], "d0", "{blk}");

    q.transaction(vec![blockdev_snapshot_action("d0", "ov1")])
        .unwrap();

    // the overlay is now the device's top, backed by the old image
    let blk = q.query_block().unwrap();
    let dev = &blk.as_array().unwrap()[0];
    assert_eq!(dev["inserted"]["node-name"], "ov1", "{dev}");
    assert_eq!(dev["inserted"]["file"], overlay.to_str().unwrap());
    assert!(dev["qdev"].as_str().unwrap().contains("vda"), "{dev}");
    let nodes = q.query_named_block_nodes().unwrap();
    let ov = node(&nodes, "ov1").expect("ov1 listed");
    assert_eq!(ov["file"], overlay.to_str().unwrap());
    assert_eq!(ov["backing_file"], vm.img.to_str().unwrap(), "{ov}");
    assert_eq!(ov["backing_file_depth"], 1);
    assert_eq!(
        ov["image"]["backing-image"]["filename"],
        vm.img.to_str().unwrap()
    );
    // QEMU 7.2's flat listing reports a depth of 0 for every node
    let flat = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    assert_eq!(node(&flat, "ov1").unwrap()["backing_file_depth"], 0);
    assert!(node(&nodes, "d0").is_some() && node(&nodes, "ov1-file").is_some());
    assert!(q.query_status().unwrap().0, "the guest kept running");

    // d0 is in use (the overlay's backing): QEMU refuses to delete it
    let e = q.blockdev_del("d0").unwrap_err();
    assert!(matches!(&e, StepError::Qmp { command, .. } if command == "blockdev-del"));

    // an unused node goes, with its inline file child
    q.blockdev_add(qcow2_overlay_args("sp0", "sp0-file", &spare))
        .unwrap();
    let nodes = q.query_named_block_nodes().unwrap();
    assert!(node(&nodes, "sp0").is_some() && node(&nodes, "sp0-file").is_some());
    q.blockdev_del("sp0").unwrap();
    let nodes = q.query_named_block_nodes().unwrap();
    assert!(node(&nodes, "sp0").is_none() && node(&nodes, "sp0-file").is_none());
    // deleting it again: QEMU's "not found" error
    assert!(matches!(q.blockdev_del("sp0"), Err(StepError::Qmp { .. })));
}

#[test]
fn snapshot_save_load_delete_jobs_run_to_completion() {
    let vm = Vm::start();
    let mut q = vm.qmp();
    let long = Duration::from_secs(120);

    q.snapshot_save("save1", "s1", "d0", &["d0"], long).unwrap();
    assert_eq!(snapshot_tags(&mut q, "d0"), ["s1"]);
    let nodes = q.query_named_block_nodes().unwrap();
    let snap = &node(&nodes, "d0").unwrap()["image"]["snapshots"][0];
    assert!(
        snap["vm-state-size"].as_u64().unwrap() > 0,
        "vmstate was saved: {snap}"
    );
    assert!(q.query_jobs().unwrap().is_empty(), "dismissed");

    // the same tag again: the job concludes with QEMU's error, dismissed
    let e = q
        .snapshot_save("save2", "s1", "d0", &["d0"], long)
        .unwrap_err();
    match &e {
        StepError::QmpJob { job, kind, error } => {
            assert_eq!((job.as_str(), kind.as_str()), ("save2", "snapshot-save"));
            assert!(error.contains("already exists"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("already exists"));
    assert!(q.query_jobs().unwrap().is_empty());

    q.snapshot_load("load1", "s1", "d0", &["d0"], long).unwrap();
    q.snapshot_delete("del1", "s1", &["d0"], long).unwrap();
    assert!(snapshot_tags(&mut q, "d0").is_empty());

    // a job started elsewhere is waited for by id
    q.execute(
        "snapshot-save",
        json!({"job-id": "save3", "tag": "s3", "vmstate": "d0", "devices": ["d0"]}),
    )
    .unwrap();
    q.wait_job("save3", long).unwrap();
    assert_eq!(snapshot_tags(&mut q, "d0"), ["s3"]);
    assert!(matches!(
        q.wait_job("save3", long),
        Err(StepError::QmpNoJob { job }) if job == "save3"
    ));
    // events of the jobs were queued meanwhile
    assert!(q.events().iter().any(|e| e.name == "JOB_STATUS_CHANGE"));
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("nobody.sock");
    let t0 = Instant::now();
    let e = Qmp::connect(&p, T).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "no waiting");
    assert!(matches!(&e, StepError::QmpNoSocket { path } if path == &p));
    assert_eq!(
        e.to_string(),
        format!(
            "no QEMU monitor at {0}: is the guest running? start QEMU with -qmp unix:{0},server=on,wait=off",
            p.display()
        )
    );
    // a missing directory too
    let p2 = d.path().join("no/such/dir.sock");
    assert!(matches!(
        Qmp::connect(&p2, T),
        Err(StepError::QmpNoSocket { .. })
    ));
}

#[test]
fn a_killed_qemus_stale_socket_is_refused_clearly() {
    let mut vm = Vm::start();
    vm.kill();
    assert!(vm.sock.exists(), "SIGKILL leaves the socket file behind");
    let e = Qmp::connect(&vm.sock, T).unwrap_err();
    assert!(matches!(&e, StepError::QmpConnect { .. }), "{e:?}");
    assert!(e.to_string().contains("has QEMU exited"), "{e}");
}

#[test]
fn qemu_killed_mid_command_is_a_clear_error() {
    let mut vm = Vm::start();
    let q = vm.qmp();
    // QEMU stopped: the command waits for its reply until QEMU dies.
    vm.signal(libc::SIGSTOP);
    let waiter = std::thread::spawn(move || {
        let mut q = q;
        let t0 = Instant::now();
        let r = q.execute_with_timeout("query-status", Value::Null, Duration::from_secs(60));
        (q, r, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "the call waits for QEMU");
    vm.kill();
    let (mut q, r, took) = waiter.join().unwrap();
    assert!(took < Duration::from_secs(30), "{took:?}");
    let e = r.unwrap_err();
    match &e {
        StepError::QmpClosed { path, during } => {
            assert_eq!((path, during.as_str()), (&vm.sock, "query-status"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!(
            "QEMU closed the monitor at {} during query-status (did it exit?)",
            vm.sock.display()
        )
    );
    // later calls fail the same way, at once
    assert!(matches!(q.query_status(), Err(StepError::QmpClosed { .. })));
    assert!(matches!(q.quit(), Err(StepError::QmpClosed { .. })));
    assert!(matches!(
        q.wait_event("STOP", T),
        Err(StepError::QmpClosed { .. })
    ));
}

#[test]
fn quit_succeeds_and_qemu_exits() {
    let mut vm = Vm::start();
    let mut q = vm.qmp();
    q.cont().unwrap();
    q.quit().unwrap();
    // QEMU 7.2 sends SHUTDOWN before quit's reply; whatever came is queued
    for e in q.events() {
        if e.name == "SHUTDOWN" {
            assert_eq!(e.data["reason"], "host-qmp-quit");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU did not exit after quit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(q.query_status(), Err(StepError::QmpClosed { .. })));
}

#[test]
fn a_monitor_serves_one_client_at_a_time_and_connect_is_bounded() {
    let vm = Vm::start();
    let mut first = vm.qmp();
    // More waiting clients than QEMU's listen backlog holds: each gives up
    // after its timeout, connect(2) included.
    for _ in 0..4 {
        let t0 = Instant::now();
        let e = Qmp::connect(&vm.sock, Duration::from_millis(300)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(matches!(&e, StepError::QmpTimeout { .. }), "{e:?}");
        assert!(e.to_string().contains("one client at a time"), "{e}");
    }
    assert!(
        first.query_status().is_ok(),
        "the first client is unaffected"
    );
    drop(first);
    let mut second = vm.qmp();
    assert_eq!(second.query_status().unwrap().1, "prelaunch");
}

#[test]
fn migrate_to_file_step_writes_a_stream_is_idempotent_and_undoes() {
    use vsnap_steps::{Cx, Probe, Step};
    let vm = Vm::start();
    let mem = vm.dir.path().join(".vsnap-t.mem.tmp");
    let step = Step::QmpMigrateToFile {
        qmp: vm.sock.clone(),
        fdname: "vsnap-t".into(),
        path: mem.clone(),
    };
    let cx = Cx::quiet();
    assert_eq!(step.probe(&cx).unwrap(), Probe::NotApplied);
    step.apply(&cx).unwrap();
    let data = std::fs::read(&mem).unwrap();
    assert_eq!(&data[..4], b"QEVM", "QEMU's migration magic");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&mem).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(step.probe(&cx).unwrap(), Probe::Applied);
    let mut q = vm.qmp();
    assert_eq!(q.query_migrate().unwrap().0, "completed");
    assert_eq!(q.query_status().unwrap().1, "postmigrate");
    drop(q);
    // Again: the same file, not a second migration.
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&mem).unwrap());
    step.apply(&cx).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&mem).unwrap()),
        ino
    );
    // The descriptor was consumed by the migration: no name is left.
    let mut q = vm.qmp();
    assert!(matches!(q.closefd("vsnap-t"), Err(StepError::Qmp { .. })));
    drop(q);
    step.undo(&cx).unwrap();
    assert!(!mem.exists());
    step.undo(&cx).unwrap();
    assert_eq!(step.probe(&cx).unwrap(), Probe::NotApplied);
    // cont takes the block nodes back after the migration.
    let mut q = vm.qmp();
    q.cont().unwrap();
    assert_eq!(q.query_status().unwrap().1, "running");
}

#[test]
fn quit_step_is_retriable_and_probes_a_gone_qemu() {
    use vsnap_steps::{Cx, Probe, Step};
    let mut vm = Vm::start();
    let step = Step::QmpQuit {
        qmp: vm.sock.clone(),
    };
    let cx = Cx::quiet();
    assert!(!step.reversible());
    assert_eq!(step.probe(&cx).unwrap(), Probe::NotApplied);
    step.apply(&cx).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(step.probe(&cx).unwrap(), Probe::Applied);
    step.apply(&cx).unwrap();
    // The undo of a stop: a QEMU that is gone is not paused.
    Step::QmpStop {
        qmp: vm.sock.clone(),
    }
    .undo(&cx)
    .unwrap();
    vm.kill();
}

/// The blockdev-add step adds without asking QEMU for every node first:
/// run again (after a crash), QEMU's duplicate-name error for the plan's
/// own node is success; with one connection held for all of it.
#[test]
fn blockdev_add_step_is_idempotent_and_one_held_connection_serves_it_all() {
    let mut overlay = PathBuf::new();
    let vm = Vm::start_prepared(|dir| {
        overlay = dir.join("disk.ov1.qcow2");
        qemu_img::create_overlay(&overlay, &dir.join("disk.qcow2"), Format::Qcow2).unwrap();
    });
    let held = vsnap_steps::live::hold_connections();
    let before = vsnap_steps::live::connections_made();
    for _ in 0..3 {
        vsnap_steps::live::blockdev_add(&vm.sock, "ov1", "ov1-file", &overlay).unwrap();
    }
    assert_eq!(
        vsnap_steps::live::blockdev_add_probe(&vm.sock, "ov1").unwrap(),
        vsnap_steps::Probe::Applied
    );
    assert_eq!(
        vsnap_steps::live::connections_made() - before,
        1,
        "one connection for every call while held"
    );
    // Another node on the same file node name is still QEMU's error.
    let e = vsnap_steps::live::blockdev_add(&vm.sock, "ov2", "ov1-file", &overlay).unwrap_err();
    assert!(e.to_string().contains("blockdev-add"), "{e}");
    drop(held);
    let mut q = vm.qmp();
    let nodes = q.query_named_block_nodes_flat().unwrap();
    assert!(node(&nodes, "ov1").is_some() && node(&nodes, "ov2").is_none());
}

/// The pivot step sends its transaction without asking first; run again
/// (switched already) QEMU's refusal is recognised as done, and a real
/// refusal (a node that does not exist) stands.
#[test]
fn transaction_step_is_idempotent_without_asking_first() {
    let mut overlay = PathBuf::new();
    let vm = Vm::start_prepared(|dir| {
        overlay = dir.join("disk.ov1.qcow2");
        qemu_img::create_overlay(&overlay, &dir.join("disk.qcow2"), Format::Qcow2).unwrap();
    });
    vsnap_steps::live::blockdev_add(&vm.sock, "ov1", "ov1-file", &overlay).unwrap();
    let dev = vm.qmp().query_block_typed().unwrap()[0].key.clone();
    let disks = [vsnap_steps::live::LiveDisk {
        device: dev.clone(),
        node: "d0".into(),
        overlay: "ov1".into(),
    }];
    vsnap_steps::live::transaction(&vm.sock, &disks).unwrap();
    vsnap_steps::live::transaction(&vm.sock, &disks).unwrap();
    let blk = vm.qmp().query_block_typed().unwrap();
    assert_eq!(
        vsnap_steps::live::top_node(&blk, &dev).as_deref(),
        Some("ov1"),
        "{blk:?}"
    );
    let bad = [vsnap_steps::live::LiveDisk {
        device: dev,
        node: "ov1".into(),
        overlay: "no-such-node".into(),
    }];
    let e = vsnap_steps::live::transaction(&vm.sock, &bad).unwrap_err();
    assert!(
        matches!(&e, StepError::Qmp { command, .. } if command == "transaction"),
        "{e}"
    );
}
