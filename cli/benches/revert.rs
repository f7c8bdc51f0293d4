//! Reverts, whole command, against the floor measured in the same run,
//! interleaved:
//!
//! | series | vsnap | floor |
//! |---|---|---|
//! | volume, internal | `vsnap vol snapshot revert IMG s1` (in place) | `qemu-img snapshot -a s1 IMG` on a twin image |
//! | domain, internal with memory, running guest | `vsnap snapshot revert g m1` | QMP `snapshot-load` of m1 on the same QEMU (vsnap-steps' client, connect to job end) |
//! | domain, external disk-only, running guest, 1 and 4 disks | `vsnap snapshot revert g d1` (QEMU quits, new overlays, QEMU started again) | the gap from the old QEMU's exit to the new guest running is reported beside it |
//!
//! The volume image is VSNAP_BENCH_MB MiB (default 1024) with half of it
//! written before the snapshot and a quarter after; before every timed
//! revert a quarter is written again (outside the timed region), so each
//! revert has the same work. The domain series boots the test guest
//! (guest/run.sh --blockdev, one 64 MiB qcow2 disk, the writer off),
//! attaches it, takes `m1 --memory internal`, and then reverts it to m1
//! over and over, vsnap and QMP in turn.
//!
//! Run: `cargo bench -p vsnap-cli --bench revert` (or `scripts/bench.sh`).
//! Environment: VSNAP_BENCH_ITERS (default 20), VSNAP_BENCH_WARMUP
//! (default 3), VSNAP_BENCH_MB, VSNAP_BENCH_DIR (default /var/tmp),
//! VSNAP_BENCH_SERIES (any of `vol`, `dom`, `ext`; default all three).

mod common;

use common::{env_num, ok, repo_root, run, timed, vsnap_binary, vsnap_cmd, Guest, QMP_TIMEOUT};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::qmp::Qmp;

fn qemu_io(img: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img)
        .stdout(Stdio::null()));
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(series: &str, vsnap: &mut [Duration], floor: &mut [Duration], target: f64) {
    let (a, b) = (median(vsnap), median(floor));
    let ratio = a.as_secs_f64() / b.as_secs_f64();
    println!(
        "bench revert: {series}: vsnap {:.1} ms, floor {:.1} ms (p50 of {}): {ratio:.2}x (target <= {target}x){}",
        ms(a),
        ms(b),
        vsnap.len(),
        if ratio <= target { "" } else { "  ABOVE TARGET" }
    );
}

fn vol_series(vsnap: &Path, dir: &Path, mb: u64, warmup: usize, iters: usize) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let state = dir.join("state");
    let (img, twin) = (dir.join("vol.qcow2"), dir.join("twin.qcow2"));
    for i in [&img, &twin] {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(i)
            .arg(format!("{mb}M")));
        qemu_io(i, &format!("write -P 0x11 0 {}M", mb / 2));
    }
    run(vsnap_cmd(vsnap, &state)
        .args(["vol", "snapshot", "create"])
        .arg(&img)
        .args(["s1", "--kind", "internal"]));
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&twin));
    let (mut v, mut f) = (Vec::new(), Vec::new());
    for i in 0..warmup + iters {
        for x in [&img, &twin] {
            qemu_io(x, &format!("write -P 0x22 0 {}M", mb / 4));
        }
        let a = timed(
            vsnap_cmd(vsnap, &state)
                .args(["vol", "snapshot", "revert"])
                .arg(&img)
                .arg("s1"),
        );
        let b = timed(
            Command::new("qemu-img")
                .args(["snapshot", "-a", "s1"])
                .arg(&twin),
        );
        if i >= warmup {
            v.push(a);
            f.push(b);
        }
    }
    report(
        &format!("volume internal, {mb} MiB image"),
        &mut v,
        &mut f,
        1.5,
    );
}

