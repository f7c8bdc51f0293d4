//! vsnap's crash suite: every volume operation, killed at every crash point
//! it passes, then recovered (and `vsnap-recover` itself killed at every
//! point it passes, then run again), then checked against DESIGN.md
//! section 5.
//!
//! Needs the binaries under test built with crash points:
//!
//! ```text
//! cargo build -p vsnap-cli --features vsnap-cli/failpoints
//! cargo test -p vsnap-crash --test crash
//! ```
//!
//! Root is needed for the btrfs loop filesystem of the reflink scenarios.
//!
//! Environment:
//! * `VSNAP_BIN_DIR` — where `vsnap` and `vsnap-recover` are (default
//!   `<workspace>/target/debug`).
//! * `VSNAP_CRASH_QUICK=1` — only the first scenario of each operation.
//! * `VSNAP_CRASH_FULL=1` — explore recovery crashes after every operation
//!   crash point; by default the `journal.*` points between the first and
//!   the last are left out of that exploration (see
//!   [`explore_recovery_after`]); they are still crashed and checked.
//! * `VSNAP_CRASH_JOBS=N` — scenarios run N at a time, each in a worker
//!   process of its own (default: the number of CPUs).
//! * `VSNAP_CRASH_LIST=1` — only set up each scenario, check its
//!   uncrashed reference run and list its crash points.
//! * `VSNAP_CRASH_KEEP=1` — keep the scratch directory (printed) after the
//!   run, to look at what a violation left (the btrfs filesystem of the
//!   reflink scenarios is unmounted and removed all the same).
//! * A free argument (`cargo test -p vsnap-crash --test crash -- delete/`)
//!   runs only the scenarios whose name contains it.
//!
//! Per scenario: the world is laid once (image, patterns, prior snapshots
//! through the CLI) and copied aside as a template; every trial starts from
//! an exact copy of it laid at the same path (a fresh setup, without
//! re-running qemu-img and vsnap for it). An uncrashed reference run lists
//! the crash points and gives the "after" state; the template gives the
//! "before" state. For each crash point P: lay the template, kill the
//! operation at P, recover, check; then for k = 1, 2, ...: lay the
//! template and kill the operation at P again, kill `vsnap-recover` at its
//! k-th crash point, recover again, check; until the k-th kill does not
//! happen. Laying the template copies files (new inodes): the harness
//! adopts the copied snapshot files each time (`vsnap vol adopt-files`,
//! what an operator does after restoring a backup).
//!
//! Checks after each recovery: (a) `Engine::vol_check` (DESIGN.md section
//! 5 for volumes: catalog and disks agree both ways, no orphan or
//! temporary file, `qemu-img check` clean (no corruption, no leaked
//! cluster), chain = catalog, no unfinished
//! plan); (b) the catalog is the state before the operation or the state
//! after it; (c) the image holds the data of that state, and every
//! snapshot in the catalog, reverted to through the CLI, shows its own
//! data; (d) a second `vsnap-recover` says "nothing to recover" and
//! changes neither the catalog nor the files (names and sizes).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vsnap_crash::*;

/// A bound on recovery crash points per operation crash point: recovery
/// that passes more points than this is a harness error (a loop).
const RECOVERY_POINTS_MAX: usize = 400;

/// The operation under test.
#[derive(Clone, Debug)]
enum Op {
    Create { name: String, kind: SnapKind },
    Revert { name: String },
    Delete { name: String, children: bool },
}

impl Op {
    fn args(&self, fx: &Fixture) -> Vec<OsString> {
        match self {
            Op::Create { name, kind } => fx.create_args(name, *kind),
            Op::Revert { name } => fx.revert_args(name),
            Op::Delete { name, children } => fx.delete_args(name, *children),
        }
    }

    fn describe(&self) -> String {
        match self {
            Op::Create { name, kind } => format!("create {kind} snapshot {name}"),
            Op::Revert { name } => format!("revert to {name}"),
            Op::Delete {
                name,
                children: false,
            } => format!("delete {name}"),
            Op::Delete {
                name,
                children: true,
            } => format!("delete {name} --children"),
        }
    }

    /// What the image and the snapshots hold after the operation.
    fn model_after(&self, before: &Model) -> Model {
        let mut m = before.clone();
        match self {
            Op::Create { name, .. } => {
                m.snaps.insert(name.clone(), m.image);
            }
            Op::Revert { name } => m.image = m.snaps[name],
            Op::Delete { .. } => {}
        }
        m
    }

