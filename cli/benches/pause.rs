//! The pause window of a live domain snapshot, against its floor, measured
//! in one run on the real test guest (guest/README.md), one guest per disk
//! count (1, 4, 16 small qcow2 disks), every series interleaved on that
//! guest, the order of the series rotating from one iteration to the next.
//!
//! Series (each switches every disk of the guest once per iteration):
//!
//! | series     | what runs                                                                 | what is measured |
//! |------------|---------------------------------------------------------------------------|------------------|
//! | vsnap      | vsnap's pivot step replayed from this process with vsnap's own library (`vsnap-steps`): overlays prepared as the plan prepares them (`qemu_img::create_overlay`, `live::blockdev_add`), then the body of `live::transaction`: connect, ONE `transaction` of `blockdev-snapshot`, disconnect. No `stop`: the guest keeps running. | **window** = the `transaction` command's round trip as vsnap's QMP client sees it (request written to reply read; the guest's I/O is drained for at most that long; its vCPUs never stop). Also the **step** = connect to disconnect. |
//! | vsnap cmd  | the real `vsnap snapshot create DOMAIN NAME --disk-only` (release build) | the whole process, wall clock (context: planning, journal fsyncs, qemu-img, QMP) |
//! | floor      | bare QMP: `stop`, ONE `transaction` of `blockdev-snapshot` (overlays prepared beforehand exactly as for vsnap), `cont` | **window** = QEMU's `RESUME` event timestamp minus its `STOP` event timestamp; also the `transaction` round trip alone |
//! | sync       | bare QMP: `stop`, ONE `transaction` of `blockdev-snapshot-sync` (QEMU creates each overlay file inside the transaction), `cont` | window = `RESUME` - `STOP` (QEMU's timestamps); also the `transaction` round trip alone |
//!
//! The ratio is vsnap's window over the floor's window (target <= 1.2x).
//!
//! Between two measurements, untimed, the bench puts the guest back as it
//! was: an active `block-commit` of each disk's new overlay into its base
//! image (the overlays are empty or nearly so), `blockdev-del` of the
//! overlay nodes that were added with `blockdev-add`, removal of the overlay
//! files. So every measurement starts from the same graph (each disk a
//! single qcow2 image), instead of a chain that grows by one layer per
//! measurement (`blockdev-del` of an active node is impossible). Before each
//! `vsnap snapshot create` the domain is attached again (`vsnap domain
//! undefine --snapshots-metadata`, `vsnap domain attach`, untimed), since the
//! commit-back leaves the catalog pointing at the removed overlay. The bench
//! also checks, after every measurement, that every disk was switched.
//!
//! The guest: `guest/build.sh` (cached), `guest/run.sh --blockdev` with the
//! disks, TCG unless KVM really works. The disks are blank qcow2 (32 MiB):
//! the guest boots with unformatted disks, mounts nothing and runs no
//! writer, so the guest is idle (its agent runs). `VSNAP_BENCH_WRITER=1`
//! formats the disks (mkfs.ext4) so that the guest's writer keeps writing
//! to every disk during the whole run. QEMU is ended by a guard (QMP `quit`,
//! then SIGKILL by its pid) whatever happens.
//!
//! Run: `cargo bench -p vsnap-cli --bench pause` (cargo builds the release
//! `vsnap`). Environment: VSNAP_BENCH_ITERS (default 20, at least 15),
//! VSNAP_BENCH_WARMUP (default 3), VSNAP_BENCH_DIR (default /var/tmp: a real
//! disk), VSNAP_BENCH_DISKS (default 1,4,16), VSNAP_BENCH_DEPTH (chain
//! depths of every disk's image, default 1; e.g. 1,20: each disk a chain
//! of 20 qcow2 files, the guest on its top), VSNAP_BENCH_WRITER (default 0).

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::live::{self, LiveDisk};
use vsnap_steps::qemu_img;
use vsnap_steps::qmp::blockdev_snapshot_action;
use vsnap_steps::Format;

const TARGET_RATIO: f64 = 1.2;
const DISK_SIZE: &str = "32M";
const DOMAIN: &str = "bench";