fn dom_series(vsnap: &Path, dir: &Path, warmup: usize, iters: usize) {
    let disk = dir.join("g.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M"));
    let guest = Guest::boot(&dir.join("guest"), std::slice::from_ref(&disk));
    let ready = guest.wait_ready();
    println!("bench revert: guest ({}) ready: {ready}", guest.accel);
    let state = dir.join("dstate");
    run(vsnap_cmd(vsnap, &state)
        .args(["domain", "attach", "g", "--qmp"])
        .arg(&guest.qmp));
    run(vsnap_cmd(vsnap, &state).args(["snapshot", "create", "g", "m1", "--memory", "internal"]));
    let node = {
        let mut q = ok(Qmp::connect(&guest.qmp, QMP_TIMEOUT), "QMP");
        let blocks = ok(q.query_block_typed(), "query-block");
        blocks
            .iter()
            .find_map(|b| b.inserted.as_ref().map(|i| i.node_name.clone()))
            .expect("a disk")
    };
    let load = |i: usize| {
        let t = Instant::now();
        let mut q = ok(Qmp::connect(&guest.qmp, QMP_TIMEOUT), "QMP");
        ok(
            q.snapshot_load(
                &format!("bench-{i}"),
                "m1",
                &node,
                &[node.as_str()],
                QMP_TIMEOUT,
            ),
            "snapshot-load",
        );
        t.elapsed()
    };
    let (mut v, mut f) = (Vec::new(), Vec::new());
    for i in 0..warmup + iters {
        let a = timed(vsnap_cmd(vsnap, &state).args(["snapshot", "revert", "g", "m1"]));
        let b = load(i);
        if i >= warmup {
            v.push(a);
            f.push(b);
        }
    }
    report(
        "domain internal with memory, running guest (256 MiB RAM, 1 disk)",
        &mut v,
        &mut f,
        1.2,
    );
    // The library: the engine opened once (what an embedding manager
    // pays per revert, without a process start and a journal open).
    let (engine, _) = vsnap_engine::Engine::open(&state).expect("open the state directory");
    let (mut lib, mut f) = (Vec::new(), Vec::new());
    for i in 0..warmup + iters {
        let t = Instant::now();
        engine
            .domain_snapshot_revert("g", "m1", Default::default(), false)
            .expect("library revert");
        let a = t.elapsed();
        let b = load(1000 + i);
        if i >= warmup {
            lib.push(a);
            f.push(b);
        }
    }
    report(
        "the same through the library (Engine::domain_snapshot_revert, opened once)",
        &mut lib,
        &mut f,
        1.2,
    );
}

/// Revert of a running guest to a live disk-only snapshot of `n` disks:
/// QEMU quits and is started again on new overlays (a fresh boot). Times:
/// the whole command, and the gap from the old QEMU's exit (polled in
/// /proc every millisecond from another thread) to the command's end
/// (vsnap returns once the new QEMU answered its `cont`: the guest runs).
fn ext_series(vsnap: &Path, dir: &Path, n: usize, warmup: usize, iters: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let disks: Vec<std::path::PathBuf> = (0..n)
        .map(|i| {
            let d = dir.join(format!("d{i}.qcow2"));
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&d)
                .arg("64M"));
            d
        })
        .collect();
    let guest = Guest::boot(&dir.join("guest"), &disks);
    guest.wait_ready();
    let state = dir.join("state");
    run(vsnap_cmd(vsnap, &state)
        .args(["domain", "attach", "g", "--qmp"])
        .arg(&guest.qmp));
    run(vsnap_cmd(vsnap, &state).args(["snapshot", "create", "g", "d1", "--live", "--disk-only"]));
    let qmp = guest.qmp.clone();
    let (mut whole, mut gap) = (Vec::new(), Vec::new());
    for i in 0..warmup + iters {
        let old = vsnap_steps::launch::peer_pid(&qmp).expect("QEMU's pid");
        // Watcher: the instant the old QEMU exits (polled in /proc, never
        // through its monitor, which serves one client at a time).
        let watch = std::thread::spawn(move || {
            let t0 = Instant::now();
            while common::qemu_alive(old) && t0.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Instant::now()
        });
        let a = timed(vsnap_cmd(vsnap, &state).args(["snapshot", "revert", "g", "d1"]));
        // vsnap returns once the new QEMU answered its `cont`: the guest runs.
        let g = watch.join().expect("watcher").elapsed();
        if i >= warmup {
            whole.push(a);
            gap.push(g);
        }
    }
    println!(
        "bench revert: external disk-only, running guest, {n} disk(s): whole command p50 {:.1} ms, old QEMU gone -> new guest running p50 {:.1} ms ({} runs; a fresh boot follows)",
        ms(median(&mut whole)),
        ms(median(&mut gap)),
        whole.len()
    );
    // The QEMU started last is vsnap's (its own session): end it.
    run(vsnap_cmd(vsnap, &state).args(["domain", "destroy", "g"]));
}

fn main() {
    let iters = env_num("VSNAP_BENCH_ITERS", 20).max(5);
    let warmup = env_num("VSNAP_BENCH_WARMUP", 3);
    let mb = env_num("VSNAP_BENCH_MB", 1024) as u64;
    let series = std::env::var("VSNAP_BENCH_SERIES").unwrap_or_else(|_| "vol,dom,ext".into());
    let base = std::env::var_os("VSNAP_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let vsnap = vsnap_binary();
    let dir = base.join(format!("vsnap-bench-revert.{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    println!(
        "bench revert: vsnap = {}; {warmup} warm-up + {iters} measured iterations per series; work dir {}",
        vsnap.display(),
        dir.display()
    );
    if series.contains("vol") {
        vol_series(&vsnap, &dir.join("vol"), mb, warmup, iters);
    }
    if series.contains("dom") {
        run(Command::new(repo_root().join("guest/build.sh")).stdout(Stdio::null()));
        std::fs::create_dir_all(dir.join("dom")).unwrap();
        dom_series(&vsnap, &dir.join("dom"), warmup, iters);
    }
    if series.contains("ext") {
        run(Command::new(repo_root().join("guest/build.sh")).stdout(Stdio::null()));
        for n in [1, 4] {
            ext_series(&vsnap, &dir.join(format!("ext{n}")), n, warmup, iters);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