    /// The catalog after the operation, worked out from the one before
    /// (independently of the engine): snapshot -> parent, and current.
    fn tree_after(
        &self,
        before: &CatalogState,
    ) -> (BTreeMap<String, Option<String>>, Option<String>) {
        let mut tree = tree_of(before);
        let mut current = before.current.clone();
        match self {
            Op::Create { name, .. } => {
                tree.insert(name.clone(), before.current.clone());
                current = Some(name.clone());
            }
            Op::Revert { name } => current = Some(name.clone()),
            Op::Delete { name, children } => {
                let parent = tree.get(name).cloned().flatten();
                let mut doomed = vec![name.clone()];
                if *children {
                    let mut i = 0;
                    while i < doomed.len() {
                        let n = doomed[i].clone();
                        doomed.extend(
                            tree.iter()
                                .filter(|(_, p)| p.as_deref() == Some(n.as_str()))
                                .map(|(k, _)| k.clone()),
                        );
                        i += 1;
                    }
                }
                for d in &doomed {
                    tree.remove(d);
                }
                for p in tree.values_mut() {
                    if p.as_deref() == Some(name.as_str()) {
                        *p = parent.clone();
                    }
                }
                if current.as_ref().is_some_and(|c| doomed.contains(c)) {
                    current = parent;
                }
            }
        }
        (tree, current)
    }
}

fn tree_of(c: &CatalogState) -> BTreeMap<String, Option<String>> {
    c.snaps
        .iter()
        .map(|s| (s.name.clone(), s.parent.clone()))
        .collect()
}

/// One scenario: an operation on a snapshot kind, with its prior state.
struct Scenario {
    name: &'static str,
    /// The operation group (`create`, `revert`, `delete`, `delete-children`).
    group: &'static str,
    kind: SnapKind,
    format: Format,
    /// Lives on the btrfs loop filesystem (reflink).
    btrfs: bool,
    /// Takes the prior snapshots (through the CLI) and returns the operation.
    setup: fn(&mut Fixture, SnapKind) -> Result<Op, String>,
}

/// s1, then a write: the image differs from s1; the operation makes s2.
fn setup_create(fx: &mut Fixture, kind: SnapKind) -> Result<Op, String> {
    fx.snapshot("s1", kind)?;
    fx.write_next()?;
    Ok(Op::Create {
        name: "s2".into(),
        kind,
    })
}

/// s1, write, s2 (current), write: the operation reverts to s1.
fn setup_revert(fx: &mut Fixture, kind: SnapKind) -> Result<Op, String> {
    for s in ["s1", "s2"] {
        fx.snapshot(s, kind)?;
        fx.write_next()?;
    }
    Ok(Op::Revert { name: "s1".into() })
}

/// s1 <- s2 <- s3 (current), a write after each: the operation deletes s2,
/// re-parenting s3 onto s1.
fn setup_delete(fx: &mut Fixture, kind: SnapKind) -> Result<Op, String> {
    for s in ["s1", "s2", "s3"] {
        fx.snapshot(s, kind)?;
        fx.write_next()?;
    }
    Ok(Op::Delete {
        name: "s2".into(),
        children: false,
    })
}

/// s1 <- s2 <- s3, then a revert to s2 and a write: s3's file and the
/// image are both backed by s2's file, so deleting s2 rebases both onto s1's.
fn setup_delete_external(fx: &mut Fixture, kind: SnapKind) -> Result<Op, String> {
    for s in ["s1", "s2", "s3"] {
        fx.snapshot(s, kind)?;
        fx.write_next()?;
    }
    fx.revert("s2")?;
    fx.write_next()?;
    Ok(Op::Delete {
        name: "s2".into(),
        children: false,
    })
}

/// s1 <- s2 <- s3 (current), a write after each: the operation deletes s2
/// and s3; current moves to s1 (external: the image, backed by s3's file,
/// is rebased onto s1's).
fn setup_delete_children(fx: &mut Fixture, kind: SnapKind) -> Result<Op, String> {
    for s in ["s1", "s2", "s3"] {
        fx.snapshot(s, kind)?;
        fx.write_next()?;
    }
    Ok(Op::Delete {
        name: "s2".into(),
        children: true,
    })
}

