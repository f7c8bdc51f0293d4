//! What the live benchmarks (`pause.rs`, `vs_libvirt.rs`) share: running
//! commands, the release `vsnap`, the test guest (`guest/run.sh
//! --blockdev`, ended by its guard), reading its block graph over QMP, and
//! putting it back to its boot-time graph between measurements.

#![allow(dead_code)] // each bench uses its own part

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::live;
use vsnap_steps::qmp::Qmp;
use vsnap_steps::StepResult;

/// Timeout of the benches' own QMP calls (a loaded machine is slow, but
/// nothing may hang forever).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(60);
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated list of positive numbers (`1,4,16`).
pub fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect()
}

pub fn ok<T>(r: StepResult<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// Run a command to completion; its stdout, or a panic with its stderr.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command to completion, output discarded; how long it took, or a
/// panic with its stderr.
pub fn timed(cmd: &mut Command) -> Duration {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let t = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

/// The release `vsnap` cargo built for the bench (built here if missing).
pub fn vsnap_binary() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vsnap"));
    if exe.is_file() {
        return exe;
    }
    let root = repo_root();
    eprintln!(
        "{} is missing: cargo build --release -p vsnap-cli",
        exe.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["build", "--release", "-p", "vsnap-cli"])
        .current_dir(&root));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("vsnap");
    assert!(
        bin.is_file(),
        "{} still missing after the build",
        bin.display()
    );
    bin
}

/// `vsnap --state-dir STATE`, to add arguments to.
pub fn vsnap_cmd(vsnap: &Path, state: &Path) -> Command {
    let mut c = Command::new(vsnap);
    c.arg("--state-dir").arg(state);
    c
}

/// Whether `pid` is a live (not zombie) QEMU process.
pub fn qemu_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (comm) S ...": comm may hold spaces; the state follows the last ')'.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let comm = stat.split_once('(').map(|x| x.1).unwrap_or("");
    let state = stat[close + 1..].trim_start().chars().next().unwrap_or('X');
    comm.starts_with("qemu-system") && !matches!(state, 'Z' | 'X')
}

/// Poll `cond` until it holds or `timeout` passes (a short sleep between
/// polls; never a fixed wait).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `VSNAP-GUEST-READY` on a console log while `alive` holds;
/// returns the line.
pub fn wait_ready(console: &Path, mut alive: impl FnMut() -> bool) -> String {
    let mut line = String::new();
    let mut dead = false;
    let found = wait_until(BOOT_TIMEOUT, || {
        let log = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.contains("VSNAP-GUEST-READY")) {
            line = l.trim().to_string();
            return true;
        }
        if !alive() {
            dead = true;
            return true;
        }
        false
    });
    let tail = || std::fs::read_to_string(console).unwrap_or_default();
    assert!(!dead, "QEMU exited during boot; console:\n{}", tail());
    assert!(
        found,
        "no VSNAP-GUEST-READY within {BOOT_TIMEOUT:?}; console:\n{}",
        tail()
    );
    line
}

/// A running test guest (`guest/run.sh --blockdev`, 256 MiB). Dropping it
/// ends QEMU: QMP `quit`, then SIGKILL by its pid if it has not exited
/// within 5 s.
pub struct Guest {
    pub qmp: PathBuf,
    pub agent: PathBuf,
    pub console: PathBuf,
    pub pid: u32,
    pub accel: String,
}

impl Guest {
    pub fn boot(dir: &Path, disks: &[PathBuf]) -> Guest {
        let out = run(Command::new(repo_root().join("guest/run.sh"))
            .arg("-d")
            .arg(dir)
            .arg("--blockdev")
            .args(disks.iter().map(|d| format!("{}:qcow2", d.display()))));
        let dir = PathBuf::from(out.trim());
        let pid: u32 = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no qemu.pid in {} after guest/run.sh", dir.display()));
        let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap_or_default();
        let accel = if cmdline.contains("accel=kvm") {
            "kvm"
        } else {
            "tcg"
        };
        Guest {
            qmp: dir.join("qmp.sock"),
            agent: dir.join("qga.sock"),
            console: dir.join("console.log"),
            pid,
            accel: accel.into(),
        }
    }

    /// Waits for `VSNAP-GUEST-READY` on the console; returns the line.
    pub fn wait_ready(&self) -> String {
        wait_ready(&self.console, || qemu_alive(self.pid))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if !qemu_alive(self.pid) {
            return;
        }
        if let Ok(mut q) = Qmp::connect(&self.qmp, Duration::from_secs(2)) {
            let _ = q.quit();
        }
        if !wait_until(Duration::from_secs(5), || !qemu_alive(self.pid)) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            wait_until(Duration::from_secs(5), || !qemu_alive(self.pid));
        }
    }
}

