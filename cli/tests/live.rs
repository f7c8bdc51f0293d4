//! Live domains with the real test guest (guest/README.md): a Debian
//! kernel under `qemu-system-x86_64` (TCG), the real `qemu-guest-agent`,
//! ext4 on every virtio disk, and a writer that keeps writing increasing
//! sequence numbers to every disk in the fixed order vda, vdb, vdc. Every
//! command is the real `vsnap` (or `vsnap-recover`) binary; what happened
//! is read from QEMU (QMP), the agent, and the images themselves.
//!
//! One test function runs named cases in order and reports each (run with
//! `--nocapture` to see them and their times). One guest kernel boots:
//!
//! * guest A (`guest/run.sh --qmp2`, `-drive` disks, the writer running)
//!   carries the attach / define / live / quiesce / memory / paused /
//!   offline cases and the bad input that needs a running guest. The
//!   silent-agent case (a fake agent peer; its 30 s agent timeout is the
//!   longest wait here) runs in a second thread on A's second monitor while
//!   A boots and while the first thread only reads from A (attach, define);
//!   the first thread waits for it before it changes anything on A.
//! * guest B (`guest/run.sh --blockdev`) is stopped at once, before its
//!   kernel runs (no CPU): it is attached (`-blockdev` names), snapshotted
//!   while paused (it stays paused), then killed for the dead-socket case.
//!
//! * guest C (after A and B are killed: raw vda and vdc, qcow2 vdb, all on
//!   a loop-mounted btrfs, the writer running) carries the reflink cases
//!   (clones and an overlay inside one pause, its window read from QEMU's
//!   STOP/RESUME events on a second monitor; a paused guest; bad input),
//!   `--memory external:PATH` (the file restored into a new QEMU with
//!   `-incoming`, which resumes the guest without a boot), and `--halt`
//!   (vsnap killed before the quit, recovery finishes it), then offline
//!   reflink clones of the shut-off guest.
//!
//! Every QEMU is killed (SIGKILL) by a drop guard, even on panic.
//!
//! Problems that need not stop the other cases (an error message that
//! names a flag the command does not have) are collected and fail the test
//! at the end. Time: about 40 to 50 s on two cores shared with other
//! builds (load 8 to 10); the silent agent's timeout is most of it.
//!
//! The quiesce case kills vsnap at a crash point, so it needs vsnap built
//! with the `failpoints` feature: `cargo test -p vsnap-cli --features
//! failpoints --test live` tests that binary; otherwise the test builds one
//! (`cargo build -p vsnap-cli --features vsnap-cli/failpoints`) before it
//! starts any guest.
//!
//! Needs root (a read-only bind mount), qemu-system-x86_64, qemu-img,
//! mkfs.ext4, debugfs, e2fsck, python3 (guest/guestctl.py for the agent),
//! and what `guest/build.sh` needs (it is called here; cached, it returns
//! in milliseconds). `VSNAP_LIVE_KEEP=1` keeps the work directory.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// --- small helpers ------------------------------------------------------------

static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// `live: [seconds since the test began] message`, on stderr.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!(
            "live: [{:5.1} s] {}",
            T0.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format_args!($($arg)*)
        )
    };
}

fn workspace() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::canonicalize(&p).unwrap_or(p)
}

fn python() -> &'static str {
    // A pyenv shim adds 0.2 s to every call (guest/README.md).
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Run a program to completion; panic (with its output) unless it exits 0.
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

/// Poll `f` every 25 ms until it gives `Some`, for at most `limit`.
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
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `vsnap` with extra environment; the exit signal, if any, is kept.
fn vsnap_env(bin: &Path, state: &Path, args: &[&str], env: &[(&str, &Path)]) -> (Out, Option<i32>) {
    let mut c = Command::new(bin);
    c.arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run vsnap");
    (
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        o.status.signal(),
    )
}

fn s(p: &Path) -> &str {
    common::p(p)
}

/// Announce a case, time it, and say FAILED if it panics.
/// The plan `vsnap --json ARGS --dry-run` prints: its steps, one line each.
fn dry_run_steps(state: &Path, args: &[&str]) -> Vec<String> {
    let args = [&["--json"][..], args, &["--dry-run"]].concat();
    let dry = vsnap(state, &args).ok().json();
    dry["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in {dry}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// A unix socket in front of a QEMU monitor socket: forwards every
/// connection to it, both ways, and counts the connections made.
struct CountingProxy {
    path: PathBuf,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Every byte the clients sent to QEMU, in order.
    sent: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl CountingProxy {
    fn start(path: &Path, real: &Path) -> CountingProxy {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let listener = UnixListener::bind(path).expect("bind the proxy socket");
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sent = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (n, real, log) = (count.clone(), real.to_path_buf(), sent.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                n.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = UnixStream::connect(&real) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(k) = (&client).read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        log.lock().unwrap().extend_from_slice(&buf[..k]);
                        if (&server).write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &s2, &mut &c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CountingProxy {
            path: path.to_path_buf(),
            count,
            sent,
        }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The QMP commands sent so far (`execute` of each message), in order.
    fn commands(&self) -> Vec<String> {
        let sent = self.sent.lock().unwrap().clone();
        String::from_utf8_lossy(&sent)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["execute"].as_str().map(str::to_string))
            .collect()
    }
}

fn case<T>(name: &str, f: impl FnOnce() -> T) -> T {
    struct Guard<'a>(&'a str, Instant);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                say!(
                    "case {} FAILED after {:.1} s",
                    self.0,
                    self.1.elapsed().as_secs_f64()
                );
            }
        }
    }
    say!("case {name} ...");
    let g = Guard(name, Instant::now());
    let r = f();
    say!("case {name} ok ({:.1} s)", g.1.elapsed().as_secs_f64());
    r
}

/// Problems that must fail the test but need not stop the other cases
/// (an error message that does not say what to do, say).
#[derive(Default)]
struct Soft(Mutex<Vec<String>>);

impl Soft {
    fn check(&self, ok: bool, what: String) {
        if !ok {
            say!("PROBLEM: {what}");
            self.0.lock().unwrap().push(what);
        }
    }
}

// --- QMP (a tiny client of the test's own; vsnap's is in steps/) -------------