fn scenarios() -> Vec<Scenario> {
    use Format::{Qcow2, Raw};
    use SnapKind::{Copy, External, Internal, Reflink};
    let s = |name, group, kind, format, btrfs, setup| Scenario {
        name,
        group,
        kind,
        format,
        btrfs,
        setup,
    };
    vec![
        s(
            "create/internal",
            "create",
            Internal,
            Qcow2,
            false,
            setup_create as fn(&mut Fixture, SnapKind) -> _,
        ),
        s(
            "create/external",
            "create",
            External,
            Qcow2,
            false,
            setup_create,
        ),
        s("create/reflink", "create", Reflink, Raw, true, setup_create),
        s("create/copy", "create", Copy, Qcow2, false, setup_create),
        s(
            "revert/internal",
            "revert",
            Internal,
            Qcow2,
            false,
            setup_revert,
        ),
        s(
            "revert/external",
            "revert",
            External,
            Qcow2,
            false,
            setup_revert,
        ),
        s("revert/reflink", "revert", Reflink, Raw, true, setup_revert),
        s("revert/copy", "revert", Copy, Qcow2, false, setup_revert),
        s(
            "delete/internal",
            "delete",
            Internal,
            Qcow2,
            false,
            setup_delete,
        ),
        s(
            "delete/external",
            "delete",
            External,
            Qcow2,
            false,
            setup_delete_external,
        ),
        s("delete/reflink", "delete", Reflink, Raw, true, setup_delete),
        s("delete/copy", "delete", Copy, Qcow2, false, setup_delete),
        s(
            "delete-children/internal",
            "delete-children",
            Internal,
            Qcow2,
            false,
            setup_delete_children,
        ),
        s(
            "delete-children/external",
            "delete-children",
            External,
            Qcow2,
            false,
            setup_delete_children,
        ),
        s(
            "delete-children/copy",
            "delete-children",
            Copy,
            Qcow2,
            false,
            setup_delete_children,
        ),
    ]
}

/// One thing found wrong.
#[derive(Clone, Debug)]
struct Violation {
    scenario: String,
    point: String,
    what: Vec<String>,
}

/// The states a run must end in: before the operation, or after it.
struct Expect {
    op: Op,
    before: CatalogState,
    after: CatalogState,
    model_before: Model,
    model_after: Model,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Before,
    After,
}

/// Everything a scenario needs for its trials.
struct Prepared {
    fx: Fixture,
    template: PathBuf,
    expect: Expect,
    points: Vec<String>,
}

#[derive(Default)]
struct ScenarioReport {
    points: usize,
    /// Operation crash points after which recovery crashes were explored.
    explored_after: usize,
    recovery_points: usize,
    failed: usize,
    seconds: f64,
    violations: Vec<Violation>,
}

fn fixture_root(base: &Path, s: &Scenario) -> PathBuf {
    base.join(s.name.replace('/', "-"))
}

/// Lay the world, save it as the template, run the operation once
/// uncrashed (listing its crash points) and check that reference run.
fn prepare(s: &Scenario, base: &Path, bins: &Bins) -> Result<(Prepared, Vec<String>), String> {
    let root = fixture_root(base, s);
    std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
    let work = root.join("work");
    let template = root.join("template");
    let image_name = match s.format {
        Format::Qcow2 => "disk.qcow2",
        Format::Raw => "disk.img",
    };
    let mut fx =
        Fixture::create(bins, &work, image_name, s.format).map_err(|e| format!("setup: {e}"))?;
    let op = (s.setup)(&mut fx, s.kind).map_err(|e| format!("setup: {e}"))?;
    let setup = fx.inspect().map_err(|e| format!("setup: {e}"))?;
    if !setup.check.violations.is_empty() {
        return Err(format!(
            "setup: the volume is inconsistent before the operation: {}",
            setup.check.violations.join("; ")
        ));
    }
    copy_tree(&work, &template).map_err(|e| format!("saving the template: {e}"))?;
    let log = root.join("points.log");
    let r = fx.vsnap(&op.args(&fx), &Inject::Log(log.clone()));
    if !r.success() {
        return Err(format!(
            "reference run ({}): {}",
            op.describe(),
            r.describe()
        ));
    }
    let points = expand_points(
        &std::fs::read_to_string(&log).map_err(|e| format!("reading {}: {e}", log.display()))?,
    );
    if points.is_empty() {
        return Err("the reference run hit no crash point".into());
    }
    let after = fx.catalog()?;
    let model_before = fx.model.clone();
    let model_after = op.model_after(&model_before);
    let expect = Expect {
        op,
        before: setup.catalog,
        after,
        model_before,
        model_after,
    };
    if expect.before == expect.after {
        return Err(
            "the operation does not change the catalog: the suite cannot tell before from after"
                .into(),
        );
    }
    // The reference run itself must be right: the catalog the operation
    // should give (worked out here, not by the engine), and every check.
    let mut problems = Vec::new();
    let (tree, current) = expect.op.tree_after(&expect.before);
    if tree != tree_of(&expect.after) || current != expect.after.current {
        problems.push(format!(
            "uncrashed {}: the catalog should be {tree:?} with current {current:?}, is {}",
            expect.op.describe(),
            expect.after.summary()
        ));
    }
    let (outcome, mut more) = verify(&fx, &expect);
    if outcome != Some(Outcome::After) && more.is_empty() {
        more.push("uncrashed run did not end in the after state".into());
    }
    problems.extend(more);
    Ok((
        Prepared {
            fx,
            template,
            expect,
            points,
        },
        problems,
    ))
}

