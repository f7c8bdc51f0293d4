//! vsnap's live crash suite: domain snapshots of the real test guest
//! (`guest/`), with its writer running, and reverts of the running guest
//! to an internal snapshot with memory and to external ones, disk-only
//! or with a memory file (QEMU restarted), killed at every crash point they
//! pass, recovered, and checked against DESIGN.md section 5; `vsnap-recover`
//! itself killed mid-way (a sample); QEMU killed with vsnap around the pivot
//! (a host-crash stand-in).
//!
//! ```text
//! cargo build -p vsnap-cli --features vsnap-cli/failpoints
//! cargo test -p vsnap-crash --test live_crash
//! ```
//!
//! One guest at a time (three 32 MiB ext4 disks made on the host) serves
//! every crash point of a scenario: after a crash and its recovery the
//! guest is consistent, and the next point simply takes another snapshot
//! under a new name. Scenarios, in order:
//!
//! * domain `ga` (vda raw, vdb, vdc qcow2): `a` live external disk-only,
//!   quiesced, vda+vdb (`--disk vdc=no`), the DESIGN.md example;
//! * domain `gb` (same disks, new): `b` live external disk-only, not
//!   quiesced, all disks; then, on the images the catalog names after b's
//!   QEMU kills (the guest rebooted on them), `c` live internal with memory
//!   (`--memory internal`, QEMU's `snapshot-save`);
//! * domain `gr` (vda raw, vdb, vdc qcow2, all on a loop-mounted btrfs,
//!   new): `r-mix` live, vda a reflink clone and vdb an external overlay
//!   inside one pause (stop, clone, rename, the transaction as the pivot,
//!   cont); `r-only` live, vda a reflink clone alone (the pivot is the
//!   catalog write); `r-halt` live `--halt` (vda reflink, vdb external:
//!   stop, clone, the transaction, QMP quit). After every point the guest
//!   must be running (not left paused) and no temporary clone left, except
//!   after a committed `--halt`: then QEMU must be gone (it is booted again
//!   on the catalog's images for the next point);
//! * domain `gm` (as `ga`, new): `mem` live with the memory state to a
//!   file (`--memory external:PATH`: stop, QEMU's migration stream to a
//!   temporary file through `getfd` + `migrate fd:`, rename, the
//!   transaction as the pivot, cont), vda+vdb; the memory file is checked
//!   with the snapshot (present when committed, no temporary left);
//! * domain `gv` (three qcow2 disks, new): two internal snapshots with
//!   memory of the running guest, `m0` and `m1`, made once, uncrashed (the
//!   writer had written every disk); then `rv-mem`, `snapshot revert` of
//!   the running guest (the catalog as the pivot, step 0, committed with
//!   the plan's begin; then QEMU's `snapshot-load` job in the same QEMU),
//!   `rv-paused`, the same with `--paused` (`stop` before the pivot;
//!   the guest is left paused), and `rv-cont`, `--running` of a guest
//!   paused before the revert (`cont` after the load). See "Reverts"
//!   below;
//! * domain `gx` (as `ga`, new): two live external disk-only snapshots
//!   (`--live --disk-only`), `x0` and `x1`, made once, uncrashed; then
//!   `rv-ext`, `snapshot revert` of the running guest, which restarts
//!   QEMU: plan 1 (new overlays on the snapshot's frozen files, the
//!   catalog as the pivot, QEMU's `quit`, the discarded overlays
//!   removed), then, in the same vsnap process, plan 2, `domain start`'s
//!   (`qemu-launch` with `-S`, its pivot, `cont`). See "Reverts that
//!   restart QEMU" below;
//! * domain `gy` (as `ga`, new): the same, `rv-memfile`, to two live
//!   snapshots with the memory state in a file (`--memory
//!   external:PATH`), `y0` and `y1` (plan 2: `qemu-launch` with
//!   `-incoming defer`, `qmp-migrate-from-file`, its pivot, `cont`);
//! * domain `gd` (three qcow2 disks, new; the guest runs until its writer
//!   wrote every disk, then is shut off): `d-int` offline internal
//!   (vda+vdb) and `d-ext` offline external (all disks), no QEMU; at the
//!   end the guest boots on the images the catalog names and is checked.
//!
//! A new domain per group keeps the domain check (which reads every file
//! of every snapshot of the domain, a qemu-img run each) from slowing
//! every later point down.
//!
//! For each crash point: vsnap dies there by SIGKILL; `vsnap-recover`
//! exits 0; then `Engine::domain_check` (QEMU runs on the catalog's images,
//! no stale vsnap block node, agent thawed, snapshots on disk both ways, no
//! orphan or temporary file, no unfinished plan) has no violation; the
//! guest is running (query-status) and thawed (agent); the snapshot is in
//! the catalog exactly when the journal's `Finished` record says
//! `Committed`, and the outcome is the one the point's position requires
//! (before the pivot took effect: rolled back; after: rolled forward); the
//! domain record is the old one (rolled back) or points at the new
//! overlays (rolled forward); no file that existed before is gone; a
//! committed snapshot's state files hold the writer's sequence numbers in
//! agreement across its disks and no older than what the guest had written
//! before the snapshot began; a second `vsnap-recover` says "nothing to
//! recover".
//!
//! QEMU killed (with vsnap) around the pivot, a host-crash stand-in, before
//! and after the pivot of every live shape (`POINT+data`: QEMU lives on
//! after vsnap's death until the guest wrote through a new overlay, then
//! dies): `vsnap-recover` must decide from the files (DESIGN.md 10.1), with
//! no operator step: exit 0, committed or rolled back, and the outcome the
//! point and the files call for (read by `qemu-img`, independently of
//! vsnap: before the pivot took effect, back; once the pivot's `Done` is
//! journaled, forward; in between, forward exactly when an overlay has
//! data of its own, or for `snapshot-save` when the snapshot is on every
//! disk). Then, with the domain shut off: the checks above (the domain
//! check of a shut-off domain runs `qemu-img check` on every image), no
//! file of a rolled-back plan left, the internal snapshot present exactly
//! when committed with memory, and nothing the guest had flushed lost
//! (each disk's catalog image holds at least the writer's sequence number
//! its files held when QEMU died); then the guest boots on the catalog's
//! images and the domain check is clean again. The suite prints `QEMU
//! kills: K, decided: D, needs attention: A` and fails when A > 0.
//!
//! Reverts (`rv-*`). Each trial reverts to the one of `m0`/`m1` that is
//! not the domain's current snapshot, so the current snapshot tells a
//! committed revert from a rolled-back one. Before it the guest runs and
//! its writer is at least `REVERT_MARGIN` records past the target's on
//! every disk (not at the target's state); the harness pauses it (QMP
//! `stop`: QEMU drains and flushes), reads every disk's record, resumes
//! it (`rv-cont`: leaves it paused). After `vsnap-recover` (exit 0, no needs-attention): the revert
//! plan ended `Committed` or `RolledBack` (a kill before the plan was
//! journaled did nothing: rolled back), as the point's position requires;
//! the guest is running (the targets were taken of a running guest), or
//! paused after a committed `--paused` or a rolled-back `rv-cont` (it was
//! paused), and thawed; paused by the harness, every disk reads: committed, the snapshot's boot and a number in
//! [the snapshot's, the one read before) (the writer went on in the same
//! boot from the snapshot's numbers; the most it wrote before the pause
//! is printed, well under the margin); rolled back, at or above the one
//! read before. The current snapshot is the target exactly when
//! committed; nothing else of the domain or its snapshots changed;
//! `Engine::domain_check` clean; no file gone or new; a second recovery
//! is a no-op. `vsnap-recover` is also killed mid-way after the sample
//! and after `step.snapshot-load.started` (vsnap dead with QEMU's job
//! running). QEMU is killed with vsnap before the pivot (`--paused`:
//! after the `stop`), as the plan's first transaction may or may not be
//! durable, after the pivot, before QEMU's job, while it may run, after
//! it (`rv-cont`: and before the `cont`): recovery decides; rolled back,
//! the shut-off domain is on its images, which hold at least what the
//! guest had flushed when QEMU died;
//! committed, the snapshot was applied offline (`qemu-img snapshot -a`)
//! and every image reads exactly the snapshot's record; then the guest
//! boots on the catalog's images (counted in the QEMU kills line).
//!
//! Reverts that restart QEMU (`rv-ext`, `rv-memfile`). As above (the target the one of
//! `x0`/`x1` that is not current, the writer `REVERT_MARGIN` past it,
//! every disk read with the guest paused just before); the snapshot's
//! record per disk is its frozen file's. The domain is attached
//! (`domain attach`), so it has a launch spec, recorded from the argv of
//! the QEMU `guest/run.sh` started. The reference run's
//! points cover both plans; the expected outcome is plan 1's (its
//! pivot). After `vsnap-recover` (exit 0, no needs-attention): plan 1
//! committed: the current snapshot is the target, every disk a new
//! `.revert-` overlay backed by the snapshot's frozen file, and either
//! QEMU runs on them (plan 2 committed: query-status running; paused by
//! the harness, each disk reads, `rv-ext`: the guest booted afresh, the
//! snapshot's record or a later boot going on from its numbers, below
//! the one read before; `rv-memfile`: the memory loaded, the snapshot's
//! boot, from its number up to below the one read before) or none answers (vsnap died before or inside
//! plan 2, rolled back: the domain shut off, the old QEMU gone, each
//! image exactly the snapshot's record); plan 1 rolled back: the domain
//! record as it was, the old QEMU running on its images, at or above the
//! number read before. Then: the snapshots unchanged (but for the
//! overlay a committed revert discarded), `Engine::domain_check` clean,
//! every file a snapshot needs present, no file gone or new but the
//! discarded and the new overlays (committed), a second recovery a
//! no-op; a shut-off domain is started by `vsnap domain start` (the
//! harness then follows its pidfile in `<state>/run/`). `vsnap-recover`
//! is killed mid-way also after plan 2's begin (vsnap dead between the
//! plans). QEMU is killed with vsnap before plan 1's pivot (the overlays
//! made), at its commit, and after it (before the `quit`): recovery
//! decides; committed, every new overlay reads exactly the snapshot's
//! record; rolled back, the images hold what the guest had flushed; then
//! `vsnap domain start`.
//!
//! Environment:
//! * `VSNAP_BIN_DIR` — where `vsnap` and `vsnap-recover` are (default
//!   `<workspace>/target/debug`); they must have crash points.
//! * `VSNAP_CRASH_QUICK=1` — a sample of the points (every 4th, plus all
//!   around the pivot), one recovery-kill exploration (two for a revert)
//!   and two or three QEMU kills per scenario (before and after its
//!   pivot).
//! * `VSNAP_CRASH_KEEP=1` — keep the scratch directory (printed).
//! * A free argument runs only the scenarios whose key contains it (the
//!   others of the same group still run once, uncrashed, to build the
//!   state the selected ones start from).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use vsnap_crash::{
    diff_listing, expand_points, listing, scratch_dir, workspace_root, Bins, BtrfsLoop, Inject,
    Listing, Run,
};
use vsnap_engine::{DiskMode, DomSnapshot, DomainRec, Engine, Format};
use vsnap_steps::{live, qemu_img};

/// Size of each guest disk.
const DISK_MB: u64 = 32;
/// No vsnap or vsnap-recover run may take longer (they have timeouts of
/// their own on every wait; this catches a hang).
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Boot to VSNAP-GUEST-READY, on a busy machine.
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// A bound on `vsnap-recover` kills per exploration: more is a loop.
const RECOVERY_KILLS_MAX: usize = 300;

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

// --- running the binaries, with a time limit --------------------------------

/// A run of a binary; `timed_out` when the harness had to kill it.
struct Ran {
    run: Run,
    timed_out: bool,
}

impl Ran {
    fn describe(&self) -> String {
        let d = self.run.describe();
        if self.timed_out {
            format!(
                "{d} [HUNG: killed by the harness after {} s]",
                RUN_LIMIT.as_secs()
            )
        } else {
            d
        }
    }
    fn killed_by_crash_point(&self) -> bool {
        !self.timed_out && self.run.killed()
    }
    fn code(&self) -> Option<i32> {
        if self.timed_out {
            None
        } else {
            self.run.code()
        }
    }
}

