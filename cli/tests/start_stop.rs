//! `vsnap domain start / shutdown / destroy` on the real test guest
//! (guest/README.md: a Debian kernel under TCG, the real qemu-guest-agent).
//! Every command is the real `vsnap` binary; what happened is read from
//! QEMU (QMP), /proc and the images.
//!
//! One test function runs the cases in order on one guest (`-blockdev`
//! disks: vda qcow2, vdb raw, so that a raw disk's external snapshot
//! makes the start rewrite its format node to qcow2):
//!
//! * attach records the argv (`/proc/PID/cmdline` of the monitor's peer)
//!   and working directory;
//! * start while running is refused, nothing changed;
//! * a live external snapshot, destroy (QMP quit), start --paused: QEMU is
//!   paused, in a session of its own, its pidfile names it, and
//!   `query-block` shows the new overlays; destroy of the paused guest;
//! * start (running), the guest boots to its ready line on the overlays;
//!   shutdown of a domain without an agent (ACPI, which this guest
//!   ignores) with --timeout fails naming destroy and leaves QEMU running;
//!   shutdown --timeout through the agent: QEMU exits;
//! * crashes: vsnap killed while QEMU starts (recovery rolls back, ending
//!   that QEMU) and after the pivot (recovery resumes the guest);
//! * refusals that change nothing: a domain defined without a launch spec,
//!   a launch file with an option vsnap cannot rewrite (`-hda`), an
//!   attached QEMU whose argv holds `-readconfig`;
//! * the library's start with a memory state (`-incoming defer`, the
//!   file loaded through a descriptor): after a `--memory external:FILE
//!   --halt` snapshot the guest resumes, without a boot;
//! * the measurement: `vsnap domain start --paused` against starting the
//!   same command line by hand, time to the monitor answering, medians of
//!   9 runs each (printed).
//!
//! Needs root, qemu-system-x86_64, qemu-img, mkfs.ext4 and what
//! `guest/build.sh` needs. About 20 s under TCG.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::qmp::Qmp;

fn workspace() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::canonicalize(&p).unwrap_or(p)
}

#[track_caller]
fn run_ok(program: &str, args: &[&str]) -> String {
    let o = Out::from_command(program, args);
    assert!(
        o.code == 0,
        "{program} {args:?} failed ({}):\n{}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    o.stdout
}

#[track_caller]
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qmp(sock: &Path) -> Qmp {
    Qmp::connect(sock, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("QMP {}: {e}", sock.display()))
}

/// target -> file, from `query-block`.
fn qemu_disks(sock: &Path) -> Vec<(String, PathBuf)> {
    let mut q = qmp(sock);
    let mut out: Vec<(String, PathBuf)> = q
        .query_block_typed()
        .unwrap()
        .into_iter()
        .filter_map(|b| Some((b.target()?, PathBuf::from(&b.inserted?.file))))
        .collect();
    out.sort();
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Field 6 of /proc/PID/stat: the session id.
fn session(pid: u32) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, r) = s.rsplit_once(") ").unwrap();
    r.split_whitespace().nth(3).unwrap().parse().unwrap()
}

fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    raw.split(|b| *b == 0)
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .filter(|a| !a.is_empty())
        .collect()
}

fn make_ext4(path: &Path, format: &str) {
    let raw = path.with_extension("mkfs");
    run_ok("truncate", &["-s", "64M", p(&raw)]);
    run_ok("mkfs.ext4", &["-q", "-F", p(&raw)]);
    run_ok("qemu-img", &["convert", "-O", format, p(&raw), p(path)]);
    std::fs::remove_file(&raw).unwrap();
}

/// Kills the pid (SIGKILL) on drop, if it is still QEMU.
struct KillOnDrop(std::sync::Mutex<Vec<u32>>);

