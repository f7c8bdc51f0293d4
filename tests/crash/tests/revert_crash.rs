//! The crash suite of domain snapshot revert (offline shapes, DESIGN.md
//! 10.3): `vsnap snapshot revert` killed at every crash point it passes,
//! `vsnap-recover` killed at every point of its own after each, then
//! checked.
//!
//! ```text
//! cargo build -p vsnap-cli --features vsnap-cli/failpoints
//! cargo test -p vsnap-crash --test revert_crash
//! ```
//!
//! Scenarios (a shut-off domain; the guest's writes stand in as `qemu-io`
//! patterns: `S` when the snapshot is taken, `C` by the time of the
//! revert):
//!
//! * `ext` — vda qcow2 and vdb raw, external `s1` (`--disk-only`): new
//!   overlays on the frozen files, the old overlays removed after the pivot;
//! * `int` — vda and vdc qcow2, internal `s1`: `qemu-img snapshot -a` in
//!   place, after the pivot (the plan rolls forward from its first step);
//! * `int-clone` — internal `s1`, then external `s2` freezes the image: a
//!   clone with `s1` applied, its internal entries deleted after the pivot;
//! * `mixed` — vda internal and vdb external in one snapshot;
//! * `reflink` — vdb raw on a loop-mounted btrfs, reflink `s1`: the clone
//!   cloned again and renamed over the image after the pivot.
//!
//! Each trial starts from a copy of the scenario's world laid at the same
//! path. After each recovery: `vsnap-recover` exits 0 (never "needs
//! attention"); the revert's plan ended committed or rolled back, and
//! every disk reads `S` (committed) or `C` (rolled back) — all disks
//! alike; the current snapshot is the target exactly when committed;
//! `vsnap domain check` is clean (catalog and files agree both ways, no
//! orphan or temporary file, `qemu-img check` clean); no file a snapshot
//! needs changed (hashes); a second `vsnap-recover` has nothing to do.
//!
//! Environment: `VSNAP_BIN_DIR` (default `<workspace>/target/debug`);
//! `VSNAP_CRASH_QUICK=1` (every third point, recovery killed only at its
//! first point); a free argument runs the scenarios whose name contains it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;
use vsnap_crash::{expand_points, replace_tree, run, scratch_dir, Bins, BtrfsLoop, Inject, Run};

const S: u8 = 0x51;
const C: u8 = 0x5c;
const MID: u8 = 0x33;
const OFF: u64 = 64 * 1024;
const LEN: u64 = 64 * 1024;
/// A bound on `vsnap-recover` kills per crash point: more is a loop.
const RECOVERY_KILLS_MAX: usize = 60;

struct Scenario {
    name: &'static str,
    btrfs: bool,
    /// (target, image name, format) of the domain's disks.
    disks: &'static [(&'static str, &'static str, &'static str)],
    /// `snapshot create` runs, in order, with the pattern written before
    /// each; `C` is written after the last.
    snaps: &'static [(&'static str, &'static [&'static str], u8)],
    target: &'static str,
    /// Disks the target snapshot left out: they read `C` either way.
    left_out: &'static [&'static str],
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "ext",
            btrfs: false,
            disks: &[("vda", "a.qcow2", "qcow2"), ("vdb", "b.raw", "raw")],
            snaps: &[("s1", &["--disk-only"], S)],
            target: "s1",
            left_out: &[],
        },
        Scenario {
            name: "int",
            btrfs: false,
            disks: &[("vda", "a.qcow2", "qcow2"), ("vdc", "c.qcow2", "qcow2")],
            snaps: &[("s1", &[], S)],
            target: "s1",
            left_out: &[],
        },
        Scenario {
            name: "int-clone",
            btrfs: false,
            disks: &[("vda", "a.qcow2", "qcow2")],
            snaps: &[("s1", &[], S), ("s2", &["--disk-only"], MID)],
            target: "s1",
            left_out: &[],
        },
        Scenario {
            name: "mixed",
            btrfs: false,
            disks: &[("vda", "a.qcow2", "qcow2"), ("vdb", "b.raw", "raw")],
            snaps: &[(
                "s1",
                &["--disk", "vda=internal", "--disk", "vdb=external"],
                S,
            )],
            target: "s1",
            left_out: &[],
        },
        Scenario {
            name: "reflink",
            btrfs: true,
            disks: &[("vda", "a.qcow2", "qcow2"), ("vdb", "b.raw", "raw")],
            snaps: &[("s1", &["--disk", "vda=no", "--disk", "vdb=reflink"], S)],
            target: "s1",
            left_out: &["vda"],
        },
    ]
}

fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_owned()
}

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let o = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// One scenario's world: a state directory and the disks' directory under
/// `root`.
struct World<'a> {
    bins: &'a Bins,
    root: PathBuf,
}

impl World<'_> {
    fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    fn vm(&self) -> PathBuf {
        self.root.join("vm")
    }
    fn vsnap(&self, args: &[&str], inject: &Inject) -> Run {
        let mut a = vec![os("--state-dir"), os(self.state())];
        a.extend(args.iter().map(os));
        run(&self.bins.vsnap, &a, inject)
    }
    fn vsnap_ok(&self, args: &[&str]) -> Result<String, String> {
        let r = self.vsnap(args, &Inject::None);
        if r.success() {
            Ok(r.stdout)
        } else {
            Err(r.describe())
        }
    }
    fn json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut a = vec!["--json"];
        a.extend(args);
        let out = self.vsnap_ok(&a)?;
        serde_json::from_str(&out).map_err(|e| format!("{a:?}: {e}: {out}"))
    }
    fn recover(&self, inject: &Inject) -> Run {
        run(
            &self.bins.recover,
            &[os("--state-dir"), os(self.state())],
            inject,
        )
    }
    /// (target, active image, format) of domain `d`.
    fn disks(&self) -> Result<Vec<(String, PathBuf, String)>, String> {
        let v = self.json(&["domain", "info", "d"])?;
        Ok(v["disks"]
            .as_array()
            .ok_or("domain info without disks")?
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap_or("").to_string(),
                    PathBuf::from(d["source"].as_str().unwrap_or("")),
                    d["format"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }
    fn write_all(&self, pattern: u8) -> Result<(), String> {
        for (_, img, fmt) in self.disks()? {
            let cmd = format!("write -P 0x{pattern:02x} {OFF} {LEN}");
            sh("qemu-io", &["-f", &fmt, "-c", &cmd, &img.to_string_lossy()])?;
        }
        Ok(())
    }
    /// Which pattern the disks read: `S` or `C` when every disk but
    /// `left_out` reads it (and those read `C`), else `None`.
    fn pattern(&self, left_out: &[&str]) -> Result<Option<u8>, String> {
        let mut seen = None;
        for (t, img, fmt) in self.disks()? {
            let p = [S, C].into_iter().find(|p| {
                let cmd = format!("read -P 0x{p:02x} {OFF} {LEN}");
                sh(
                    "qemu-io",
                    &["-f", &fmt, "-r", "-U", "-c", &cmd, &img.to_string_lossy()],
                )
                .is_ok_and(|o| !o.contains("Pattern verification failed"))
            });
            if left_out.contains(&t.as_str()) {
                if p != Some(C) {
                    return Ok(None);
                }
                continue;
            }
            match (seen, p) {
                (_, None) => return Ok(None),
                (None, Some(p)) => seen = Some(p),
                (Some(a), Some(b)) if a != b => return Ok(None),
                _ => {}
            }
        }
        Ok(seen)
    }
    fn current(&self) -> Result<String, String> {
        let r = self.vsnap(&["snapshot", "current", "d"], &Inject::None);
        Ok(r.stdout.trim().to_string())
    }
    /// The last revert plan's outcome (`Committed`, `RolledBack`, ...).
    fn revert_outcome(&self) -> Result<String, String> {
        let v = self.json(&["plan", "list"])?;
        let list = v
            .as_array()
            .cloned()
            .or_else(|| v["plans"].as_array().cloned());
        let list = list.ok_or_else(|| format!("plan list: {v}"))?;
        // Killed before the plan was journaled: nothing was done.
        Ok(list
            .iter()
            .rev()
            .find(|p| p["op"] == "domain.snapshot.revert")
            .map(|p| p["outcome"].as_str().unwrap_or("").to_string())
            .unwrap_or_else(|| "RolledBack".to_string()))
    }
    /// Every snapshot's files that are not a disk's active image, hashed
    /// (they must never change).
    fn needed_hashes(&self) -> Result<BTreeMap<PathBuf, u64>, String> {
        let active: Vec<PathBuf> = self.disks()?.into_iter().map(|x| x.1).collect();
        let mut out = BTreeMap::new();
        for s in self
            .json(&["snapshot", "list", "d"])?
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = s["name"].as_str().unwrap_or("");
            let info = self.json(&["snapshot", "info", "d", name])?;
            for d in info["disks"].as_array().cloned().unwrap_or_default() {
                let Some(f) = d["state_file"].as_str() else {
                    continue;
                };
                let f = PathBuf::from(f);
                if !active.contains(&f) && f.is_file() {
                    out.insert(f.clone(), hash(&f)?);
                }
            }
        }
        Ok(out)
    }
}

