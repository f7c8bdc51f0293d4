//! `vsnap vol snapshot create`, whole process, against the bare qemu-img
//! command it wraps, measured in the same run, interleaved:
//!
//! | series   | vsnap                                              | floor                                              |
//! |----------|----------------------------------------------------|----------------------------------------------------|
//! | internal | `vsnap vol snapshot create IMG NAME --kind internal` | `qemu-img snapshot -c NAME -f qcow2 IMG`           |
//! | external | `vsnap vol snapshot create IMG NAME --kind external` | `qemu-img create -f qcow2 -b IMG -F qcow2 OVERLAY` |
//!
//! A second vsnap row times the same command while `vsnap serve` holds
//! its state directory (the client then only forwards it: see
//! cli/src/service.rs), with its own ratio to the floor.
//!
//! A third row per series times the same operation through the library
//! (`Engine::vol_snapshot_create`, the engine opened once before the
//! loop): what a manager that embeds vsnap pays per snapshot, without the
//! process start and journal open a CLI call pays every time.
//!
//! Run: `cargo bench -p vsnap-cli --bench create` (or `scripts/bench.sh`).
//! cargo builds the release `vsnap` for the bench (it is the path in
//! `CARGO_BIN_EXE_vsnap`, normally target/release/vsnap); if that file is
//! missing the bench runs `cargo build --release -p vsnap-cli` itself.
//!
//! Each series has its own fresh state directory (so the journal grows as
//! it would in use); every iteration gets a fresh 64 MiB qcow2 image with
//! 1 MiB of data, made outside the timed region, for vsnap and the floor
//! alike. Images live under /var/tmp (a real disk, not tmpfs: vsnap fsyncs).
//! Environment: VSNAP_BENCH_ITERS (default 40), VSNAP_BENCH_WARMUP
//! (default 5), VSNAP_BENCH_DIR (default /var/tmp).

mod common;

use common::{env_num, pct, run, timed, vsnap_binary};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TARGET_RATIO: f64 = 1.5;

/// A fresh 64 MiB qcow2 image with 1 MiB of data.
fn fresh_image(path: &Path) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -q -P 0x5a 0 1M"])
        .arg(path)
        .stdout(Stdio::null()));
}

/// Whether this qemu-img's `snapshot` takes `-f` (8.0 and later); older
/// ones (Debian 12's 7.2) need `--image-opts`, which is what vsnap passes.
/// Set once by [`probe_snapshot_f`].
static SNAPSHOT_HAS_F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn snapshot_has_f() -> bool {
    *SNAPSHOT_HAS_F.get().expect("probe_snapshot_f ran")
}

fn probe_snapshot_f(dir: &Path) {
    let img = dir.join("probe.qcow2");
    fresh_image(&img);
    let ok = Command::new("qemu-img")
        .args(["snapshot", "-l", "-f", "qcow2"])
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = SNAPSHOT_HAS_F.set(ok);
    let _ = std::fs::remove_file(img);
}

/// `driver=qcow2,file.driver=file,file.filename=PATH` (commas doubled).
fn image_opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        path.display().to_string().replace(',', ",,")
    )
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Internal,
    External,
}

struct Series {
    vsnap: Vec<Duration>,
    /// The same command while `vsnap serve` holds the state directory.
    served: Vec<Duration>,
    floor: Vec<Duration>,
    /// The same operation through the library, the engine opened once
    /// (what a manager embedding vsnap pays per snapshot).
    library: Vec<Duration>,
}

fn bench(kind: Kind, vsnap: &Path, dir: &Path, warmup: usize, iters: usize) -> Series {
    let label = if kind == Kind::Internal {
        "internal"
    } else {
        "external"
    };
    let state = dir.join(format!("state-{label}"));
    let mut s = Series {
        vsnap: Vec::new(),
        served: Vec::new(),
        floor: Vec::new(),
        library: Vec::new(),
    };
    let (engine, _) = vsnap_engine::Engine::open(&dir.join(format!("state-lib-{label}")))
        .unwrap_or_else(|e| panic!("engine: {e}"));
    let served_state = dir.join(format!("state-served-{label}"));
    let service = Service::start(vsnap, &served_state);
    for i in 0..warmup + iters {
        let name = format!("snap{i}");
        // vsnap, carried out by `vsnap serve`
        let img = dir.join(format!("{label}-s{i}.qcow2"));
        fresh_image(&img);
        let d = timed(
            Command::new(vsnap)
                .arg("--state-dir")
                .arg(&served_state)
                .args(["vol", "snapshot", "create"])
                .arg(&img)
                .arg(&name)
                .args(["--kind", label]),
        );
        if i >= warmup {
            s.served.push(d);
        }
        // vsnap
        let img = dir.join(format!("{label}-v{i}.qcow2"));
        fresh_image(&img);
        let d = timed(
            Command::new(vsnap)
                .arg("--state-dir")
                .arg(&state)
                .args(["vol", "snapshot", "create"])
                .arg(&img)
                .arg(&name)
                .args(["--kind", label]),
        );
        if i >= warmup {
            s.vsnap.push(d);
        }
        // floor: the bare qemu-img command
        let img = dir.join(format!("{label}-q{i}.qcow2"));
        fresh_image(&img);
        let d = match kind {
            Kind::Internal => {
                let mut c = Command::new("qemu-img");
                if snapshot_has_f() {
                    c.args(["snapshot", "-c", &name, "-f", "qcow2"]).arg(&img);
                } else {
                    c.args(["snapshot", "--image-opts", "-c", &name])
                        .arg(image_opts(&img));
                }
                timed(&mut c)
            }
            Kind::External => {
                let overlay = dir.join(format!("{label}-q{i}.overlay.qcow2"));
                timed(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-b"])
                        .arg(&img)
                        .args(["-F", "qcow2"])
                        .arg(&overlay),
                )
            }
        };
        if i >= warmup {
            s.floor.push(d);
        }
        // library
        let img = dir.join(format!("{label}-l{i}.qcow2"));
        fresh_image(&img);
        let req = vsnap_engine::CreateRequest {
            image: img,
            name: Some(name.clone()),
            kind: Some(if kind == Kind::Internal {
                vsnap_engine::SnapKind::Internal
            } else {
                vsnap_engine::SnapKind::External
            }),
            ..Default::default()
        };
        let t = Instant::now();
        engine
            .vol_snapshot_create(&req, false)
            .unwrap_or_else(|e| panic!("library create: {e}"));
        if i >= warmup {
            s.library.push(t.elapsed());
        }
    }
    service.stop();
    s
}