impl KillOnDrop {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let is_qemu = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"));
            if is_qemu && alive(*pid) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// The pid serving the domain's monitor now (from `vsnap`'s pidfile or
/// QEMU's own).
fn pid_of_file(f: &Path) -> u32 {
    std::fs::read_to_string(f)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `vsnap` with extra environment; the signal that killed it, if any.
fn vsnap_env(state: &Path, args: &[&str], env: &[(&str, &str)]) -> (Out, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    let mut c = vsnap_command(state);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run vsnap");
    let sig = o.status.signal();
    (Out::from(o), sig)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn start_stop_domains() {
    let t0 = Instant::now();
    let say = |m: &str| eprintln!("start_stop: [{:5.1} s] {m}", t0.elapsed().as_secs_f64());
    let o = Out::from_command(p(&workspace().join("guest/build.sh")), &[]);
    assert_eq!(
        o.code, 0,
        "guest/build.sh failed:\n{}{}",
        o.stdout, o.stderr
    );

    let w = Work::new("start-stop");
    let kills = KillOnDrop(Default::default());
    let vda = w.work.join("vda.qcow2");
    let vdb = w.work.join("vdb.raw");
    make_ext4(&vda, "qcow2");
    make_ext4(&vdb, "raw");
    let run = w.work.join("run");
    let out = run_ok(
        p(&workspace().join("guest/run.sh")),
        &[
            "-d",
            p(&run),
            "--blockdev",
            &format!("{}:qcow2", p(&vda)),
            &format!("{}:raw", p(&vdb)),
        ],
    );
    assert_eq!(Path::new(out.trim()), run);
    let sock = run.join("qmp.sock");
    let qga = run.join("qga.sock");
    let pid0 = wait_for("run.sh's QEMU pid", Duration::from_secs(20), || {
        std::fs::read_to_string(run.join("qemu.pid"))
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()
    });
    kills.add(pid0);
    say(&format!("guest started by run.sh: pid {pid0}"));

    // --- attach records how QEMU was started -------------------------------------
    let o = w.vsnap(&[
        "--json",
        "domain",
        "attach",
        "g",
        "--qmp",
        p(&sock),
        "--agent",
        p(&qga),
    ]);
    o.ok();
    let d = o.json();
    let argv: Vec<String> = serde_json::from_value(d["launch"]["argv"].clone()).unwrap();
    assert_eq!(
        argv,
        cmdline(pid0),
        "the recorded argv is QEMU's /proc cmdline"
    );
    let cwd = std::fs::read_link(format!("/proc/{pid0}/cwd")).unwrap();
    assert_eq!(d["launch"]["cwd"], json!(p(&cwd)));
    assert_eq!(
        d["launch"]["disks"],
        json!([{"target": "vda", "path": p(&vda)}, {"target": "vdb", "path": p(&vdb)}])
    );
    say("attach recorded argv and cwd");

    // --- start while running: refused, nothing changed ---------------------------
    let before = w.world(&[]);
    let o = w.vsnap(&["--json", "domain", "start", "g"]);
    o.expect_code(2).stderr_has(&["already running", "destroy"]);
    assert_eq!(o.json()["kind"], "wrong-state");
    assert_unchanged(&before, &w.world(&[]));
    assert!(alive(pid0));
    assert_eq!(
        qemu_disks(&sock),
        [("vda".into(), vda.clone()), ("vdb".into(), vdb.clone())]
    );

    // --- a live external snapshot, destroy, start --paused on the overlays -------
    w.vsnap(&["snapshot", "create", "g", "s1", "--disk-only"])
        .ok();
    let info = w.vsnap(&["--json", "domain", "info", "g"]).ok().json();
    let ov: Vec<PathBuf> = info["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| PathBuf::from(x["source"].as_str().unwrap()))
        .collect();
    assert_ne!(ov[0], vda);
    assert_ne!(ov[1], vdb);
    let o = w.vsnap(&["--json", "domain", "destroy", "g"]);
    o.ok();
    assert_eq!(o.json()["how"], "quit");
    assert_eq!(o.json()["pid"], pid0);
    assert!(!alive(pid0), "QEMU {pid0} still runs after destroy");
    let st = w.vsnap(&["--json", "domain", "info", "g"]).ok().json();
    assert_eq!(st["state"], "shutoff");
    // The dry run shows the rewritten command line.
    let plan = w
        .vsnap(&["--json", "domain", "start", "g", "--dry-run"])
        .ok()
        .json();
    let pargv: Vec<String> = serde_json::from_value(plan["argv"].clone()).unwrap();
    assert!(
        pargv.contains(&format!(
            "driver=file,filename={},node-name=vda-file",
            p(&ov[0])
        )),
        "{pargv:?}"
    );
    assert!(
        pargv.contains(&format!(
            "driver=file,filename={},node-name=vdb-file",
            p(&ov[1])
        )),
        "{pargv:?}"
    );
    assert!(
        pargv.contains(&"driver=qcow2,file=vdb-file,node-name=vdb".to_string()),
        "the raw disk's format node becomes qcow2: {pargv:?}"
    );
    assert!(!pargv.contains(&"-daemonize".to_string()));
    assert_eq!(pargv.last().map(String::as_str), Some("-S"));

    let o = w.vsnap(&["--json", "domain", "start", "g", "--paused"]);
    o.ok();
    let pid1 = o.json()["pid"].as_u64().unwrap() as u32;
    kills.add(pid1);
    let (running, status) = qmp(&sock).query_status().unwrap();
    assert!(
        !running && (status == "prelaunch" || status == "paused"),
        "{status}"
    );
    assert_eq!(
        qemu_disks(&sock),
        [("vda".into(), ov[0].clone()), ("vdb".into(), ov[1].clone())],
        "QEMU runs on the snapshot's overlays"
    );
    assert_eq!(vsnap_steps::launch::peer_pid(&sock).unwrap(), pid1);
    assert_eq!(session(pid1), pid1, "QEMU leads a session of its own");
    assert_eq!(pid_of_file(&w.state.join("run/g.pid")), pid1);
    let log = std::fs::read_to_string(w.state.join("run/g.log")).unwrap();
    assert!(log.contains("vsnap: starting at"), "{log}");
    say(&format!(
        "start --paused: pid {pid1}, {status}, on the overlays"
    ));
    // A second start is refused.
    w.vsnap(&["domain", "start", "g"])
        .expect_code(2)
        .stderr_has(&["already running"]);
    assert!(alive(pid1));
    let o = w.vsnap(&["--json", "domain", "destroy", "g"]);
    o.ok();
    assert!(!alive(pid1));
    w.vsnap(&["domain", "destroy", "g"])
        .expect_code(2)
        .stderr_has(&["not running"]);

    // --- start running; the guest boots on the overlays; shutdown by agent -------
    let console = run.join("console.log");
    let _ = std::fs::remove_file(&console);
    let o = w.vsnap(&["--json", "domain", "start", "g"]);
    o.ok();
    let pid2 = o.json()["pid"].as_u64().unwrap() as u32;
    kills.add(pid2);
    assert!(qmp(&sock).query_status().unwrap().0, "the guest runs");
    wait_for("the guest's ready line", Duration::from_secs(90), || {
        let t = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(!t.contains("Kernel panic"), "{t}");
        t.contains("VSNAP-GUEST-READY").then_some(())
    });
    say("start: the guest booted on the overlays");
    // Without an agent: the ACPI power button, which this guest ignores
    // (no acpid): --timeout waits, then fails naming destroy; QEMU runs on.
    w.vsnap(&["domain", "attach", "noagent", "--qmp", p(&sock)])
        .ok();
    let t = Instant::now();
    let o = w.vsnap(&[
        "--json",
        "domain",
        "shutdown",
        "noagent",
        "--timeout",
        "1.5",
    ]);
    o.expect_code(2)
        .stderr_has(&["still runs", "ACPI", "vsnap domain destroy noagent"]);
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert!(alive(pid2), "shutdown never kills");
    let o = w.vsnap(&["--json", "domain", "shutdown", "noagent"]);
    o.ok();
    assert_eq!(o.json()["via"], "acpi");
    assert!(alive(pid2));
    w.vsnap(&["domain", "undefine", "noagent"]).ok();
    say("shutdown by ACPI: asked, timed out, QEMU left running");
    let o = w.vsnap(&["--json", "domain", "shutdown", "g", "--timeout", "60"]);
    o.ok();
    assert_eq!(o.json()["via"], "agent");
    assert!(!alive(pid2), "QEMU exited after the guest shut down");
    assert_eq!(
        w.vsnap(&["--json", "domain", "info", "g"]).ok().json()["state"],
        "shutoff"
    );
    w.vsnap(&["domain", "shutdown", "g"])
        .expect_code(2)
        .stderr_has(&["not running"]);
    say("shutdown through the agent");

    // --- refusals that change nothing --------------------------------------------
    let c = w.work.join("c.qcow2");
    qemu_img_create(&c, "qcow2", 16 * MIB);
    let xml = w.work.join("c.xml");
    std::fs::write(&xml, domain_xml("c", &[("vda", &c, Some("qcow2"))])).unwrap();
    w.vsnap(&[
        "domain",
        "define",
        p(&xml),
        "--qmp",
        p(&w.work.join("c.qmp")),
    ])
    .ok();
    let before = w.world(&[]);
    let o = w.vsnap(&["--json", "domain", "start", "c"]);
    o.expect_code(2).stderr_has(&[
        "no launch spec",
        "domain define",
        "--launch",
        "domain attach",
    ]);
    assert_eq!(o.json()["kind"], "wrong-state");
    assert_unchanged(&before, &w.world(&[]));
    // A launch file with an option vsnap cannot rewrite: refused at define.
    let bad = w.work.join("bad.json");
    std::fs::write(
        &bad,
        serde_json::to_string(&json!([
            "qemu-system-x86_64",
            "-hda",
            p(&c),
            "-qmp",
            format!("unix:{},server=on,wait=off", p(&w.work.join("d.qmp")))
        ]))
        .unwrap(),
    )
    .unwrap();
    let dxml = w.work.join("d.xml");
    std::fs::write(&dxml, domain_xml("d", &[("vda", &c, Some("qcow2"))])).unwrap();
    let before = w.world(&[]);
    let o = w.vsnap(&[
        "--json",
        "domain",
        "define",
        p(&dxml),
        "--qmp",
        p(&w.work.join("d.qmp")),
        "--launch",
        p(&bad),
    ]);
    o.expect_code(2).stderr_has(&["-hda", "-drive file=PATH"]);
    assert_eq!(o.json()["kind"], "not-supported");
    assert_unchanged(&before, &w.world(&[]));
    // A good launch file is accepted and planned with the XML's disks.
    let good = w.work.join("good.json");
    std::fs::write(
        &good,
        serde_json::to_string(&json!({"argv": ["qemu-system-x86_64", "-drive", "file=c.qcow2,format=qcow2,if=none,id=vda", "-qmp", "unix:d.qmp,server=on,wait=off"]})).unwrap(),
    )
    .unwrap();
    w.vsnap(&[
        "domain",
        "define",
        p(&dxml),
        "--qmp",
        p(&w.work.join("d.qmp")),
        "--launch",
        p(&good),
    ])
    .ok();
    let plan = w
        .vsnap(&["--json", "domain", "start", "d", "--dry-run"])
        .ok()
        .json();
    assert!(
        plan["argv"].as_array().unwrap().contains(&json!(format!(
            "file={},format=qcow2,if=none,id=vda",
            p(&c)
        ))),
        "{plan}"
    );
    // A QEMU that exits at start: the plan is rolled back, its own words
    // (and only this start's) are in the error, nothing is left running.
    let f = w.work.join("f.json");
    std::fs::write(
        &f,
        serde_json::to_string(&json!([
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "nosuch",
            "-drive",
            "file=c.qcow2,format=qcow2,if=none,id=vda",
            "-qmp",
            "unix:f.qmp,server=on,wait=off"
        ]))
        .unwrap(),
    )
    .unwrap();
    let fxml = w.work.join("f.xml");
    std::fs::write(&fxml, domain_xml("f", &[("vda", &c, Some("qcow2"))])).unwrap();
    w.vsnap(&[
        "domain",
        "define",
        p(&fxml),
        "--qmp",
        p(&w.work.join("f.qmp")),
        "--launch",
        p(&f),
    ])
    .ok();
    for _ in 0..2 {
        let o = w.vsnap(&["domain", "start", "f"]);
        o.expect_code(2).stderr_has(&[
            "QEMU exited during start",
            "unsupported machine type",
            "rolled back",
        ]);
        assert_eq!(
            o.stderr.matches("unsupported machine type").count(),
            1,
            "{}",
            o.stderr
        );
    }
    assert!(!w.state.join("run/f.pid").exists());
    assert_eq!(
        w.vsnap(&["--json", "domain", "info", "f"]).ok().json()["state"],
        "shutoff"
    );
    // An attached QEMU whose argv holds -readconfig: start refuses it,
    // naming the option, and starts nothing.
    let cfg = w.work.join("empty.cfg");
    std::fs::write(&cfg, "").unwrap();
    let esock = w.work.join("e.qmp");
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "accel=tcg",
            "-S",
            "-readconfig",
            p(&cfg),
        ])
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=none,id=vda", p(&c)))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", p(&esock)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kills.add(child.id());
    wait_for("QEMU e's monitor", Duration::from_secs(20), || {
        Qmp::connect(&esock, Duration::from_secs(2)).ok()
    });
    w.vsnap(&["domain", "attach", "e", "--qmp", p(&esock)])
        .ok()
        .stdout_has(&["would refuse", "-readconfig"]);
    child.kill().unwrap();
    child.wait().unwrap();
    let before = w.world(&[]);
    let o = w.vsnap(&["--json", "domain", "start", "e"]);
    o.expect_code(2)
        .stderr_has(&["-readconfig", "nothing was started"]);
    assert_eq!(o.json()["kind"], "not-supported");
    assert_unchanged(&before, &w.world(&[]));
    assert!(!w.state.join("run/e.log").exists(), "nothing was spawned");
    say("refusals changed nothing");

    // --- crashes: vsnap killed in the middle of a start -------------------------
    // While QEMU is spawned (pidfile written, monitor not yet answering) and
    // once it is up on the planned images (Done not written): recovery
    // rolls the plan back, which ends the QEMU it started.
    for point in ["step.qemu-launch.spawned", "run.applied.0"] {
        let (o, sig) = vsnap_env(
            &w.state,
            &["domain", "start", "g"],
            &[("VSNAP_CRASH_AT", point)],
        );
        assert_eq!(sig, Some(9), "{point}: vsnap was not killed there: {o:?}");
        let pid = pid_of_file(&w.state.join("run/g.pid"));
        kills.add(pid);
        assert!(alive(pid), "{point}: the spawned QEMU outlives vsnap");
        vsnap_recover(&w.state, &[]).ok();
        assert!(
            !alive(pid),
            "{point}: recovery ended the QEMU the rolled-back plan started"
        );
        assert!(!w.state.join("run/g.pid").exists());
        let plans = w.vsnap(&["--json", "plan", "list"]).ok().json();
        let last = plans.as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["outcome"], "RolledBack", "{point}: {last}");
        assert_eq!(
            w.vsnap(&["--json", "domain", "info", "g"]).ok().json()["state"],
            "shutoff"
        );
    }
    // After the pivot, before `cont`: recovery rolls forward, the guest runs.
    let (_, sig) = vsnap_env(
        &w.state,
        &["domain", "start", "g"],
        &[("VSNAP_CRASH_AT", "run.done.1")],
    );
    assert_eq!(sig, Some(9));
    let pid = pid_of_file(&w.state.join("run/g.pid"));
    kills.add(pid);
    assert!(
        !qmp(&sock).query_status().unwrap().0,
        "paused until recovery resumes it"
    );
    vsnap_recover(&w.state, &[]).ok();
    assert!(
        qmp(&sock).query_status().unwrap().0,
        "recovery resumed the guest"
    );
    let plans = w.vsnap(&["--json", "plan", "list"]).ok().json();
    assert_eq!(
        plans.as_array().unwrap().last().unwrap()["outcome"],
        "Committed"
    );
    w.vsnap(&["domain", "destroy", "g"]).ok();
    assert!(!alive(pid));
    say("crashes in a start: rolled back (QEMU ended) before the pivot, forward after");

    // --- the library: start with a memory state (what revert will use) ---------
    // A snapshot with external memory and --halt: the disks (new overlays)
    // and the memory are one instant, and QEMU quits. Started again with
    // -incoming defer and the file loaded, the guest resumes (no boot).
    let _ = std::fs::remove_file(&console);
    w.vsnap(&["domain", "start", "g"]).ok();
    wait_for("the guest's ready line", Duration::from_secs(90), || {
        let t = std::fs::read_to_string(&console).unwrap_or_default();
        t.contains("VSNAP-GUEST-READY").then_some(())
    });
    let mem = w.work.join("m1.mem");
    w.vsnap(&[
        "snapshot",
        "create",
        "g",
        "m1",
        "--memory",
        &format!("external:{}", p(&mem)),
        "--halt",
    ])
    .ok();
    assert_eq!(
        w.vsnap(&["--json", "domain", "info", "g"]).ok().json()["state"],
        "shutoff"
    );
    let _ = std::fs::remove_file(&console);
    {
        let (engine, _) = vsnap_engine::Engine::open(&w.state).unwrap();
        // Not a memory state: refused before anything starts.
        let e = engine
            .domain_start_with_memory("g", &cfg, false)
            .unwrap_err();
        assert_eq!(e.kind(), Some(vsnap_engine::RefusalKind::BadRequest), "{e}");
        let t = Instant::now();
        let l = engine.domain_start_with_memory("g", &mem, false).unwrap();
        kills.add(l.pid.unwrap());
        let mem_mib = std::fs::metadata(&mem).unwrap().len() as f64 / (1 << 20) as f64;
        say(&format!(
            "started with the memory state ({mem_mib:.1} MiB) in {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        ));
    }
    assert!(qmp(&sock).query_status().unwrap().0, "the guest runs");
    let mut agent = vsnap_steps::agent::Agent::connect(&qga, Duration::from_secs(5)).unwrap();
    agent.wait_ready(Duration::from_secs(30)).unwrap();
    agent.ping().unwrap();
    drop(agent);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        !text.contains("VSNAP-GUEST-READY"),
        "the guest booted instead of resuming: {text}"
    );
    let plans = w.vsnap(&["--json", "plan", "list"]).ok().json();
    let last = plans.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "Committed", "{last}");
    w.vsnap(&["domain", "destroy", "g"]).ok();
    say("start with a memory state: the guest resumed without a boot");

    // --- revert with a restart (DESIGN 10.3) --------------------------------------
    let booted = |console: &Path| {
        std::fs::read_to_string(console)
            .unwrap_or_default()
            .contains("VSNAP-GUEST-READY")
    };
    let snapshot_files = |name: &str| -> Vec<(PathBuf, u64)> {
        let i = w
            .vsnap(&["--json", "snapshot", "info", "g", name])
            .ok()
            .json();
        i["disks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["snapshot"] != "no")
            .map(|d| {
                let f = PathBuf::from(d["state_file"].as_str().unwrap());
                let h = hash_file(&f);
                (f, h)
            })
            .collect()
    };
    // Shut off, to m1 (memory in a file): new overlays on m1's frozen
    // files, then QEMU started with the memory loaded: no boot.
    let m1_files = snapshot_files("m1");
    let _ = std::fs::remove_file(&console);
    let r = w
        .vsnap(&["--json", "snapshot", "revert", "g", "m1"])
        .ok()
        .json();
    assert_eq!(r["state"], "running", "{r}");
    assert!(r["started"].is_u64(), "{r}");
    let pid = pid_of_file(&w.state.join("run/g.pid"));
    kills.add(pid);
    assert!(qmp(&sock).query_status().unwrap().0, "the guest runs");
    let mut agent = vsnap_steps::agent::Agent::connect(&qga, Duration::from_secs(5)).unwrap();
    agent.wait_ready(Duration::from_secs(30)).unwrap();
    drop(agent);
    assert!(
        !booted(&console),
        "reverted to m1, the guest booted instead of resuming"
    );
    assert!(
        qemu_disks(&sock)
            .iter()
            .all(|(_, f)| f.to_string_lossy().contains(".m1.revert-")),
        "{:?}",
        qemu_disks(&sock)
    );
    w.vsnap(&["domain", "check", "g"]).ok();
    say("revert of a shut-off domain to a memory-file snapshot: started, resumed without a boot");
    // Running, to a disk-only snapshot taken live: QEMU quits, new
    // overlays on d1's files, QEMU started again: a fresh boot.
    w.vsnap(&["snapshot", "create", "g", "d1", "--live", "--disk-only"])
        .ok();
    let d1_files = snapshot_files("d1");
    let _ = std::fs::remove_file(&console);
    let dry = w
        .vsnap(&["--json", "snapshot", "revert", "g", "d1", "--dry-run"])
        .ok()
        .json();
    assert!(dry["steps"].to_string().contains("QEMU quits"), "{dry}");
    assert!(alive(pid), "a dry run touches nothing");
    let r = w
        .vsnap(&["--json", "snapshot", "revert", "g", "d1"])
        .ok()
        .json();
    assert_eq!(r["state"], "running", "{r}");
    assert!(!alive(pid), "the old QEMU is gone");
    let pid = pid_of_file(&w.state.join("run/g.pid"));
    kills.add(pid);
    wait_for(
        "the guest's ready line after the revert",
        Duration::from_secs(90),
        || booted(&console).then_some(()),
    );
    assert!(
        qemu_disks(&sock)
            .iter()
            .all(|(_, f)| f.to_string_lossy().contains(".d1.revert-")),
        "{:?}",
        qemu_disks(&sock)
    );
    w.vsnap(&["domain", "check", "g"]).ok();
    say("revert of a running guest to a disk-only snapshot: restarted on new overlays, booted");
    // Running, back to m1: QEMU quits, m1's memory loaded in a new one.
    let _ = std::fs::remove_file(&console);
    let r = w
        .vsnap(&["--json", "snapshot", "revert", "g", "m1", "--paused"])
        .ok()
        .json();
    assert_eq!(r["state"], "paused", "{r}");
    assert_eq!(
        qmp(&sock).query_status().unwrap(),
        (false, "paused".to_string())
    );
    let pid = pid_of_file(&w.state.join("run/g.pid"));
    kills.add(pid);
    assert!(!booted(&console));
    w.vsnap(&["domain", "check", "g"]).ok();
    // Nothing a snapshot needs was written to.
    for (f, h) in m1_files.iter().chain(&d1_files) {
        assert_eq!(hash_file(f), *h, "{} changed", f.display());
    }
    assert_eq!(
        w.vsnap(&["snapshot", "current", "g"]).ok().stdout.trim(),
        "m1"
    );
    say("revert of a running guest to a memory-file snapshot, --paused: loaded in a new QEMU");
    // Shut off, to an internal snapshot with memory: started paused on
    // its disks, then QEMU's snapshot-load, then running: no boot.
    qmp(&sock).cont().unwrap();
    w.vsnap(&["snapshot", "create", "g", "i1", "--memory", "internal"])
        .ok();
    w.vsnap(&["domain", "destroy", "g"]).ok();
    let _ = std::fs::remove_file(&console);
    let r = w
        .vsnap(&["--json", "snapshot", "revert", "g", "i1"])
        .ok()
        .json();
    assert_eq!(r["state"], "running", "{r}");
    let pid = pid_of_file(&w.state.join("run/g.pid"));
    kills.add(pid);
    assert!(qmp(&sock).query_status().unwrap().0, "the guest runs");
    let mut agent = vsnap_steps::agent::Agent::connect(&qga, Duration::from_secs(5)).unwrap();
    agent.wait_ready(Duration::from_secs(30)).unwrap();
    drop(agent);
    assert!(
        !booted(&console),
        "reverted to i1, the guest booted instead of resuming"
    );
    assert!(r["steps"].to_string().contains("snapshot-load"), "{r}");
    w.vsnap(&["domain", "check", "g"]).ok();
    w.vsnap(&["domain", "destroy", "g"]).ok();
    say("revert of a shut-off domain to an internal snapshot with memory: started paused, loaded, resumed");

    // --- measure: vsnap domain start against the same argv by hand --------------
    let plan = w
        .vsnap(&["--json", "domain", "start", "g", "--paused", "--dry-run"])
        .ok()
        .json();
    let hand: Vec<String> = serde_json::from_value(plan["argv"].clone()).unwrap();
    let (mut by_vsnap, mut by_hand) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        let t = Instant::now();
        // vsnap returns once the monitor answered (and query-block
        // showed the planned images).
        let o = w.vsnap(&["--json", "domain", "start", "g", "--paused"]);
        by_vsnap.push(t.elapsed().as_secs_f64() * 1000.0);
        o.ok();
        kills.add(o.json()["pid"].as_u64().unwrap() as u32);
        w.vsnap(&["domain", "destroy", "g"]).ok();

        let t = Instant::now();
        let mut c = Command::new(&hand[0])
            .args(&hand[1..])
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kills.add(c.id());
        let pid = c.id();
        // Polled as vsnap polls (every 2 ms), bounded.
        loop {
            if vsnap_steps::launch::peer_pid(&sock).is_ok_and(|x| x == pid)
                && Qmp::connect(&sock, Duration::from_secs(5)).is_ok()
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the hand-started QEMU's monitor did not answer"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        by_hand.push(t.elapsed().as_secs_f64() * 1000.0);
        c.kill().unwrap();
        c.wait().unwrap();
    }
    eprintln!(
        "start_stop: MEASURE time to the monitor answering (paused start, 9 runs each): vsnap domain start median {:.1} ms {by_vsnap:.1?}, same argv by hand median {:.1} ms {by_hand:.1?}",
        median(by_vsnap.clone()),
        median(by_hand.clone())
    );
    say("done");
}