/// One disk of the guest as QEMU shows it after boot.
pub struct Disk {
    /// `query-block`'s key (`qdev` with -blockdev), as vsnap matches it.
    pub key: String,
    /// The device's top node at boot (its top again between measurements).
    pub base_node: String,
    /// That node's file.
    pub base_file: PathBuf,
}

/// The guest's disks as `query-block` shows them, in the order of
/// `files` (their top images at boot).
pub fn disks_at_boot(q: &mut Qmp, files: &[PathBuf]) -> Vec<Disk> {
    let blocks = ok(q.query_block(), "query-block");
    files
        .iter()
        .map(|f| {
            let canon = std::fs::canonicalize(f).expect("disk path");
            let entry = blocks
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["inserted"]["file"].as_str().map(Path::new) == Some(canon.as_path()))
                .unwrap_or_else(|| panic!("query-block does not show {}", f.display()));
            Disk {
                key: vsnap_engine::testing::block_key(entry),
                base_node: entry["inserted"]["node-name"]
                    .as_str()
                    .expect("node-name")
                    .to_string(),
                base_file: canon,
            }
        })
        .collect()
}

pub fn top_nodes(q: &mut Qmp, disks: &[Disk]) -> Vec<String> {
    let blocks = ok(q.query_block_typed(), "query-block");
    disks
        .iter()
        .map(|d| {
            live::top_node(&blocks, &d.key)
                .unwrap_or_else(|| panic!("query-block has no device {}", d.key))
        })
        .collect()
}

/// Every node: (node-name, driver).
pub fn node_names(q: &mut Qmp) -> Vec<(String, String)> {
    let nodes = ok(q.query_named_block_nodes(), "query-named-block-nodes");
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let s = |k: &str| n.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            (s("node-name"), s("drv"))
        })
        .collect()
}

/// Back to the boot-time graph (untimed): checks that every disk was
/// switched, commits each disk's new top into its boot-time top (an
/// active commit with `base-node`, not into the chain's bottom, QEMU's
/// default: ready, complete), deletes the overlay nodes that remain
/// (added with blockdev-add), and checks that exactly the boot-time nodes
/// are left, each disk on its boot-time top.
pub fn commit_back(qmp: &Path, disks: &[Disk], boot_nodes: &BTreeSet<String>, what: &str) {
    let mut q = ok(live::qmp(qmp), "connect");
    q.set_timeout(QMP_TIMEOUT);
    let tops = top_nodes(&mut q, disks);
    let mut jobs = Vec::new();
    for (k, (d, top)) in disks.iter().zip(&tops).enumerate() {
        assert_ne!(
            top, &d.base_node,
            "{what}: disk {} was not switched to an overlay",
            d.key
        );
        let job = format!("flat{k}");
        ok(
            q.execute(
                "block-commit",
                json!({"job-id": job, "device": top, "base-node": d.base_node}),
            ),
            "block-commit",
        );
        jobs.push(job);
    }
    for job in &jobs {
        ok(
            q.wait_event_where(
                "BLOCK_JOB_READY",
                |e| e.data["device"] == job.as_str(),
                QMP_TIMEOUT,
            ),
            "BLOCK_JOB_READY",
        );
    }
    for job in &jobs {
        ok(
            q.execute("job-complete", json!({ "id": job })),
            "job-complete",
        );
    }
    for job in &jobs {
        let e = ok(
            q.wait_event_where(
                "BLOCK_JOB_COMPLETED",
                |e| e.data["device"] == job.as_str(),
                QMP_TIMEOUT,
            ),
            "BLOCK_JOB_COMPLETED",
        );
        if let Some(err) = e.data.get("error") {
            panic!("{what}: commit job {job} failed: {err}");
        }
    }
    for (name, drv) in node_names(&mut q) {
        if !boot_nodes.contains(&name) && drv != "file" {
            ok(q.blockdev_del(&name), "blockdev-del");
        }
    }
    let left: BTreeSet<String> = node_names(&mut q).into_iter().map(|n| n.0).collect();
    assert_eq!(
        &left, boot_nodes,
        "{what}: nodes left after the commit-back"
    );
    for (d, top) in disks.iter().zip(top_nodes(&mut q, disks)) {
        assert_eq!(top, d.base_node, "{what}: top after the commit-back");
    }
}

/// Nearest-rank percentile, in milliseconds.
pub fn pct(v: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * ms.len() as f64).ceil().max(1.0) as usize;
    ms[rank.min(ms.len()) - 1]
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