/// Checks (a)-(d) after recovery; returns the outcome seen and what is
/// wrong. Reverts the image (to check every snapshot's data) as its last
/// act: the caller lays the world anew afterwards.
fn verify(fx: &Fixture, exp: &Expect) -> (Option<Outcome>, Vec<String>) {
    let mut p = Vec::new();
    // (a) DESIGN.md section 5 as it applies to volumes, and no unfinished plan.
    let first = match fx.inspect() {
        Ok(i) => i,
        Err(e) => {
            p.push(format!("(a) cannot inspect the state: {e}"));
            return (None, p);
        }
    };
    p.extend(first.check.violations.iter().map(|v| format!("(a) {v}")));
    // `qemu-img check` clean: leaked clusters too (a note for `vol check`).
    if first.check.leaked_clusters > 0 {
        p.push(format!(
            "(a) qemu-img check is not clean: {} leaked cluster(s): {}",
            first.check.leaked_clusters,
            first.check.notes.join("; ")
        ));
    }
    // (b) all or nothing.
    let cat = &first.catalog;
    let outcome = if *cat == exp.before {
        Some(Outcome::Before)
    } else if *cat == exp.after {
        Some(Outcome::After)
    } else {
        p.push(format!(
            "(b) the catalog is neither the state before nor the state after the operation: it is {}; before: {}; after: {}",
            cat.summary(),
            exp.before.summary(),
            exp.after.summary()
        ));
        None
    };
    // (d) a second recovery has nothing to do and changes nothing.
    match listing(&fx.disk_dir) {
        Err(e) => p.push(format!("(d) {e}")),
        Ok(files_before) => {
            let r = fx.recover(&Inject::None);
            if !r.success() || !r.stdout.contains("nothing to recover") {
                p.push(format!(
                    "(d) a second vsnap-recover should say \"nothing to recover\": {}",
                    r.describe()
                ));
            }
            match fx.catalog() {
                Err(e) => p.push(format!("(d) after a second recovery: {e}")),
                Ok(c) if c != *cat => p.push(format!(
                    "(d) a second recovery changed the catalog: {} -> {}",
                    cat.summary(),
                    c.summary()
                )),
                Ok(_) => {}
            }
            match listing(&fx.disk_dir) {
                Err(e) => p.push(format!("(d) {e}")),
                Ok(files_after) => {
                    for d in diff_listing(&files_before, &files_after) {
                        p.push(format!("(d) a second recovery changed the files: {d}"));
                    }
                }
            }
        }
    }
    // (c) data: the image as before or after (matching (b)); every
    // snapshot, reverted to through the CLI, shows its own data.
    let model = match outcome {
        Some(Outcome::Before) => Some(&exp.model_before),
        Some(Outcome::After) => Some(&exp.model_after),
        None => None,
    };
    if let Some(m) = model {
        p.extend(
            fx.check_image(&m.image)
                .into_iter()
                .map(|e| format!("(c) image: {e}")),
        );
    }
    for s in &cat.snaps {
        let Some(want) = exp.model_after.snaps.get(&s.name) else {
            p.push(format!(
                "(c) the catalog holds snapshot {:?}, which the test never made",
                s.name
            ));
            continue;
        };
        let r = fx.vsnap(&fx.revert_args(&s.name), &Inject::None);
        if !r.success() {
            p.push(format!(
                "(c) reverting to {} failed: {}",
                s.name,
                r.describe()
            ));
            continue;
        }
        p.extend(
            fx.check_image(want)
                .into_iter()
                .map(|e| format!("(c) reverted to {}: {e}", s.name)),
        );
    }
    (outcome, p.into_iter().map(|s| fx.short(&s)).collect())
}