/// Overlays prepared the way vsnap's live plan prepares them, with vsnap's
/// own steps: `qemu-img create -f qcow2 -b BASE -F qcow2 OVERLAY` (step
/// create-overlay), then `blockdev-add` of it as a qcow2 node with an
/// inline file node and `backing: null` (step qmp-blockdev-add, which
/// connects, lists the nodes, adds). Untimed.
fn prepare(g: &Guest, disks: &[Disk], img: &Path, tag: &str) -> Vec<LiveDisk> {
    let mut q = ok(live::qmp(&g.qmp), "connect");
    let tops = top_nodes(&mut q, disks);
    drop(q);
    disks
        .iter()
        .zip(tops)
        .enumerate()
        .map(|(k, (d, top))| {
            let path = img.join(format!("d{k}.{tag}.qcow2"));
            ok(
                qemu_img::create_overlay(&path, &d.base_file, Format::Qcow2),
                "create overlay",
            );
            let node = format!("bench-{tag}-{k}");
            ok(
                live::blockdev_add(&g.qmp, &node, &format!("{node}f"), &path),
                "blockdev-add",
            );
            LiveDisk {
                device: d.key.clone(),
                node: top,
                overlay: node,
            }
        })
        .collect()
}

/// vsnap's pivot step, `vsnap_steps::live::transaction`, replayed call for
/// call (its two failpoint hits are no-ops without the `failpoints`
/// feature) with clocks around the `transaction` command and around the
/// whole step. Returns (transaction round trip, step).
fn vsnap_pivot(qmp_path: &Path, disks: &[LiveDisk]) -> (Duration, Duration) {
    let t0 = Instant::now();
    let mut q = ok(live::qmp(qmp_path), "connect");
    let actions = disks
        .iter()
        .map(|d| blockdev_snapshot_action(&d.node, &d.overlay))
        .collect();
    let t1 = Instant::now();
    ok(q.transaction(actions), "transaction (blockdev-snapshot)");
    let tx = t1.elapsed();
    drop(q);
    (tx, t0.elapsed())
}

/// `stop`, `transaction` of `actions`, `cont` on one connection opened
/// beforehand. Returns (RESUME - STOP by QEMU's timestamps, transaction
/// round trip).
fn paused_transaction(qmp_path: &Path, actions: Vec<Value>, what: &str) -> (Duration, Duration) {
    let mut q = ok(live::qmp(qmp_path), "connect");
    q.set_timeout(QMP_TIMEOUT);
    ok(q.poll_events(), "events");
    ok(q.stop(), "stop");
    let t1 = Instant::now();
    let r = q.transaction(actions);
    let tx = t1.elapsed();
    // Resume whatever the transaction did.
    ok(q.cont(), "cont");
    ok(r, what);
    let stop = ok(q.wait_event("STOP", QMP_TIMEOUT), "STOP event");
    let resume = ok(q.wait_event("RESUME", QMP_TIMEOUT), "RESUME event");
    (resume.timestamp.since(&stop.timestamp), tx)
}

/// Back to the base graph (untimed, [`commit_back`]), then the overlay
/// files removed.
fn flatten(g: &Guest, disks: &[Disk], base_nodes: &BTreeSet<String>, img: &Path, series: &str) {
    commit_back(&g.qmp, disks, base_nodes, series);
    let bases: BTreeSet<&Path> = disks.iter().map(|d| d.base_file.as_path()).collect();
    for e in std::fs::read_dir(img).expect("image dir").flatten() {
        let p = e.path();
        // The chain under each disk (make_chain's `d<k>.b<j>.qcow2`) stays.
        let layer = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').nth(1))
            .is_some_and(|m| {
                m.len() > 1 && m.starts_with('b') && m[1..].bytes().all(|c| c.is_ascii_digit())
            });
        if !bases.contains(p.as_path()) && !layer {
            std::fs::remove_file(&p).unwrap_or_else(|err| panic!("remove {}: {err}", p.display()));
        }
    }
}

#[derive(Default)]
struct Results {
    vsnap_tx: Vec<Duration>,
    vsnap_step: Vec<Duration>,
    vsnap_cmd: Vec<Duration>,
    floor_window: Vec<Duration>,
    floor_tx: Vec<Duration>,
    sync_window: Vec<Duration>,
    sync_tx: Vec<Duration>,
    ready: String,
    boot: Duration,
    accel: String,
}

#[derive(Clone, Copy, Debug)]
enum Series {
    VsnapCmd,
    Vsnap,
    Floor,
    Sync,
}

const ALL: [Series; 4] = [Series::VsnapCmd, Series::Vsnap, Series::Floor, Series::Sync];

fn make_disk(path: &Path, format_ext4: bool) {
    if !format_ext4 {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(DISK_SIZE));
        return;
    }
    let raw = path.with_extension("raw");
    run(Command::new("truncate").args(["-s", DISK_SIZE]).arg(&raw));
    run(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&raw));
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(path));
    let _ = std::fs::remove_file(raw);
}

