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
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
        domain_xml("vm", &[("vda", &disk, Some("qcow2"))]),
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
    let d = TempDir::new("svc-epipe");
    let state = d.join("state");
    let img = d.join("a.raw");
    qemu_img_create(&img, "raw", 160 << 20);
    let svc = Service::start(&state, &[]);
    let out = vsnap_command(&state)
        .args([
            "vol",
            "snapshot",
            "create",
            img.to_str().unwrap(),
            "c1",
            "--kind",
            "copy",
        ])
        .stderr(pipe_nobody_reads())
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

/// A client that connects and sends nothing, and one that sends half a
/// request, hold up no one: another client's command is carried out at
/// once, by the service (it holds the lock).
#[test]
fn a_silent_client_holds_up_no_one() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let d = TempDir::new("svc-silent");
    let state = d.join("state");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 << 20);
    let svc = Service::start(&state, &[]);
    let pid = svc.child.id().to_string();
    let silent = UnixStream::connect(&svc.socket).unwrap();
    let mut half = UnixStream::connect(&svc.socket).unwrap();
    half.write_all(&[7, 0]).unwrap();
    // Let the service take both in before the real command comes.
    std::thread::sleep(Duration::from_millis(300));
    let i = img.to_str().unwrap();
    let t0 = Instant::now();
    vsnap(
        &state,
        &["vol", "snapshot", "create", i, "s1", "--kind", "internal"],
    )
    .ok()
    .stdout_has(&["created internal snapshot \"s1\""]);
    vsnap(&state, &["vol", "snapshot", "count", i])
        .ok()
        .stdout_has(&["1"]);
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "two commands took {took:?} while a silent client was connected"
    );
    vsnap_in(
        &d.path,
        &[("VSNAP_NO_SERVICE", "1")],
        &["--state-dir", state.to_str().unwrap(), "plan", "list"],
    )
    .expect_code(2)
    .stderr_has(&["locked by process", &pid]);
    drop((silent, half));
}

/// A command that panics (a fault injected at a crash point, with
/// `VSNAP_PANIC_AT`, failpoints builds only: the real code has no panic to
/// trigger on purpose) does not end the service: the service recovers the
/// plan the panic cut short, on its own engine, before anything else runs;
/// the client is told (exit 2: rolled back, nothing changed; exit 1 when
/// the plan had committed), and the service serves on.
#[cfg(feature = "failpoints")]
#[test]
fn a_panicking_command_does_not_end_the_service() {
    let d = TempDir::new("svc-panic");
    let state = d.join("state");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 << 20);
    let i = img.to_str().unwrap();
    // Mid-plan: the snapshot is made in the image, not yet recorded.
    let mut svc = Service::start(&state, &[("VSNAP_PANIC_AT", "run.applied.0#1")]);
    let o = vsnap(
        &state,
        &["vol", "snapshot", "create", i, "s1", "--kind", "internal"],
    );
    o.expect_code(2).stderr_has(&[
        "panicked",
        "VSNAP_PANIC_AT",
        "recovered plan 1",
        "rolled-back",
        "nothing was changed",
    ]);
    assert!(!o.stderr.contains("ended during"), "{}", o.stderr);
    assert!(svc.child.try_wait().unwrap().is_none(), "the service ended");
    let snaps = Out::from_command("qemu-img", &["snapshot", "-l", i]);
    assert!(!snaps.stdout.contains("s1"), "{}", snaps.stdout);
    vsnap(&state, &["vol", "snapshot", "count", i])
        .ok()
        .stdout_has(&["0"]);
    let plans = vsnap(&state, &["--json", "plan", "list"]).ok().json();
    assert_eq!(plans[0]["outcome"], "RolledBack", "{plans}");
    // The next create runs through, in the same service.
    vsnap(
        &state,
        &["vol", "snapshot", "create", i, "s1", "--kind", "internal"],
    )
    .ok();
    assert!(svc.child.try_wait().unwrap().is_none(), "the service ended");
    let (st, _) = svc.stop();
    assert!(st.success(), "{st}");
    // After the plan committed: exit 1, and the client is told it happened.
    let svc = Service::start(&state, &[("VSNAP_PANIC_AT", "run.finished#1")]);
    vsnap(
        &state,
        &["vol", "snapshot", "create", i, "s2", "--kind", "internal"],
    )
    .expect_code(1)
    .stderr_has(&["panicked", "ended Some(Committed)", "it changed something"]);
    vsnap(&state, &["vol", "snapshot", "count", i])
        .ok()
        .stdout_has(&["2"]);
    drop(svc);
}