fn qmp_try(sock: &Path, cmd: &str, args: Value) -> Result<Value, String> {
    let st = UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    st.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = st.try_clone().unwrap();
    let mut r = BufReader::new(st);
    let next = |r: &mut BufReader<UnixStream>| -> Result<Value, String> {
        loop {
            let mut line = String::new();
            let n = r
                .read_line(&mut line)
                .map_err(|e| format!("QMP {} read: {e}", sock.display()))?;
            if n == 0 {
                return Err(format!("QMP {} closed", sock.display()));
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP line {line:?}: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = next(&mut r)?;
    if greeting.get("QMP").is_none() {
        return Err(format!("no QMP greeting: {greeting}"));
    }
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    next(&mut r)?;
    let mut msg = json!({ "execute": cmd });
    if !args.is_null() {
        msg["arguments"] = args;
    }
    w.write_all(format!("{msg}\n").as_bytes()).unwrap();
    let v = next(&mut r)?;
    match v.get("return") {
        Some(ret) => Ok(ret.clone()),
        None => Err(format!("QMP {cmd}: {v}")),
    }
}

#[track_caller]
fn qmp(sock: &Path, cmd: &str) -> Value {
    qmp_try(sock, cmd, Value::Null).unwrap_or_else(|e| panic!("{e}"))
}

/// (running, status) from `query-status`.
fn qmp_status(sock: &Path) -> (bool, String) {
    let v = qmp(sock, "query-status");
    (
        v["running"].as_bool().unwrap(),
        v["status"].as_str().unwrap().to_string(),
    )
}

/// The name of a `query-block` device as vsnap's targets are: `device`, or
/// the peripheral id in `qdev` (`-blockdev` configurations).
fn block_target(b: &Value) -> String {
    let dev = b["device"].as_str().unwrap_or("");
    if !dev.is_empty() {
        return dev.to_string();
    }
    let qdev = b["qdev"].as_str().unwrap_or("");
    qdev.strip_prefix("/machine/peripheral/")
        .and_then(|r| r.split('/').next())
        .unwrap_or(qdev)
        .to_string()
}

/// Target -> the image QEMU runs the device on now.
fn qemu_disks(sock: &Path) -> BTreeMap<String, PathBuf> {
    qmp(sock, "query-block")
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b.get("inserted").is_some())
        .map(|b| {
            (
                block_target(b),
                PathBuf::from(b["inserted"]["file"].as_str().unwrap()),
            )
        })
        .collect()
}

/// Each device's top node, by target.
fn qemu_disks_nodes(sock: &Path) -> BTreeMap<String, String> {
    qmp(sock, "query-block")
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b.get("inserted").is_some())
        .map(|b| {
            (
                block_target(b),
                b["inserted"]["node-name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn image_chain(img: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cur = Some(img);
    while let Some(i) = cur {
        out.push(json!({
            "filename": i["filename"],
            "format": i["format"],
            "snapshots": snapshot_names(&i["snapshots"]),
        }));
        cur = i.get("backing-image");
    }
    out
}

fn snapshot_names(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What QEMU's block layer looks like, without what the guest's writes
/// change (sizes, dirty flags): devices with their chains, and every node.
fn qemu_view(sock: &Path) -> Value {
    let blocks: Vec<Value> = qmp(sock, "query-block")
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let ins = &b["inserted"];
            json!({
                "device": b["device"], "qdev": b["qdev"], "node": ins["node-name"],
                "file": ins["file"], "ro": ins["ro"], "drv": ins["drv"],
                "chain": if ins.is_null() { vec![] } else { image_chain(&ins["image"]) },
            })
        })
        .collect();
    let mut nodes: Vec<Value> = qmp(sock, "query-named-block-nodes")
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            json!({
                "node": n["node-name"], "drv": n["drv"], "file": n["file"], "ro": n["ro"],
                "backing_file": n["backing_file"], "snapshots": snapshot_names(&n["image"]["snapshots"]),
            })
        })
        .collect();
    nodes.sort_by_key(|n| n["node"].as_str().unwrap_or("").to_string());
    json!({ "blocks": blocks, "nodes": nodes })
}

// --- the guest agent, through guest/guestctl.py ----------------------------------

fn agent(sock: &Path, cmd: &str) -> Value {
    let helper = workspace().join("guest/guestctl.py");
    let out = run_ok(python(), &[s(&helper), "qga", s(sock), cmd]);
    let v: Value = serde_json::from_str(out.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("agent {cmd}: {e}: {out}"));
    v.get("return").cloned().unwrap_or(v)
}

// --- images -------------------------------------------------------------------------

/// The writer's record with the highest sequence number in an image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seq {
    seq: u64,
    disk: String,
    boot: u64,
}

static SCRATCH_N: AtomicU32 = AtomicU32::new(0);

/// A raw copy of what `img` shows (its whole chain), read with `-U` so a
/// running QEMU does not stop it: `qemu-img convert -U -O raw`.
fn raw_copy(img: &Path, scratch: &Path) -> PathBuf {
    let n = SCRATCH_N.fetch_add(1, Ordering::SeqCst);
    let name = img.file_name().unwrap().to_string_lossy();
    let raw = scratch.join(format!("{n}-{name}.raw"));
    run_ok("qemu-img", &["convert", "-U", "-O", "raw", s(img), s(&raw)]);
    raw
}

/// Parse the writer's file: 64 slots of 512 bytes, each
/// `VSNAPSEQ seq=%020d disk=%s boot=%020d t_ns=%020d\n` or zeros.
fn parse_seq(data: &[u8]) -> Option<Seq> {
    let mut best: Option<Seq> = None;
    for slot in data.chunks(512).take(64) {
        let Some(rest) = slot.strip_prefix(b"VSNAPSEQ seq=") else {
            continue;
        };
        let line = String::from_utf8_lossy(rest);
        let line = line.split('\n').next().unwrap_or("");
        let mut it = line.split(' ');
        let seq: u64 = it.next().and_then(|x| x.parse().ok())?;
        let disk = it.next()?.strip_prefix("disk=")?.to_string();
        let boot: u64 = it.next()?.strip_prefix("boot=")?.parse().ok()?;
        if best.as_ref().is_none_or(|b| seq > b.seq) {
            best = Some(Seq { seq, disk, boot });
        }
    }
    best
}

/// The writer's sequence number in an image (qcow2 chain or raw), from the
/// file's bytes alone: `debugfs -R 'cat /seq'` on a raw conversion.
fn image_seq(img: &Path, scratch: &Path) -> Seq {
    let raw = raw_copy(img, scratch);
    let out = Command::new("debugfs")
        .args(["-R", "cat /seq", s(&raw)])
        .stdin(Stdio::null())
        .output()
        .expect("run debugfs (e2fsprogs)");
    let _ = std::fs::remove_file(&raw);
    parse_seq(&out.stdout).unwrap_or_else(|| {
        panic!(
            "no writer record in {}: debugfs said {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The writer's sequence number inside internal snapshot `name` of a
/// qcow2 image (`qemu-img convert -l snapshot.name=NAME`).
fn snapshot_seq(img: &Path, name: &str, scratch: &Path) -> Seq {
    let n = SCRATCH_N.fetch_add(1, Ordering::Relaxed);
    let raw = scratch.join(format!("{n}-snap-{name}.raw"));
    let sel = format!("snapshot.name={name}");
    run_ok(
        "qemu-img",
        &["convert", "-U", "-l", &sel, "-O", "raw", s(img), s(&raw)],
    );
    let out = Command::new("debugfs")
        .args(["-R", "cat /seq", s(&raw)])
        .stdin(Stdio::null())
        .output()
        .expect("run debugfs (e2fsprogs)");
    let _ = std::fs::remove_file(&raw);
    parse_seq(&out.stdout).unwrap_or_else(|| panic!("no writer record in {}@{name}", img.display()))
}

/// `seq(d1) >= seq(d2) >= ... >= seq(d1) - 1`, in writer order.
#[track_caller]
fn assert_one_instant(what: &str, seqs: &[(&str, &Seq)]) {
    let first = seqs[0].1.seq;
    for w in seqs.windows(2) {
        assert!(
            w[0].1.seq >= w[1].1.seq,
            "{what}: seq({})={} < seq({})={}: not one instant ({seqs:?})",
            w[0].0,
            w[0].1.seq,
            w[1].0,
            w[1].1.seq
        );
    }
    let last = seqs[seqs.len() - 1].1.seq;
    assert!(
        last + 1 >= first,
        "{what}: the disks are more than one write apart: {seqs:?}"
    );
    for (t, sq) in seqs {
        assert_eq!(
            &sq.disk, t,
            "{what}: the record in {t} names disk {}",
            sq.disk
        );
        assert_eq!(
            sq.boot, seqs[0].1.boot,
            "{what}: different writer boots: {seqs:?}"
        );
    }
}

/// `qemu-img info -U --output=json`.
fn img_info(img: &Path) -> Value {
    serde_json::from_str(&run_ok(
        "qemu-img",
        &["info", "-U", "--output=json", s(img)],
    ))
    .unwrap()
}

fn img_snapshots(img: &Path) -> Vec<String> {
    snapshot_names(&img_info(img)["snapshots"])
}

/// A 64 MiB ext4 qcow2 disk: mkfs.ext4 on a raw file, then convert.
fn make_ext4_qcow2(path: &Path) {
    let raw = path.with_extension("mkfs.raw");
    run_ok("truncate", &["-s", "64M", s(&raw)]);
    run_ok("mkfs.ext4", &["-q", "-F", s(&raw)]);
    run_ok("qemu-img", &["convert", "-O", "qcow2", s(&raw), s(path)]);
    std::fs::remove_file(&raw).unwrap();
}

// --- the guests ---------------------------------------------------------------------

/// A guest started with `guest/run.sh` (QEMU daemonizes); SIGKILLed on drop.
struct Guest {
    name: &'static str,
    dir: PathBuf,
    pid: u32,
}

impl Guest {
    fn start(name: &'static str, dir: &Path, flags: &[&str], disks: &[&Path]) -> Guest {
        let run = workspace().join("guest/run.sh");
        let mut args = vec!["-d", s(dir)];
        args.extend_from_slice(flags);
        args.extend(disks.iter().map(|d| s(d)));
        let out = run_ok(s(&run), &args);
        assert_eq!(Path::new(out.trim()), dir, "run.sh printed {out:?}");
        let pidfile = dir.join("qemu.pid");
        let pid = wait_for("QEMU's pid file", Duration::from_secs(20), || {
            std::fs::read_to_string(&pidfile)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        });
        let g = Guest {
            name,
            dir: dir.to_path_buf(),
            pid,
        };
        assert!(
            g.alive(),
            "guest {name}: QEMU {pid} is not running (see {})",
            dir.display()
        );
        g
    }

    fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    fn qga(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The process exists, is QEMU, and is not a zombie.
    fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let state = stat
            .rsplit_once(") ")
            .map(|(_, r)| r.chars().next().unwrap_or('?'));
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        state != Some('Z') && String::from_utf8_lossy(&cmdline).contains("qemu-system")
    }

    fn kill(&self) {
        if self.alive() {
            let _ = Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
        }
        wait_for("QEMU to die", Duration::from_secs(20), || {
            (!self.alive()).then_some(())
        });
    }

    /// Wait for a console line (bounded); fail at once if QEMU died or the
    /// guest kernel panicked.
    fn wait_console(&self, marker: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        wait_for(
            &format!("{marker:?} on guest {}'s console", self.name),
            limit,
            || {
                let text = self.console();
                assert!(
                    !text.contains("Kernel panic"),
                    "guest {} panicked:\n{text}",
                    self.name
                );
                assert!(
                    self.alive() || text.contains(marker),
                    "guest {}'s QEMU died:\n{text}",
                    self.name
                );
                text.contains(marker).then_some(())
            },
        );
        start.elapsed()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.alive() {
            let _ = Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
        }
    }
}

// --- "nothing changed" ----------------------------------------------------------------

/// A directory's entries: the directory's own mtime (an entry made and
/// removed again changes it), and for each file its inode, size, mode,
/// mtime and ctime (any write or metadata change moves ctime, which no one
/// can set back), except the images a running QEMU writes (`active`),
/// whose presence only is compared.
fn dir_state(dir: &Path, active: &BTreeSet<PathBuf>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let m = std::fs::metadata(dir).unwrap();
    out.insert(
        ".".into(),
        format!("mtime {}.{}", m.mtime(), m.mtime_nsec()),
    );
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        let m = std::fs::symlink_metadata(&path).unwrap();
        let v = if active.contains(&path) {
            "active image".to_string()
        } else {
            format!(
                "inode {}, {} bytes, mode {:o}, mtime {}.{}, ctime {}.{}",
                m.ino(),
                m.len(),
                m.mode(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            )
        };
        out.insert(e.file_name().to_string_lossy().into_owned(), v);
    }
    out
}

/// Everything a refused command must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    files: BTreeMap<String, String>,
    snapshots: Value,
    domain: Value,
    plans: Value,
    qemu: Option<Value>,
}

fn world_of(state: &Path, domain: &str, disks_dir: &Path, qmp_sock: Option<&Path>) -> Snapshot {
    let qemu = qmp_sock.map(qemu_view);
    let active: BTreeSet<PathBuf> = match qmp_sock {
        Some(q) => qemu_disks(q).into_values().collect(),
        None => BTreeSet::new(),
    };
    Snapshot {
        files: dir_state(disks_dir, &active),
        snapshots: vsnap(state, &["--json", "snapshot", "list", domain])
            .ok()
            .json(),
        domain: vsnap(state, &["--json", "domain", "info", domain])
            .ok()
            .json(),
        plans: vsnap(state, &["--json", "plan", "list"]).ok().json(),
        qemu,
    }
}

#[track_caller]
fn assert_nothing_changed(what: &str, before: &Snapshot, after: &Snapshot) {
    let mut diff = Vec::new();
    for (k, v) in &before.files {
        match after.files.get(k) {
            None => diff.push(format!("removed: {k}")),
            Some(w) if w != v => diff.push(format!("changed: {k}: {v} -> {w}")),
            _ => {}
        }
    }
    for k in after
        .files
        .keys()
        .filter(|k| !before.files.contains_key(*k))
    {
        diff.push(format!("new: {k}"));
    }
    assert!(
        diff.is_empty(),
        "{what}: files changed:\n{}",
        diff.join("\n")
    );
    assert_eq!(
        before.snapshots, after.snapshots,
        "{what}: the snapshot catalog changed"
    );
    assert_eq!(before.domain, after.domain, "{what}: the domain changed");
    assert_eq!(
        before.plans, after.plans,
        "{what}: the journal has a new plan"
    );
    assert_eq!(
        before.qemu, after.qemu,
        "{what}: QEMU's block graph changed"
    );
}

/// A refusal: exit 2, stderr naming every one of `words`.
#[track_caller]
fn assert_refused(what: &str, o: &Out, words: &[&str]) {
    assert_eq!(
        o.code, 2,
        "{what}: exit {} (want 2)\nstdout:\n{}\nstderr:\n{}",
        o.code, o.stdout, o.stderr
    );
    for w in words {
        assert!(
            o.stderr.contains(w),
            "{what}: stderr does not name {w:?}:\n{}",
            o.stderr
        );
    }
}

// --- crash points ---------------------------------------------------------------------

/// Whether `bin` was built with crash points: a trivial command with
/// VSNAP_FAILPOINT_LOG writes the log.
fn has_failpoints(bin: &Path, scratch: &Path) -> bool {
    let log = scratch.join("failpoint-probe.log");
    let state = scratch.join("failpoint-probe-state");
    let _ = std::fs::remove_file(&log);
    let (o, _) = vsnap_env(
        bin,
        &state,
        &["plan", "list"],
        &[("VSNAP_FAILPOINT_LOG", log.as_path())],
    );
    o.expect_code(0);
    let logged = std::fs::read_to_string(&log).is_ok_and(|t| !t.trim().is_empty());
    let _ = std::fs::remove_dir_all(&state);
    logged
}

/// A vsnap with crash points: the binary under test if it has them, else
/// one built now with `cargo build -p vsnap-cli --features vsnap-cli/failpoints`.
fn failpoint_vsnap(scratch: &Path) -> PathBuf {
    let under_test = PathBuf::from(VSNAP);
    if has_failpoints(&under_test, scratch) {
        say!("{VSNAP} has crash points");
        return under_test;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    say!("{VSNAP} has no crash points; building vsnap with --features vsnap-cli/failpoints");
    let start = Instant::now();
    let out = Command::new(&cargo)
        .current_dir(workspace())
        .args([
            "build",
            "-p",
            "vsnap-cli",
            "--features",
            "vsnap-cli/failpoints",
            "--bin",
            "vsnap",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "cargo build with crash points failed");
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "vsnap")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no vsnap executable");
    assert!(
        has_failpoints(&exe, scratch),
        "{} was built with --features vsnap-cli/failpoints but logs no crash point",
        exe.display()
    );
    say!(
        "built {} in {:.1} s",
        exe.display(),
        start.elapsed().as_secs_f64()
    );
    exe
}

// --- XML ------------------------------------------------------------------------------

/// A `<domain>` as `virsh dumpxml` prints a running guest (with the parts
/// vsnap does not use: memory, os, devices it does not snapshot, aliases,
/// addresses, a libosinfo metadata element, the agent channel's state).
fn virsh_domain_xml(name: &str, disks: &[(&str, &Path)], agent: Option<&Path>) -> String {
    let mut x = format!(
        "<domain type='kvm' id='3'>
  <name>{name}</name>
  <uuid>5f0c9a4e-2b7d-4c1a-9e3f-7a6b8c9d0e1f</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo=\"http://libosinfo.org/xmlns/libvirt/domain/1.0\">
      <libosinfo:os id=\"http://debian.org/debian/12\"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/var/lib/vsnap-guest/vmlinuz</kernel>
    <initrd>/var/lib/vsnap-guest/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
"
    );
    for (i, (target, path)) in disks.iter().enumerate() {
        x.push_str(&format!(
            "    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='{}' index='{}'/>
      <backingStore/>
      <target dev='{target}' bus='virtio'/>
      <alias name='virtio-disk{i}'/>
      <address type='pci' domain='0x0000' bus='0x0{}' slot='0x00' function='0x0'/>
    </disk>
",
            path.display(),
            disks.len() - i,
            i + 4
        ));
    }
    x.push_str(
        "    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <alias name='sata0-0-0'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='virtio-serial' index='0'>
      <alias name='virtio-serial0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </controller>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
",
    );
    if let Some(a) = agent {
        x.push_str(&format!(
            "    <channel type='unix'>
      <source mode='bind' path='{}'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
",
            a.display()
        ));
    }
    x.push_str(
        "    <memballoon model='none'/>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+994</label>
    <imagelabel>+64055:+994</imagelabel>
  </seclabel>
</domain>
",
    );
    x
}

// --- a silent peer for the agent channel -----------------------------------------------

/// A unix listener that accepts and reads but never answers: an agent
/// channel whose agent does not respond. Records what it was sent.
struct SilentPeer {
    path: PathBuf,
    got: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentPeer {
    fn start(path: &Path) -> SilentPeer {
        let l = UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<UnixStream> = Vec::new();
            while !st.load(Ordering::SeqCst) {
                if let Ok((c, _)) = l.accept() {
                    c.set_nonblocking(true).unwrap();
                    conns.push(c);
                }
                let mut buf = [0u8; 4096];
                for c in &mut conns {
                    if let Ok(n) = c.read(&mut buf) {
                        g.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        SilentPeer {
            path: path.to_path_buf(),
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.got.lock().unwrap()).into_owned()
    }
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

// --- the test -------------------------------------------------------------------------

/// The work directory, removed at the end unless VSNAP_LIVE_KEEP is set.
struct Work(Option<TempDir>);

impl Drop for Work {
    fn drop(&mut self) {
        if std::env::var_os("VSNAP_LIVE_KEEP").is_some() {
            if let Some(t) = self.0.take() {
                say!("kept {}", t.path.display());
                std::mem::forget(t);
            }
        }
    }
}

const TARGETS: [&str; 3] = ["vda", "vdb", "vdc"];

#[test]
fn live_domains() {
    let t0 = *T0.get_or_init(Instant::now);
    let work = Work(Some(TempDir::new("live")));
    let root = work.0.as_ref().unwrap().path.clone();
    let scratch = root.join("scratch");
    std::fs::create_dir(&scratch).unwrap();

    // The guest (cached: milliseconds when built).
    let build = workspace().join("guest/build.sh");
    let o = Out::from_command(s(&build), &[]);
    assert_eq!(
        o.code, 0,
        "guest/build.sh failed:\n{}{}",
        o.stdout, o.stderr
    );

    // Before any guest runs (building replaces target/debug/vsnap).
    let fp_vsnap = failpoint_vsnap(&scratch);

    // Guest A's disks, and copies for guest B.
    let a_disks = root.join("a-disks");
    let b_disks = root.join("b-disks");
    std::fs::create_dir(&a_disks).unwrap();
    std::fs::create_dir(&b_disks).unwrap();
    let a_imgs: Vec<PathBuf> = TARGETS
        .iter()
        .map(|t| a_disks.join(format!("{t}.qcow2")))
        .collect();
    let b_imgs: Vec<PathBuf> = TARGETS
        .iter()
        .map(|t| b_disks.join(format!("{t}.qcow2")))
        .collect();
    for (a, b) in a_imgs.iter().zip(&b_imgs) {
        make_ext4_qcow2(a);
        std::fs::copy(a, b).unwrap();
    }
    say!("disks ready");

    let guest_a = Guest::start(
        "A",
        &root.join("a-run"),
        &["--qmp2"],
        &a_imgs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let guest_b = Guest::start(
        "B",
        &root.join("b-run"),
        &["--blockdev", "--append", "vsnap_writer=0"],
        &b_imgs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    // B burns no CPU: its kernel never runs.
    let qb = guest_b.qmp();
    wait_for("guest B's monitor", Duration::from_secs(20), || {
        qmp_try(&qb, "stop", Value::Null).ok()
    });
    say!(
        "guests started: A pid {}, B pid {} (stopped)",
        guest_a.pid,
        guest_b.pid
    );

    let soft = Soft::default();
    let state_a = root.join("state-a");
    let state_b = root.join("state-b");
    let state_s = root.join("state-silent");

    std::thread::scope(|sc| {
        // The silent agent's 30 s timeout runs beside guest A's boot and
        // the cases that do not change guest A.
        let silent = sc.spawn(|| silent_agent_case(&guest_a, &state_s, &root));
        guest_b_cases(&guest_b, &b_disks, &state_b, &root);
        let join_silent = || {
            if let Err(p) = silent.join() {
                std::panic::resume_unwind(p);
            }
        };
        guest_a_cases(
            &guest_a,
            &a_disks,
            &state_a,
            &root,
            &scratch,
            &fp_vsnap,
            &soft,
            join_silent,
        );
    });

    // Guest C runs alone: A and B are done.
    guest_a.kill();
    guest_b.kill();
    guest_c_cases(&root, &scratch, &fp_vsnap);

    let took = t0.elapsed();
    say!("all cases done in {:.1} s", took.as_secs_f64());
    let problems = soft.0.lock().unwrap().clone();
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Guest B (`--blockdev`, stopped before its kernel ran): attach, a
/// disk-only snapshot of a paused guest, then QEMU killed (a dead socket),
/// a missing socket, and undefine.
fn guest_b_cases(b: &Guest, disks: &Path, state: &Path, root: &Path) {
    let qmp_b = b.qmp();
    let imgs: Vec<PathBuf> = TARGETS
        .iter()
        .map(|t| disks.join(format!("{t}.qcow2")))
        .collect();

    case("attach_blockdev", || {
        let att = vsnap(
            state,
            &[
                "--json",
                "domain",
                "attach",
                "blk",
                "--qmp",
                s(&qmp_b),
                "--agent",
                s(&b.qga()),
            ],
        )
        .ok()
        .json();
        let got: Vec<(String, String, String)> = att["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap().into(),
                    d["source"].as_str().unwrap().into(),
                    d["format"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want: Vec<(String, String, String)> = TARGETS
            .iter()
            .zip(&imgs)
            .map(|(t, i)| (t.to_string(), s(i).to_string(), "qcow2".to_string()))
            .collect();
        assert_eq!(got, want, "with -blockdev the targets are the device ids");
        let info = vsnap(state, &["--json", "domain", "info", "blk"])
            .ok()
            .json();
        assert_eq!(info["state"], "paused");
        assert_eq!(info["qmp"], s(&qmp_b));
        assert_eq!(info["agent"], s(&b.qga()));
        let list = vsnap(state, &["--json", "domain", "list"]).ok().json();
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["name"], "blk");
        let xml = vsnap(state, &["domain", "dumpxml", "blk"])
            .ok()
            .stdout
            .clone();
        for (t, i) in TARGETS.iter().zip(&imgs) {
            assert!(
                xml.contains(&format!("<source file='{}'/>", i.display())),
                "{xml}"
            );
            assert!(xml.contains(&format!("<target dev='{t}'/>")), "{xml}");
        }
    });

    case("blockdev_paused_guest_stays_paused", || {
        assert_eq!(qmp_status(&qmp_b), (false, "paused".to_string()));
        let o = vsnap(
            state,
            &[
                "snapshot",
                "create",
                "blk",
                "bs1",
                "--live",
                "--disk-only",
                "--disk",
                "vdc=no",
            ],
        );
        o.ok();
        assert_eq!(
            qmp_status(&qmp_b),
            (false, "paused".to_string()),
            "a paused guest stays paused"
        );
        let on = qemu_disks(&qmp_b);
        assert_eq!(on["vda"], disks.join("vda.bs1.qcow2"));
        assert_eq!(on["vdb"], disks.join("vdb.bs1.qcow2"));
        assert_eq!(on["vdc"], disks.join("vdc.qcow2"));
        let info = vsnap(state, &["--json", "domain", "info", "blk"])
            .ok()
            .json();
        for d in info["disks"].as_array().unwrap() {
            assert_eq!(
                on[d["target"].as_str().unwrap()],
                Path::new(d["source"].as_str().unwrap())
            );
        }
        vsnap(state, &["domain", "check", "blk"]).ok();
    });

    // vsnap's promise: one monitor connection per plan (with its
    // planning), not one per step and per question. Counted from outside,
    // by a socket in front of QEMU's that forwards and counts connections.
    case("one_monitor_connection_per_plan", || {
        let pstate = root.join("proxy-state");
        let proxy = CountingProxy::start(&root.join("b-proxy.sock"), &qmp_b);
        vsnap(
            &pstate,
            &["domain", "attach", "blkp", "--qmp", s(&proxy.path)],
        )
        .ok();
        let before = proxy.count();
        let before_cmds = proxy.commands().len();
        vsnap(
            &pstate,
            &[
                "snapshot",
                "create",
                "blkp",
                "p1",
                "--live",
                "--disk-only",
                "--disk",
                "vdc=no",
            ],
        )
        .ok();
        let made = proxy.count() - before;
        let on = qemu_disks(&qmp_b);
        assert_eq!(on["vda"], disks.join("vda.bs1.p1.qcow2"));
        assert_eq!(on["vdb"], disks.join("vdb.bs1.p1.qcow2"));
        say!("disk-only snapshot of 2 disks: {made} monitor connection(s)");
        assert_eq!(made, 1, "one monitor connection for the whole plan");
        // Planning asks each chosen device for its node (`qom-get`,
        // confirming what attach saw), never for the whole block graph,
        // whose answer grows with every chain's depth.
        let cmds = proxy.commands();
        let plan = &cmds[before_cmds..];
        say!("the plan's QMP commands: {plan:?}");
        assert!(
            !plan
                .iter()
                .any(|c| c.starts_with("query-block") || c == "query-named-block-nodes"),
            "{plan:?}"
        );
        assert_eq!(
            plan.iter().filter(|c| *c == "qom-get").count(),
            2,
            "{plan:?}"
        );
    });

    // `<disk type='block'>`: the overlay written onto a block device (a
    // loop device) and switched in live, through QEMU's host_device driver.
    case("live_overlay_onto_a_block_device", || {
        let pstate = root.join("proxy-state");
        let devfile = root.join("b-vdc-dev.img");
        std::fs::File::create(&devfile)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let dev = LoopDev::attach(&devfile);
        let f = root.join("b-block.xml");
        std::fs::write(
            &f,
            format!(
                "<domainsnapshot><name>p2</name><disks><disk name='vda' snapshot='no'/><disk name='vdb' snapshot='no'/>\
                 <disk name='vdc' snapshot='external' type='block'><source dev='{}'/></disk></disks></domainsnapshot>",
                dev.0
            ),
        )
        .unwrap();
        vsnap(
            &pstate,
            &[
                "snapshot",
                "create",
                "blkp",
                "--xml",
                s(&f),
                "--live",
                "--disk-only",
            ],
        )
        .ok();
        let on = qemu_disks(&qmp_b);
        assert_eq!(on["vdc"], dev.path(), "QEMU's vdc is the device now");
        assert_eq!(on["vda"], disks.join("vda.bs1.p1.qcow2"), "vda left alone");
        let info = vsnap(&pstate, &["--json", "domain", "info", "blkp"])
            .ok()
            .json();
        let vdc = info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["target"] == "vdc")
            .unwrap()
            .clone();
        assert_eq!(vdc["source"], dev.0.as_str(), "{info}");
        assert!(
            !std::fs::read_dir(&pstate).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("devhead.")),
            "the device's saved head goes after the pivot"
        );
        vsnap(&pstate, &["domain", "check", "blkp"]).ok();
    });

    // The view of QEMU vsnap keeps (what attach and each live snapshot
    // saw) never hides a graph changed behind vsnap's back: vda switched
    // to an overlay vsnap did not make, the next snapshot sees that QEMU
    // no longer runs the image the domain names, and refuses.
    case("a_graph_changed_behind_vsnap_is_seen", || {
        let pstate = root.join("proxy-state");
        let behind = root.join("b-behind.qcow2");
        let top = disks.join("vda.bs1.p1.qcow2");
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                s(&top),
                s(&behind),
            ],
        );
        let node = qemu_disks_nodes(&qmp_b)["vda"].clone();
        qmp_try(
            &qmp_b,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "behind", "backing": null,
                   "file": {"driver": "file", "filename": s(&behind)}}),
        )
        .unwrap();
        qmp_try(
            &qmp_b,
            "blockdev-snapshot",
            json!({"node": node, "overlay": "behind"}),
        )
        .unwrap();
        assert_eq!(qemu_disks(&qmp_b)["vda"], behind);
        let before = world_of(&pstate, "blkp", disks, None);
        let o = vsnap(
            &pstate,
            &[
                "snapshot",
                "create",
                "blkp",
                "p3",
                "--live",
                "--disk-only",
                "--disk",
                "vdb=no",
                "--disk",
                "vdc=no",
            ],
        );
        assert_refused(
            "a graph changed behind vsnap",
            &o,
            &["QEMU does not use", s(&top), "stale"],
        );
        let after = world_of(&pstate, "blkp", disks, None);
        assert_nothing_changed("a graph changed behind vsnap", &before, &after);
        assert_eq!(qemu_disks(&qmp_b)["vda"], behind, "QEMU left as it was");
    });

    case("dead_qmp_socket", || {
        b.kill();
        assert!(qmp_b.exists(), "a killed QEMU leaves its socket file");
        let before = world_of(state, "blk", disks, None);
        let o = vsnap(
            state,
            &["snapshot", "create", "blk", "d1", "--live", "--disk-only"],
        );
        assert_refused("dead QMP socket", &o, &[s(&qmp_b), "--live"]);
        let after = world_of(state, "blk", disks, None);
        assert_nothing_changed("dead QMP socket", &before, &after);
        assert_eq!(after.domain["state"], "shutoff");
    });

    // A view of one QEMU is never taken for another's: a QEMU started
    // anew on the same monitor socket, with the same node names (`vda`)
    // on another image, is asked `query-block`, which shows that it does
    // not run the image the domain names.
    case("a_view_of_another_qemu_is_not_trusted", || {
        let dir = root.join("b2-run");
        let (e1, e2) = (root.join("b2-e1.qcow2"), root.join("b2-e2.qcow2"));
        for e in [&e1, &e2] {
            run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(e), "32M"]);
        }
        let stopped = |img: &Path| {
            let g = Guest::start("B2", &dir, &["--blockdev"], &[img]);
            wait_for("B2's monitor", Duration::from_secs(20), || {
                qmp_try(&g.qmp(), "stop", Value::Null).ok()
            });
            g
        };
        let first = stopped(&e1);
        vsnap(state, &["domain", "attach", "b2", "--qmp", s(&first.qmp())]).ok();
        first.kill();
        drop(first);
        let second = stopped(&e2);
        assert_eq!(
            qemu_disks_nodes(&second.qmp())["vda"],
            "vda",
            "the same node name"
        );
        let before = world_of(state, "b2", disks, None);
        let o = vsnap(
            state,
            &["snapshot", "create", "b2", "x1", "--live", "--disk-only"],
        );
        assert_refused(
            "another QEMU on the socket",
            &o,
            &["QEMU does not use", s(&e1), "stale"],
        );
        let after = world_of(state, "b2", disks, None);
        assert_nothing_changed("another QEMU on the socket", &before, &after);
        assert_eq!(qemu_disks(&second.qmp())["vda"], e2, "QEMU left as it was");
        second.kill();
        vsnap(state, &["domain", "undefine", "b2"]).ok();
    });

    case("missing_qmp_socket", || {
        let gone = root.join("b-run/no-such.sock");
        let xml = root.join("nosock.xml");
        let on: Vec<(&str, &Path)> = vec![("vda", imgs[0].as_path())];
        std::fs::write(&xml, virsh_domain_xml("nosock", &on, None)).unwrap();
        vsnap(state, &["domain", "define", s(&xml), "--qmp", s(&gone)]).ok();
        let before = world_of(state, "nosock", disks, None);
        let o = vsnap(
            state,
            &[
                "snapshot",
                "create",
                "nosock",
                "m1",
                "--live",
                "--disk-only",
            ],
        );
        assert_refused("missing QMP socket", &o, &[s(&gone), "--live"]);
        let after = world_of(state, "nosock", disks, None);
        assert_nothing_changed("missing QMP socket", &before, &after);
        vsnap(state, &["domain", "undefine", "nosock"]).ok();
    });

    case("undefine_blockdev", || {
        let o = vsnap(state, &["domain", "undefine", "blk"]);
        assert_refused(
            "undefine with snapshots",
            &o,
            &["snapshot", "--snapshots-metadata"],
        );
        vsnap(
            state,
            &["domain", "undefine", "blk", "--snapshots-metadata"],
        )
        .ok();
        let list = vsnap(state, &["--json", "domain", "list"]).ok().json();
        assert_eq!(list, json!([]));
        assert!(
            disks.join("vda.bs1.qcow2").exists(),
            "undefine leaves the files"
        );
    });
}

/// A silent agent, on guest A while it boots and while the other thread
/// only reads from it (attach, define): nothing else changes its block
/// graph or its disks' directory until this case is over.
fn silent_agent_case(a: &Guest, state: &Path, root: &Path) {
    case("silent_agent_fake_peer", || {
        // A running guest whose agent channel is a listener that never
        // answers. Guest A's QEMU runs from its start on (whether its
        // kernel has booted yet does not matter here); this domain uses
        // A's second monitor, while the other thread uses the first.
        let qmp2 = a.dir.join("qmp2.sock");
        assert!(qmp_status(&qmp2).0);
        let peer = SilentPeer::start(&root.join("silent-qga.sock"));
        let xml = root.join("silent.xml");
        let on = qemu_disks(&qmp2);
        let disks: Vec<(&str, &Path)> = TARGETS.iter().map(|t| (*t, on[*t].as_path())).collect();
        std::fs::write(
            &xml,
            virsh_domain_xml("silent", &disks, Some(peer.path.as_path())),
        )
        .unwrap();
        vsnap(state, &["domain", "define", s(&xml), "--qmp", s(&qmp2)]).ok();
        let before = world_of(state, "silent", &disks_dir_of(&on), Some(qmp2.as_path()));
        let args = [
            "--state-dir",
            s(state),
            "snapshot",
            "create",
            "silent",
            "q1",
            "--live",
            "--disk-only",
            "--quiesce",
        ];
        let (o, took) = run_with_deadline(VSNAP, &args, Duration::from_secs(120));
        say!(
            "silent agent: vsnap gave up after {:.1} s",
            took.as_secs_f64()
        );
        assert_refused("silent agent", &o, &[s(&peer.path), "did not answer"]);
        assert!(
            took < Duration::from_secs(60),
            "a silent agent took {took:?}"
        );
        let after = world_of(state, "silent", &disks_dir_of(&on), Some(qmp2.as_path()));
        assert_nothing_changed("silent agent", &before, &after);
        let got = peer.received();
        assert!(
            got.contains("guest-sync-delimited"),
            "vsnap did not talk to the agent: {got:?}"
        );
        assert!(
            !got.contains("fsfreeze"),
            "vsnap sent a freeze to an agent that never synced: {got:?}"
        );
        assert!(qmp_status(&qmp2).0, "the guest still runs");
        vsnap(state, &["domain", "undefine", "silent"]).ok();
    });
}

fn disks_dir_of(on: &BTreeMap<String, PathBuf>) -> PathBuf {
    on["vda"].parent().unwrap().to_path_buf()
}

/// Guest A (`-drive`, the writer running).
#[allow(clippy::too_many_arguments)]
fn guest_a_cases(
    a: &Guest,
    disks: &Path,
    state: &Path,
    root: &Path,
    scratch: &Path,
    fp_vsnap: &Path,
    soft: &Soft,
    join_silent: impl FnOnce(),
) {
    let qa = a.qmp();
    let img = |name: &str| disks.join(name);
    let boot = a.wait_console("VSNAP-GUEST-READY", Duration::from_secs(180));
    say!("guest A ready (waited {:.1} s for it)", boot.as_secs_f64());
    assert!(
        a.console()
            .contains("VSNAP-GUEST-READY disks=vda,vdb,vdc agent=yes"),
        "{}",
        a.console()
    );
    let v = qmp(&qa, "query-version");
    say!("QEMU {}", v["qemu"]);

    case("attach_drive", || {
        let att = vsnap(
            state,
            &[
                "--json",
                "domain",
                "attach",
                "drv",
                "--qmp",
                s(&qa),
                "--agent",
                s(&a.qga()),
            ],
        )
        .ok()
        .json();
        let targets: Vec<&str> = att["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["target"].as_str().unwrap())
            .collect();
        assert_eq!(
            targets, TARGETS,
            "with -drive the targets are the drive ids"
        );
        for (d, t) in att["disks"].as_array().unwrap().iter().zip(TARGETS) {
            assert_eq!(d["source"], s(&img(&format!("{t}.qcow2"))));
            assert_eq!(d["format"], "qcow2");
            assert_eq!(d["readonly"], false);
        }
        let info = vsnap(state, &["--json", "domain", "info", "drv"])
            .ok()
            .json();
        assert_eq!(info["state"], "running");
        assert_eq!(info["agent"], s(&a.qga()));
        assert_eq!(info["current_snapshot"], Value::Null);
        let text = vsnap(state, &["domain", "info", "drv"]).ok().stdout.clone();
        assert!(text.contains("State:    running"), "{text}");
        let list = vsnap(state, &["domain", "list"]).ok().stdout.clone();
        assert!(
            list.lines()
                .any(|l| l.starts_with("drv ") && l.contains("running")),
            "{list}"
        );
        // dumpxml: text and JSON agree, and defining it again gives the same domain.
        let xml = vsnap(state, &["domain", "dumpxml", "drv"])
            .ok()
            .stdout
            .clone();
        let xj = vsnap(state, &["--json", "domain", "dumpxml", "drv"])
            .ok()
            .json();
        assert_eq!(xj["xml"], xml.as_str());
        assert!(
            xml.contains("name='org.qemu.guest_agent.0'") && xml.contains(s(&a.qga())),
            "{xml}"
        );
        let f = root.join("drv.xml");
        std::fs::write(&f, &xml).unwrap();
        vsnap(state, &["domain", "undefine", "drv"]).ok();
        let list = vsnap(state, &["--json", "domain", "list"]).ok().json();
        assert_eq!(list, json!([]), "undefined");
        vsnap(state, &["domain", "define", s(&f)]).ok();
        let again = vsnap(state, &["--json", "domain", "info", "drv"])
            .ok()
            .json();
        assert_eq!(again, info, "dumpxml output defines the same domain");
        vsnap(state, &["domain", "undefine", "drv"]).ok();
    });

    case("define_virsh_xml", || {
        let f = root.join("vm.xml");
        let srcs: Vec<PathBuf> = TARGETS.iter().map(|t| img(&format!("{t}.qcow2"))).collect();
        let d: Vec<(&str, &Path)> = TARGETS
            .iter()
            .zip(&srcs)
            .map(|(t, p)| (*t, p.as_path()))
            .collect();
        std::fs::write(&f, virsh_domain_xml("vm", &d, Some(a.qga().as_path()))).unwrap();
        let o = vsnap(state, &["domain", "define", s(&f), "--qmp", s(&qa)]);
        o.ok().stdout_has(&["defined domain vm (3 disk(s))"]);
        let info = vsnap(state, &["--json", "domain", "info", "vm"])
            .ok()
            .json();
        assert_eq!(info["name"], "vm");
        assert_eq!(info["uuid"], "5f0c9a4e-2b7d-4c1a-9e3f-7a6b8c9d0e1f");
        assert_eq!(info["state"], "running");
        assert_eq!(info["qmp"], s(&qa));
        assert_eq!(info["agent"], s(&a.qga()));
        let got: Vec<(&str, &str)> = info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["target"].as_str().unwrap(), x["source"].as_str().unwrap()))
            .collect();
        let want: Vec<(&str, &str)> = d.iter().map(|(t, p)| (*t, s(p))).collect();
        assert_eq!(got, want, "the cdrom is not a disk to snapshot");
        let list = vsnap(state, &["--json", "domain", "list"]).ok().json();
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["state"], "running");
        let xml = vsnap(state, &["domain", "dumpxml", "vm"])
            .ok()
            .stdout
            .clone();
        assert!(
            xml.contains("<uuid>5f0c9a4e-2b7d-4c1a-9e3f-7a6b8c9d0e1f</uuid>"),
            "{xml}"
        );
        assert!(xml.contains(s(&qa)) && xml.contains(s(&a.qga())), "{xml}");
        let o = vsnap(state, &["domain", "define", s(&f), "--qmp", s(&qa)]);
        assert_refused("define twice", &o, &["already defined", "undefine"]);
        // Nothing snapshotted yet: no current snapshot (exit 1).
        vsnap(state, &["snapshot", "current", "vm"]).expect_code(1);
    });

    // From here on guest A's block graph changes: the silent-agent case
    // (another thread) must be over.
    join_silent();

    // The writer must be writing: its start line, and numbers on the disks.
    a.wait_console("VSNAP-WRITER start", Duration::from_secs(60));
    let pre = wait_for(
        "the writer's numbers on vda",
        Duration::from_secs(60),
        || {
            let q = image_seq(&img("vda.qcow2"), scratch);
            (q.seq >= 10).then_some(q)
        },
    );

    case("live_external_subset", || {
        let o = vsnap(
            state,
            &[
                "--json",
                "snapshot",
                "create",
                "vm",
                "s1",
                "--live",
                "--disk-only",
                "--disk",
                "vdc=no",
            ],
        );
        let created = o.ok().json();
        assert_eq!(created["snapshot"]["state"], "disk-snapshot");
        assert!(qmp_status(&qa).0, "the guest kept running");
        // The files: an overlay for vda and vdb, none for vdc.
        let names: BTreeSet<String> = std::fs::read_dir(disks)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let want: BTreeSet<String> = [
            "vda.qcow2",
            "vdb.qcow2",
            "vdc.qcow2",
            "vda.s1.qcow2",
            "vdb.s1.qcow2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        assert_eq!(names, want);
        // QEMU: vda and vdb on the overlays, vdc on its own image still.
        let on = qemu_disks(&qa);
        assert_eq!(on["vda"], img("vda.s1.qcow2"));
        assert_eq!(on["vdb"], img("vdb.s1.qcow2"));
        assert_eq!(
            on["vdc"],
            img("vdc.qcow2"),
            "the excluded disk is still on its image"
        );
        for t in ["vda", "vdb"] {
            let i = img_info(&img(&format!("{t}.s1.qcow2")));
            assert_eq!(i["backing-filename"], s(&img(&format!("{t}.qcow2"))));
        }
        let vdc = img_info(&img("vdc.qcow2"));
        assert!(
            vdc.get("backing-filename").is_none(),
            "vdc got a backing file: {vdc}"
        );
        assert!(
            img_snapshots(&img("vdc.qcow2")).is_empty(),
            "vdc got a snapshot"
        );
        // From the images alone: the frozen state files show one instant,
        // taken while the writer ran.
        let sa = image_seq(&img("vda.qcow2"), scratch);
        let sb = image_seq(&img("vdb.qcow2"), scratch);
        say!(
            "s1 state: vda {} vdb {} (writer was at {} before)",
            sa.seq,
            sb.seq,
            pre.seq
        );
        assert!(
            sa.seq >= pre.seq,
            "the snapshot is older than what the writer had written before it"
        );
        assert_one_instant("s1", &[("vda", &sa), ("vdb", &sb)]);
        // The guest writes on, to the new overlays; the state files stay as they were.
        wait_for(
            "the writer to go on in the overlays",
            Duration::from_secs(60),
            || {
                let a2 = image_seq(&img("vda.s1.qcow2"), scratch);
                let b2 = image_seq(&img("vdb.s1.qcow2"), scratch);
                (a2.seq > sa.seq + 10 && b2.seq > sb.seq + 10).then_some(())
            },
        );
        for (t, q) in [("vda", &sa), ("vdb", &sb)] {
            let m = img_info(&img(&format!("{t}.s1.qcow2")));
            assert!(m["actual-size"].as_u64().unwrap() > 0);
            assert_eq!(
                &image_seq(&img(&format!("{t}.qcow2")), scratch),
                q,
                "{t}'s state file changed"
            );
        }
        // ...and to vdc's own image, which the snapshot left alone.
        let c = image_seq(&img("vdc.qcow2"), scratch);
        assert!(
            c.seq > sa.seq,
            "vdc is written on its own image: {} <= {}",
            c.seq,
            sa.seq
        );
        // query-block equals the catalog.
        let info = vsnap(state, &["--json", "domain", "info", "vm"])
            .ok()
            .json();
        let on = qemu_disks(&qa);
        for d in info["disks"].as_array().unwrap() {
            assert_eq!(
                on[d["target"].as_str().unwrap()],
                Path::new(d["source"].as_str().unwrap())
            );
        }
        assert_eq!(info["current_snapshot"], "s1");
        vsnap(state, &["domain", "check", "vm"]).ok();
        // The snapshot commands show it.
        let list = vsnap(state, &["--json", "snapshot", "list", "vm"])
            .ok()
            .json();
        assert_eq!(list.as_array().unwrap().len(), 1);
        let s1 = &list[0];
        assert_eq!(s1["name"], "s1");
        assert_eq!(s1["current"], true);
        assert_eq!(s1["parent"], Value::Null);
        assert_eq!(s1["quiesced"], false);
        let modes: Vec<(&str, &str)> = s1["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap(),
                    d["snapshot"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            modes,
            [("vda", "external"), ("vdb", "external"), ("vdc", "no")]
        );
        assert_eq!(s1["disks"][0]["state_file"], s(&img("vda.qcow2")));
        assert_eq!(s1["disks"][0]["overlay"], s(&img("vda.s1.qcow2")));
        assert_eq!(
            vsnap(state, &["snapshot", "current", "vm"])
                .ok()
                .stdout
                .trim(),
            "s1"
        );
        assert_eq!(
            vsnap(state, &["--json", "snapshot", "current", "vm"])
                .ok()
                .json()["name"],
            "s1"
        );
        let tl = vsnap(state, &["snapshot", "list", "vm"])
            .ok()
            .stdout
            .clone();
        assert!(
            tl.lines()
                .any(|l| l.starts_with("s1 ") && l.contains("vdc=no")),
            "{tl}"
        );
        let info = vsnap(state, &["--json", "snapshot", "info", "vm", "s1"])
            .ok()
            .json();
        assert_eq!(&info, s1);
        let text = vsnap(state, &["snapshot", "info", "vm"])
            .ok()
            .stdout
            .clone();
        assert!(
            text.contains("Name:        s1") && text.contains("State:       disk-snapshot"),
            "{text}"
        );
        let xml = vsnap(state, &["snapshot", "dumpxml", "vm", "s1"])
            .ok()
            .stdout
            .clone();
        for want in [
            "<name>s1</name>",
            "<state>disk-snapshot</state>",
            "<disk name='vdc' snapshot='no'/>",
            &format!("<source file='{}'/>", img("vda.s1.qcow2").display()),
            "<active>1</active>",
        ] {
            assert!(xml.contains(want), "dumpxml lacks {want}:\n{xml}");
        }
        assert_eq!(
            vsnap(state, &["--json", "snapshot", "dumpxml", "vm"])
                .ok()
                .json()["xml"],
            xml.as_str()
        );
        let o = vsnap(state, &["snapshot", "parent", "vm", "s1"]);
        o.expect_code(1).stderr_has(&["no parent"]);
    });

    case("quiesce_frozen_window", || {
        // The pivot's index, from the plan.
        let steps = dry_run_steps(
            state,
            &[
                "snapshot",
                "create",
                "vm",
                "q1",
                "--live",
                "--disk-only",
                "--quiesce",
                "--disk",
                "vdc=no",
            ],
        );
        let pivot = steps
            .iter()
            .position(|x| x.contains("[PIVOT"))
            .expect("a pivot");
        let freeze = steps
            .iter()
            .position(|x| x.contains("freeze"))
            .expect("a freeze step");
        assert!(
            freeze < pivot && steps[pivot].contains("transaction"),
            "{steps:#?}"
        );
        assert!(steps[pivot + 1].contains("thaw"), "{steps:#?}");
        // Kill vsnap right after the pivot: the filesystems are frozen now.
        let log = scratch.join("q1.failpoints");
        let crash = format!("run.applied.{pivot}");
        let (o, sig) = vsnap_env(
            fp_vsnap,
            state,
            &[
                "snapshot",
                "create",
                "vm",
                "q1",
                "--live",
                "--disk-only",
                "--quiesce",
                "--disk",
                "vdc=no",
            ],
            &[
                ("VSNAP_FAILPOINT_LOG", log.as_path()),
                ("VSNAP_CRASH_AT", Path::new(&crash)),
            ],
        );
        assert_eq!(sig, Some(9), "vsnap was not killed at {crash}: {o:?}");
        let points = std::fs::read_to_string(&log).unwrap();
        let points: Vec<&str> = points.lines().collect();
        assert_eq!(points.last(), Some(&crash.as_str()));
        let at = |n: &str| {
            points
                .iter()
                .position(|p| *p == n)
                .unwrap_or_else(|| panic!("no {n} in {points:?}"))
        };
        assert!(at("step.agent-freeze.before") < at("step.qmp-transaction.after"));
        // During the window: the agent says frozen, the disks are switched,
        // and the writer stands still.
        assert_eq!(agent(&a.qga(), "guest-fsfreeze-status"), "frozen");
        let on = qemu_disks(&qa);
        assert_eq!(on["vda"], img("vda.q1.qcow2"));
        assert_eq!(on["vdb"], img("vdb.q1.qcow2"));
        let f1 = image_seq(&img("vda.q1.qcow2"), scratch);
        let f2 = image_seq(&img("vda.q1.qcow2"), scratch);
        assert_eq!(f1, f2, "the writer moved while frozen");
        assert!(
            qmp_status(&qa).0,
            "the guest runs (frozen filesystems, not stopped CPUs)"
        );
        // Recovery rolls forward and thaws.
        let r = vsnap_recover(state, &["--json"]).ok().json();
        assert_eq!(r["plans"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["plans"][0]["outcome"], "committed", "{r}");
        assert!(
            r["plans"][0]["detail"]
                .as_str()
                .unwrap()
                .contains("rolled forward"),
            "{r}"
        );
        assert_eq!(agent(&a.qga(), "guest-fsfreeze-status"), "thawed");
        wait_for(
            "the writer to go on after the thaw",
            Duration::from_secs(60),
            || (image_seq(&img("vda.q1.qcow2"), scratch).seq > f1.seq + 5).then_some(()),
        );
        vsnap_recover(state, &[])
            .ok()
            .stdout_has(&["nothing to recover"]);
        let q1 = vsnap(state, &["--json", "snapshot", "info", "vm", "q1"])
            .ok()
            .json();
        assert_eq!(q1["quiesced"], true);
        assert_eq!(q1["current"], true);
        assert_eq!(q1["parent"], "s1");
        assert_eq!(
            vsnap(state, &["snapshot", "parent", "vm", "q1"])
                .ok()
                .stdout
                .trim(),
            "s1"
        );
        // The snapshot's filesystems are clean, and show one instant.
        let mut seqs = Vec::new();
        for d in q1["disks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["snapshot"] == "external")
        {
            let f = PathBuf::from(d["state_file"].as_str().unwrap());
            let raw = raw_copy(&f, scratch);
            let o = Out::from_command("e2fsck", &["-fn", s(&raw)]);
            assert_eq!(
                o.code,
                0,
                "e2fsck -fn of {} (a quiesced snapshot):\n{}{}",
                f.display(),
                o.stdout,
                o.stderr
            );
            std::fs::remove_file(&raw).unwrap();
            seqs.push((
                d["target"].as_str().unwrap().to_string(),
                image_seq(&f, scratch),
            ));
        }
        assert_eq!(seqs.len(), 2);
        assert_one_instant("q1", &[("vda", &seqs[0].1), ("vdb", &seqs[1].1)]);
        vsnap(state, &["domain", "check", "vm"]).ok();
    });

    case("internal_with_memory", || {
        let o = vsnap(
            state,
            &[
                "--json", "snapshot", "create", "vm", "m1", "--live", "--memory", "internal",
            ],
        );
        let m1 = o.ok().json();
        assert_eq!(m1["snapshot"]["memory"], "internal");
        assert_eq!(
            qmp_status(&qa),
            (true, "running".to_string()),
            "the guest runs after snapshot-save"
        );
        let on = qemu_disks(&qa);
        let mut vm_state = 0;
        for t in TARGETS {
            let i = img_info(&on[t]);
            let snaps = i["snapshots"].as_array().cloned().unwrap_or_default();
            let m = snaps.iter().find(|x| x["name"] == "m1");
            let m = m.unwrap_or_else(|| {
                panic!("{t} ({}) has no internal snapshot m1: {i}", on[t].display())
            });
            vm_state += m["vm-state-size"].as_u64().unwrap_or(0);
        }
        assert!(vm_state > 0, "no disk holds the memory state");
        let info = vsnap(state, &["--json", "snapshot", "info", "vm", "m1"])
            .ok()
            .json();
        assert_eq!(info["state"], "running");
        assert!(info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["snapshot"] == "internal"));
        vsnap(state, &["domain", "check", "vm"]).ok();
    });

    case("revert_internal_with_memory_in_the_same_qemu", || {
        // What m1 holds, disk by disk; then the guest moves on.
        let on = qemu_disks(&qa);
        let at: Vec<Seq> = TARGETS
            .iter()
            .map(|t| snapshot_seq(&on[*t], "m1", scratch))
            .collect();
        wait_for(
            "the writer to move past m1",
            Duration::from_secs(120),
            || (image_seq(&on["vda"], scratch).seq > at[0].seq + 2).then_some(()),
        );
        // A disk-only snapshot of a running guest needs QEMU started again
        // on new overlays: this domain (defined from XML, no --launch)
        // has no launch spec, so it is refused before anything is touched.
        let world = || world_of(state, "vm", disks, Some(qa.as_path()));
        let before = world();
        let o = vsnap(state, &["snapshot", "revert", "vm", "s1"]);
        assert_refused(
            "revert to s1 while running, no launch spec",
            &o,
            &["no launch spec", "--launch"],
        );
        assert_nothing_changed("revert to s1 while running", &before, &world());
        let r = vsnap(
            state,
            &["--json", "snapshot", "revert", "vm", "m1", "--paused"],
        )
        .ok()
        .json();
        assert_eq!(r["state"], "paused", "{r}");
        assert!(r["steps"].to_string().contains("snapshot-load"), "{r}");
        assert_eq!(qmp_status(&qa), (false, "paused".to_string()));
        // The same QEMU, its disks back at m1: the writer's numbers are m1's.
        assert_eq!(
            qemu_disks(&qa),
            on,
            "revert changed the images QEMU runs on"
        );
        for (t, want) in TARGETS.iter().zip(&at) {
            let got = image_seq(&on[*t], scratch);
            assert_eq!(
                (got.seq, got.boot),
                (want.seq, want.boot),
                "{t} after revert to m1"
            );
        }
        vsnap(state, &["domain", "check", "vm"]).ok();
        assert_eq!(
            vsnap(state, &["snapshot", "current", "vm"])
                .ok()
                .stdout
                .trim(),
            "m1"
        );
        // Running again, the writer goes on in the same boot, from m1's numbers.
        qmp(&qa, "cont");
        let next = wait_for(
            "the writer to write after the revert",
            Duration::from_secs(120),
            || {
                let x = image_seq(&on["vda"], scratch);
                (x.seq > at[0].seq).then_some(x)
            },
        );
        assert_eq!(
            next.boot, at[0].boot,
            "the guest rebooted: its memory was not loaded"
        );
    });

    case("paused_guest_stays_paused", || {
        qmp(&qa, "stop");
        assert_eq!(qmp_status(&qa), (false, "paused".to_string()));
        vsnap(
            state,
            &["snapshot", "create", "vm", "p1", "--live", "--disk-only"],
        )
        .ok();
        assert_eq!(
            qmp_status(&qa),
            (false, "paused".to_string()),
            "a paused guest stays paused"
        );
        let on = qemu_disks(&qa);
        for t in TARGETS {
            assert_eq!(on[t], img(&format!("{t}.p1.qcow2")));
        }
        assert_eq!(
            vsnap(state, &["--json", "snapshot", "info", "vm", "p1"])
                .ok()
                .json()["state"],
            "disk-snapshot"
        );
        vsnap(state, &["domain", "check", "vm"]).ok();
        qmp(&qa, "cont");
        assert!(qmp_status(&qa).0);
    });

    let world = || world_of(state, "vm", disks, Some(qa.as_path()));

    case("bad_quiesce_without_agent_channel", || {
        vsnap(state, &["domain", "attach", "noagent", "--qmp", s(&qa)]).ok();
        let before = world_of(state, "noagent", disks, Some(qa.as_path()));
        let o = vsnap(
            state,
            &[
                "snapshot",
                "create",
                "noagent",
                "x",
                "--live",
                "--disk-only",
                "--quiesce",
            ],
        );
        assert_refused(
            "--quiesce without an agent",
            &o,
            &["noagent", "agent", "--quiesce"],
        );
        assert_nothing_changed(
            "--quiesce without an agent",
            &before,
            &world_of(state, "noagent", disks, Some(qa.as_path())),
        );
        vsnap(state, &["domain", "undefine", "noagent"]).ok();
    });

    case("bad_xml_disk_the_domain_lacks", || {
        let f = root.join("vdz.xml");
        std::fs::write(
            &f,
            "<domainsnapshot>\n  <name>z1</name>\n  <disks>\n    <disk name='vda' snapshot='external'/>\n    <disk name='vdz' snapshot='external'>\n      <source file='/var/tmp/nowhere.qcow2'/>\n    </disk>\n  </disks>\n</domainsnapshot>\n",
        )
        .unwrap();
        let before = world();
        let o = vsnap(
            state,
            &[
                "snapshot",
                "create",
                "vm",
                "--xml",
                s(&f),
                "--live",
                "--disk-only",
            ],
        );
        assert_refused("<disk name='vdz'>", &o, &["vdz", "vda, vdb, vdc"]);
        assert_nothing_changed("<disk name='vdz'>", &before, &world());
    });

    // libvirt's <domainsnapshot> rules against the running guest: a
    // memory file without snapshot= is an external memory snapshot (not
    // "no memory"); <memory snapshot='no'/> is refused without
    // --disk-only (libvirt: an internal snapshot of a running guest holds
    // its memory) and with it makes overlays of the disks not excluded.
    case("xml_read_as_libvirt_reads_it", || {
        let mem = root.join("x1.mem");
        let f = root.join("x1.xml");
        std::fs::write(
            &f,
            format!(
                "<domainsnapshot><name>x1</name><memory file='{}'/><disks>\
                 <disk name='vda'><source file='{}'/></disk><disk name='vdb' snapshot='no'/>\
                 <disk name='vdc' snapshot='no'/></disks></domainsnapshot>",
                s(&mem),
                s(&img("vda.x1.qcow2"))
            ),
        )
        .unwrap();
        let steps = dry_run_steps(state, &["snapshot", "create", "vm", "--xml", s(&f)]);
        let all = steps.join("\n");
        assert!(
            all.contains("memory state") && all.contains("x1.mem"),
            "a memory file is an external memory snapshot:\n{all}"
        );
        assert!(all.contains(s(&img("vda.x1.qcow2"))), "{all}");
        assert!(
            !all.contains("vdb.qcow2") && !all.contains("vdc.qcow2"),
            "vdb and vdc are excluded:\n{all}"
        );
        let f = root.join("x2.xml");
        std::fs::write(
            &f,
            "<domainsnapshot><name>x2</name><memory snapshot='no'/><disks><disk name='vdc' snapshot='no'/></disks></domainsnapshot>",
        )
        .unwrap();
        let before = world();
        let o = vsnap(state, &["snapshot", "create", "vm", "--xml", s(&f)]);
        assert_refused(
            "memory no",
            &o,
            &["must include the memory state", "--disk-only"],
        );
        assert_nothing_changed("memory no", &before, &world());
        let steps = dry_run_steps(
            state,
            &["snapshot", "create", "vm", "--xml", s(&f), "--disk-only"],
        );
        let all = steps.join("\n");
        assert!(!all.contains("memory state"), "{all}");
        assert!(
            all.contains("vda.x2.qcow2") && all.contains("vdb.x2.qcow2") && !all.contains("vdc"),
            "overlays of vda and vdb only:\n{all}"
        );
    });

    case("bad_overlay_path_exists", || {
        let taken = img("taken.qcow2");
        std::fs::write(&taken, b"not vsnap's").unwrap();
        let before = world();
        let spec = format!("vda=external:{}", taken.display());
        let o = vsnap(
            state,
            &[
                "snapshot",
                "create",
                "vm",
                "e1",
                "--live",
                "--disk-only",
                "--disk",
                &spec,
                "--disk",
                "vdc=no",
            ],
        );
        assert_refused("existing overlay", &o, &[s(&taken), "already exists"]);
        assert_nothing_changed("existing overlay", &before, &world());
        assert_eq!(std::fs::read(&taken).unwrap(), b"not vsnap's");
        soft.check(
            !o.stderr.contains("--file"),
            format!("existing overlay: the error tells the user to use --file, which `vsnap snapshot create` does not have (it is --disk TARGET=external:PATH): {}", o.stderr.trim()),
        );
        std::fs::remove_file(&taken).unwrap();
    });

    case("bad_name_clash", || {
        let before = world();
        let o = vsnap(
            state,
            &[
                "snapshot",
                "create",
                "vm",
                "s1",
                "--live",
                "--disk-only",
                "--disk",
                "vdc=no",
            ],
        );
        assert_refused(
            "name clash",
            &o,
            &["\"s1\"", "already has a snapshot", "another name"],
        );
        assert_nothing_changed("name clash", &before, &world());
    });

    case("bad_read_only_image_directory", || {
        let before = world();
        let o = {
            let m = Mount::bind(disks, disks);
            m.remount_ro_bind();
            assert!(
                std::fs::write(img("probe"), b"x").is_err(),
                "the bind mount is not read-only"
            );
            let o = vsnap(
                state,
                &[
                    "snapshot",
                    "create",
                    "vm",
                    "r1",
                    "--live",
                    "--disk-only",
                    "--disk",
                    "vdc=no",
                ],
            );
            assert!(
                qmp_status(&qa).0,
                "the guest runs under the read-only mount"
            );
            o
        };
        assert_refused("read-only directory", &o, &[s(disks), "not writable"]);
        assert_nothing_changed("read-only directory", &before, &world());
        soft.check(
            !o.stderr.contains("--file"),
            format!("read-only directory: the error mentions --file, which `vsnap snapshot create` does not have (it is --disk TARGET=external:PATH): {}", o.stderr.trim()),
        );
    });

    case("offline_internal_and_external", || {
        // A clean shutdown through the agent: the guest unmounts, QEMU exits.
        agent(&a.qga(), "guest-shutdown");
        wait_for("guest A's QEMU to exit", Duration::from_secs(60), || {
            (!a.alive()).then_some(())
        });
        let info = vsnap(state, &["--json", "domain", "info", "vm"])
            .ok()
            .json();
        assert_eq!(info["state"], "shutoff");
        let tops: Vec<PathBuf> = info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| PathBuf::from(d["source"].as_str().unwrap()))
            .collect();
        assert_eq!(tops, TARGETS.map(|t| img(&format!("{t}.p1.qcow2"))));
        let o = vsnap(
            state,
            &["snapshot", "create", "vm", "--live", "off0", "--disk-only"],
        );
        assert_refused("--live on a shut-off guest", &o, &["not running", "--live"]);
        // Internal (qcow2's default offline).
        let off1 = vsnap(state, &["--json", "snapshot", "create", "vm", "off1"])
            .ok()
            .json();
        assert_eq!(off1["snapshot"]["state"], "shutoff");
        for t in &tops {
            assert!(
                img_snapshots(t).contains(&"off1".to_string()),
                "{} lacks off1",
                t.display()
            );
        }
        // External, every disk.
        vsnap(
            state,
            &[
                "snapshot",
                "create",
                "vm",
                "off2",
                "--disk",
                "vda=external",
                "--disk",
                "vdb=external",
                "--disk",
                "vdc=external",
            ],
        )
        .ok();
        let info = vsnap(state, &["--json", "domain", "info", "vm"])
            .ok()
            .json();
        for (d, t) in info["disks"].as_array().unwrap().iter().zip(&tops) {
            let src = PathBuf::from(d["source"].as_str().unwrap());
            assert_eq!(
                src,
                img(&format!("{}.off2.qcow2", d["target"].as_str().unwrap()))
            );
            assert_eq!(img_info(&src)["backing-filename"], s(t));
        }
        assert_eq!(info["current_snapshot"], "off2");
        vsnap(state, &["domain", "check", "vm"]).ok();
        let names = vsnap(state, &["snapshot", "list", "vm", "--name"])
            .ok()
            .stdout
            .clone();
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            ["s1", "q1", "m1", "p1", "off1", "off2"]
        );
        let tree = vsnap(state, &["snapshot", "list", "vm", "--tree"])
            .ok()
            .stdout
            .clone();
        assert!(tree.contains("off2  (current)"), "{tree}");
        // The guest shut down cleanly: its filesystems are clean.
        for t in TARGETS {
            let raw = raw_copy(&img(&format!("{t}.off2.qcow2")), scratch);
            let o = Out::from_command("e2fsck", &["-fn", s(&raw)]);
            assert_eq!(
                o.code, 0,
                "e2fsck -fn {t} after a clean shutdown:\n{}{}",
                o.stdout, o.stderr
            );
            std::fs::remove_file(&raw).unwrap();
        }
    });
}

/// The `STOP` and `RESUME` events a second monitor saw: the pause window
/// (QEMU's own timestamps), or None when the guest was not paused.
fn pause_window(mon: &mut vsnap_steps::qmp::Qmp) -> Option<Duration> {
    let ev = mon.poll_events().expect("events on the second monitor");
    let stop = ev.iter().find(|e| e.name == "STOP")?;
    let resume = ev.iter().find(|e| e.name == "RESUME").unwrap_or_else(|| {
        panic!(
            "STOP without RESUME: {:?}",
            ev.iter().map(|e| &e.name).collect::<Vec<_>>()
        )
    });
    Some(resume.timestamp.since(&stop.timestamp))
}

/// Guest C: vda and vdc raw, vdb qcow2, all on a loop-mounted btrfs, the
/// writer running. Reflink clones of the raw disks inside one pause
/// (with vdb's external overlay switched in the same pause), a paused
/// guest that stays paused, bad input, and `--halt` last (QEMU exits).
fn guest_c_cases(root: &Path, scratch: &Path, fp_vsnap: &Path) {
    let mnt = root.join("c-btrfs");
    let _m = Mount::btrfs(&root.join("c-btrfs.img"), &mnt, "512M");
    let disks = mnt.join("disks");
    std::fs::create_dir(&disks).unwrap();
    let img = |name: &str| disks.join(name);
    for t in ["vda", "vdc"] {
        let raw = img(&format!("{t}.raw"));
        run_ok("truncate", &["-s", "64M", s(&raw)]);
        run_ok("mkfs.ext4", &["-q", "-F", s(&raw)]);
    }
    make_ext4_qcow2(&img("vdb.qcow2"));
    let a = img("vda.raw");
    let b = img("vdb.qcow2");
    let c = img("vdc.raw");
    let guest = Guest::start(
        "C",
        &root.join("c-run"),
        &["--qmp2"],
        &[
            Path::new(&format!("{}:raw", s(&a))),
            b.as_path(),
            Path::new(&format!("{}:raw", s(&c))),
        ],
    );
    let state = root.join("state-c");
    let qc = guest.qmp();
    let boot = guest.wait_console("VSNAP-WRITER start", Duration::from_secs(180));
    say!("guest C writing (waited {:.1} s)", boot.as_secs_f64());
    vsnap(
        &state,
        &[
            "domain",
            "attach",
            "vmc",
            "--qmp",
            s(&qc),
            "--agent",
            s(&guest.qga()),
        ],
    )
    .ok();
    let pre = wait_for(
        "the writer's numbers on vda",
        Duration::from_secs(60),
        || {
            let q = image_seq(&a, scratch);
            (q.seq >= 10).then_some(q)
        },
    );
    let files = || -> BTreeSet<String> {
        std::fs::read_dir(&disks)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };

    case("reflink_live_quiesced_with_external", || {
        let args = [
            "snapshot",
            "create",
            "vmc",
            "r1",
            "--live",
            "--disk-only",
            "--quiesce",
            "--disk",
            "vda=reflink",
            "--disk",
            "vdc=reflink",
        ];
        // The plan: overlay work first, then freeze, stop, the clones,
        // the transaction as the pivot, cont, thaw.
        let steps = dry_run_steps(&state, &args);
        let at = |w: &str| {
            steps
                .iter()
                .position(|x| x.contains(w))
                .unwrap_or_else(|| panic!("no step with {w:?}: {steps:#?}"))
        };
        let pivot = at("[PIVOT");
        assert!(steps[pivot].contains("transaction"), "{steps:#?}");
        assert!(
            at("blockdev-add") < at("freeze")
                && at("freeze") < at("(stop)")
                && at("(stop)") < at("reflink")
                && at("rename") < pivot
                && pivot < at("(cont)")
                && at("(cont)") < at("thaw"),
            "{steps:#?}"
        );
        let mut mon =
            vsnap_steps::qmp::Qmp::connect(&guest.dir.join("qmp2.sock"), Duration::from_secs(10))
                .expect("guest C's second monitor");
        mon.poll_events().unwrap();
        let t = Instant::now();
        vsnap(&state, &args).ok();
        let took = t.elapsed();
        let window = pause_window(&mut mon).expect("the guest was paused (STOP, RESUME)");
        say!(
            "r1: pause window (STOP to RESUME, QEMU's clock) {:.1} ms; whole command {:.0} ms",
            window.as_secs_f64() * 1000.0,
            took.as_secs_f64() * 1000.0
        );
        assert!(window < Duration::from_secs(5), "pause window {window:?}");
        assert!(qmp_status(&qc).0, "the guest runs again");
        assert_eq!(agent(&guest.qga(), "guest-fsfreeze-status"), "thawed");
        let want: BTreeSet<String> = [
            "vda.raw",
            "vdb.qcow2",
            "vdc.raw",
            "vda.r1.raw",
            "vdb.r1.qcow2",
            "vdc.r1.raw",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        assert_eq!(files(), want, "the clones, the overlay, no temporary file");
        // QEMU: the raw disks stay on their images, vdb is on its overlay.
        let on = qemu_disks(&qc);
        assert_eq!(on["vda"], a);
        assert_eq!(on["vdb"], img("vdb.r1.qcow2"));
        assert_eq!(on["vdc"], c);
        // One instant across the clones and vdb's frozen state, taken while
        // the writer ran; clean filesystems (quiesced).
        let sa = image_seq(&img("vda.r1.raw"), scratch);
        let sb = image_seq(&b, scratch);
        let sc = image_seq(&img("vdc.r1.raw"), scratch);
        say!(
            "r1 state: vda {} vdb {} vdc {} (writer was at {} before)",
            sa.seq,
            sb.seq,
            sc.seq,
            pre.seq
        );
        assert!(sa.seq >= pre.seq);
        assert_one_instant("r1", &[("vda", &sa), ("vdb", &sb), ("vdc", &sc)]);
        for clone in ["vda.r1.raw", "vdc.r1.raw"] {
            let o = Out::from_command("e2fsck", &["-n", "-f", s(&img(clone))]);
            assert_eq!(o.code, 0, "e2fsck -n {clone}:\n{}{}", o.stdout, o.stderr);
        }
        // The writer goes on, on the raw images and the overlay; the clones stay.
        wait_for("the writer to go on", Duration::from_secs(60), || {
            let a2 = image_seq(&a, scratch);
            let b2 = image_seq(&img("vdb.r1.qcow2"), scratch);
            (a2.seq > sa.seq + 10 && b2.seq > sb.seq + 10).then_some(())
        });
        assert_eq!(
            image_seq(&img("vda.r1.raw"), scratch),
            sa,
            "the clone changed"
        );
        // The catalog.
        let info = vsnap(&state, &["--json", "snapshot", "info", "vmc", "r1"])
            .ok()
            .json();
        let modes: Vec<(&str, &str, &str)> = info["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap(),
                    d["snapshot"].as_str().unwrap(),
                    d["state_file"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            modes,
            [
                ("vda", "reflink", s(&img("vda.r1.raw"))),
                ("vdb", "external", s(&b)),
                ("vdc", "reflink", s(&img("vdc.r1.raw"))),
            ]
        );
        let dom = vsnap(&state, &["--json", "domain", "info", "vmc"])
            .ok()
            .json();
        let sources: Vec<&str> = dom["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["source"].as_str().unwrap())
            .collect();
        assert_eq!(sources, [s(&a), s(&img("vdb.r1.qcow2")), s(&c)]);
        let xml = vsnap(&state, &["snapshot", "dumpxml", "vmc", "r1"])
            .ok()
            .stdout
            .clone();
        assert!(
            xml.contains("<kind>reflink</kind>") && xml.contains(s(&img("vda.r1.raw"))),
            "{xml}"
        );
        vsnap(&state, &["domain", "check", "vmc"]).ok();
    });

    case("reflink_paused_guest_stays_paused", || {
        qmp(&qc, "stop");
        let mut mon =
            vsnap_steps::qmp::Qmp::connect(&guest.dir.join("qmp2.sock"), Duration::from_secs(10))
                .expect("guest C's second monitor");
        mon.poll_events().unwrap();
        let o = vsnap(
            &state,
            &[
                "--json",
                "snapshot",
                "create",
                "vmc",
                "r2",
                "--disk-only",
                "--disk",
                "vda=reflink",
                "--disk",
                "vdb=no",
                "--disk",
                "vdc=no",
            ],
        );
        let j = o.ok().json();
        let steps = j["steps"].to_string();
        assert!(
            !steps.contains("(stop)") && !steps.contains("(cont)"),
            "a paused guest needs no stop/cont: {steps}"
        );
        assert_eq!(qmp_status(&qc), (false, "paused".into()), "still paused");
        assert!(
            pause_window(&mut mon).is_none(),
            "vsnap paused or resumed the guest"
        );
        assert!(img("vda.r2.raw").is_file());
        assert_eq!(
            image_seq(&img("vda.r2.raw"), scratch),
            image_seq(&a, scratch),
            "a paused guest's clone is its image"
        );
        vsnap(&state, &["domain", "check", "vmc"]).ok();
        qmp(&qc, "cont");
    });

    case("reflink_bad_input", || {
        let before = world_of(&state, "vmc", &disks, Some(&qc));
        let o = vsnap(
            &state,
            &[
                "snapshot",
                "create",
                "vmc",
                "x1",
                "--disk-only",
                "--disk",
                "vdb=reflink",
            ],
        );
        assert_refused(
            "reflink of a qcow2 disk",
            &o,
            &["vdb", "raw", "--disk vdb=external"],
        );
        let elsewhere = scratch.join("vda.x1.raw");
        let o = vsnap(
            &state,
            &[
                "snapshot",
                "create",
                "vmc",
                "x1",
                "--disk-only",
                "--disk",
                &format!("vda=reflink:{}", s(&elsewhere)),
            ],
        );
        assert_refused(
            "a clone on another filesystem",
            &o,
            &["vda", "reflink", "--disk vda=external"],
        );
        let o = vsnap(
            &state,
            &[
                "snapshot",
                "create",
                "vmc",
                "x1",
                "--disk",
                "vda=reflink",
                "--memory",
                "internal",
            ],
        );
        assert_refused(
            "reflink with a memory snapshot",
            &o,
            &["vda", "--disk-only"],
        );
        assert!(!elsewhere.exists());
        assert_nothing_changed(
            "bad reflink input",
            &before,
            &world_of(&state, "vmc", &disks, Some(&qc)),
        );
        std::fs::write(img("vda.x1.raw"), b"not ours").unwrap();
        let before = world_of(&state, "vmc", &disks, Some(&qc));
        let o = vsnap(
            &state,
            &[
                "snapshot",
                "create",
                "vmc",
                "x1",
                "--disk-only",
                "--disk",
                "vda=reflink",
            ],
        );
        assert_refused(
            "the clone's name exists",
            &o,
            &["vda.x1.raw", "already exists", "reflink:PATH"],
        );
        assert_nothing_changed(
            "the clone's name exists",
            &before,
            &world_of(&state, "vmc", &disks, Some(&qc)),
        );
        std::fs::remove_file(img("vda.x1.raw")).unwrap();
    });

    case("memory_external_with_reflink_and_external", || {
        let mem = disks.join("m1.mem");
        let o = vsnap(
            &state,
            &[
                "snapshot",
                "create",
                "vmc",
                "x2",
                "--disk-only",
                "--memory",
                &format!("external:{}", s(&mem)),
            ],
        );
        assert_refused(
            "--disk-only with --memory external",
            &o,
            &["--disk-only", "--memory external"],
        );
        let taken = scratch.join("taken.mem");
        std::fs::write(&taken, b"not ours").unwrap();
        let o = vsnap(
            &state,
            &[
                "snapshot",
                "create",
                "vmc",
                "x2",
                "--memory",
                &format!("external:{}", s(&taken)),
            ],
        );
        assert_refused(
            "an existing memory file",
            &o,
            &["taken.mem", "already exists", "--memory external:PATH"],
        );
        assert_eq!(std::fs::read(&taken).unwrap(), b"not ours");
        assert!(qmp_status(&qc).0, "a refusal leaves the guest running");
        let mut mon =
            vsnap_steps::qmp::Qmp::connect(&guest.dir.join("qmp2.sock"), Duration::from_secs(10))
                .expect("guest C's second monitor");
        mon.poll_events().unwrap();
        let pre = image_seq(&a, scratch);
        let t = Instant::now();
        let j = vsnap(
            &state,
            &[
                "--json",
                "snapshot",
                "create",
                "vmc",
                "m1",
                "--memory",
                &format!("external:{}", s(&mem)),
                "--disk",
                "vda=reflink",
                "--disk",
                "vdc=reflink",
            ],
        )
        .ok()
        .json();
        let took = t.elapsed();
        let window = pause_window(&mut mon).expect("the guest was paused (STOP, RESUME)");
        say!(
            "m1: pause window {:.1} ms (memory {} MB to a file, 2 clones, 1 overlay); whole command {:.0} ms",
            window.as_secs_f64() * 1000.0,
            std::fs::metadata(&mem).map(|m| m.len() >> 20).unwrap_or(0),
            took.as_secs_f64() * 1000.0
        );
        let steps = j["steps"].to_string();
        assert!(steps.contains("memory state"), "{steps}");
        assert_eq!(j["snapshot"]["memory"], "external");
        assert_eq!(j["snapshot"]["memory_file"], s(&mem));
        assert_eq!(j["snapshot"]["state"], "running");
        assert!(qmp_status(&qc).0, "the guest runs again");
        // A real migration stream, private to root.
        let head = std::fs::read(&mem).unwrap();
        assert_eq!(&head[..4], b"QEVM", "QEMU's migration magic");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&mem).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            !files().iter().any(|f| f.starts_with(".vsnap-")),
            "{:?}",
            files()
        );
        let sa = image_seq(&img("vda.m1.raw"), scratch);
        let sb = image_seq(&img("vdb.r1.qcow2"), scratch);
        let sc = image_seq(&img("vdc.m1.raw"), scratch);
        assert!(sa.seq >= pre.seq);
        assert_one_instant("m1", &[("vda", &sa), ("vdb", &sb), ("vdc", &sc)]);
        let xml = vsnap(&state, &["snapshot", "dumpxml", "vmc", "m1"])
            .ok()
            .stdout
            .clone();
        assert!(
            xml.contains(&format!("<memory snapshot='external' file='{}'/>", s(&mem))),
            "{xml}"
        );
        vsnap(&state, &["domain", "check", "vmc"]).ok();
        // The memory and the disks are one state: a new QEMU started from
        // copies of the snapshot's disks and the memory file resumes the
        // guest where it was (no boot), and its writer goes on from the
        // snapshot's numbers, in the same boot.
        let rdir = root.join("c-restore");
        std::fs::create_dir(&rdir).unwrap();
        let (ra, rb, rc) = (
            rdir.join("vda.raw"),
            rdir.join("vdb.qcow2"),
            rdir.join("vdc.raw"),
        );
        run_ok("cp", &["--reflink=auto", s(&img("vda.m1.raw")), s(&ra)]);
        run_ok("cp", &["--reflink=auto", s(&img("vdc.m1.raw")), s(&rc)]);
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-O",
                "qcow2",
                s(&img("vdb.r1.qcow2")),
                s(&rb),
            ],
        );
        let restored = Guest::start(
            "C-restored",
            &root.join("c-restore-run"),
            &["--qmp2", "--incoming", &format!("exec:cat {}", s(&mem))],
            &[
                Path::new(&format!("{}:raw", s(&ra))),
                rb.as_path(),
                Path::new(&format!("{}:raw", s(&rc))),
            ],
        );
        let rq = restored.qmp();
        wait_for("the memory state to load", Duration::from_secs(60), || {
            qmp_try(&rq, "query-status", Value::Null)
                .ok()
                .filter(|v| v["status"] == "paused")
        });
        qmp(&rq, "cont");
        let r = wait_for(
            "the restored writer to go on",
            Duration::from_secs(60),
            || {
                let q = image_seq(&ra, scratch);
                (q.seq > sa.seq + 5).then_some(q)
            },
        );
        assert_eq!(
            r.boot, sa.boot,
            "the restored guest booted again instead of resuming"
        );
        assert!(
            !restored.console().contains("VSNAP-GUEST-READY"),
            "the restored guest booted: {}",
            restored.console()
        );
        let rb2 = image_seq(&rb, scratch);
        assert!(rb2.seq > sb.seq, "vdb: {} <= {}", rb2.seq, sb.seq);
        say!(
            "m1 restored: writer went on from vda {} to {} (boot {})",
            sa.seq,
            r.seq,
            r.boot
        );
        restored.kill();
    });

    case("halt_killed_before_quit_then_recovered", || {
        let args = [
            "snapshot",
            "create",
            "vmc",
            "h1",
            "--disk-only",
            "--halt",
            "--disk",
            "vda=reflink",
            "--disk",
            "vdc=no",
        ];
        let steps = dry_run_steps(&state, &args);
        assert!(
            steps.last().unwrap().contains("retriable") && steps.last().unwrap().contains("quits"),
            "{steps:#?}"
        );
        assert!(steps.iter().any(|x| x.contains("(stop)")), "{steps:#?}");
        assert!(!steps.iter().any(|x| x.contains("(cont)")), "{steps:#?}");
        // vsnap dies after the pivot, just before QEMU is told to quit:
        // the snapshot is taken, the guest paused; recovery finishes the halt.
        let (o, sig) = vsnap_env(
            fp_vsnap,
            &state,
            &args,
            &[("VSNAP_CRASH_AT", Path::new("step.qmp-quit.before"))],
        );
        assert_eq!(sig, Some(9), "vsnap was not killed before quit: {o:?}");
        assert!(guest.alive());
        assert_eq!(
            qmp_status(&qc),
            (false, "paused".into()),
            "paused, not resumed"
        );
        let r = vsnap_recover(&state, &["--json"]).ok().json();
        assert_eq!(r["plans"][0]["outcome"], "committed", "{r}");
        wait_for("QEMU to exit after --halt", Duration::from_secs(30), || {
            (!guest.alive()).then_some(())
        });
        vsnap_recover(&state, &[])
            .ok()
            .stdout_has(&["nothing to recover"]);
        let info = vsnap(&state, &["--json", "domain", "info", "vmc"])
            .ok()
            .json();
        assert_eq!(info["state"], "shutoff");
        assert_eq!(info["current_snapshot"], "h1");
        // Paused before the snapshot and never resumed: what the images
        // hold now is exactly the snapshot's instant.
        let ha = image_seq(&img("vda.h1.raw"), scratch);
        let hb = image_seq(&img("vdb.m1.qcow2"), scratch);
        assert_one_instant("h1", &[("vda", &ha), ("vdb", &hb)]);
        assert_eq!(image_seq(&a, scratch), ha, "vda changed after the snapshot");
        assert_eq!(
            image_seq(&img("vdb.h1.qcow2"), scratch),
            hb,
            "vdb changed after the snapshot"
        );
        vsnap(&state, &["domain", "check", "vmc"]).ok();
    });

    case("offline_reflink_and_halt_on_a_shut_off_guest", || {
        let j = vsnap(
            &state,
            &[
                "--json",
                "snapshot",
                "create",
                "vmc",
                "h2",
                "--halt",
                "--disk",
                "vda=reflink",
                "--disk",
                "vdb=no",
                "--disk",
                "vdc=reflink",
            ],
        )
        .ok()
        .json();
        let steps = j["steps"].to_string();
        assert!(
            !steps.contains("QMP") && steps.contains("reflink"),
            "an offline plan: {steps}"
        );
        assert_eq!(j["snapshot"]["state"], "shutoff");
        for (clone, img0) in [("vda.h2.raw", &a), ("vdc.h2.raw", &c)] {
            assert_eq!(
                std::fs::read(img(clone)).unwrap(),
                std::fs::read(img0).unwrap(),
                "{clone} is not a copy of its image"
            );
        }
        vsnap(&state, &["domain", "check", "vmc"]).ok();
    });
    drop(guest);
}