/// A disk whose image is a chain `depth` files long: `path` on top of
/// `path.b1` ... on top of the base (`path.b<depth-1>`, made by
/// [`make_disk`]). Depth 1 is the base alone.
fn make_chain(path: &Path, depth: usize, format_ext4: bool) {
    let layer = |j: usize| {
        if j == 0 {
            path.to_path_buf()
        } else {
            path.with_extension(format!("b{j}.qcow2"))
        }
    };
    make_disk(&layer(depth - 1), format_ext4);
    for j in (0..depth - 1).rev() {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(layer(j + 1))
            .arg(layer(j)));
    }
}

fn bench(
    n: usize,
    depth: usize,
    vsnap: &Path,
    dir: &Path,
    warmup: usize,
    iters: usize,
    writer: bool,
) -> Results {
    let img = dir.join("img");
    std::fs::create_dir_all(&img).expect("bench dir");
    let files: Vec<PathBuf> = (0..n).map(|k| img.join(format!("d{k}.qcow2"))).collect();
    for f in &files {
        make_chain(f, depth, writer);
    }
    let t = Instant::now();
    let g = Guest::boot(dir, &files);
    let ready = g.wait_ready();
    let boot = t.elapsed();

    // The disks as QEMU has them, in -device order (d0 = vda, ...).
    let mut q = ok(live::qmp(&g.qmp), "connect");
    let base_nodes: BTreeSet<String> = node_names(&mut q).into_iter().map(|n| n.0).collect();
    let disks = disks_at_boot(&mut q, &files);
    drop(q);

    let state = dir.join("state");
    let mut r = Results {
        ready,
        boot,
        accel: g.accel.clone(),
        ..Default::default()
    };
    let mut attached = false;
    for i in 0..warmup + iters {
        let keep = i >= warmup;
        for s in (0..ALL.len()).map(|j| ALL[(i + j) % ALL.len()]) {
            let label = format!("{s:?} #{i}");
            match s {
                Series::VsnapCmd => {
                    if attached {
                        run(vsnap_cmd(vsnap, &state).args([
                            "domain",
                            "undefine",
                            DOMAIN,
                            "--snapshots-metadata",
                        ]));
                    }
                    run(vsnap_cmd(vsnap, &state)
                        .args(["domain", "attach", DOMAIN, "--qmp"])
                        .arg(&g.qmp)
                        .arg("--agent")
                        .arg(&g.agent));
                    attached = true;
                    let mut c = vsnap_cmd(vsnap, &state);
                    c.args([
                        "snapshot",
                        "create",
                        DOMAIN,
                        &format!("v{i}"),
                        "--disk-only",
                    ]);
                    let t = Instant::now();
                    run(&mut c);
                    let d = t.elapsed();
                    if keep {
                        r.vsnap_cmd.push(d);
                    }
                }
                Series::Vsnap => {
                    let ld = prepare(&g, &disks, &img, &format!("r{i}"));
                    let (tx, step) = vsnap_pivot(&g.qmp, &ld);
                    if keep {
                        r.vsnap_tx.push(tx);
                        r.vsnap_step.push(step);
                    }
                }
                Series::Floor => {
                    let ld = prepare(&g, &disks, &img, &format!("f{i}"));
                    let actions = ld
                        .iter()
                        .map(|d| blockdev_snapshot_action(&d.node, &d.overlay))
                        .collect();
                    let (w, tx) =
                        paused_transaction(&g.qmp, actions, "transaction (blockdev-snapshot)");
                    if keep {
                        r.floor_window.push(w);
                        r.floor_tx.push(tx);
                    }
                }
                Series::Sync => {
                    let mut q = ok(live::qmp(&g.qmp), "connect");
                    let tops = top_nodes(&mut q, &disks);
                    drop(q);
                    let actions = tops
                        .iter()
                        .enumerate()
                        .map(|(k, top)| {
                            json!({"type": "blockdev-snapshot-sync", "data": {
                                "node-name": top,
                                "snapshot-file": img.join(format!("d{k}.s{i}.qcow2")).to_string_lossy(),
                                "snapshot-node-name": format!("bench-s{i}-{k}"),
                                "format": "qcow2",
                            }})
                        })
                        .collect();
                    let (w, tx) =
                        paused_transaction(&g.qmp, actions, "transaction (blockdev-snapshot-sync)");
                    if keep {
                        r.sync_window.push(w);
                        r.sync_tx.push(tx);
                    }
                }
            }
            flatten(&g, &disks, &base_nodes, &img, &label);
        }
    }
    drop(g);
    r
}

fn pp(v: &[Duration]) -> String {
    format!("{:.2} / {:.2}", pct(v, 50.0), pct(v, 90.0))
}