fn hash(p: &Path) -> Result<u64, String> {
    use std::hash::{Hash, Hasher};
    let data = std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    Ok(h.finish())
}

/// Lay the scenario's world at `w.root` (from nothing).
fn setup(w: &World, sc: &Scenario) -> Result<(), String> {
    std::fs::create_dir_all(w.vm()).map_err(|e| e.to_string())?;
    let mut xml = String::from("<domain type='kvm'><name>d</name><devices>");
    for (t, name, fmt) in sc.disks {
        let p = w.vm().join(name);
        sh(
            "qemu-img",
            &["create", "-q", "-f", fmt, &p.to_string_lossy(), "1M"],
        )?;
        xml.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{}'/><target dev='{t}'/></disk>",
            p.display()
        ));
    }
    xml.push_str("</devices></domain>");
    let f = w.root.join("d.xml");
    std::fs::write(&f, xml).map_err(|e| e.to_string())?;
    w.vsnap_ok(&["domain", "define", &f.to_string_lossy()])?;
    for (name, args, pattern) in sc.snaps {
        w.write_all(*pattern)?;
        let mut a = vec!["snapshot", "create", "d", name];
        a.extend(args.iter());
        w.vsnap_ok(&a)?;
    }
    w.write_all(C)
}

#[derive(Default)]
struct Report {
    points: usize,
    recovery_kills: usize,
    committed: usize,
    rolled_back: usize,
    violations: Vec<String>,
}

/// After a crash and its recovery: the checks of the module's doc.
fn check(
    w: &World,
    sc: &Scenario,
    before_current: &str,
    needed: &BTreeMap<PathBuf, u64>,
    rec: &Run,
) -> Result<bool, Vec<String>> {
    let mut v = Vec::new();
    if rec.code() != Some(0) || rec.stdout.contains("needs-attention") {
        v.push(format!("vsnap-recover: {}", rec.describe()));
    }
    let outcome = w.revert_outcome().unwrap_or_else(|e| {
        v.push(e);
        String::new()
    });
    let committed = outcome == "Committed";
    if !committed && outcome != "RolledBack" {
        v.push(format!("the revert plan ended {outcome:?}"));
    }
    match w.pattern(sc.left_out) {
        Ok(Some(p)) if p == if committed { S } else { C } => {}
        Ok(p) => v.push(format!(
            "{outcome}: the disks read {:?}, want 0x{:02x} on every disk",
            p.map(|x| format!("0x{x:02x}")),
            if committed { S } else { C }
        )),
        Err(e) => v.push(e),
    }
    let want_current = if committed { sc.target } else { before_current };
    match w.current() {
        Ok(c) if c == want_current => {}
        Ok(c) => v.push(format!(
            "{outcome}: current snapshot {c:?}, want {want_current:?}"
        )),
        Err(e) => v.push(e),
    }
    let chk = w.vsnap(&["domain", "check", "d"], &Inject::None);
    if !chk.success() {
        v.push(format!("domain check: {}", chk.describe()));
    }
    for (f, h) in needed {
        match hash(f) {
            Ok(x) if x == *h => {}
            Ok(_) => v.push(format!("{} (a snapshot's file) changed", f.display())),
            Err(e) => v.push(e),
        }
    }
    let again = w.recover(&Inject::None);
    if again.code() != Some(0) || !again.stdout.contains("nothing to recover") {
        v.push(format!("a second vsnap-recover: {}", again.describe()));
    }
    if v.is_empty() {
        Ok(committed)
    } else {
        Err(v)
    }
}