/// How one recovery trial ended.
enum Trial {
    /// Recovered and checked: what is wrong, if anything.
    Checked(Vec<String>),
    /// The recovery run meant to be killed at `*#k` finished instead: the
    /// recovery crash points of this operation crash point are exhausted.
    RecoveryFinished,
}

/// Lay the world anew from the template. The copy gives every file a new
/// inode, which vsnap (rightly) refuses as a replaced snapshot file: the
/// harness adopts them as an operator who restored a backup would
/// (`vsnap vol adopt-files`), which checks them first.
fn lay_world(pr: &Prepared) -> Result<(), String> {
    let fx = &pr.fx;
    replace_tree(&pr.template, &fx.root)
        .map_err(|e| format!("harness: laying the world anew: {e}"))?;
    let image = fx.image.as_os_str().to_owned();
    let r = fx.vsnap(
        &[OsString::from("vol"), "adopt-files".into(), image],
        &Inject::None,
    );
    if !r.success() {
        return Err(format!(
            "harness: adopting the copied snapshot files: {}",
            fx.short(&r.describe())
        ));
    }
    Ok(())
}

/// Lay the world anew from the template and kill the operation at
/// `point`. Err: a harness error (the point was not reached).
fn crash_op(pr: &Prepared, point: &str) -> Result<(), String> {
    let fx = &pr.fx;
    lay_world(pr)?;
    let r = fx.vsnap(&pr.expect.op.args(fx), &Inject::CrashAt(point.to_string()));
    if !r.killed() {
        return Err(format!(
            "harness: the operation was not killed at {point} (the point was not reached): {}",
            fx.short(&r.describe())
        ));
    }
    Ok(())
}

/// After a crash of the operation: with `k`, kill `vsnap-recover` at its
/// k-th crash point first; then recover and check everything.
fn recover_and_verify(pr: &Prepared, k: Option<usize>) -> Trial {
    let fx = &pr.fx;
    if let Some(k) = k {
        let r = fx.recover(&Inject::CrashAt(format!("*#{k}")));
        if !r.killed() {
            return Trial::RecoveryFinished;
        }
    }
    let mut p = Vec::new();
    let r = fx.recover(&Inject::None);
    if !r.success() {
        p.push(format!(
            "vsnap-recover should exit 0: {}",
            fx.short(&r.describe())
        ));
    }
    let (_, more) = verify(fx, &pr.expect);
    p.extend(more);
    Trial::Checked(p)
}

/// `VSNAP_CRASH_LIST=1`: set up and run the reference run of each
/// scenario, print its crash points, explore none.
fn list_only() -> bool {
    std::env::var("VSNAP_CRASH_LIST").is_ok_and(|v| v == "1")
}

/// Negative controls, run once per scenario: the checks must see a world
/// known to be broken, else a clean result would mean nothing. (1) A
/// crash at the middle crash point left without recovery: an unfinished
/// plan. (2) The uncrashed operation, then a foreign pattern written over
/// region 0 of the image: wrong data.
fn negative_controls(pr: &Prepared) -> Vec<String> {
    let mut out = Vec::new();
    let fx = &pr.fx;
    let mid = &pr.points[pr.points.len() / 2];
    match crash_op(pr, mid) {
        Err(e) => out.push(e),
        Ok(()) => {
            let (_, p) = verify(fx, &pr.expect);
            if !p.iter().any(|x| x.starts_with("(a) inv7")) {
                out.push(format!(
                    "harness: the checks are blind: a crash at {mid} left without recovery was not reported as an unfinished plan (found: {p:?})"
                ));
            }
        }
    }
    if let Err(e) = lay_world(pr) {
        out.push(e);
        return out;
    }
    let r = fx.vsnap(&pr.expect.op.args(fx), &Inject::None);
    if !r.success() {
        out.push(format!(
            "harness: the uncrashed operation failed: {}",
            fx.short(&r.describe())
        ));
        return out;
    }
    if let Err(e) = write_region(&fx.image, 0, 0x3f) {
        out.push(format!("harness: writing a foreign pattern: {e}"));
        return out;
    }
    let (_, p) = verify(fx, &pr.expect);
    if !p.iter().any(|x| x.starts_with("(c) image")) {
        out.push(format!(
            "harness: the checks are blind: a foreign pattern written over the image after the operation was not reported (found: {p:?})"
        ));
    }
    out
}