fn run_timed(program: &Path, args: &[OsString], inject: &Inject) -> Ran {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("VSNAP_CRASH_AT")
        .env_remove("VSNAP_FAILPOINT_LOG")
        .env_remove("VSNAP_STATE_DIR")
        .env("LC_ALL", "C");
    let mut cmdline = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned();
    for a in args {
        cmdline.push(' ');
        cmdline.push_str(&a.to_string_lossy());
    }
    match inject {
        Inject::None => {}
        Inject::CrashAt(spec) => {
            cmd.env("VSNAP_CRASH_AT", spec);
            cmdline = format!("VSNAP_CRASH_AT={spec} {cmdline}");
        }
        Inject::Log(file) => {
            cmd.env("VSNAP_FAILPOINT_LOG", file);
        }
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let ro = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let re = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait for a killed child");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {cmdline}: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&ro.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&re.join().unwrap_or_default()).into_owned();
    Ran {
        run: Run {
            cmdline,
            status,
            stdout,
            stderr,
        },
        timed_out,
    }
}

// --- the guest ------------------------------------------------------------------

fn proc_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let t = Instant::now();
    while proc_alive(pid) {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The test guest's QEMU; killed (SIGKILL) on drop, also while a panic
/// unwinds.
struct Guest {
    dir: PathBuf,
    pid: Option<u32>,
    boots: Vec<f64>,
}

impl Guest {
    fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    fn qga(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    /// Boot on `disks` (vda, vdb, ... in order) and wait for the READY line.
    fn boot(&mut self, disks: &[(PathBuf, Format)]) -> Result<f64, String> {
        self.kill()?;
        let t = Instant::now();
        let mut cmd = Command::new(workspace_root().join("guest/run.sh"));
        cmd.arg("-d").arg(&self.dir).stdin(Stdio::null());
        for (p, f) in disks {
            cmd.arg(format!("{}:{}", p.display(), f.as_str()));
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run guest/run.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "guest/run.sh failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let pidfile = self.dir.join("qemu.pid");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .map_err(|e| format!("reading {}: {e}", pidfile.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("{}: {e}", pidfile.display()))?;
        self.pid = Some(pid);
        let log = self.dir.join("console.log");
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if text.contains("VSNAP-GUEST-READY") {
                break;
            }
            if text.contains("Kernel panic") {
                return Err(format!("the guest panicked: see {}", log.display()));
            }
            if !proc_alive(pid) {
                return Err(format!(
                    "QEMU (pid {pid}) exited during boot: see {}",
                    log.display()
                ));
            }
            if t.elapsed() > BOOT_LIMIT {
                return Err(format!(
                    "no VSNAP-GUEST-READY in {} after {} s",
                    log.display(),
                    BOOT_LIMIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let s = t.elapsed().as_secs_f64();
        self.boots.push(s);
        Ok(s)
    }

    /// SIGKILL QEMU and wait until it is gone.
    fn kill(&mut self) -> Result<(), String> {
        let Some(pid) = self.pid.take() else {
            return Ok(());
        };
        if proc_alive(pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if wait_gone(pid, Duration::from_secs(30)) {
            Ok(())
        } else {
            Err(format!("QEMU pid {pid} still alive 30 s after SIGKILL"))
        }
    }

    /// QMP `quit` (a shut-off guest), falling back to SIGKILL.
    fn quit(&mut self) -> Result<(), String> {
        let Some(pid) = self.pid else {
            return Ok(());
        };
        let r = live::qmp(&self.qmp()).and_then(|mut q| q.quit());
        if r.is_ok() && wait_gone(pid, Duration::from_secs(30)) {
            self.pid = None;
            return Ok(());
        }
        self.kill()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("warning: {e}");
        }
    }
}

// --- reading the writer's sequence numbers ------------------------------------

/// The highest writer record of `image` (`snapshot`: an internal snapshot
/// of it): (seq, the disk name the guest wrote in it).
fn image_seq(
    scratch: &Path,
    image: &Path,
    snapshot: Option<&str>,
) -> Result<(u64, String), String> {
    image_rec(scratch, image, snapshot).map(|r| (r.seq, r.disk))
}

/// One writer record: its sequence number, the disk the guest wrote it
/// to, and the writer's start count (`boot`: the same after a revert to
/// a snapshot with memory, one more after a reboot).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    seq: u64,
    disk: String,
    boot: u64,
}

/// The highest writer record of `image` (`snapshot`: an internal snapshot
/// of it).
fn image_rec(scratch: &Path, image: &Path, snapshot: Option<&str>) -> Result<Rec, String> {
    let fmt = qemu_img::detect_format(image).map_err(|e| e.to_string())?;
    let tmp = scratch.join("seq-read.raw");
    let raw = if fmt == Format::Raw && snapshot.is_none() {
        image.to_path_buf()
    } else {
        let _ = std::fs::remove_file(&tmp);
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-U", "-f", fmt.as_str()]);
        if let Some(s) = snapshot {
            c.arg("-l").arg(format!("snapshot.name={s}"));
        }
        c.args(["-O", "raw"]).arg(image).arg(&tmp);
        let out = c
            .output()
            .map_err(|e| format!("cannot run qemu-img: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img convert of {}{}: {}",
                image.display(),
                snapshot
                    .map(|s| format!(" (snapshot {s})"))
                    .unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        tmp.clone()
    };
    let out = Command::new("debugfs")
        .args(["-R", "cat /seq"])
        .arg(&raw)
        .output()
        .map_err(|e| format!("cannot run debugfs: {e}"))?;
    let _ = std::fs::remove_file(&tmp);
    let data = out.stdout;
    let mut best: Option<Rec> = None;
    for slot in data.chunks(512).take(64) {
        let Some(rest) = slot.strip_prefix(b"VSNAPSEQ seq=") else {
            continue;
        };
        if rest.len() < 20 {
            continue;
        }
        let Some(seq) = std::str::from_utf8(&rest[..20])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let tail = String::from_utf8_lossy(&rest[20..]);
        let disk = tail
            .strip_prefix(" disk=")
            .and_then(|t| t.split(' ').next())
            .unwrap_or("?")
            .to_string();
        let boot = tail
            .split(' ')
            .find_map(|w| w.strip_prefix("boot="))
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(0);
        if best.as_ref().is_none_or(|b| seq > b.seq) {
            best = Some(Rec { seq, disk, boot });
        }
    }
    best.ok_or_else(|| {
        format!(
            "no writer record in /seq of {}{} ({} bytes read; debugfs: {})",
            image.display(),
            snapshot
                .map(|s| format!(" (snapshot {s})"))
                .unwrap_or_default(),
            data.len(),
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " | ")
        )
    })
}

/// Whether the qcow2 `overlay` maps data of its own (`qemu-img map`: an
/// extent at depth 0 that is data or zero, not its backing file's): read
/// by qemu-img, independently of vsnap's own reader.
fn own_data(overlay: &Path) -> Result<bool, String> {
    let out = Command::new("qemu-img")
        .args(["map", "-U", "--output=json", "-f", "qcow2"])
        .arg(overlay)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img map {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let map: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img map {}: {e}", overlay.display()))?;
    Ok(map.as_array().is_some_and(|a| {
        a.iter().any(|x| {
            x["depth"].as_u64() == Some(0)
                && (x["data"].as_bool() == Some(true) || x["zero"].as_bool() == Some(true))
                && x["present"].as_bool() != Some(false)
        })
    }))
}

// --- scenarios -------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    LiveExternal,
    LiveMemory,
    /// A running guest whose pivot is the catalog write (reflink clones
    /// only: stop, clone, rename, catalog, cont).
    LiveCatalog,
    Offline,
    /// A running guest reverted to an internal snapshot with memory
    /// (`snapshot revert`: [qmp-stop], the catalog as the pivot, QEMU's
    /// `snapshot-load`, [qmp-cont]); `flags` are the revert's own.
    LiveRevert,
    /// A running guest reverted to an external disk-only snapshot: two
    /// plans in one vsnap process (new overlays, the catalog as the
    /// pivot, QEMU's `quit`, the discarded overlays removed; then
    /// `domain start`'s: `qemu-launch`, its pivot, `cont`).
    LiveRevertExt,
    /// The same to a live snapshot with its memory in a file (plan 2
    /// starts QEMU with `-incoming defer` and loads the file).
    LiveRevertMemFile,
}

/// A revert that restarts QEMU (two plans).
fn ext_revert(kind: Kind) -> bool {
    matches!(kind, Kind::LiveRevertExt | Kind::LiveRevertMemFile)
}

struct Scenario {
    key: &'static str,
    title: &'static str,
    kind: Kind,
    /// `snapshot create` arguments after the snapshot's name (for
    /// `LiveRevert`: `snapshot revert` arguments after the target's).
    flags: &'static [&'static str],
    /// Points where QEMU is killed too (by name; `{pivot}`, `{before}`,
    /// `{load}` (the step after the pivot) are replaced).
    qemu_kills: &'static [&'static str],
    qemu_kills_quick: &'static [&'static str],
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            key: "a",
            title: "live external disk-only, quiesced, vda+vdb (vdc=no)",
            kind: Kind::LiveExternal,
            flags: &["--live", "--disk-only", "--quiesce", "--disk", "vdc=no"],
            qemu_kills: &[
                "run.done.{before}#1",
                "step.qmp-transaction.before#1",
                "step.qmp-transaction.after#1",
                "run.applied.{pivot}#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["run.done.{before}#1", "step.qmp-transaction.after#1"],
        },
        Scenario {
            key: "b",
            title: "live external disk-only, not quiesced, all disks",
            kind: Kind::LiveExternal,
            flags: &["--live", "--disk-only"],
            qemu_kills: &[
                "step.qmp-transaction.before#1",
                "step.qmp-transaction.after#1",
                "step.qmp-transaction.after#1+data",
                "run.applied.{pivot}#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &[
                "step.qmp-transaction.before#1",
                "step.qmp-transaction.after#1+data",
                "run.applied.{pivot}#1",
            ],
        },
        Scenario {
            key: "c",
            title: "live internal with memory (snapshot-save), all disks",
            kind: Kind::LiveMemory,
            flags: &["--live", "--memory", "internal"],
            qemu_kills: &[
                "step.snapshot-save.before#1",
                "run.applied.{pivot}#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["step.snapshot-save.before#1", "run.applied.{pivot}#1"],
        },
        Scenario {
            key: "r-mix",
            title: "live, vda raw reflink + vdb external, one pause (vdc=no)",
            kind: Kind::LiveExternal,
            flags: &[
                "--live",
                "--disk-only",
                "--disk",
                "vda=reflink",
                "--disk",
                "vdc=no",
            ],
            qemu_kills: &[
                "step.qmp-transaction.before#1",
                "step.qmp-transaction.after#1",
                "run.applied.{pivot}#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["step.qmp-transaction.before#1", "run.done.{pivot}#1"],
        },
        Scenario {
            key: "r-only",
            title: "live, vda raw reflink only (pause, clone, resume)",
            kind: Kind::LiveCatalog,
            flags: &[
                "--live",
                "--disk-only",
                "--disk",
                "vda=reflink",
                "--disk",
                "vdb=no",
                "--disk",
                "vdc=no",
            ],
            // before the pivot; as the catalog write (the pivot) may or may
            // not be durable; once it is, before `cont` (step 4): QEMU
            // gone, the cont is done.
            qemu_kills: &[
                "run.done.{before}#1",
                "run.started.{pivot}#1",
                "journal.pivot.committed#1",
                "run.started.4#1",
            ],
            qemu_kills_quick: &["run.done.{before}#1", "run.started.4#1"],
        },
        Scenario {
            key: "r-halt",
            title: "live --halt, vda reflink + vdb external (stop, ..., quit)",
            kind: Kind::LiveExternal,
            flags: &[
                "--live",
                "--disk-only",
                "--halt",
                "--disk",
                "vda=reflink",
                "--disk",
                "vdc=no",
            ],
            qemu_kills: &[
                "run.done.{before}#1",
                "step.qmp-transaction.after#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["run.done.{before}#1", "run.done.{pivot}#1"],
        },
        Scenario {
            key: "mem",
            title: "live, memory to a file (migrate to fd:), vda+vdb external",
            kind: Kind::LiveExternal,
            flags: &[
                "--live",
                "--memory",
                "external:{disks}/{name}.mem",
                "--disk",
                "vdc=no",
            ],
            qemu_kills: &[
                "step.migrate.before-fsync#1",
                "step.qmp-transaction.before#1",
                "step.qmp-transaction.after#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["step.migrate.before-fsync#1", "run.done.{pivot}#1"],
        },
        Scenario {
            key: "rv-mem",
            title: "revert, running, to an internal memory snapshot",
            kind: Kind::LiveRevert,
            flags: &[],
            // The pivot is step 0, in the plan's first transaction: QEMU
            // dies as that may or may not be durable; after the pivot,
            // before QEMU's snapshot-load job, while it runs, after it.
            qemu_kills: &[
                "journal.begin.inserted#1",
                "run.done.{pivot}#1",
                "step.snapshot-load.before#1",
                "step.snapshot-load.started#1",
                "run.applied.{load}#1",
            ],
            qemu_kills_quick: &["journal.begin.inserted#1", "step.snapshot-load.before#1"],
        },
        Scenario {
            key: "rv-paused",
            title: "revert --paused, running, to an internal memory snapshot",
            kind: Kind::LiveRevert,
            flags: &["--paused"],
            // stop (step 0), before the pivot; the pivot's commit; after.
            qemu_kills: &[
                "run.applied.{before}#1",
                "journal.pivot.committed#1",
                "run.done.{pivot}#1",
                "step.snapshot-load.before#1",
                "step.snapshot-load.started#1",
                "run.applied.{load}#1",
            ],
            qemu_kills_quick: &["run.applied.{before}#1", "run.done.{pivot}#1"],
        },
        Scenario {
            key: "rv-cont",
            title: "revert --running, paused, to an internal memory snapshot",
            kind: Kind::LiveRevert,
            flags: &["--running"],
            // The pivot (step 0) with the plan's begin; before the job;
            // after it, before the cont (step 2).
            qemu_kills: &[
                "journal.begin.inserted#1",
                "step.snapshot-load.before#1",
                "run.applied.{load}#1",
                "run.started.2#1",
            ],
            qemu_kills_quick: &["journal.begin.inserted#1", "run.started.2#1"],
        },
        Scenario {
            key: "rv-ext",
            title: "revert, running, to a live external disk-only snapshot",
            kind: Kind::LiveRevertExt,
            flags: &[],
            // Plan 1: the overlays made, before the pivot; the pivot's
            // commit (with the last overlay's Done); after it, before
            // QEMU's quit.
            qemu_kills: &[
                "run.applied.{before}#1",
                "journal.pivot.committed#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["run.applied.{before}#1", "run.done.{pivot}#1"],
        },
        Scenario {
            key: "rv-memfile",
            title: "revert, running, to a live snapshot with a memory file",
            kind: Kind::LiveRevertMemFile,
            flags: &[],
            qemu_kills: &[
                "run.applied.{before}#1",
                "journal.pivot.committed#1",
                "run.done.{pivot}#1",
            ],
            qemu_kills_quick: &["run.applied.{before}#1", "run.done.{pivot}#1"],
        },
        Scenario {
            key: "d-ext",
            title: "offline external, all disks (guest shut off)",
            kind: Kind::Offline,
            flags: &[
                "--disk",
                "vda=external",
                "--disk",
                "vdb=external",
                "--disk",
                "vdc=external",
            ],
            qemu_kills: &[],
            qemu_kills_quick: &[],
        },
        Scenario {
            key: "d-int",
            title: "offline internal, vda+vdb (vdc=no; guest shut off)",
            kind: Kind::Offline,
            flags: &[
                "--disk",
                "vda=internal",
                "--disk",
                "vdb=internal",
                "--disk",
                "vdc=no",
            ],
            qemu_kills: &[],
            qemu_kills_quick: &[],
        },
    ]
}

/// What recovery must do after a crash at a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Back,
    Forward,
    /// Between the pivot's sled transaction and its flush, for a pivot
    /// that cannot be probed (the catalog write): either is correct.
    Either,
}

/// The points of one uncrashed run, and where the pivot lies among them.
struct PointMap {
    points: Vec<String>,
    pivot: u32,
    /// First point at which the pivot has taken effect.
    effect: usize,
    /// The pivot's `run.done` point.
    done: usize,
    probeable: bool,
    /// A point whose recovery is killed too, in quick runs also (a
    /// revert's: vsnap dead with QEMU's snapshot-load job running).
    also_sample: Option<usize>,
}

impl PointMap {
    fn new(log: &str, kind: Kind) -> Result<PointMap, String> {
        let points = expand_points(log);
        let pos = |p: &str| points.iter().position(|x| x == p);
        // A plan whose first step is the catalog pivot commits it with its
        // begin (one transaction): `journal.begin.inserted`.
        let commit = match pos("journal.pivot.committed#1") {
            Some(c) => c,
            None if kind == Kind::LiveRevert => pos("journal.begin.inserted#1")
                .ok_or("no journal.pivot.committed or journal.begin.inserted point")?,
            None => return Err("no journal.pivot.committed point in the run".into()),
        };
        let pivot: u32 = if matches!(
            kind,
            Kind::LiveRevert | Kind::LiveRevertExt | Kind::LiveRevertMemFile
        ) {
            // The catalog pivot's Started is written in its commit's
            // transaction: its `run.started` is the first after it.
            points[commit..]
                .iter()
                .find_map(|p| {
                    p.strip_prefix("run.started.")
                        .and_then(|r| r.split('#').next())
                        .and_then(|n| n.parse().ok())
                })
                .ok_or("no run.started point after the pivot's commit")?
        } else {
            points[..commit]
                .iter()
                .rev()
                .find_map(|p| {
                    p.strip_prefix("run.started.")
                        .and_then(|r| r.split('#').next())
                        .and_then(|n| n.parse().ok())
                })
                .ok_or("no run.started point before the pivot's commit")?
        };
        let done = points
            .iter()
            .enumerate()
            .skip(commit)
            .find(|(_, p)| p.starts_with(&format!("run.done.{pivot}#")))
            .map(|(i, _)| i)
            .ok_or("no run.done point of the pivot")?;
        let (effect, probeable) = match kind {
            Kind::LiveExternal => (
                pos("step.qmp-transaction.after#1").ok_or("no step.qmp-transaction.after point")?,
                true,
            ),
            Kind::LiveMemory => (
                pos(&format!("run.applied.{pivot}#1"))
                    .ok_or("no run.applied point of the pivot")?,
                true,
            ),
            Kind::Offline
            | Kind::LiveCatalog
            | Kind::LiveRevert
            | Kind::LiveRevertExt
            | Kind::LiveRevertMemFile => (commit, false),
        };
        let also_sample = match kind {
            Kind::LiveRevert => pos("step.snapshot-load.started#1"),
            // vsnap dead between its two plans (plan 2's begin).
            Kind::LiveRevertExt | Kind::LiveRevertMemFile => pos("journal.begin.inserted#2"),
            _ => None,
        };
        Ok(PointMap {
            points,
            pivot,
            effect,
            done,
            probeable,
            also_sample,
        })
    }

    fn expect(&self, i: usize) -> Expect {
        if i < self.effect {
            Expect::Back
        } else if i >= self.done || self.probeable {
            Expect::Forward
        } else {
            Expect::Either
        }
    }

    /// `{pivot}` / `{before}` (the step before the pivot) / `{load}`
    /// (the step after it) filled in.
    fn resolve(&self, p: &str) -> String {
        p.replace("{pivot}", &self.pivot.to_string())
            .replace("{before}", &self.pivot.saturating_sub(1).to_string())
            .replace("{load}", &(self.pivot + 1).to_string())
    }

    fn index(&self, p: &str) -> Option<usize> {
        self.points.iter().position(|x| x == p)
    }

    /// The points to crash at.
    fn selection(&self, quick: bool) -> Vec<usize> {
        (0..self.points.len())
            .filter(|&i| {
                !quick
                    || i % 4 == 0
                    || (i + 2 >= self.effect && i <= self.done + 1)
                    || Some(i) == self.also_sample
                    || i + 1 == self.points.len()
            })
            .collect()
    }

    /// The points where vsnap-recover is killed too.
    fn recovery_sample(&self, quick: bool) -> BTreeSet<usize> {
        let mut s = BTreeSet::new();
        s.insert(self.effect);
        s.extend(self.also_sample);
        if !quick {
            s.insert(self.effect.saturating_sub(1));
            s.insert(self.effect.saturating_sub(1) / 2);
            s.insert(self.done);
        }
        s
    }
}

// --- the state seen before a run --------------------------------------------------

struct Before {
    dom: DomainRec,
    snaps: Vec<DomSnapshot>,
    plans: usize,
    listing: Listing,
    /// The writer's seq on each disk's current image, read before the run.
    seq: BTreeMap<String, u64>,
}

/// A violation: where, and what.
struct Violation {
    at: String,
    what: Vec<String>,
}

struct ScenarioReport {
    key: &'static str,
    points: usize,
    recovery_kills: usize,
    qemu_kills: usize,
    /// QEMU kills that recovery decided (exit 0, committed or rolled back).
    qemu_decided: usize,
    /// QEMU kills that recovery left needing attention.
    qemu_attention: usize,
    committed: usize,
    rolled_back: usize,
    failed: usize,
    seconds: f64,
    notes: Vec<String>,
}

struct Suite {
    /// Seconds spent per phase (for the report and for tuning).
    phases: BTreeMap<&'static str, f64>,
    bins: Bins,
    root: PathBuf,
    /// The domain of the current group, and its disks' directory.
    dom: String,
    disks: PathBuf,
    state: PathBuf,
    guest: Guest,
    quick: bool,
    counter: usize,
    violations: Vec<Violation>,
    /// Per disk target, the highest seq a committed snapshot held so far.
    last_seq: BTreeMap<String, u64>,
    /// What the last seq check read (for the report).
    last_seq_note: String,
    /// The btrfs of the current group, if it has one (after `guest`:
    /// unmounted once QEMU is gone).
    btrfs: Option<BtrfsLoop>,
    /// The revert targets of the current group, once made.
    rev: Option<RevTargets>,
}

impl Suite {
    /// Add the time since `t` to `phase`.
    fn took(&mut self, phase: &'static str, t: Instant) {
        *self.phases.entry(phase).or_insert(0.0) += t.elapsed().as_secs_f64();
    }

    fn vsnap<S: AsRef<OsStr>>(&self, args: &[S], inject: &Inject) -> Ran {
        let mut a = vec![os("--state-dir"), os(&self.state)];
        a.extend(args.iter().map(os));
        run_timed(&self.bins.vsnap, &a, inject)
    }

    fn recover(&self, inject: &Inject) -> Ran {
        run_timed(
            &self.bins.recover,
            &[os("--state-dir"), os(&self.state)],
            inject,
        )
    }

    fn engine(&self) -> Result<Engine, String> {
        Engine::open_without_recovery(&self.state).map_err(|e| format!("opening the engine: {e}"))
    }

    fn domain(&self) -> Result<(DomainRec, Vec<DomSnapshot>, usize), String> {
        let e = self.engine()?;
        let d = e
            .domain(&self.dom)
            .map_err(|e| format!("reading domain {}: {e}", self.dom))?;
        let s = e
            .domain_snapshot_list(&self.dom)
            .map_err(|e| format!("reading snapshots: {e}"))?;
        let p = e.plans().map_err(|e| format!("reading plans: {e}"))?.len();
        Ok((d, s, p))
    }

    fn boot_catalog(&mut self) -> Result<f64, String> {
        let (d, _, _) = self.domain()?;
        let disks: Vec<(PathBuf, Format)> = d
            .disks
            .iter()
            .filter_map(|x| Some((x.image()?.to_path_buf(), x.format)))
            .collect();
        self.guest.boot(&disks)
    }

    /// The state before a run; the writer's numbers only with `want_seq`
    /// (they matter only when the snapshot may commit).
    fn before(&mut self, live: bool, chosen: &[String], want_seq: bool) -> Result<Before, String> {
        if live {
            self.ensure_guest()?;
        }
        let t = Instant::now();
        let (dom, snaps, plans) = self.domain()?;
        let listing = listing(&self.disks)?;
        let mut seq = BTreeMap::new();
        for disk in dom
            .disks
            .iter()
            .filter(|x| want_seq && chosen.contains(&x.target))
        {
            // A live image is read with -U: a stale but never too new view.
            let Some(image) = disk.image() else {
                continue;
            };
            if let Ok((s, _)) = image_seq(&self.root, image, None) {
                seq.insert(disk.target.clone(), s);
            } else if !live {
                return Err(format!(
                    "cannot read the writer's records from {}",
                    image.display()
                ));
            }
        }
        self.took("before", t);
        Ok(Before {
            dom,
            snaps,
            plans,
            listing,
            seq,
        })
    }

    fn next_name(&mut self, key: &str) -> String {
        self.counter += 1;
        format!("{key}-{:03}", self.counter)
    }

    fn create_args(&self, sc: &Scenario, name: &str) -> Vec<String> {
        let mut a: Vec<String> = ["snapshot", "create", &self.dom, name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // `{disks}`: the group's disks directory; `{name}`: the snapshot's name.
        a.extend(sc.flags.iter().map(|s| {
            s.replace("{disks}", &self.disks.to_string_lossy())
                .replace("{name}", name)
        }));
        a
    }

    /// The targets a scenario snapshots, in writer order.
    fn chosen(&self, sc: &Scenario) -> Result<Vec<String>, String> {
        let (d, _, _) = self.domain()?;
        Ok(d.disks
            .iter()
            .map(|x| x.target.clone())
            .filter(|t| {
                !sc.flags
                    .windows(2)
                    .any(|w| w[0] == "--disk" && w[1] == format!("{t}=no"))
            })
            .collect())
    }

    /// Everything checked after a recovery that must leave the domain
    /// consistent. Returns the problems and the outcome
    /// (`Some(true)` committed, `Some(false)` rolled back).
    fn verify(
        &mut self,
        sc: &Scenario,
        name: &str,
        before: &Before,
        expect: Option<Expect>,
        qemu_killed: bool,
    ) -> (Vec<String>, Option<bool>) {
        let mut v = Vec::new();
        // A guest whose QEMU was killed is shut off: no guest to ask.
        let live = sc.kind != Kind::Offline && !qemu_killed;
        let t = Instant::now();
        let engine = match self.engine() {
            Ok(e) => e,
            Err(e) => return (vec![e], None),
        };
        match engine.domain_check(&self.dom) {
            Ok(r) => v.extend(r.violations.iter().map(|x| format!("domain check: {x}"))),
            Err(e) => v.push(format!("domain check failed: {e}")),
        }
        self.took("domain check", t);
        let (dom, snaps, plans) = match (
            engine.domain(&self.dom),
            engine.domain_snapshot_list(&self.dom),
            engine.plans(),
        ) {
            (Ok(d), Ok(s), Ok(p)) => (d, s, p),
            (d, s, p) => {
                v.push(format!(
                    "reading the catalog: {:?} {:?} {:?}",
                    d.err().map(|e| e.to_string()),
                    s.err().map(|e| e.to_string()),
                    p.err().map(|e| e.to_string())
                ));
                return (v, None);
            }
        };
        drop(engine);
        let quoted = format!("{name:?}");
        let plan = plans
            .iter()
            .skip(before.plans)
            .find(|p| p.header.summary.contains(&quoted));
        let outcome = plan.map(|p| p.outcome().map(|o| format!("{o:?}")));
        let snap = snaps.iter().find(|s| s.name == name);
        let committed = match &outcome {
            None => {
                if snap.is_some() {
                    v.push(format!(
                        "catalog has snapshot {name} but the journal has no plan for it"
                    ));
                }
                false
            }
            Some(None) => {
                v.push(format!(
                    "inv7: plan {} for {name} has no Finished record after recovery",
                    plan.map_or(0, |p| p.id.0)
                ));
                snap.is_some()
            }
            Some(Some(o)) if o == "Committed" => {
                if snap.is_none() {
                    v.push(format!(
                        "journal says Committed but snapshot {name} is not in the catalog"
                    ));
                }
                true
            }
            Some(Some(o)) if o == "RolledBack" => {
                if snap.is_some() {
                    v.push(format!(
                        "journal says RolledBack but snapshot {name} is in the catalog"
                    ));
                }
                false
            }
            Some(Some(o)) => {
                v.push(format!("plan for {name} ended {o} (a crash of vsnap alone must be recovered without a person)"));
                snap.is_some()
            }
        };
        match (expect, committed) {
            (Some(Expect::Back), true) => {
                v.push("rolled forward, but the crash was before the pivot took effect".into())
            }
            (Some(Expect::Forward), false) => {
                v.push("rolled back, but the crash was after the pivot took effect".into())
            }
            _ => {}
        }
        // Earlier snapshots untouched.
        for s in &before.snaps {
            match snaps.iter().find(|x| x.name == s.name) {
                Some(x) if x == s => {}
                Some(_) => v.push(format!("snapshot {} changed in the catalog", s.name)),
                None => v.push(format!("snapshot {} disappeared from the catalog", s.name)),
            }
        }
        // The domain record.
        if committed {
            if let Some(s) = snap {
                if dom.current.as_deref() != Some(name) {
                    v.push(format!("current snapshot is {:?}, not {name}", dom.current));
                }
                for sd in &s.disks {
                    let now = dom
                        .disks
                        .iter()
                        .find(|x| x.target == sd.target)
                        .and_then(|x| x.image().map(Path::to_path_buf));
                    let old = before
                        .dom
                        .disks
                        .iter()
                        .find(|x| x.target == sd.target)
                        .and_then(|x| x.image().map(Path::to_path_buf));
                    let want = match (sd.mode, &sd.overlay) {
                        (DiskMode::External, Some(o)) => Some(o.clone()),
                        _ => old.clone(),
                    };
                    if now != want {
                        v.push(format!(
                            "disk {}: the catalog's source is {:?}, expected {:?}",
                            sd.target, now, want
                        ));
                    }
                    if sd.mode == DiskMode::Reflink {
                        let clone_dir = sd.state_file.parent().map(Path::to_path_buf);
                        let img_dir = old.as_ref().and_then(|o| o.parent().map(Path::to_path_buf));
                        if !(sd.state_file.is_file()
                            && old.as_ref() != Some(&sd.state_file)
                            && clone_dir == img_dir)
                        {
                            v.push(format!(
                                "disk {}: reflink clone {} is not a new file beside {:?}",
                                sd.target,
                                sd.state_file.display(),
                                old
                            ));
                        }
                    } else if sd.mode != DiskMode::No && old.as_ref() != Some(&sd.state_file) {
                        v.push(format!(
                            "disk {}: snapshot state file {} is not the image it had ({:?})",
                            sd.target,
                            sd.state_file.display(),
                            old
                        ));
                    }
                }
            }
        } else if dom != before.dom {
            v.push(format!(
                "rolled back, but the domain record changed: {:?} -> {:?}",
                before.dom, dom
            ));
        }
        // Nothing that existed before is gone.
        match listing(&self.disks) {
            Ok(after) => {
                for line in diff_listing(&before.listing, &after) {
                    if line.ends_with("disappeared") {
                        v.push(format!(
                            "a file that existed before the snapshot is gone: {line}"
                        ));
                    }
                }
            }
            Err(e) => v.push(e),
        }
        // The guest.
        let t = Instant::now();
        if live && committed && sc.flags.contains(&"--halt") {
            // --halt: shut off afterwards (QEMU quit), never left paused.
            match self.guest.pid {
                Some(pid) if proc_alive(pid) && !wait_gone(pid, Duration::from_secs(30)) => v.push(
                    format!("inv1: --halt committed, but QEMU (pid {pid}) still runs"),
                ),
                _ => {}
            }
            match live::qmp(&self.guest.qmp()) {
                Err(
                    vsnap_steps::StepError::QmpNoSocket { .. }
                    | vsnap_steps::StepError::QmpConnect { .. },
                ) => {}
                Ok(_) => {
                    v.push("inv1: --halt committed, but QEMU still answers on its monitor".into())
                }
                Err(e) => v.push(format!("inv1: after --halt: {e}")),
            }
        } else if qemu_killed {
            // Shut off after a host crash: no QEMU answers on the monitor.
            match live::gone(&self.guest.qmp()) {
                Ok(true) => {}
                Ok(false) => v.push("QEMU was killed, but a QEMU answers on the monitor".into()),
                Err(e) => v.push(format!("after the QEMU kill: {e}")),
            }
        } else if live {
            match live::qmp(&self.guest.qmp()).and_then(|mut q| q.query_status()) {
                Ok((true, _)) => {}
                Ok((false, st)) => v.push(format!("inv1: the guest is {st}, not running")),
                Err(e) => v.push(format!("inv1: query-status: {e}")),
            }
            match live::agent(&self.guest.qga()).and_then(|mut a| a.fsfreeze_status()) {
                Ok(s) if s == "thawed" => {}
                Ok(s) => v.push(format!("inv2: the agent says {s}")),
                Err(e) => v.push(format!("inv2: fsfreeze-status: {e}")),
            }
        }
        self.took("guest status", t);
        // Data: the snapshot's disks show one instant, no older than the run's start.
        let t = Instant::now();
        if let (true, Some(s)) = (committed, snap) {
            v.extend(self.check_seqs(s, before));
        }
        self.took("seq read", t);
        // Recovery again: a no-op.
        let t = Instant::now();
        let r = self.recover(&Inject::None);
        self.took("second recovery", t);
        if r.code() != Some(0) || !r.run.stdout.contains("nothing to recover") {
            v.push(format!(
                "inv7: a second vsnap-recover is not a no-op: {}",
                r.describe()
            ));
        }
        (v, Some(committed))
    }

    fn check_seqs(&mut self, s: &DomSnapshot, before: &Before) -> Vec<String> {
        let mut v = Vec::new();
        let mut seqs: Vec<(String, u64)> = Vec::new();
        for sd in s.disks.iter().filter(|d| d.mode != DiskMode::No) {
            let snapshot = (sd.mode == DiskMode::Internal).then_some(s.name.as_str());
            match image_seq(&self.root, &sd.state_file, snapshot) {
                Ok((seq, disk)) => {
                    if disk != sd.target {
                        v.push(format!(
                            "inv6: disk {}'s state holds the records of {disk}",
                            sd.target
                        ));
                    }
                    if let Some(&pre) = before.seq.get(&sd.target) {
                        if seq < pre {
                            v.push(format!(
                                "inv6: disk {}: the snapshot holds seq {seq}, but the guest had written {pre} before it began",
                                sd.target
                            ));
                        }
                    }
                    if let Some(&last) = self.last_seq.get(&sd.target) {
                        if seq < last {
                            v.push(format!("inv6: disk {}: seq {seq} is older than an earlier snapshot's {last}", sd.target));
                        }
                    }
                    seqs.push((sd.target.clone(), seq));
                }
                Err(e) => v.push(format!("inv6: {e}")),
            }
        }
        // Writer order: seq(d1) >= seq(d2) >= ... >= seq(dk) >= seq(d1) - 1.
        let agree = seqs.windows(2).all(|w| w[0].1 >= w[1].1)
            && match (seqs.first(), seqs.last()) {
                (Some(f), Some(l)) => l.1 + 1 >= f.1,
                _ => true,
            };
        if !agree {
            v.push(format!(
                "inv6: the disks of snapshot {} show different instants: {seqs:?}",
                s.name
            ));
        }
        self.last_seq_note = format!(
            "{} state: {}; before the run the guest had written {}",
            s.name,
            seqs.iter()
                .map(|(t, q)| format!("{t} seq {q}"))
                .collect::<Vec<_>>()
                .join(", "),
            before
                .seq
                .iter()
                .map(|(t, q)| format!("{t} {q}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if v.is_empty() {
            for (t, q) in seqs {
                self.last_seq.insert(t, q);
            }
        }
        v
    }

    fn violation(&mut self, at: String, what: Vec<String>) {
        println!("VIOLATION at {at}:");
        for w in &what {
            println!("    {w}");
        }
        self.violations.push(Violation { at, what });
    }

    /// vsnap killed at `point` (and `vsnap-recover` at every k-th point
    /// in turn when `kill_recovery`), recovered, verified.
    fn crash_point(
        &mut self,
        sc: &Scenario,
        map: &PointMap,
        i: usize,
        kill_recovery: bool,
        rep: &mut ScenarioReport,
    ) {
        let point = map.points[i].clone();
        let name = self.next_name(sc.key);
        let at = format!("{} {point} (snapshot {name})", sc.key);
        let mut v = Vec::new();
        let chosen = match self.chosen(sc) {
            Ok(c) => c,
            Err(e) => return self.violation(at, vec![format!("harness: {e}")]),
        };
        let expect = map.expect(i);
        let before = match self.before(sc.kind != Kind::Offline, &chosen, expect != Expect::Back) {
            Ok(b) => b,
            Err(e) => return self.violation(at, vec![format!("harness: {e}")]),
        };
        let t = Instant::now();
        let r = self.vsnap(
            &self.create_args(sc, &name),
            &Inject::CrashAt(point.clone()),
        );
        self.took("vsnap (crashed)", t);
        rep.points += 1;
        if !r.killed_by_crash_point() {
            v.push(format!(
                "vsnap did not die by SIGKILL at {point}: {}",
                r.describe()
            ));
        }
        let rec = self.recover_killing(kill_recovery, rep, &mut v);
        if rec.code() != Some(0) {
            v.push(format!("vsnap-recover: {}", rec.describe()));
        }
        let (problems, outcome) = self.verify(sc, &name, &before, Some(expect), false);
        v.extend(problems);
        match outcome {
            Some(true) => rep.committed += 1,
            Some(false) => rep.rolled_back += 1,
            None => {}
        }
        if !v.is_empty() {
            rep.failed += 1;
            self.violation(at, v);
        }
    }

    /// `vsnap-recover`; with `kill_recovery` killed at its 1st, 2nd, ...
    /// crash point in turn until a run passes none (each kill counted).
    fn recover_killing(
        &mut self,
        kill_recovery: bool,
        rep: &mut ScenarioReport,
        v: &mut Vec<String>,
    ) -> Ran {
        let t = Instant::now();
        let rec = if kill_recovery {
            let mut k = 0;
            loop {
                k += 1;
                let rr = self.recover(&Inject::CrashAt(format!("*#{k}")));
                if !rr.killed_by_crash_point() {
                    break rr;
                }
                rep.recovery_kills += 1;
                if k >= RECOVERY_KILLS_MAX {
                    v.push(format!(
                        "vsnap-recover still passing crash points after {k} kills"
                    ));
                    break self.recover(&Inject::None);
                }
            }
        } else {
            self.recover(&Inject::None)
        };
        self.took(
            if kill_recovery {
                "recovery (with kills)"
            } else {
                "recovery"
            },
            t,
        );
        rec
    }

    /// vsnap killed at `point` and QEMU killed too (a host crash):
    /// recovery must decide from the files (exit 0, committed or rolled
    /// back as the point and the files say), lose nothing the guest
    /// flushed, and leave a consistent, shut-off domain that boots on the
    /// catalog's images.
    fn qemu_kill_point(
        &mut self,
        sc: &Scenario,
        map: &PointMap,
        point: &str,
        rep: &mut ScenarioReport,
    ) {
        let t = Instant::now();
        self.qemu_kill_point_inner(sc, map, point, rep);
        self.took("QEMU kills (with reboots)", t);
    }

    /// The journal's outcome (`Committed`, `RolledBack`, ...) of the plan
    /// for snapshot `name` among the plans after the first `skip`.
    fn plan_outcome(&self, name: &str, skip: usize) -> Option<String> {
        let quoted = format!("{name:?}");
        let plans = self.engine().ok()?.plans().ok()?;
        let p = plans
            .iter()
            .skip(skip)
            .find(|p| p.header.summary.contains(&quoted))?;
        p.outcome().map(|o| format!("{o:?}"))
    }

    /// Per disk target: its image, and the plan's new overlay of it if
    /// the plan made one (a new `<stem>.*.<snapshot>.qcow2` beside it):
    /// where the guest's writes went when QEMU died.
    fn tops_at_kill(
        &self,
        dom: &DomainRec,
        name: &str,
        created: &BTreeSet<String>,
    ) -> BTreeMap<String, (PathBuf, Option<PathBuf>)> {
        let mut out = BTreeMap::new();
        for d in &dom.disks {
            let Some(image) = d.image() else { continue };
            let stem = image
                .file_name()
                .map(|f| {
                    f.to_string_lossy()
                        .split('.')
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default();
            let overlay = created
                .iter()
                .find(|f| {
                    !f.contains('/')
                        && f.starts_with(&format!("{stem}."))
                        && f.ends_with(&format!(".{name}.qcow2"))
                })
                .map(|f| self.disks.join(f));
            out.insert(d.target.clone(), (image.to_path_buf(), overlay));
        }
        out
    }

    fn qemu_kill_point_inner(
        &mut self,
        sc: &Scenario,
        map: &PointMap,
        point: &str,
        rep: &mut ScenarioReport,
    ) {
        let name = self.next_name(sc.key);
        let at = format!("{} {point} + QEMU killed (snapshot {name})", sc.key);
        let mut v = Vec::new();
        // `POINT+data`: QEMU lives on after vsnap's death until the guest
        // wrote (and flushed) through a new overlay, then dies.
        let label = point;
        let (point, wait_data) = match point.strip_suffix("+data") {
            Some(p) => (p, true),
            None => (point, false),
        };
        let Some(i) = map.index(point) else {
            return self.violation(at, vec![format!("harness: the run never passes {point}")]);
        };
        let chosen = match self.chosen(sc) {
            Ok(c) => c,
            Err(e) => return self.violation(at, vec![format!("harness: {e}")]),
        };
        let before = match self.before(true, &chosen, true) {
            Ok(b) => b,
            Err(e) => return self.violation(at, vec![format!("harness: {e}")]),
        };
        let r = self.vsnap(
            &self.create_args(sc, &name),
            &Inject::CrashAt(point.to_string()),
        );
        rep.qemu_kills += 1;
        if !r.killed_by_crash_point() {
            v.push(format!(
                "vsnap did not die by SIGKILL at {point}: {}",
                r.describe()
            ));
        }
        if wait_data {
            let t = Instant::now();
            let listed = listing(&self.disks).unwrap_or_default();
            let overlays: Vec<PathBuf> = listed
                .keys()
                .filter(|k| !before.listing.contains_key(*k) && k.ends_with(".qcow2"))
                .map(|k| self.disks.join(k))
                .collect();
            while !overlays.iter().any(|o| own_data(o).unwrap_or(false)) {
                if t.elapsed() > Duration::from_secs(30) {
                    v.push(format!(
                        "harness: the guest wrote nothing through {overlays:?} in 30 s"
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Err(e) = self.guest.kill() {
            return self.violation(at, vec![format!("harness: {e}")]);
        }
        // What the files say, read by qemu-img (independently of vsnap's
        // reader): whether the switch took effect (an overlay with data
        // of its own), whether the internal snapshot is on every disk;
        // and what the guest had flushed on each disk when QEMU died.
        let crashed = listing(&self.disks).unwrap_or_default();
        let created: BTreeSet<String> = crashed
            .keys()
            .filter(|k| !before.listing.contains_key(*k))
            .cloned()
            .collect();
        let tops = self.tops_at_kill(&before.dom, &name, &created);
        let overlay_data = tops
            .values()
            .filter_map(|(_, o)| o.as_ref())
            .any(|o| own_data(o).unwrap_or(false));
        let chosen_images: Vec<PathBuf> = tops
            .iter()
            .filter(|(t, _)| chosen.contains(t))
            .map(|(_, (img, _))| img.clone())
            .collect();
        let tagged = |img: &Path| {
            qemu_img::snapshot_names(img, true)
                .unwrap_or_default()
                .iter()
                .any(|n| n == &name)
        };
        let files_say = match sc.kind {
            Kind::LiveMemory => chosen_images.iter().all(|p| tagged(p)),
            _ => overlay_data,
        };
        let mut flushed = BTreeMap::new();
        for (t, (img, ov)) in &tops {
            let top = ov.as_ref().unwrap_or(img);
            match image_seq(&self.root, top, None) {
                Ok((q, _)) => {
                    flushed.insert(t.clone(), q);
                }
                Err(e) => v.push(format!("harness: reading {t} after the kill: {e}")),
            }
        }
        // The outcome the point and the files call for: before the pivot
        // took effect, back; once the journal has the pivot's Done,
        // forward; in between, as the files say (a switch the guest never
        // wrote through may roll back: nothing it flushed is lost).
        let expect = match map.expect(i) {
            Expect::Forward if i < map.done && map.probeable => {
                if files_say {
                    Expect::Forward
                } else {
                    Expect::Back
                }
            }
            e => e,
        };
        let t = Instant::now();
        let rec = self.recover(&Inject::None);
        self.took("recovery", t);
        let out = rec.run.stdout.clone();
        // Decided: exit 0, and the plan's journal outcome Committed or
        // RolledBack (by recovery, or by the run itself when vsnap died
        // after its last record: then there is nothing to recover).
        let ended = self.plan_outcome(&name, before.plans);
        let decided = rec.code() == Some(0)
            && !out.contains("needs-attention")
            && matches!(ended.as_deref(), Some("Committed" | "RolledBack"));
        if decided {
            rep.qemu_decided += 1;
        } else {
            rep.qemu_attention += 1;
            v.push(format!(
                "vsnap-recover did not decide (exit 0, the plan committed or rolled back; the journal says {ended:?}): {}",
                rec.describe()
            ));
        }
        let seen = out
            .lines()
            .find(|l| {
                l.contains("needs-attention")
                    || l.contains("rolled-back")
                    || l.contains("committed")
            })
            .unwrap_or(out.lines().next().unwrap_or(""))
            .trim()
            .to_string();
        // The catalog, the journal's outcome and the files agree; the
        // domain is shut off and consistent (`domain_check` of a domain
        // no QEMU answers for: qemu-img check of every image, snapshots on
        // disk both ways, no orphan or temporary file, no unfinished
        // plan); nothing that existed before is gone; a second recovery
        // is a no-op.
        let (problems, outcome) = self.verify(sc, &name, &before, Some(expect), true);
        v.extend(problems);
        match outcome {
            Some(true) => rep.committed += 1,
            Some(false) => rep.rolled_back += 1,
            None => {}
        }
        let after = listing(&self.disks).unwrap_or_default();
        if outcome == Some(false) {
            for f in created.iter().filter(|f| after.contains_key(*f)) {
                v.push(format!("rolled back, but the plan's file {f} is left"));
            }
        }
        // Internal snapshots: this one exactly when it committed with the
        // memory inside the disks (partial entries are removed).
        for img in &chosen_images {
            let has = tagged(img);
            let want = outcome == Some(true) && sc.kind == Kind::LiveMemory;
            if has != want {
                v.push(format!(
                    "{}: internal snapshot {name} {} after recovery ({})",
                    img.display(),
                    if has { "present" } else { "absent" },
                    if outcome == Some(true) {
                        "committed"
                    } else {
                        "rolled back"
                    }
                ));
            }
        }
        // Nothing the guest flushed is lost: each disk's catalog image
        // holds at least the writer's records its files held at the kill.
        match self.domain() {
            Ok((dom, _, _)) => {
                for d in &dom.disks {
                    let (Some(img), Some(&pre)) = (d.image(), flushed.get(&d.target)) else {
                        continue;
                    };
                    match image_seq(&self.root, img, None) {
                        Ok((q, _)) if q >= pre => {}
                        Ok((q, _)) => v.push(format!(
                            "inv6: disk {}: the catalog's image {} holds seq {q}, but the guest had flushed {pre} when QEMU died",
                            d.target,
                            img.display()
                        )),
                        Err(e) => v.push(format!("inv6: {e}")),
                    }
                }
            }
            Err(e) => v.push(e),
        }
        rep.notes.push(format!(
            "QEMU killed at {label}: {} (expected {expect:?}); vsnap-recover exit {:?}: {seen}",
            match (sc.kind, files_say) {
                _ if i < map.effect => "before the pivot took effect",
                _ if i >= map.done => "the journal has the pivot done",
                _ if !map.probeable => "the catalog write may or may not be durable",
                (Kind::LiveMemory, true) => "the files said: snapshot on every disk",
                (Kind::LiveMemory, false) => "the files said: snapshot not on every disk",
                (_, true) => "the files said: an overlay has data",
                (_, false) => "the files said: no overlay has data",
            },
            rec.code()
        ));
        // Boot again on the catalog's images: consistent.
        match self.boot_catalog() {
            Ok(_) => match self
                .engine()
                .and_then(|e| e.domain_check(&self.dom).map_err(|e| e.to_string()))
            {
                Ok(r) => v.extend(
                    r.violations
                        .iter()
                        .map(|x| format!("after reboot: domain check: {x}")),
                ),
                Err(e) => v.push(format!("after reboot: {e}")),
            },
            Err(e) => v.push(format!("harness: reboot: {e}")),
        }
        if !v.is_empty() {
            rep.failed += 1;
            self.violation(at, v);
        }
    }

    /// A guest that a committed `--halt` shut off boots again on the
    /// catalog's images (the next point needs a running guest).
    fn ensure_guest(&mut self) -> Result<(), String> {
        if self.guest.pid.is_some_and(proc_alive) {
            return Ok(());
        }
        let t = Instant::now();
        self.guest.pid = None;
        self.boot_catalog()?;
        self.took("reboots after --halt", t);
        Ok(())
    }

    /// The writer goes on, on the catalog's images (read with -U), within 60 s.
    fn writer_progress(&mut self) -> Result<String, String> {
        self.ensure_guest()?;
        let (d, _, _) = self.domain()?;
        let disk = d.disks.first().and_then(|x| x.image()).ok_or("no disk")?;
        let (s0, _) = image_seq(&self.root, disk, None)?;
        let t = Instant::now();
        loop {
            let (s, _) = image_seq(&self.root, disk, None)?;
            if s > s0 {
                return Ok(format!("writer on {}: seq {s0} -> {s}", disk.display()));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the guest's writer made no progress on {} in 60 s (seq {s0})",
                    disk.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn run_scenario(&mut self, sc: &Scenario) -> ScenarioReport {
        let t0 = Instant::now();
        let mut rep = ScenarioReport {
            key: sc.key,
            points: 0,
            recovery_kills: 0,
            qemu_kills: 0,
            qemu_decided: 0,
            qemu_attention: 0,
            committed: 0,
            rolled_back: 0,
            failed: 0,
            seconds: 0.0,
            notes: Vec::new(),
        };
        // An uncrashed run lists the points; it is checked like the others.
        if matches!(
            sc.kind,
            Kind::LiveRevert | Kind::LiveRevertExt | Kind::LiveRevertMemFile
        ) {
            self.run_revert_scenario(sc, &mut rep);
            rep.seconds = t0.elapsed().as_secs_f64();
            return rep;
        }
        let name = self.next_name(sc.key);
        let log = self.root.join(format!("points-{}.log", sc.key));
        let _ = std::fs::remove_file(&log);
        let chosen = self.chosen(sc).unwrap_or_default();
        let map = match self.before(sc.kind != Kind::Offline, &chosen, true) {
            Ok(before) => {
                let t = Instant::now();
                let r = self.vsnap(&self.create_args(sc, &name), &Inject::Log(log.clone()));
                rep.notes.push(format!(
                    "uncrashed snapshot took {:.2} s",
                    t.elapsed().as_secs_f64()
                ));
                let mut v = Vec::new();
                if r.code() != Some(0) {
                    v.push(format!("the uncrashed run failed: {}", r.describe()));
                }
                let (problems, outcome) =
                    self.verify(sc, &name, &before, Some(Expect::Forward), false);
                v.extend(problems);
                rep.notes
                    .push(format!("uncrashed snapshot {}", self.last_seq_note));
                if outcome == Some(true) {
                    rep.committed += 1;
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let map = PointMap::new(&text, sc.kind);
                if let Err(e) = &map {
                    v.push(format!("harness: {e}; points: {text:?}"));
                }
                if !v.is_empty() {
                    rep.failed += 1;
                    self.violation(format!("{} uncrashed (snapshot {name})", sc.key), v);
                }
                map.ok()
            }
            Err(e) => {
                rep.failed += 1;
                self.violation(format!("{} setup", sc.key), vec![format!("harness: {e}")]);
                None
            }
        };
        let Some(map) = map else {
            rep.seconds = t0.elapsed().as_secs_f64();
            return rep;
        };
        let sel = map.selection(self.quick);
        let sample = map.recovery_sample(self.quick);
        rep.notes.push(format!(
            "{} crash points in the run (pivot: step {}, takes effect at {}){}; vsnap-recover killed mid-way after: {}",
            map.points.len(),
            map.pivot,
            map.points[map.effect],
            if sel.len() < map.points.len() { format!(", {} sampled", sel.len()) } else { String::new() },
            sample.iter().map(|&i| map.points[i].as_str()).collect::<Vec<_>>().join(", ")
        ));
        for i in sel {
            self.crash_point(sc, &map, i, sample.contains(&i), &mut rep);
        }
        if sc.kind != Kind::Offline {
            match self.writer_progress() {
                Ok(s) => rep.notes.push(s),
                Err(e) => {
                    rep.failed += 1;
                    self.violation(format!("{} after its points", sc.key), vec![e]);
                }
            }
            let kills = if self.quick {
                sc.qemu_kills_quick
            } else {
                sc.qemu_kills
            };
            for p in kills {
                let p = map.resolve(p);
                self.qemu_kill_point(sc, &map, &p, &mut rep);
            }
        }
        rep.seconds = t0.elapsed().as_secs_f64();
        rep
    }
}

// --- revert of a running guest ------------------------------------------------

/// A revert `--running` is tried on a guest paused before it (the shape
/// whose plan ends with `cont`).
fn paused_before(sc: &Scenario) -> bool {
    sc.flags.contains(&"--running")
}

/// The revert targets of group `gv`: internal snapshots with memory of
/// the running guest, made once, uncrashed. Each trial reverts to the one
/// that is not the domain's current snapshot (the current snapshot then
/// tells a committed revert from a rolled-back one).
const REVERT_TARGETS: [&str; 2] = ["m0", "m1"];
/// The revert targets of group `gx`: live external disk-only snapshots
/// of the running guest, made once, uncrashed.
const REVERT_TARGETS_EXT: [&str; 2] = ["x0", "x1"];
/// The revert targets of group `gy`: live snapshots of the running guest
/// with the memory state in a file (`--memory external:PATH`).
const REVERT_TARGETS_MEMFILE: [&str; 2] = ["y0", "y1"];

fn rev_targets(kind: Kind) -> [&'static str; 2] {
    if kind == Kind::LiveRevertMemFile {
        REVERT_TARGETS_MEMFILE
    } else if kind == Kind::LiveRevertExt {
        REVERT_TARGETS_EXT
    } else {
        REVERT_TARGETS
    }
}
/// Before a revert the writer is at least this many records past the
/// target's on every disk: more than it writes between the snapshot's
/// load and the harness's `stop` after recovery, so a committed revert
/// (the writer went on from the snapshot's numbers) reads below the
/// number read before it, and a rolled-back one at or above.
const REVERT_MARGIN: u64 = 80;

/// What the revert targets hold: per snapshot, per disk target, the
/// writer's record in the snapshot.
struct RevTargets {
    recs: BTreeMap<String, BTreeMap<String, Rec>>,
    /// The most records the writer wrote after a committed revert before
    /// the harness paused it (must stay below [`REVERT_MARGIN`]).
    climb: u64,
    /// `rv-ext`: trials after which plan 1 had committed and QEMU ran
    /// (plan 2 committed), and after which the domain was shut off and
    /// the harness started it.
    ext_running: usize,
    ext_started: usize,
}

/// The state before a revert trial.
struct RevBefore {
    target: String,
    dom: DomainRec,
    snaps: Vec<DomSnapshot>,
    plans: usize,
    listing: Listing,
    /// Per disk target: its image and the writer's record there, read
    /// with the guest paused just before the revert.
    pre: BTreeMap<String, (PathBuf, Rec)>,
}

impl Suite {
    /// The revert targets, made once per group (the guest running).
    fn rev_setup(&mut self, kind: Kind) -> Result<(), String> {
        if self.rev.is_some() {
            return Ok(());
        }
        self.ensure_guest()?;
        // The writer wrote every disk (a snapshot of a disk it has not
        // reached yet holds no record to compare with).
        let t = Instant::now();
        loop {
            let (d, _, _) = self.domain()?;
            let seqs: Vec<Result<Rec, String>> = d
                .disks
                .iter()
                .filter_map(|x| x.image())
                .map(|p| image_rec(&self.root, p, None))
                .collect();
            if seqs.iter().all(|r| r.as_ref().is_ok_and(|r| r.seq > 0)) {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the writer wrote nothing to some disk in 60 s: {seqs:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, have, _) = self.domain()?;
        let shape: &[&str] = match kind {
            Kind::LiveRevertExt => &["--live", "--disk-only"],
            Kind::LiveRevertMemFile => &["--live", "--memory"],
            _ => &["--live", "--memory", "internal"],
        };
        for (k, n) in rev_targets(kind).iter().enumerate() {
            if have.iter().any(|s| s.name == *n) {
                continue;
            }
            if k > 0 {
                // Read with -U while the guest writes through a new
                // overlay, a record may not read yet: retried.
                let t = Instant::now();
                while let Err(e) = self.writer_progress() {
                    if t.elapsed() > Duration::from_secs(60) {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let mem = format!("external:{}", self.disks.join(format!("{n}.mem")).display());
            let mut args = vec!["snapshot", "create", &self.dom, n];
            args.extend(shape);
            if kind == Kind::LiveRevertMemFile {
                args.push(&mem);
            }
            let r = self.vsnap(&args, &Inject::None);
            if r.code() != Some(0) {
                return Err(format!("making revert target {n}: {}", r.describe()));
            }
        }
        let (d, snaps, _) = self.domain()?;
        let mut recs: BTreeMap<String, BTreeMap<String, Rec>> = BTreeMap::new();
        for n in rev_targets(kind) {
            for disk in &d.disks {
                let img = disk.image().ok_or("a disk without an image")?;
                let r = if ext_revert(kind) {
                    // The snapshot's frozen file holds its state.
                    let state = snaps
                        .iter()
                        .find(|s| s.name == n)
                        .and_then(|s| s.disks.iter().find(|x| x.target == disk.target))
                        .map(|x| x.state_file.clone())
                        .ok_or(format!("snapshot {n} has no disk {}", disk.target))?;
                    image_rec(&self.root, &state, None)?
                } else {
                    image_rec(&self.root, img, Some(n))?
                };
                if r.disk != disk.target {
                    return Err(format!(
                        "{} (snapshot {n}) holds the records of {}",
                        img.display(),
                        r.disk
                    ));
                }
                recs.entry(n.to_string())
                    .or_default()
                    .insert(disk.target.clone(), r);
            }
        }
        self.rev = Some(RevTargets {
            recs,
            climb: 0,
            ext_running: 0,
            ext_started: 0,
        });
        Ok(())
    }

    /// The snapshot's record of disk `target`.
    fn rev_rec(&self, snap: &str, target: &str) -> Option<Rec> {
        self.rev.as_ref()?.recs.get(snap)?.get(target).cloned()
    }

    /// Before a trial: the guest running, the target chosen (not the
    /// current snapshot), the writer [`REVERT_MARGIN`] records past the
    /// target's on every disk; its numbers read with the guest paused;
    /// then resumed, or left paused for a revert `--running`.
    fn rev_prepare(&mut self, sc: &Scenario) -> Result<RevBefore, String> {
        self.rev_setup(sc.kind)?;
        self.ensure_guest()?;
        let qmp = self.guest.qmp();
        live::cont(&qmp).map_err(|e| format!("cont before the trial: {e}"))?;
        let (dom, snaps, plans) = self.domain()?;
        let target = rev_targets(sc.kind)
            .iter()
            .find(|n| dom.current.as_deref() != Some(**n))
            .expect("two targets")
            .to_string();
        let t = Instant::now();
        loop {
            let mut behind = Vec::new();
            for disk in &dom.disks {
                let img = disk.image().ok_or("a disk without an image")?;
                let want = self
                    .rev_rec(&target, &disk.target)
                    .ok_or("no record of the target")?
                    .seq
                    + REVERT_MARGIN;
                // Read with -U while it runs: stale at worst, never too new
                // (through an overlay it has just begun to write, maybe
                // unreadable for a moment: `rv-ext`, retried).
                match image_rec(&self.root, img, None) {
                    Ok(r) if r.seq < want => {
                        behind.push(format!("{} {} < {want}", disk.target, r.seq))
                    }
                    Ok(_) => {}
                    Err(e) if ext_revert(sc.kind) => behind.push(e),
                    Err(e) => return Err(e),
                }
            }
            if behind.is_empty() {
                break;
            }
            if t.elapsed() > Duration::from_secs(180) {
                return Err(format!(
                    "the writer did not move {REVERT_MARGIN} records past {target} in 180 s: {}",
                    behind.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.took("revert: the writer moves on", t);
        let t = Instant::now();
        live::stop(&qmp).map_err(|e| format!("stop before the trial: {e}"))?;
        let mut pre = BTreeMap::new();
        for disk in &dom.disks {
            let img = disk.image().ok_or("a disk without an image")?;
            pre.insert(
                disk.target.clone(),
                (img.to_path_buf(), image_rec(&self.root, img, None)?),
            );
        }
        if !paused_before(sc) {
            live::cont(&qmp).map_err(|e| format!("cont before the trial: {e}"))?;
        }
        let listing = listing(&self.disks)?;
        self.took("before", t);
        Ok(RevBefore {
            target,
            dom,
            snaps,
            plans,
            listing,
            pre,
        })
    }

    fn revert_args(&self, sc: &Scenario, target: &str) -> Vec<String> {
        let mut a: Vec<String> = ["snapshot", "revert", &self.dom, target]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(sc.flags.iter().map(|s| s.to_string()));
        a
    }

    /// The revert plan run after the first `skip` plans, if any: its
    /// journal outcome (`None`: not finished).
    fn rev_plan(&self, skip: usize) -> Result<Option<Option<String>>, String> {
        let plans = self
            .engine()?
            .plans()
            .map_err(|e| format!("reading plans: {e}"))?;
        Ok(plans
            .iter()
            .skip(skip)
            .find(|p| p.header.op == "domain.snapshot.revert")
            .map(|p| p.outcome().map(|o| format!("{o:?}"))))
    }

    /// Everything checked after the recovery of a revert trial. Returns
    /// the problems and the outcome (`Some(true)` committed).
    /// `flushed`: after a QEMU kill, each disk's record when QEMU died.
    fn verify_revert(
        &mut self,
        sc: &Scenario,
        before: &RevBefore,
        expect: Option<Expect>,
        flushed: Option<&BTreeMap<String, Rec>>,
    ) -> (Vec<String>, Option<bool>) {
        let mut v = Vec::new();
        let target = before.target.as_str();
        let paused_flag = sc.flags.contains(&"--paused");
        // The journal: committed or rolled back; a kill before the plan
        // was journaled did nothing (rolled back).
        let plan = match self.rev_plan(before.plans) {
            Ok(p) => p,
            Err(e) => return (vec![e], None),
        };
        let (dom, snaps, _) = match self.domain() {
            Ok(x) => x,
            Err(e) => return (vec![e], None),
        };
        let committed = match plan.as_ref().map(|o| o.as_deref()) {
            None => false,
            Some(Some("Committed")) => true,
            Some(Some("RolledBack")) => false,
            Some(None) => {
                v.push("inv7: the revert plan has no Finished record after recovery".into());
                dom.current.as_deref() == Some(target)
            }
            Some(Some(o)) => {
                v.push(format!(
                    "the revert plan ended {o} (a crash must be recovered without a person)"
                ));
                dom.current.as_deref() == Some(target)
            }
        };
        match (expect, committed) {
            (Some(Expect::Back), true) => {
                v.push("rolled forward, but the crash was before the pivot took effect".into())
            }
            (Some(Expect::Forward), false) => {
                v.push("rolled back, but the crash was after the pivot took effect".into())
            }
            _ => {}
        }
        // The guest first (the writer runs on): running and thawed, or
        // paused after a committed --paused; then paused by the harness
        // to read the disks race-free, and resumed.
        let t = Instant::now();
        let qmp = self.guest.qmp();
        let mut after: BTreeMap<String, Rec> = BTreeMap::new();
        if flushed.is_none() {
            // Committed: as asked; rolled back: as it was.
            let want_running = if committed {
                !paused_flag
            } else {
                !paused_before(sc)
            };
            match live::qmp(&qmp).and_then(|mut q| q.query_status()) {
                Ok((r, _)) if r == want_running => {}
                Ok((_, st)) => v.push(format!(
                    "inv1: the guest is {st}, expected {}",
                    if want_running { "running" } else { "paused" }
                )),
                Err(e) => v.push(format!("inv1: query-status: {e}")),
            }
            if want_running {
                match live::agent(&self.guest.qga()).and_then(|mut a| a.fsfreeze_status()) {
                    Ok(s) if s == "thawed" => {}
                    Ok(s) => v.push(format!("inv2: the agent says {s}")),
                    Err(e) => v.push(format!("inv2: fsfreeze-status: {e}")),
                }
            }
            if let Err(e) = live::stop(&qmp) {
                v.push(format!("harness: stop: {e}"));
            }
        } else {
            match live::gone(&qmp) {
                Ok(true) => {}
                Ok(false) => v.push("QEMU was killed, but a QEMU answers on the monitor".into()),
                Err(e) => v.push(format!("after the QEMU kill: {e}")),
            }
        }
        for (t, (img, _)) in &before.pre {
            match image_rec(&self.root, img, None) {
                Ok(r) => {
                    after.insert(t.clone(), r);
                }
                Err(e) => v.push(format!("inv6: {e}")),
            }
        }
        if flushed.is_none() {
            if let Err(e) = live::cont(&qmp) {
                v.push(format!("harness: cont: {e}"));
            }
        }
        self.took("guest status and seq read", t);
        // The data, disk by disk.
        for (t, (img, pre)) in &before.pre {
            let Some(a) = after.get(t) else { continue };
            let Some(snap) = self.rev_rec(target, t) else {
                v.push(format!("harness: no record of {target} for {t}"));
                continue;
            };
            let img = img.display();
            match (committed, flushed) {
                // Reverted in the same QEMU: the writer went on, in the
                // snapshot's boot, from the snapshot's numbers.
                (true, None) => {
                    if a.boot != snap.boot || a.seq < snap.seq || a.seq >= pre.seq {
                        v.push(format!(
                            "inv6: disk {t} ({img}) after a committed revert to {target}: seq {} boot {}; the snapshot holds seq {} boot {}, before the revert the guest was at seq {} (expected the snapshot's boot, seq in [{}, {}))",
                            a.seq, a.boot, snap.seq, snap.boot, pre.seq, snap.seq, pre.seq
                        ));
                    } else if let Some(r) = self.rev.as_mut() {
                        r.climb = r.climb.max(a.seq - snap.seq);
                    }
                }
                // Applied offline (QEMU dead): exactly the snapshot's disk.
                (true, Some(_)) => {
                    if (a.seq, a.boot) != (snap.seq, snap.boot) {
                        v.push(format!(
                            "inv6: disk {t} ({img}): the snapshot {target} applied offline, but the image holds seq {} boot {}, the snapshot seq {} boot {}",
                            a.seq, a.boot, snap.seq, snap.boot
                        ));
                    }
                }
                (false, None) => {
                    if a.seq < pre.seq {
                        v.push(format!(
                            "inv6: disk {t} ({img}): rolled back, but the guest is at seq {} below the {} it had before the revert",
                            a.seq, pre.seq
                        ));
                    }
                }
                (false, Some(fl)) => {
                    let want = fl.get(t).map_or(pre.seq, |r| r.seq).max(pre.seq);
                    if a.seq < want {
                        v.push(format!(
                            "inv6: disk {t} ({img}): rolled back, but the image holds seq {} below the {want} the guest had flushed",
                            a.seq
                        ));
                    }
                }
            }
        }
        // The catalog: the target current exactly when committed; nothing
        // else of the domain or its snapshots changed (in place: the
        // same images).
        if committed != (dom.current.as_deref() == Some(target)) {
            v.push(format!(
                "the current snapshot is {:?} but the revert to {target} {}",
                dom.current,
                if committed {
                    "committed"
                } else {
                    "rolled back"
                }
            ));
        }
        let mut same = dom.clone();
        same.current = before.dom.current.clone();
        if same != before.dom {
            v.push(format!(
                "the domain record changed beyond its current snapshot: {:?} -> {dom:?}",
                before.dom
            ));
        }
        if snaps != before.snaps {
            v.push(format!(
                "the snapshots changed: {:?} -> {snaps:?}",
                before.snaps.iter().map(|s| &s.name).collect::<Vec<_>>()
            ));
        }
        let t = Instant::now();
        match self.engine().and_then(|e| {
            e.domain_check(&self.dom)
                .map_err(|e| format!("domain check failed: {e}"))
        }) {
            Ok(r) => v.extend(r.violations.iter().map(|x| format!("domain check: {x}"))),
            Err(e) => v.push(e),
        }
        self.took("domain check", t);
        // Nothing that existed before is gone, and nothing new: a revert
        // in place makes no file.
        match listing(&self.disks) {
            Ok(now) => {
                for line in diff_listing(&before.listing, &now) {
                    if line.ends_with("disappeared") || line.ends_with("appeared") {
                        v.push(format!("file: {line}"));
                    }
                }
            }
            Err(e) => v.push(e),
        }
        let t = Instant::now();
        let r = self.recover(&Inject::None);
        self.took("second recovery", t);
        if r.code() != Some(0) || !r.run.stdout.contains("nothing to recover") {
            v.push(format!(
                "inv7: a second vsnap-recover is not a no-op: {}",
                r.describe()
            ));
        }
        (v, Some(committed))
    }

    /// [`Suite::verify_revert`] or, for `rv-ext`, [`Suite::verify_revert_ext`].
    fn verify_rev(
        &mut self,
        sc: &Scenario,
        before: &RevBefore,
        expect: Option<Expect>,
        flushed: Option<&BTreeMap<String, Rec>>,
    ) -> (Vec<String>, Option<bool>) {
        if ext_revert(sc.kind) {
            self.verify_revert_ext(sc, before, expect, flushed)
        } else {
            self.verify_revert(sc, before, expect, flushed)
        }
    }

    /// The QEMU vsnap launched for the domain (its pidfile), now the guest.
    fn adopt_launched(&mut self) -> Result<u32, String> {
        let pidfile = self.state.join("run").join(format!("{}.pid", self.dom));
        let pid = vsnap_steps::launch::pid_from_file(&pidfile)
            .ok_or(format!("no live QEMU in {}", pidfile.display()))?;
        self.guest.pid = Some(pid);
        Ok(pid)
    }

    /// `vsnap domain start` of the shut-off domain; the guest's writer
    /// runs when its READY line is on the console.
    fn start_domain(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let r = self.vsnap(&["domain", "start", &self.dom], &Inject::None);
        if r.code() != Some(0) {
            return Err(format!("vsnap domain start: {}", r.describe()));
        }
        let pid = self.adopt_launched()?;
        let log = self.guest.dir.join("console.log");
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains("VSNAP-GUEST-READY") {
                break;
            }
            if !proc_alive(pid) {
                return Err(format!(
                    "QEMU (pid {pid}) exited during boot: see {}",
                    log.display()
                ));
            }
            if t.elapsed() > BOOT_LIMIT {
                return Err(format!(
                    "no VSNAP-GUEST-READY in {} after {} s",
                    log.display(),
                    BOOT_LIMIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        self.guest.boots.push(t.elapsed().as_secs_f64());
        self.took("domain start after a revert", t);
        Ok(())
    }

    /// Everything checked after the recovery of an `rv-ext` trial (the
    /// top doc, "Reverts"). Returns the problems and whether plan 1
    /// committed; a shut-off domain is started (`vsnap domain start`)
    /// after the checks.
    fn verify_revert_ext(
        &mut self,
        sc: &Scenario,
        before: &RevBefore,
        expect: Option<Expect>,
        flushed: Option<&BTreeMap<String, Rec>>,
    ) -> (Vec<String>, Option<bool>) {
        let mut v = Vec::new();
        let target = before.target.as_str();
        let plan = match self.rev_plan(before.plans) {
            Ok(p) => p,
            Err(e) => return (vec![e], None),
        };
        let (dom, snaps, _) = match self.domain() {
            Ok(x) => x,
            Err(e) => return (vec![e], None),
        };
        let committed = match plan.as_ref().map(|o| o.as_deref()) {
            None => false,
            Some(Some("Committed")) => true,
            Some(Some("RolledBack")) => false,
            Some(o) => {
                v.push(format!(
                    "inv7: the revert plan ended {o:?} after recovery (a crash must be recovered without a person)"
                ));
                dom.current.as_deref() == Some(target)
            }
        };
        match (expect, committed) {
            (Some(Expect::Back), true) => {
                v.push("rolled forward, but the crash was before the pivot took effect".into())
            }
            (Some(Expect::Forward), false) => {
                v.push("rolled back, but the crash was after the pivot took effect".into())
            }
            _ => {}
        }
        let Some(snap) = snaps.iter().find(|s| s.name == target) else {
            return (
                vec![format!("the target {target} is gone")],
                Some(committed),
            );
        };
        // The catalog: committed, the target current and every disk a new
        // `.revert-` overlay on the snapshot's state file; rolled back,
        // the domain record as it was.
        if committed {
            if dom.current.as_deref() != Some(target) {
                v.push(format!(
                    "committed, but the current snapshot is {:?}",
                    dom.current
                ));
            }
            for disk in &dom.disks {
                let Some(img) = disk.image() else {
                    v.push(format!("disk {} has no image", disk.target));
                    continue;
                };
                if !img.to_string_lossy().contains(".revert-") {
                    v.push(format!(
                        "disk {}: {} is not a .revert- overlay",
                        disk.target,
                        img.display()
                    ));
                }
                let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                let want = snap
                    .disks
                    .iter()
                    .find(|x| x.target == disk.target)
                    .map(|x| canon(&x.state_file));
                match qemu_img::info(img, Format::Qcow2, true) {
                    Ok(i) if i.backing.as_deref().map(canon) == want => {}
                    Ok(i) => v.push(format!(
                        "disk {}: {} is backed by {:?}, not the snapshot's state file {want:?}",
                        disk.target,
                        img.display(),
                        i.backing
                    )),
                    Err(e) => v.push(format!("disk {}: qemu-img info: {e}", disk.target)),
                }
            }
        } else if dom != before.dom {
            v.push(format!(
                "rolled back, but the domain record changed: {:?} -> {dom:?}",
                before.dom
            ));
        }
        // Committed, a snapshot whose overlay was the discarded active
        // image forgets it (the file is removed); nothing else changes.
        let mut want_snaps = before.snaps.clone();
        if committed {
            let old: Vec<&Path> = before.dom.disks.iter().filter_map(|d| d.image()).collect();
            for d in want_snaps.iter_mut().flat_map(|s| s.disks.iter_mut()) {
                if d.overlay.as_deref().is_some_and(|o| old.contains(&o)) {
                    d.overlay = None;
                }
            }
        }
        if snaps != want_snaps {
            v.push(format!(
                "the snapshots changed: {:?} -> {:?}",
                want_snaps
                    .iter()
                    .filter(|s| !snaps.contains(s))
                    .collect::<Vec<_>>(),
                snaps
                    .iter()
                    .filter(|s| !want_snaps.contains(s))
                    .collect::<Vec<_>>()
            ));
        }
        // The guest: rolled back, the old QEMU runs on; committed, either
        // QEMU runs on the new overlays (plan 2 committed) or none answers
        // (the domain shut off). Paused by the harness to read the disks.
        let t = Instant::now();
        let qmp = self.guest.qmp();
        let running = if flushed.is_some() {
            match live::gone(&qmp) {
                Ok(true) => {}
                Ok(false) => v.push("QEMU was killed, but a QEMU answers on the monitor".into()),
                Err(e) => v.push(format!("after the QEMU kill: {e}")),
            }
            false
        } else {
            match live::qmp(&qmp).and_then(|mut q| q.query_status()) {
                Ok((true, _)) => true,
                Ok((false, st)) => {
                    v.push(format!("inv1: the guest is {st}, expected running"));
                    true
                }
                Err(_) if committed => match live::gone(&qmp) {
                    Ok(true) => false,
                    Ok(false) => {
                        v.push("inv1: a QEMU answers on the monitor, but not query-status".into());
                        false
                    }
                    Err(e) => {
                        v.push(format!("inv1: {e}"));
                        false
                    }
                },
                Err(e) => {
                    v.push(format!("inv1: rolled back, but QEMU does not answer: {e}"));
                    false
                }
            }
        };
        if let Some(r) = self.rev.as_mut() {
            if committed && running {
                r.ext_running += 1;
            } else if !running {
                r.ext_started += 1;
            }
        }
        if committed && running {
            // Plan 2 committed: the guest is vsnap's QEMU now.
            if let Err(e) = self.adopt_launched() {
                v.push(format!("plan 2 committed, but {e}"));
            }
        }
        if !running {
            // The old QEMU is gone (quit, or killed).
            if let Some(pid) = self.guest.pid.take() {
                if !wait_gone(pid, Duration::from_secs(30)) {
                    v.push(format!(
                        "the domain is shut off, but QEMU pid {pid} lives on"
                    ));
                }
            }
        }
        if running {
            if let Err(e) = live::stop(&qmp) {
                v.push(format!("harness: stop: {e}"));
            }
        }
        for disk in &dom.disks {
            let Some(img) = disk.image() else { continue };
            let t = &disk.target;
            let (Some((_, pre)), Some(want)) = (before.pre.get(t), self.rev_rec(target, t)) else {
                v.push(format!("harness: no record of disk {t}"));
                continue;
            };
            let a = match image_rec(&self.root, img, None) {
                Ok(a) => a,
                Err(e) => {
                    v.push(format!("inv6: {e}"));
                    continue;
                }
            };
            let img = img.display();
            if committed && !running {
                // Before the next boot: exactly the snapshot's state.
                if (a.seq, a.boot) != (want.seq, want.boot) {
                    v.push(format!(
                        "inv6: disk {t} ({img}) reverted to {target}, shut off: seq {} boot {}, the snapshot holds seq {} boot {}",
                        a.seq, a.boot, want.seq, want.boot
                    ));
                }
            } else if committed {
                // Booted afresh on the snapshot's disks: the snapshot's
                // record, or a later boot going on from its numbers; with
                // the memory loaded, the same boot going on from them.
                let ok = if sc.kind == Kind::LiveRevertMemFile {
                    a.boot == want.boot && a.seq >= want.seq && a.seq < pre.seq
                } else {
                    (a.seq, a.boot) == (want.seq, want.boot)
                        || (a.boot > want.boot && a.seq > want.seq && a.seq < pre.seq)
                };
                if !ok {
                    v.push(format!(
                        "inv6: disk {t} ({img}) reverted to {target} and booted: seq {} boot {}; the snapshot holds seq {} boot {}, before the revert seq {} (expected the snapshot's, or a later boot in ({}, {}))",
                        a.seq, a.boot, want.seq, want.boot, pre.seq, want.seq, pre.seq
                    ));
                } else if let Some(r) = self.rev.as_mut() {
                    r.climb = r.climb.max(a.seq - want.seq);
                }
            } else {
                let floor = flushed
                    .and_then(|f| f.get(t))
                    .map_or(pre.seq, |r| r.seq)
                    .max(pre.seq);
                if a.seq < floor {
                    v.push(format!(
                        "inv6: disk {t} ({img}): rolled back, but it holds seq {} below the {floor} the guest had written",
                        a.seq
                    ));
                }
            }
        }
        if running {
            if let Err(e) = live::cont(&qmp) {
                v.push(format!("harness: cont: {e}"));
            }
        }
        self.took("guest status and seq read", t);
        let t = Instant::now();
        match self.engine().and_then(|e| {
            e.domain_check(&self.dom)
                .map_err(|e| format!("domain check failed: {e}"))
        }) {
            Ok(r) => v.extend(r.violations.iter().map(|x| format!("domain check: {x}"))),
            Err(e) => v.push(e),
        }
        self.took("domain check", t);
        // No file a snapshot needs is gone; rolled back, no file gone or
        // new; committed, only the new overlays new, only the discarded
        // active images gone.
        let needed: BTreeSet<PathBuf> = snaps
            .iter()
            .flat_map(|s| {
                s.disks
                    .iter()
                    .map(|d| d.state_file.clone())
                    .chain(s.memory_file.clone())
            })
            .collect();
        for f in &needed {
            if !f.exists() {
                v.push(format!(
                    "file: {} is gone, and a snapshot needs it",
                    f.display()
                ));
            }
        }
        let rel = |p: &Path| {
            p.strip_prefix(&self.disks)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        };
        let new_imgs: BTreeSet<String> = dom
            .disks
            .iter()
            .filter_map(|d| d.image())
            .filter_map(rel)
            .collect();
        let old_imgs: BTreeSet<String> = before
            .dom
            .disks
            .iter()
            .filter_map(|d| d.image())
            .filter(|p| !needed.contains(*p))
            .filter_map(rel)
            .collect();
        match listing(&self.disks) {
            Ok(now) => {
                for k in before.listing.keys().filter(|k| !now.contains_key(*k)) {
                    if !(committed && old_imgs.contains(k)) {
                        v.push(format!("file: {k} disappeared"));
                    }
                }
                for k in now.keys().filter(|k| !before.listing.contains_key(*k)) {
                    if !(committed && new_imgs.contains(k)) {
                        v.push(format!("file: {k} appeared"));
                    }
                }
            }
            Err(e) => v.push(e),
        }
        let t = Instant::now();
        let r = self.recover(&Inject::None);
        self.took("second recovery", t);
        if r.code() != Some(0) || !r.run.stdout.contains("nothing to recover") {
            v.push(format!(
                "inv7: a second vsnap-recover is not a no-op: {}",
                r.describe()
            ));
        }
        // Shut off (plan 2 not run or rolled back, or QEMU killed): the
        // harness starts it as an operator would.
        if !running {
            if let Err(e) = self.start_domain() {
                v.push(e);
            }
        }
        (v, Some(committed))
    }

    /// vsnap killed at point `i` of the revert, recovered (killed too with
    /// `kill_recovery`), verified.
    fn revert_crash_point(
        &mut self,
        sc: &Scenario,
        map: &PointMap,
        i: usize,
        kill_recovery: bool,
        rep: &mut ScenarioReport,
    ) {
        let point = map.points[i].clone();
        let before = match self.rev_prepare(sc) {
            Ok(b) => b,
            Err(e) => {
                rep.failed += 1;
                return self
                    .violation(format!("{} {point}", sc.key), vec![format!("harness: {e}")]);
            }
        };
        let at = format!("{} {point} (revert to {})", sc.key, before.target);
        let mut v = Vec::new();
        let t = Instant::now();
        let r = self.vsnap(
            &self.revert_args(sc, &before.target),
            &Inject::CrashAt(point.clone()),
        );
        self.took("vsnap (crashed)", t);
        rep.points += 1;
        if !r.killed_by_crash_point() {
            v.push(format!(
                "vsnap did not die by SIGKILL at {point}: {}",
                r.describe()
            ));
        }
        let rec = self.recover_killing(kill_recovery, rep, &mut v);
        if rec.code() != Some(0) || rec.run.stdout.contains("needs-attention") {
            v.push(format!("vsnap-recover: {}", rec.describe()));
        }
        let (problems, outcome) = self.verify_rev(sc, &before, Some(map.expect(i)), None);
        v.extend(problems);
        match outcome {
            Some(true) => rep.committed += 1,
            Some(false) => rep.rolled_back += 1,
            None => {}
        }
        if !v.is_empty() {
            rep.failed += 1;
            self.violation(at, v);
        }
    }

    /// vsnap killed at `point` of the revert and QEMU killed too (a host
    /// crash): recovery decides (before the pivot, back, the domain on
    /// its images; after it, forward, the snapshot applied offline to
    /// every image); the shut-off domain is consistent, then the guest
    /// boots on the catalog's images.
    fn revert_qemu_kill(
        &mut self,
        sc: &Scenario,
        map: &PointMap,
        point: &str,
        rep: &mut ScenarioReport,
    ) {
        let t0 = Instant::now();
        let Some(i) = map.index(point) else {
            rep.failed += 1;
            return self.violation(
                format!("{} {point} + QEMU killed", sc.key),
                vec![format!("harness: the run never passes {point}")],
            );
        };
        let before = match self.rev_prepare(sc) {
            Ok(b) => b,
            Err(e) => {
                rep.failed += 1;
                return self.violation(
                    format!("{} {point} + QEMU killed", sc.key),
                    vec![format!("harness: {e}")],
                );
            }
        };
        let at = format!(
            "{} {point} + QEMU killed (revert to {})",
            sc.key, before.target
        );
        let mut v = Vec::new();
        let r = self.vsnap(
            &self.revert_args(sc, &before.target),
            &Inject::CrashAt(point.to_string()),
        );
        rep.qemu_kills += 1;
        if !r.killed_by_crash_point() {
            v.push(format!(
                "vsnap did not die by SIGKILL at {point}: {}",
                r.describe()
            ));
        }
        if let Err(e) = self.guest.kill() {
            rep.failed += 1;
            return self.violation(at, vec![format!("harness: {e}")]);
        }
        let mut flushed = BTreeMap::new();
        for (t, (img, _)) in &before.pre {
            match image_rec(&self.root, img, None) {
                Ok(r) => {
                    flushed.insert(t.clone(), r);
                }
                Err(e) => v.push(format!("harness: reading {t} after the kill: {e}")),
            }
        }
        let t = Instant::now();
        let rec = self.recover(&Inject::None);
        self.took("recovery", t);
        let out = rec.run.stdout.clone();
        let ended = self.rev_plan(before.plans).ok().flatten();
        // Decided: exit 0, and the plan committed or rolled back (no plan:
        // vsnap died before journaling it, nothing was done).
        let decided = rec.code() == Some(0)
            && !out.contains("needs-attention")
            && match &ended {
                None => true,
                Some(o) => matches!(o.as_deref(), Some("Committed" | "RolledBack")),
            };
        if decided {
            rep.qemu_decided += 1;
        } else {
            rep.qemu_attention += 1;
            v.push(format!(
                "vsnap-recover did not decide (exit 0, the plan committed or rolled back; the journal says {ended:?}): {}",
                rec.describe()
            ));
        }
        let expect = map.expect(i);
        let (problems, outcome) = self.verify_rev(sc, &before, Some(expect), Some(&flushed));
        v.extend(problems);
        match outcome {
            Some(true) => rep.committed += 1,
            Some(false) => rep.rolled_back += 1,
            None => {}
        }
        rep.notes.push(format!(
            "QEMU killed at {point} (expected {expect:?}): {}; vsnap-recover exit {:?}",
            match outcome {
                Some(true) if ext_revert(sc.kind) => {
                    "committed, the domain shut off on the new overlays"
                }
                Some(true) => "committed, the snapshot applied offline",
                Some(false) => "rolled back, the domain on its images",
                None => "?",
            },
            rec.code()
        ));
        // (`rv-ext`: verified, then started by `vsnap domain start`.)
        let booted = if self.guest.pid.is_some_and(proc_alive) {
            Ok(0.0)
        } else {
            self.boot_catalog()
        };
        match booted {
            Ok(_) => match self
                .engine()
                .and_then(|e| e.domain_check(&self.dom).map_err(|e| e.to_string()))
            {
                Ok(r) => v.extend(
                    r.violations
                        .iter()
                        .map(|x| format!("after reboot: domain check: {x}")),
                ),
                Err(e) => v.push(format!("after reboot: {e}")),
            },
            Err(e) => v.push(format!("harness: reboot: {e}")),
        }
        self.took("QEMU kills (with reboots)", t0);
        if !v.is_empty() {
            rep.failed += 1;
            self.violation(at, v);
        }
    }

    /// A revert scenario: the reference run lists the points (checked
    /// like the others), then every point, the recovery kills, the QEMU
    /// kills.
    fn run_revert_scenario(&mut self, sc: &Scenario, rep: &mut ScenarioReport) {
        let log = self.root.join(format!("points-{}.log", sc.key));
        let _ = std::fs::remove_file(&log);
        let map = match self.rev_prepare(sc) {
            Ok(before) => {
                let t = Instant::now();
                let r = self.vsnap(
                    &self.revert_args(sc, &before.target),
                    &Inject::Log(log.clone()),
                );
                rep.notes.push(format!(
                    "uncrashed revert took {:.2} s",
                    t.elapsed().as_secs_f64()
                ));
                let mut v = Vec::new();
                if r.code() != Some(0) {
                    v.push(format!("the uncrashed run failed: {}", r.describe()));
                }
                let (problems, outcome) = self.verify_rev(sc, &before, Some(Expect::Forward), None);
                v.extend(problems);
                if outcome == Some(true) {
                    rep.committed += 1;
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let map = PointMap::new(&text, sc.kind);
                if let Err(e) = &map {
                    v.push(format!("harness: {e}; points: {text:?}"));
                }
                if !v.is_empty() {
                    rep.failed += 1;
                    self.violation(format!("{} uncrashed", sc.key), v);
                }
                map.ok()
            }
            Err(e) => {
                rep.failed += 1;
                self.violation(format!("{} setup", sc.key), vec![format!("harness: {e}")]);
                None
            }
        };
        let Some(map) = map else { return };
        let sel = map.selection(self.quick);
        let sample = map.recovery_sample(self.quick);
        rep.notes.push(format!(
            "{} crash points in the run (pivot: step {}, takes effect at {}){}; vsnap-recover killed mid-way after: {}",
            map.points.len(),
            map.pivot,
            map.points[map.effect],
            if sel.len() < map.points.len() { format!(", {} sampled", sel.len()) } else { String::new() },
            sample.iter().map(|&i| map.points[i].as_str()).collect::<Vec<_>>().join(", ")
        ));
        for i in sel {
            self.revert_crash_point(sc, &map, i, sample.contains(&i), rep);
        }
        let kills = if self.quick {
            sc.qemu_kills_quick
        } else {
            sc.qemu_kills
        };
        for p in kills {
            let p = map.resolve(p);
            self.revert_qemu_kill(sc, &map, &p, rep);
        }
        match self.writer_progress() {
            Ok(s) => rep.notes.push(s),
            Err(e) => {
                rep.failed += 1;
                self.violation(format!("{} after its points", sc.key), vec![e]);
            }
        }
        if let Some(r) = &self.rev {
            rep.notes.push(format!(
                "after a committed revert the writer was at most {} records past the snapshot's when paused (margin {REVERT_MARGIN})",
                r.climb
            ));
            if ext_revert(sc.kind) {
                rep.notes.push(format!(
                    "after recovery: QEMU running on the new overlays {} time(s); the domain shut off and started by `vsnap domain start` {} time(s)",
                    r.ext_running, r.ext_started
                ));
            }
        }
    }
}

// --- setup ---------------------------------------------------------------------------

fn sh(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// vda raw (qcow2 with `all_qcow2`), vdb and vdc qcow2: ext4 made on
/// the host (the guest formats nothing).
fn make_disks(dir: &Path, all_qcow2: bool) -> Result<Vec<(PathBuf, Format)>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for (t, mut fmt) in [
        ("vda", Format::Raw),
        ("vdb", Format::Qcow2),
        ("vdc", Format::Qcow2),
    ] {
        if all_qcow2 {
            fmt = Format::Qcow2;
        }
        let raw = dir.join(format!("{t}.raw"));
        let f =
            std::fs::File::create(&raw).map_err(|e| format!("create {}: {e}", raw.display()))?;
        f.set_len(DISK_MB << 20)
            .map_err(|e| format!("truncate {}: {e}", raw.display()))?;
        drop(f);
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&raw))?;
        if fmt == Format::Qcow2 {
            let q = dir.join(format!("{t}.qcow2"));
            sh(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&q))?;
            std::fs::remove_file(&raw).map_err(|e| format!("rm {}: {e}", raw.display()))?;
            out.push((q, fmt));
        } else {
            out.push((raw, fmt));
        }
    }
    Ok(out)
}

/// Scenarios share a domain within a group; each group starts a new
/// domain on new disks (the domain check reads every file of a domain's
/// snapshots, so one domain for all would slow every later point).
struct Group {
    dom: &'static str,
    /// The disks on a loop-mounted btrfs (reflink clones).
    btrfs: bool,
    scenarios: &'static [&'static str],
    /// vda is raw, except in the offline group (its internal snapshots need qcow2).
    all_qcow2: bool,
    /// The guest is shut off (after its writer wrote to every disk) before the scenarios.
    offline: bool,
}

const GROUPS: &[Group] = &[
    Group {
        dom: "ga",
        btrfs: false,
        scenarios: &["a"],
        all_qcow2: false,
        offline: false,
    },
    Group {
        dom: "gb",
        btrfs: false,
        scenarios: &["b", "c"],
        all_qcow2: false,
        offline: false,
    },
    Group {
        dom: "gr",
        btrfs: true,
        scenarios: &["r-mix", "r-only", "r-halt"],
        all_qcow2: false,
        offline: false,
    },
    Group {
        dom: "gm",
        btrfs: false,
        scenarios: &["mem"],
        all_qcow2: false,
        offline: false,
    },
    Group {
        dom: "gv",
        btrfs: false,
        scenarios: &["rv-mem", "rv-paused", "rv-cont"],
        // Internal snapshots with memory need every disk qcow2.
        all_qcow2: true,
        offline: false,
    },
    Group {
        dom: "gx",
        btrfs: false,
        scenarios: &["rv-ext"],
        all_qcow2: false,
        offline: false,
    },
    Group {
        dom: "gy",
        btrfs: false,
        scenarios: &["rv-memfile"],
        all_qcow2: false,
        offline: false,
    },
    Group {
        dom: "gd",
        btrfs: false,
        scenarios: &["d-int", "d-ext"],
        all_qcow2: true,
        offline: true,
    },
];

impl Suite {
    /// A new domain on new disks: boot, attach; for an offline group, wait
    /// until the writer wrote every disk, then shut the guest off.
    fn start_group(&mut self, g: &Group) -> Result<(), String> {
        self.guest.kill()?;
        self.btrfs = None;
        self.dom = g.dom.to_string();
        self.disks = if g.btrfs {
            let b = BtrfsLoop::create(&self.root, 1 << 30)?;
            let d = b.mount.join(format!("disks-{}", g.dom));
            self.btrfs = Some(b);
            d
        } else {
            self.root.join(format!("disks-{}", g.dom))
        };
        self.guest.dir = self.root.join(g.dom);
        self.last_seq.clear();
        self.rev = None;
        let disks = make_disks(&self.disks, g.all_qcow2)?;
        let s = self.guest.boot(&disks)?;
        println!(
            "group {}: guest booted in {s:.1} s on new disks in {}",
            g.dom,
            self.disks.display()
        );
        let attach = self.vsnap(
            &[
                os("domain"),
                os("attach"),
                os(&self.dom),
                os("--qmp"),
                os(self.guest.qmp()),
                os("--agent"),
                os(self.guest.qga()),
            ],
            &Inject::None,
        );
        if attach.code() != Some(0) {
            return Err(format!("attaching the domain: {}", attach.describe()));
        }
        if g.offline {
            let t = Instant::now();
            let mut last;
            loop {
                let seqs: Result<Vec<u64>, String> = disks
                    .iter()
                    .map(|(p, _)| image_seq(&self.root, p, None).map(|(s, _)| s))
                    .collect();
                match seqs {
                    Ok(v) if v.iter().all(|&s| s > 0) => break,
                    Ok(v) => last = format!("{v:?}"),
                    Err(e) => last = e,
                }
                if t.elapsed() > Duration::from_secs(60) {
                    return Err(format!(
                        "the writer wrote nothing to some disk in 60 s: {last}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            self.guest.quit()?;
        }
        Ok(())
    }

    /// The end of an offline group: boot on the catalog's images; consistent, and the writer goes on.
    fn final_boot(&mut self) -> Vec<String> {
        let tb = Instant::now();
        let mut v = Vec::new();
        match self.boot_catalog() {
            Ok(_) => {
                match self
                    .engine()
                    .and_then(|e| e.domain_check(&self.dom).map_err(|e| e.to_string()))
                {
                    Ok(r) => v.extend(r.violations.iter().map(|x| format!("domain check: {x}"))),
                    Err(e) => v.push(e),
                }
                match self.writer_progress() {
                    Ok(s) => println!(
                        "group {}: boot on the catalog's images: consistent; {s} ({:.1} s)",
                        self.dom,
                        tb.elapsed().as_secs_f64()
                    ),
                    Err(e) => v.push(e),
                }
            }
            Err(e) => v.push(format!("boot on the catalog's images: {e}")),
        }
        v
    }
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let quick = std::env::var("VSNAP_CRASH_QUICK").is_ok_and(|v| v == "1");
    let fail = |e: String| {
        eprintln!("live crash suite: FAILED: {e}");
        println!("live crash points explored: 0, invariant violations: 1");
        println!("0 passed, 1 failed");
        ExitCode::FAILURE
    };
    let bins = match Bins::locate() {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    for prog in ["qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
            .unwrap_or(false);
        if !found {
            return fail(format!(
                "{prog} is not installed (needed for the real guest)"
            ));
        }
    }
    let scratch = match scratch_dir("vsnap-live.") {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot make a directory under /var/tmp: {e}")),
    };
    let root = std::fs::canonicalize(scratch.path()).expect("scratch dir is canonicalizable");
    if let Err(e) = bins.require_failpoints(&root) {
        return fail(e);
    }
    // The guest: built (cached) by the one command the suite calls.
    let tb = Instant::now();
    if let Err(e) = sh(&mut Command::new(workspace_root().join("guest/build.sh"))) {
        return fail(format!("building the test guest: {e}"));
    }
    let build_s = tb.elapsed().as_secs_f64();
    let mut suite = Suite {
        phases: BTreeMap::new(),
        bins,
        root: root.clone(),
        dom: String::new(),
        disks: root.clone(),
        state: root.join("state"),
        guest: Guest {
            dir: root.clone(),
            pid: None,
            boots: Vec::new(),
        },
        quick,
        counter: 0,
        violations: Vec::new(),
        last_seq: BTreeMap::new(),
        last_seq_note: String::new(),
        btrfs: None,
        rev: None,
    };
    println!(
        "live crash suite{}: binaries from {}, scratch {}, guest build {:.1} s",
        if quick {
            " (VSNAP_CRASH_QUICK=1: sampled)"
        } else {
            ""
        },
        suite.bins.dir.display(),
        root.display(),
        build_s
    );

    let all = scenarios();
    let mut reports = Vec::new();
    let mut harness_failures = 0;
    for g in GROUPS {
        let wanted = |k: &str| filter.as_deref().is_none_or(|f| k.contains(f));
        if !g.scenarios.iter().any(|k| wanted(k)) {
            continue;
        }
        if let Err(e) = suite.start_group(g) {
            return fail(format!("group {}: {e}", g.dom));
        }
        for key in g.scenarios {
            let sc = all
                .iter()
                .find(|s| s.key == *key)
                .expect("every group's scenario exists");
            if !wanted(key)
                && matches!(
                    sc.kind,
                    Kind::LiveRevert | Kind::LiveRevertExt | Kind::LiveRevertMemFile
                )
            {
                // Reverts build no state for the next scenario.
                continue;
            }
            if !wanted(key) {
                // Build the state the next scenarios start from, no crash.
                let name = suite.next_name(sc.key);
                let r = suite.vsnap(&suite.create_args(sc, &name), &Inject::None);
                if r.code() != Some(0) {
                    harness_failures += 1;
                    suite.violation(
                        format!("{} (not selected) setup", sc.key),
                        vec![r.describe()],
                    );
                }
                continue;
            }
            let rep = suite.run_scenario(sc);
            println!(
                "scenario {:<6} {:<54} points {:>3}  recovery kills {:>3}  QEMU kills {}  committed {:>3}  rolled back {:>3}  failed {:>2}  {:>6.1} s",
                rep.key, sc.title, rep.points, rep.recovery_kills, rep.qemu_kills, rep.committed, rep.rolled_back, rep.failed, rep.seconds
            );
            for n in &rep.notes {
                println!("    {n}");
            }
            reports.push(rep);
        }
        if g.offline {
            let v = suite.final_boot();
            if !v.is_empty() {
                harness_failures += 1;
                suite.violation(format!("group {}: final boot", g.dom), v);
            }
        }
        if let Err(e) = suite.guest.quit() {
            eprintln!("warning: {e}");
        }
    }
    if let Err(e) = suite.guest.kill() {
        eprintln!("warning: {e}");
    }

    let points: usize = reports.iter().map(|r| r.points).sum();
    let rk: usize = reports.iter().map(|r| r.recovery_kills).sum();
    let qk: usize = reports.iter().map(|r| r.qemu_kills).sum();
    let qd: usize = reports.iter().map(|r| r.qemu_decided).sum();
    let qa: usize = reports.iter().map(|r| r.qemu_attention).sum();
    // Every host crash is decided from the files (DESIGN.md 10.1): a QEMU
    // kill left needing attention fails the suite (it is a violation at
    // its point, counted in `failed`).
    let failed: usize = reports.iter().map(|r| r.failed).sum::<usize>() + harness_failures;
    println!("QEMU kills: {qk}, decided: {qd}, needs attention: {qa}");
    let n = points + rk + qk;
    println!();
    println!(
        "{points} vsnap crash points + {rk} vsnap-recover crash points + {qk} QEMU kills; {} guest boot(s) ({} s); run time {:.1} s",
        suite.guest.boots.len(),
        suite.guest.boots.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>().join(" "),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "time per phase: {}",
        suite
            .phases
            .iter()
            .map(|(k, v)| format!("{k} {v:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !suite.violations.is_empty() {
        println!("violations:");
        for v in &suite.violations {
            println!("  at {}:", v.at);
            for w in &v.what {
                println!("      {w}");
            }
        }
    }
    drop(suite);
    if failed > 0 || std::env::var("VSNAP_CRASH_KEEP").is_ok_and(|v| v == "1") {
        let kept = scratch.keep();
        println!("scratch directory kept: {}", kept.display());
    }
    println!("live crash points explored: {n}, invariant violations: {failed}");
    println!("{} passed, {failed} failed", n.saturating_sub(failed));
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