fn run_scenario(bins: &Bins, base: &Path, sc: &Scenario, quick: bool) -> Result<Report, String> {
    let t = Instant::now();
    let _btrfs;
    let parent = if sc.btrfs {
        let dir = base.join(format!("{}-fs", sc.name));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let b = BtrfsLoop::create(&dir, 256 << 20)?;
        let m = b.mount.clone();
        _btrfs = Some(b);
        m
    } else {
        _btrfs = None;
        base.to_path_buf()
    };
    let w = World {
        bins,
        root: parent.join(sc.name),
    };
    let tpl = parent.join(format!("{}.template", sc.name));
    setup(&w, sc)?;
    let before_current = w.current()?;
    let needed = w.needed_hashes()?;
    replace_tree(&w.root, &tpl).map_err(|e| e.to_string())?;
    // The reference run: the points, and a clean result.
    let log = parent.join(format!("{}.points", sc.name));
    let r = w.vsnap(
        &["snapshot", "revert", "d", sc.target],
        &Inject::Log(log.clone()),
    );
    if !r.success() {
        return Err(format!("reference run: {}", r.describe()));
    }
    let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
    let points = expand_points(&text);
    let mut rep = Report::default();
    if w.pattern(sc.left_out)? != Some(S) {
        rep.violations
            .push("reference run: the disks do not read the snapshot's data".into());
    }
    let revert = ["snapshot", "revert", "d", sc.target];
    for (i, p) in points.iter().enumerate() {
        if quick && i % 3 != 0 && i + 1 != points.len() {
            continue;
        }
        rep.points += 1;
        let kills_max = if quick { 1 } else { RECOVERY_KILLS_MAX };
        // k = 0: recovery not killed; k >= 1: killed at its k-th point, then run again.
        for k in 0..=kills_max {
            replace_tree(&tpl, &w.root).map_err(|e| e.to_string())?;
            let at = format!(
                "{} {p}{}",
                sc.name,
                if k > 0 {
                    format!(" + recovery *#{k}")
                } else {
                    String::new()
                }
            );
            let r = w.vsnap(&revert, &Inject::CrashAt(p.clone()));
            if !r.killed() {
                rep.violations
                    .push(format!("{at}: vsnap did not die there: {}", r.describe()));
                break;
            }
            let rec = if k > 0 {
                let first = w.recover(&Inject::CrashAt(format!("*#{k}")));
                if !first.killed() {
                    break; // recovery passes fewer than k points: done
                }
                rep.recovery_kills += 1;
                w.recover(&Inject::None)
            } else {
                w.recover(&Inject::None)
            };
            match check(&w, sc, &before_current, &needed, &rec) {
                Ok(true) => rep.committed += 1,
                Ok(false) => rep.rolled_back += 1,
                Err(v) => rep
                    .violations
                    .extend(v.into_iter().map(|x| format!("{at}: {x}"))),
            }
        }
    }
    println!(
        "scenario {:<10} points {:>3} (of {:>3})  recovery kills {:>4}  committed {:>4}  rolled back {:>4}  violations {:>2}  {:>6.1} s",
        sc.name,
        rep.points,
        points.len(),
        rep.recovery_kills,
        rep.committed,
        rep.rolled_back,
        rep.violations.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(rep)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let filter = args.first().cloned();
    let quick = std::env::var("VSNAP_CRASH_QUICK").is_ok_and(|v| v == "1");
    let t0 = Instant::now();
    let bins = match Bins::locate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("revert crash suite: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scratch = match scratch_dir("vsnap-revert-crash.") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("revert crash suite: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = std::fs::canonicalize(scratch.path()).expect("scratch dir");
    if let Err(e) = bins.require_failpoints(&base) {
        eprintln!("revert crash suite: FAILED: {e}");
        return ExitCode::FAILURE;
    }
    let mut total = Report::default();
    let mut failed = false;
    for sc in scenarios()
        .iter()
        .filter(|s| filter.as_deref().is_none_or(|f| s.name.contains(f)))
    {
        match run_scenario(&bins, &base, sc, quick) {
            Ok(r) => {
                total.points += r.points;
                total.recovery_kills += r.recovery_kills;
                total.committed += r.committed;
                total.rolled_back += r.rolled_back;
                for v in &r.violations {
                    println!("  VIOLATION {v}");
                }
                total.violations.extend(r.violations);
            }
            Err(e) => {
                println!("scenario {}: HARNESS ERROR: {e}", sc.name);
                failed = true;
            }
        }
    }
    println!(
        "revert crash suite: {} vsnap crash points + {} vsnap-recover crash points explored; committed {}, rolled back {}; {} violation(s); {:.1} s",
        total.points,
        total.recovery_kills,
        total.committed,
        total.rolled_back,
        total.violations.len(),
        t0.elapsed().as_secs_f64()
    );
    if failed || !total.violations.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