/// Whether recovery crashes are explored after operation crash point
/// `i` of `points`. `VSNAP_CRASH_FULL=1`: after every point. Default: after
/// every point except the `journal.*` points strictly between the first
/// and the last, whose durable state is that of a neighbouring `run.*` or
/// `step.*` point (`journal.*.inserted`: a record in sled's memory, not
/// flushed, lost with the process: the state of the point before it;
/// `journal.flushed`: flushed, and nothing happens before the next point).
/// Those points themselves are still crashed, recovered and checked.
fn explore_recovery_after(points: &[String], i: usize) -> bool {
    full() || i == 0 || i + 1 == points.len() || !points[i].starts_with("journal.")
}

fn full() -> bool {
    std::env::var("VSNAP_CRASH_FULL").is_ok_and(|v| v == "1")
}

fn run_scenario(s: &Scenario, base: &Path, bins: &Bins) -> ScenarioReport {
    let t0 = Instant::now();
    let mut rep = ScenarioReport::default();
    let violation = |point: &str, what: Vec<String>| Violation {
        scenario: s.name.to_string(),
        point: point.to_string(),
        what,
    };
    let pr = match prepare(s, base, bins) {
        Ok((pr, problems)) => {
            if !problems.is_empty() {
                rep.failed += 1;
                rep.violations
                    .push(violation("none (uncrashed reference run)", problems));
            }
            pr
        }
        Err(e) => {
            rep.failed += 1;
            rep.violations
                .push(violation("none (setup / reference run)", vec![e]));
            rep.seconds = t0.elapsed().as_secs_f64();
            return rep;
        }
    };
    let sampled: Vec<&str> = (0..pr.points.len())
        .filter(|&i| explore_recovery_after(&pr.points, i))
        .map(|i| pr.points[i].as_str())
        .collect();
    println!(
        "{:<26} {} crash points, recovery crashes explored after {} of them: {}",
        s.name,
        pr.points.len(),
        sampled.len(),
        pr.expect.op.describe()
    );
    if list_only() {
        println!("    all:      {}", pr.points.join(" "));
        println!("    recovery: {}", sampled.join(" "));
        rep.seconds = t0.elapsed().as_secs_f64();
        return rep;
    }
    let blind = negative_controls(&pr);
    if !blind.is_empty() {
        rep.failed += 1;
        rep.violations
            .push(violation("none (negative controls)", blind));
    }
    for (i, point) in pr.points.iter().enumerate() {
        rep.points += 1;
        if let Err(e) = crash_op(&pr, point) {
            rep.failed += 1;
            rep.violations.push(violation(point, vec![e]));
            continue;
        }
        let explore = explore_recovery_after(&pr.points, i);
        match recover_and_verify(&pr, None) {
            Trial::Checked(p) if p.is_empty() => {}
            Trial::Checked(p) => {
                rep.failed += 1;
                rep.violations.push(violation(point, p));
            }
            Trial::RecoveryFinished => unreachable!("no recovery crash was asked for"),
        }
        if !explore {
            continue;
        }
        rep.explored_after += 1;
        for k in 1.. {
            let at = format!("{point}, then vsnap-recover killed at *#{k}");
            if k > RECOVERY_POINTS_MAX {
                rep.failed += 1;
                rep.violations.push(violation(
                    &at,
                    vec![format!("harness: vsnap-recover still crashed at its crash point #{k}: endless recovery?")],
                ));
                break;
            }
            // The crash again, from the template (a copy of what the
            // first crash left would hold files of new inodes mid-plan).
            if let Err(e) = crash_op(&pr, point) {
                rep.failed += 1;
                rep.violations.push(violation(&at, vec![e]));
                break;
            }
            match recover_and_verify(&pr, Some(k)) {
                Trial::RecoveryFinished => break,
                Trial::Checked(p) => {
                    rep.recovery_points += 1;
                    if !p.is_empty() {
                        rep.failed += 1;
                        rep.violations.push(violation(&at, p));
                    }
                }
            }
        }
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    rep
}

fn scenario_line(name: &str, r: &ScenarioReport) -> String {
    format!(
        "{name:<26} points {:>4}  recovery points {:>5} (after {:>3} points)  failed {:>3}  {:>7.1} s",
        r.points, r.recovery_points, r.explored_after, r.failed, r.seconds
    )
}

fn print_violation(v: &Violation) {
    println!("VIOLATION {} at {}:", v.scenario, v.point);
    for w in &v.what {
        println!("    {w}");
    }
}

/// A worker's report, written to a file for the parent: numbers, then one
/// line per violation (fields separated by tabs).
fn write_report(path: &Path, r: &ScenarioReport) -> std::io::Result<()> {
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    let mut out = format!(
        "{} {} {} {} {}\n",
        r.points, r.explored_after, r.recovery_points, r.failed, r.seconds
    );
    for v in &r.violations {
        let mut line = format!("{}\t{}", clean(&v.scenario), clean(&v.point));
        for w in &v.what {
            line.push('\t');
            line.push_str(&clean(w));
        }
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(path, out)
}

fn read_report(path: &Path) -> Result<ScenarioReport, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let bad = || format!("malformed report {}", path.display());
    let [p, e, r, f, sec] = head[..] else {
        return Err(bad());
    };
    let mut rep = ScenarioReport {
        points: p.parse().map_err(|_| bad())?,
        explored_after: e.parse().map_err(|_| bad())?,
        recovery_points: r.parse().map_err(|_| bad())?,
        failed: f.parse().map_err(|_| bad())?,
        seconds: sec.parse().map_err(|_| bad())?,
        violations: Vec::new(),
    };
    for l in lines {
        let mut f = l.split('\t');
        let (Some(sc), Some(pt)) = (f.next(), f.next()) else {
            return Err(bad());
        };
        rep.violations.push(Violation {
            scenario: sc.into(),
            point: pt.into(),
            what: f.map(String::from).collect(),
        });
    }
    Ok(rep)
}

/// `--worker NAME --base DIR --report FILE`: run one scenario in this
/// process and write its report. Scenarios run in worker processes, not
/// threads: the suite opens the engine (and so the state directory's
/// `flock`) in-process, and a child forked meanwhile by another thread
/// would hold that lock until its `exec`, making a concurrent vsnap find
/// its state directory locked.
fn worker(args: &[String]) -> ExitCode {
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(name), Some(base), Some(report)) = (get("--worker"), get("--base"), get("--report"))
    else {
        eprintln!("crash worker: usage: --worker NAME --base DIR --report FILE");
        return ExitCode::FAILURE;
    };
    let Some(s) = scenarios().into_iter().find(|s| s.name == name) else {
        eprintln!("crash worker: no scenario {name:?}");
        return ExitCode::FAILURE;
    };
    let bins = match Bins::locate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("crash worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rep = run_scenario(&s, Path::new(&base), &bins);
    println!("{}", scenario_line(s.name, &rep));
    for v in &rep.violations {
        print_violation(v);
    }
    match write_report(Path::new(&report), &rep) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crash worker: writing {report}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The first free argument: not a flag, nor the value of one of libtest's
/// flags that take one (`cargo test -- --test-threads 1` must not filter).
fn scenario_filter(args: &[String]) -> Option<String> {
    const WITH_VALUE: [&str; 6] = [
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "-Z",
    ];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            return Some(a.clone());
        }
    }
    None
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--worker") {
        return worker(&args);
    }
    let t0 = Instant::now();
    let filter = scenario_filter(&args);
    let quick = std::env::var("VSNAP_CRASH_QUICK").is_ok_and(|v| v == "1");
    let bins = match Bins::locate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("crash suite: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scratch = match scratch_dir("vsnap-crash.") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("crash suite: FAILED: cannot make a directory under /var/tmp: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = std::fs::canonicalize(scratch.path()).expect("scratch dir is canonicalizable");
    if let Err(e) = bins.require_failpoints(&base) {
        eprintln!("crash suite: FAILED: {e}");
        return ExitCode::FAILURE;
    }

    let mut seen_groups = Vec::new();
    let selected: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| filter.as_deref().is_none_or(|f| s.name.contains(f)))
        .filter(|s| {
            if !quick {
                return true;
            }
            if seen_groups.contains(&s.group) {
                return false;
            }
            seen_groups.push(s.group);
            true
        })
        .collect();
    if selected.is_empty() {
        eprintln!("crash suite: FAILED: no scenario matches {filter:?}");
        return ExitCode::FAILURE;
    }
    let jobs = std::env::var("VSNAP_CRASH_JOBS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, selected.len());
    println!(
        "crash suite: {} scenario(s){}, {jobs} at a time, binaries from {}, scratch {}",
        selected.len(),
        if quick {
            " (VSNAP_CRASH_QUICK=1: the first of each operation)"
        } else {
            ""
        },
        bins.dir.display(),
        base.display()
    );
    if full() {
        println!(
            "recovery crashes explored after every operation crash point (VSNAP_CRASH_FULL=1)"
        );
    } else {
        println!(
            "sampled: recovery crashes (vsnap-recover killed at *#1, *#2, ... until it finishes) are explored after \
             every operation crash point except the journal.* points between the first and the last \
             (journal.*.inserted: a record not yet flushed, lost with the process, the state of the point before; \
             journal.flushed: the state of the point after); those points are still crashed, recovered and checked. \
             VSNAP_CRASH_FULL=1 explores after every point."
        );
    }

    // One btrfs filesystem for the whole run, unmounted when `btrfs`
    // drops (also while a panic unwinds).
    let btrfs = if selected.iter().any(|s| s.btrfs) {
        match BtrfsLoop::create(&base, 512 << 20) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!(
                    "crash suite: FAILED: cannot set up btrfs for the reflink scenarios: {e}"
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let ext4_base = base.join("fs");
    std::fs::create_dir_all(&ext4_base).expect("mkdir in scratch");
    let reports_dir = base.join("reports");
    std::fs::create_dir_all(&reports_dir).expect("mkdir in scratch");
    let exe = std::env::current_exe().expect("the test binary knows its path");

    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, ScenarioReport)>> = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..jobs {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(s) = selected.get(i) else { break };
                let dir = match (&btrfs, s.btrfs) {
                    (Some(b), true) => b.mount.clone(),
                    _ => ext4_base.clone(),
                };
                let report = reports_dir.join(s.name.replace('/', "-"));
                let status = std::process::Command::new(&exe)
                    .args(["--worker", s.name, "--base"])
                    .arg(&dir)
                    .arg("--report")
                    .arg(&report)
                    .stdin(std::process::Stdio::null())
                    .status();
                let rep = match (status, read_report(&report)) {
                    (Ok(st), Ok(rep)) if st.success() => rep,
                    (st, rep) => ScenarioReport {
                        failed: 1,
                        violations: vec![Violation {
                            scenario: s.name.to_string(),
                            point: "none (harness)".into(),
                            what: vec![format!(
                                "the worker process failed: {st:?}; its report: {:?}",
                                rep.err()
                            )],
                        }],
                        ..Default::default()
                    },
                };
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, rep));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    drop(btrfs);

    let points: usize = results.iter().map(|(_, r)| r.points).sum();
    let recovery: usize = results.iter().map(|(_, r)| r.recovery_points).sum();
    let failed: usize = results.iter().map(|(_, r)| r.failed).sum();
    let n = points + recovery;
    println!();
    println!("per scenario:");
    for (i, r) in &results {
        println!("  {}", scenario_line(selected[*i].name, r));
    }
    let violations: Vec<&Violation> = results.iter().flat_map(|(_, r)| &r.violations).collect();
    if !violations.is_empty() {
        println!();
        println!("violations:");
        for v in &violations {
            print_violation(v);
        }
    }
    println!();
    println!(
        "{points} operation crash points + {recovery} recovery crash points{}, run time {:.1} s",
        if full() { "" } else { " (sampled, see above)" },
        t0.elapsed().as_secs_f64()
    );
    if std::env::var("VSNAP_CRASH_KEEP").is_ok_and(|v| v == "1") {
        let kept = scratch.keep();
        println!("scratch directory kept: {}", kept.display());
    }
    println!("crash points explored: {n}, invariant violations: {failed}");
    println!("{} passed, {failed} failed", n.saturating_sub(failed));
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