/// A `vsnap serve` child for the bench's "served" row.
struct Service(std::process::Child);

impl Service {
    fn start(vsnap: &Path, state: &Path) -> Service {
        let child = Command::new(vsnap)
            .arg("--state-dir")
            .arg(state)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("vsnap serve: {e}"));
        let sock = state.join("vsnap.sock");
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vsnap serve did not come up on {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Service(child)
    }

    fn stop(mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let st = self.0.wait().expect("wait for vsnap serve");
        assert!(st.success(), "vsnap serve ended with {st}");
    }
}

fn main() {
    // cargo bench passes --bench (and maybe a filter): a filter selects
    // series by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let iters = env_num("VSNAP_BENCH_ITERS", 40).max(1);
    let warmup = env_num("VSNAP_BENCH_WARMUP", 5);
    let base = std::env::var_os("VSNAP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let vsnap = vsnap_binary();
    let dir = base.join(format!("vsnap-bench-create.{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    // Removed at the end, and on a panic too (unwinding runs the drop).
    let _cleanup = RemoveOnDrop(dir.clone());
    probe_snapshot_f(&dir);
    let qemu = Command::new("qemu-img").arg("--version").output().map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    });
    println!("bench create: vsnap = {}", vsnap.display());
    println!("bench create: {} ; images under {} ; {warmup} warm-up + {iters} measured iterations per series, interleaved", qemu.unwrap_or_else(|e| format!("qemu-img: {e}")), dir.display());
    println!();
    println!(
        "{:<10} {:<48} {:>9} {:>9} {:>9}",
        "series", "command", "p50 ms", "p90 ms", "min ms"
    );
    let mut verdicts = Vec::new();
    for (kind, label, floor_cmd) in [
        (
            Kind::Internal,
            "internal",
            if snapshot_has_f() {
                "qemu-img snapshot -c NAME -f qcow2 IMG"
            } else {
                "qemu-img snapshot --image-opts -c NAME OPTS"
            },
        ),
        (
            Kind::External,
            "external",
            "qemu-img create -f qcow2 -b IMG -F qcow2 OVL",
        ),
    ] {
        if !wanted(label) {
            continue;
        }
        let s = bench(kind, &vsnap, &dir, warmup, iters);
        let (v50, v90, f50, f90) = (
            pct(&s.vsnap, 50.0),
            pct(&s.vsnap, 90.0),
            pct(&s.floor, 50.0),
            pct(&s.floor, 90.0),
        );
        println!(
            "{:<10} {:<48} {:>9.2} {:>9.2} {:>9.2}",
            label,
            format!("vsnap vol snapshot create --kind {label}"),
            v50,
            v90,
            pct(&s.vsnap, 0.0)
        );
        let (s50, s90) = (pct(&s.served, 50.0), pct(&s.served, 90.0));
        println!(
            "{:<10} {:<48} {:>9.2} {:>9.2} {:>9.2}",
            "",
            "the same, carried out by `vsnap serve`",
            s50,
            s90,
            pct(&s.served, 0.0)
        );
        println!(
            "{:<10} {:<48} {:>9.2} {:>9.2} {:>9.2}",
            "",
            floor_cmd,
            f50,
            f90,
            pct(&s.floor, 0.0)
        );
        let (r50, r90) = (v50 / f50, v90 / f90);
        println!(
            "{:<10} {:<48} {:>8.2}x {:>8.2}x",
            "", "ratio vsnap/floor (alone)", r50, r90
        );
        let (q50, q90) = (s50 / f50, s90 / f90);
        println!(
            "{:<10} {:<48} {:>8.2}x {:>8.2}x",
            "", "ratio vsnap/floor (vsnap serve running)", q50, q90
        );
        let (l50, l90) = (pct(&s.library, 50.0), pct(&s.library, 90.0));
        println!(
            "{:<10} {:<48} {:>9.2} {:>9.2} {:>9.2}",
            "",
            "library: Engine::vol_snapshot_create (open once)",
            l50,
            l90,
            pct(&s.library, 0.0)
        );
        println!(
            "{:<10} {:<48} {:>8.2}x {:>8.2}x",
            "",
            "ratio library/floor",
            l50 / f50,
            l90 / f90
        );
        let verdict = |r: f64| {
            if r <= TARGET_RATIO {
                format!("within the {TARGET_RATIO}x target")
            } else {
                format!("ABOVE the {TARGET_RATIO}x target")
            }
        };
        verdicts.push(format!(
            "{label}: p50 ratio {r50:.2}x alone ({}), {q50:.2}x with vsnap serve running ({})",
            verdict(r50),
            verdict(q50)
        ));
    }
    println!();
    for v in verdicts {
        println!("bench create: {v}");
    }
}
