//! `vsnap serve`: commands run while a service holds the state directory
//! are carried out by it, print and exit as they would alone, and read
//! relative paths from the client's directory; a command for another
//! state directory is done by the client itself; SIGTERM stops the service
//! and removes its socket; a service killed during a plan leaves it to
//! `vsnap-recover`, as any crashed `vsnap` does.
//!
//! While a service runs it holds the state lock, so a command that
//! succeeds on its state directory can only have been carried out by it:
//! the same command with `VSNAP_NO_SERVICE=1` fails naming the service's
//! pid, which every test below checks too.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Service {
    child: Child,
    socket: PathBuf,
}

impl Service {
    /// Start `vsnap serve` on `state` (with `env` added) and wait until its
    /// socket answers (bounded: a service that does not come up fails).
    fn start(state: &Path, env: &[(&str, &str)]) -> Service {
        let mut c = Command::new(VSNAP);
        c.arg("--state-dir")
            .arg(state)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("start vsnap serve");
        let socket = state.join("vsnap.sock");
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("vsnap serve exited at start: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vsnap serve did not listen on {} within 20 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Service { child, socket }
    }

    /// SIGTERM; the exit status and what it printed.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut said = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut said)
            .unwrap();
        (self.child.wait().unwrap(), said)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vsnap ARGS` run in `cwd`, with `env` added.
fn vsnap_in(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut c = Command::new(VSNAP);
    c.current_dir(cwd).args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    Out::from(c.output().expect("run vsnap"))
}

#[test]
fn commands_run_in_the_service_as_they_would_alone() {
    let d = TempDir::new("svc");
    let state = d.join("state");
    let work = d.join("work");
    std::fs::create_dir(&work).unwrap();
    qemu_img_create(&work.join("a.qcow2"), "qcow2", 64 << 20);
    qemu_img_create(&work.join("b.qcow2"), "qcow2", 64 << 20);
    let svc = Service::start(&state, &[]);
    let pid = svc.child.id().to_string();
    let st = state.to_str().unwrap();
    // `vsnap --state-dir STATE ARGS` in `work`, with `env` added.
    let with = |env: &[(&str, &str)], args: &[&str]| {
        vsnap_in(&work, env, &[&["--state-dir", st][..], args].concat())
    };
    let cmd = |args: &[&str]| with(&[], args);

    // Relative image paths are the client's.
    cmd(&[
        "vol", "snapshot", "create", "a.qcow2", "s1", "--kind", "internal",
    ])
    .ok()
    .stdout_has(&[
        "created internal snapshot \"s1\"",
        work.join("a.qcow2").to_str().unwrap(),
    ]);
    // Proof that the service did it: alone, the command meets its lock.
    with(
        &[("VSNAP_NO_SERVICE", "1")],
        &["vol", "snapshot", "current", "a.qcow2"],
    )
    .expect_code(2)
    .stderr_has(&["locked by process", &pid]);
    // vsnap-recover needs the lock too, and says what holds it.
    vsnap_recover(&state, &[]).expect_code(2).stderr_has(&[
        "locked by process",
        &pid,
        "a `vsnap serve` holds it",
        "SIGTERM",
    ]);

    cmd(&["vol", "snapshot", "current", "a.qcow2"])
        .ok()
        .stdout_has(&["s1"]);
    // Exit 1 and its word, as alone.
    let o = cmd(&["vol", "snapshot", "has-current", "b.qcow2"]);
    o.expect_code(1);
    assert_eq!(o.stdout.trim(), "no");
    // An error: exit 2, the message on the client's stderr.
    cmd(&["vol", "snapshot", "create", "a.qcow2", "s1"])
        .expect_code(2)
        .stderr_has(&["already has a snapshot named \"s1\""]);
    // --json, and an external snapshot whose file lands beside the image.
    cmd(&[
        "vol", "snapshot", "create", "b.qcow2", "e1", "--kind", "external",
    ])
    .ok();
    assert!(work.join("b.e1.qcow2").is_file());
    let list = cmd(&["--json", "vol", "snapshot", "list", "a.qcow2"]);
    let names: Vec<String> = list
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["s1"]);
    // clap's own answers: a usage error (exit 2, stderr), --help (exit 0, stdout).
    cmd(&["vol", "snapshot", "bogus"])
        .expect_code(2)
        .stderr_has(&["unrecognized subcommand", "Usage:"]);
    cmd(&["vol", "snapshot", "create", "--help"])
        .ok()
        .stdout_has(&["--kind <KIND>"]);

    // A domain: defined from XML named relative to the client, then an
    // offline snapshot of its disk.
    let disk = work.join("d.qcow2");
    qemu_img_create(&disk, "qcow2", 64 << 20);
    std::fs::write(
        work.join("vm.xml"),
        format!(
            "<domain type='kvm'><name>vm</name><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/>\
             </disk></devices></domain>",
            disk.display()
        ),
    )
    .unwrap();
    cmd(&["domain", "define", "vm.xml"]).ok();
    cmd(&["snapshot", "create", "vm", "d1"]).ok();
    cmd(&["snapshot", "current", "vm"]).ok().stdout_has(&["d1"]);
    // The journal, through the service's own engine.
    cmd(&["plan", "list"]).ok().stdout_has(&[
        "internal snapshot \"s1\"",
        "Committed",
        "offline snapshot \"d1\"",
    ]);

    // The state directory from the client's environment, not the
    // service's.
    vsnap_in(
        &work,
        &[("VSNAP_STATE_DIR", st)],
        &["vol", "snapshot", "count", "a.qcow2"],
    )
    .ok()
    .stdout_has(&["1"]);

    // SIGTERM: a clean stop, the socket gone; then commands work alone
    // and see what the service did.
    let socket = svc.socket.clone();
    let (status, said) = svc.stop();
    assert!(status.success(), "vsnap serve: {status}\n{said}");
    assert!(said.contains("service stopped"), "{said}");
    assert!(!socket.exists(), "the socket outlived the service");
    cmd(&["vol", "snapshot", "count", "b.qcow2"])
        .ok()
        .stdout_has(&["1"]);
}

/// A client whose stderr is a pipe nobody reads any more: every progress
/// line of its copy fails (EPIPE) in the service. The plan completes, the
/// client gets its status and its stdout, and the service serves on.
#[test]
fn a_client_gone_from_stderr_does_not_stop_its_plan() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let d = TempDir::new("svc-epipe");
    let state = d.join("state");
    let img = d.join("a.raw");
    qemu_img_create(&img, "raw", 160 << 20);
    let svc = Service::start(&state, &[]);
    let mut fds = [0; 2];
    // SAFETY: pipe fills fds with two new descriptors, owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let out = Command::new(VSNAP)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "vol",
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "c1",
            "--kind",
            "copy",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::from(write_end))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created copy snapshot \"c1\""));
    assert!(d.join("a.c1.raw").is_file());
    vsnap(
        &state,
        &["vol", "snapshot", "current", img.to_str().unwrap()],
    )
    .ok()
    .stdout_has(&["c1"]);
    drop(svc);
}

#[test]
fn a_command_for_another_state_dir_is_done_by_the_client() {
    let d = TempDir::new("svc-other");
    let (ours, other) = (d.join("ours"), d.join("other"));
    qemu_img_create(&d.join("a.qcow2"), "qcow2", 64 << 20);
    let svc = Service::start(&ours, &[]);
    vsnap(
        &other,
        &[
            "vol",
            "snapshot",
            "create",
            d.join("a.qcow2").to_str().unwrap(),
            "s1",
            "--kind",
            "internal",
        ],
    )
    .ok();
    assert!(
        other.join("db").is_dir(),
        "the client opened its own journal"
    );
    // The service never saw it.
    drop(svc);
    vsnap(
        &ours,
        &[
            "vol",
            "snapshot",
            "count",
            d.join("a.qcow2").to_str().unwrap(),
        ],
    )
    .ok()
    .stdout_has(&["0"]);
    vsnap(
        &other,
        &[
            "vol",
            "snapshot",
            "count",
            d.join("a.qcow2").to_str().unwrap(),
        ],
    )
    .ok()
    .stdout_has(&["1"]);
}

/// A service that dies during a plan (here at a crash point inside it,
/// after qemu-img made the snapshot and before that was recorded): the
/// client says so and exits 2; `vsnap-recover` rolls the plan back; the
/// image has no snapshot and the catalog none.
#[cfg(feature = "failpoints")]
#[test]
fn a_service_killed_mid_plan_is_recovered_like_any_vsnap() {
    let d = TempDir::new("svc-crash");
    let state = d.join("state");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 64 << 20);
    let mut svc = Service::start(&state, &[("VSNAP_CRASH_AT", "run.applied.0")]);
    vsnap(
        &state,
        &[
            "vol",
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "s1",
            "--kind",
            "internal",
        ],
    )
    .expect_code(2)
    .stderr_has(&["service", "ended during the command", "vsnap-recover"]);
    let st = svc.child.wait().unwrap();
    assert!(!st.success(), "the service should have died: {st}");
    vsnap_recover(&state, &[]).ok().stdout_has(&["rolled-back"]);
    let snaps = Out::from_command("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
    snaps.ok();
    assert!(!snaps.stdout.contains("s1"), "{}", snaps.stdout);
    vsnap(&state, &["vol", "snapshot", "count", img.to_str().unwrap()])
        .ok()
        .stdout_has(&["0"]);
}