/// `vsnap ... | head` through the service: the client's stdout is a pipe
/// nobody reads; the command exits 0 without a panic and the service
/// serves on.
#[test]
fn a_closed_stdout_through_the_service_is_not_a_panic() {
    let d = TempDir::new("svc-stdout");
    let state = d.join("state");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 << 20);
    let i = img.to_str().unwrap();
    let mut svc = Service::start(&state, &[]);
    vsnap(
        &state,
        &["vol", "snapshot", "create", i, "s1", "--kind", "internal"],
    )
    .ok();
    for _ in 0..2 {
        let out = vsnap_command(&state)
            .args(["vol", "snapshot", "list", i])
            .stdout(pipe_nobody_reads())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {err}", out.status);
        assert!(!err.contains("panicked") && !err.contains("ended"), "{err}");
        assert!(svc.child.try_wait().unwrap().is_none(), "the service ended");
    }
    // Nothing of the lost output reaches the next client.
    let o = vsnap(&state, &["vol", "snapshot", "count", i]);
    o.ok();
    assert_eq!(o.stdout, "1\n");
}

/// Arguments that are not UTF-8 travel to the service as bytes; a
/// command that cannot use them is refused (or fails) there without
/// taking the service down.
#[test]
fn non_utf8_arguments_do_not_end_the_service() {
    use std::os::unix::ffi::OsStrExt;
    let d = TempDir::new("svc-bytes");
    let state = d.join("state");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 << 20);
    let mut svc = Service::start(&state, &[]);
    let mut bad = d.path.as_os_str().as_bytes().to_vec();
    bad.extend_from_slice(b"/\xff\xfe.qcow2");
    let bad = std::ffi::OsStr::from_bytes(&bad);
    for args in [
        vec![
            "vol".as_ref(),
            "snapshot".as_ref(),
            "create".as_ref(),
            img.as_os_str(),
            std::ffi::OsStr::from_bytes(b"s\xff"),
        ],
        vec!["vol".as_ref(), "snapshot".as_ref(), "list".as_ref(), bad],
        vec!["vol".as_ref(), "check".as_ref(), bad],
    ] {
        let out = vsnap_command(&state).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("ended during"), "{args:?}: {err}");
        assert!(
            matches!(out.status.code(), Some(0..=2)),
            "{args:?}: {}: {err}",
            out.status
        );
        assert!(svc.child.try_wait().unwrap().is_none(), "the service ended");
    }
    vsnap(&state, &["vol", "snapshot", "count", img.to_str().unwrap()])
        .ok()
        .stdout_has(&["0"]);
}

/// Another user's service is never handed a command (items of issue 8:
/// "a state directory owned by another user", "a command refused by
/// another user's service"). A service run as uid 65534 on its own
/// directory: root's command there is refused before anything is sent,
/// naming the owner; the service itself refuses a client of another uid
/// with a status byte, not by hanging up; a socket in root's own
/// directory whose listener runs as 65534 is refused (`SO_PEERCRED`), as
/// is a socket file root does not own.
#[test]
fn another_users_service_is_never_handed_a_command() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let d = TempDir::new("svc-user");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 << 20);
    let i = img.to_str().unwrap();
    let theirs = d.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&theirs, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", VSNAP])
        .arg("--state-dir")
        .arg(&theirs)
        .arg("serve")
        .stdin(Stdio::null());
    let svc = Service::spawn(c, &theirs);
    let sock = svc.socket.clone();
    let mut raw = UnixStream::connect(&sock).unwrap();
    // The service answers a client of another uid: refused (254).
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    raw.read_exact(&mut b).unwrap();
    assert_eq!(b[0], 254);
    // Root's command on that directory: refused, nothing sent.
    let o = vsnap(&theirs, &["vol", "snapshot", "count", i]);
    o.expect_code(2)
        .stderr_has(&["refusing state directory", "belongs to uid 65534"]);
    assert!(!o.stderr.contains("ended during"), "{}", o.stderr);
    // A socket in root's own state directory, listened on by uid 65534.
    let mine = d.join("mine");
    vsnap(
        &mine,
        &["vol", "snapshot", "create", i, "s1", "--kind", "internal"],
    )
    .ok();
    std::fs::hard_link(&sock, mine.join("vsnap.sock")).unwrap();
    std::os::unix::fs::chown(mine.join("vsnap.sock"), Some(0), Some(0)).unwrap();
    vsnap(&mine, &["vol", "snapshot", "count", i])
        .expect_code(2)
        .stderr_has(&["runs as uid 65534", "nothing was sent"]);
    // The socket file is not root's.
    std::os::unix::fs::chown(mine.join("vsnap.sock"), Some(65534), Some(65534)).unwrap();
    vsnap(&mine, &["vol", "snapshot", "count", i])
        .expect_code(2)
        .stderr_has(&["belongs to uid 65534", "nothing was sent"]);
    std::fs::remove_file(mine.join("vsnap.sock")).unwrap();
    vsnap(&mine, &["vol", "snapshot", "count", i])
        .ok()
        .stdout_has(&["1"]);
    let (st, said) = svc.stop();
    assert!(st.success(), "{st}\n{said}");
}