fn main() {
    let iters = env_num("VSNAP_BENCH_ITERS", 20).max(15);
    let warmup = env_num("VSNAP_BENCH_WARMUP", 3);
    let writer = env_num("VSNAP_BENCH_WRITER", 0) != 0;
    let counts: Vec<usize> = std::env::var("VSNAP_BENCH_DISKS")
        .unwrap_or_else(|_| "1,4,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let depths: Vec<usize> = std::env::var("VSNAP_BENCH_DEPTH")
        .unwrap_or_else(|_| "1".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let base = std::env::var_os("VSNAP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let vsnap = vsnap_binary();
    run(Command::new(repo_root().join("guest/build.sh")).stdout(Stdio::null()));
    let dir = base.join(format!("vsnap-bench-pause.{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let qemu = run(Command::new("qemu-system-x86_64").arg("--version"));
    println!("bench pause: vsnap = {}", vsnap.display());
    println!(
        "bench pause: {} ; work dir {} ; {warmup} warm-up + {iters} measured iterations per series; \
         guest {}; load average at start {}",
        qemu.lines().next().unwrap_or(""),
        dir.display(),
        if writer {
            "writing to every disk (ext4 + writer)"
        } else {
            "idle (blank disks: no filesystem, no writer)"
        },
        loadavg()
    );
    let mut all = Vec::new();
    for &depth in &depths {
        for &n in &counts {
            let sub = dir.join(format!("n{n}-d{depth}"));
            let r = bench(n, depth, &vsnap, &sub, warmup, iters, writer);
            println!(
                "bench pause: {n} disk(s), chain depth {depth}: guest booted in {:.1} s ({}): {}",
                r.boot.as_secs_f64(),
                r.accel,
                r.ready
            );
            let _ = std::fs::remove_dir_all(&sub);
            all.push((format!("{n}/{depth}"), r));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!("Windows in ms, p50 / p90 (nearest rank), {iters} measurements each:");
    println!("  vsnap window = round trip of vsnap's ONE `transaction` of blockdev-snapshot (vsnap-steps' QMP client,");
    println!(
        "                 request written -> reply read); no stop: the guest's vCPUs keep running"
    );
    println!("  floor window = QEMU's RESUME minus STOP event timestamps around stop / transaction(blockdev-snapshot) / cont");
    println!("  sync window  = the same with transaction(blockdev-snapshot-sync): QEMU creates the overlays while paused");
    println!("  vsnap cmd    = wall time of the whole `vsnap snapshot create DOMAIN NAME --disk-only` process");
    println!();
    println!(
        "{:>7}  {:>17}  {:>17}  {:>15}  {:>17}  {:>17}",
        "disks/depth",
        "vsnap window",
        "floor window",
        "ratio p50 (p90)",
        "sync window",
        "vsnap cmd"
    );
    let mut verdicts = Vec::new();
    for (n, r) in &all {
        let (r50, r90) = (
            pct(&r.vsnap_tx, 50.0) / pct(&r.floor_window, 50.0),
            pct(&r.vsnap_tx, 90.0) / pct(&r.floor_window, 90.0),
        );
        println!(
            "{:>7}  {:>17}  {:>17}  {:>15}  {:>17}  {:>17}",
            n,
            pp(&r.vsnap_tx),
            pp(&r.floor_window),
            format!("{r50:.2}x ({r90:.2}x)"),
            pp(&r.sync_window),
            pp(&r.vsnap_cmd)
        );
        verdicts.push(format!(
            "{n} (disks/depth): vsnap window / floor window = {r50:.2}x at p50 ({}); sync window / floor window = {:.2}x",
            if r50 <= TARGET_RATIO {
                format!("within the {TARGET_RATIO}x target")
            } else {
                format!("ABOVE the {TARGET_RATIO}x target")
            },
            pct(&r.sync_window, 50.0) / pct(&r.floor_window, 50.0)
        ));
    }
    println!();
    println!(
        "Transaction round trips alone (client clock) and vsnap's whole pivot step, ms, p50 / p90:"
    );
    println!(
        "{:>7}  {:>17}  {:>17}  {:>17}  {:>26}",
        "disks/depth",
        "vsnap tx (running)",
        "floor tx (paused)",
        "sync tx (paused)",
        "vsnap step (connect..drop)"
    );
    for (n, r) in &all {
        println!(
            "{:>7}  {:>17}  {:>17}  {:>17}  {:>26}",
            n,
            pp(&r.vsnap_tx),
            pp(&r.floor_tx),
            pp(&r.sync_tx),
            pp(&r.vsnap_step)
        );
    }
    println!();
    for v in verdicts {
        println!("bench pause: {v}");
    }
    println!("bench pause: load average at the end {}", loadavg());
}
