//! Plans: data that an operation compiles to, run journal-first, and the
//! carrying out of recovery's decisions.
//!
//! Runner protocol (each journal write is durable before the next action):
//!
//! ```text
//! begin(plan)                                   crash point run.begun
//! for each step i:
//!     Started(i)                                crash point run.started.<i>
//!     apply                                     crash point run.applied.<i>
//!     Done(i)  (pivot: Done + catalog in one    crash point run.done.<i>
//!               transaction)
//! Finished(Committed)
//! failure before the pivot's Done:
//!     RollingBack                               crash point rollback.begun
//!     undo i, i-1, ... 0                        crash point rollback.undone.<i>
//!     Undone(i) each
//!     Finished(RolledBack)
//! ```
//!
//! Steps after the pivot are retried (bounded) until they succeed; one
//! that still fails leaves the plan unfinished (the change is committed:
//! [`EngineError::AfterPivot`], exit 1) for recovery to roll forward; when
//! recovery's own tries fail too, the plan ends `NeedsAttention`.

use crate::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vsnap_journal::{
    codec, failpoint, CatalogOp, Journal, Outcome, PlanHeader, PlanId, Record, StoredPlan,
};
use vsnap_recovery::{Decision, PivotSeen};
use vsnap_steps::{Cx, Probe, Step, StepError};

/// How many times a step after the pivot is tried before the plan needs attention.
const RETRIABLE_TRIES_MAX: u32 = 4;

/// An operation, compiled: every name and path fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Operation name, e.g. `vol.snapshot.create`.
    pub op: String,
    /// One line for operators.
    pub summary: String,
    /// The steps, in order; `pivot` indexes them.
    pub steps: Vec<Step>,
    /// Index of the pivot in `steps`.
    pub pivot: u32,
    /// Catalog changes written atomically with the pivot's `Done`.
    pub catalog: Vec<CatalogOp>,
}

impl Plan {
    /// Programmer errors in a compiled plan are bugs: assert, in release too.
    pub fn assert_well_formed(&self) {
        assert!(
            (self.pivot as usize) < self.steps.len(),
            "plan {}: pivot out of range",
            self.op
        );
        for (i, s) in self.steps.iter().enumerate().take(self.pivot as usize) {
            assert!(
                s.reversible(),
                "plan {}: step {i} ({}) before the pivot has no undo",
                self.op,
                s.name()
            );
        }
    }

    /// Refuse (before anything is journaled or touched) a plan that two
    /// steps would each create the same file in (compared as normalised
    /// absolute paths, and as the same existing file by device and inode),
    /// or that would create a path the filesystem cannot hold (a name
    /// over 255 bytes, a path over 4095). Every plan kind passes here:
    /// the runner checks, and so does every compile function.
    pub fn check_paths(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        // (normalised path, device and inode if it exists, step index)
        type Seen = (PathBuf, Option<(u64, u64)>, usize);
        let mut seen: Vec<Seen> = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            for path in step.created_paths() {
                if let Err(why) = vsnap_steps::fsops::check_path_length(&path) {
                    return Err(EngineError::PathTooLong {
                        path,
                        why,
                        step: step.describe(),
                    });
                }
                let norm = normalise(&path);
                let id = std::fs::symlink_metadata(&norm)
                    .ok()
                    .map(|m| (m.dev(), m.ino()));
                if let Some((_, _, j)) = seen
                    .iter()
                    .find(|(p, pid, _)| *p == norm || (id.is_some() && *pid == id))
                {
                    return Err(EngineError::SamePath {
                        path,
                        first: self.steps[*j].describe(),
                        second: step.describe(),
                    });
                }
                seen.push((norm, id, i));
            }
        }
        Ok(())
    }

    /// What the journal keeps of the plan beside its body.
    pub fn header(&self) -> PlanHeader {
        PlanHeader {
            op: self.op.clone(),
            summary: self.summary.clone(),
            steps: self.steps.len() as u32,
            pivot: self.pivot,
            created_unix: crate::now_unix(),
        }
    }

    /// Human listing, one line per step, marking the pivot.
    pub fn render(&self) -> String {
        let mut s = format!("plan: {}\n", self.summary);
        for (i, step) in self.steps.iter().enumerate() {
            let role = match (i as u32).cmp(&self.pivot) {
                std::cmp::Ordering::Less => "undoable ",
                std::cmp::Ordering::Equal => "PIVOT    ",
                std::cmp::Ordering::Greater => "retriable",
            };
            s.push_str(&format!("  {i:>2} [{role}] {}\n", step.describe()));
        }
        s
    }

    /// The plan a stored plan's body holds; `Journal` (`Corrupt`, naming the
    /// plan) if it does not decode.
    pub fn decode(stored: &StoredPlan) -> Result<Plan> {
        codec::decode(&stored.body).map_err(|e| {
            EngineError::Journal(vsnap_journal::JournalError::Corrupt {
                plan: stored.id,
                what: "plan body".into(),
                reason: e.to_string(),
            })
        })
    }
}

/// `p` absolute, without `.` and `..`, its directory resolved through
/// symlinks where it exists (the file itself need not exist).
pub(crate) fn normalise(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) {
        if let Ok(d) = std::fs::canonicalize(dir) {
            return d.join(name);
        }
    }
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// How recovery ended (or, in a dry run, would end) one plan. Written
/// as `committed`, `rolled-back`, `needs-attention` or `nothing` (JSON
/// and `Display` alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanOutcome {
    /// Rolled forward to the end: the change is made.
    Committed,
    /// Rolled back: nothing of the plan is left.
    RolledBack,
    /// An operator must look (`detail` says why; nothing was deleted).
    NeedsAttention,
    /// The plan had finished already.
    Nothing,
}

impl PlanOutcome {
    /// The word the CLI prints: `committed`, `rolled-back`,
    /// `needs-attention`, `nothing`.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanOutcome::Committed => "committed",
            PlanOutcome::RolledBack => "rolled-back",
            PlanOutcome::NeedsAttention => "needs-attention",
            PlanOutcome::Nothing => "nothing",
        }
    }
}

impl std::fmt::Display for PlanOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The end of one plan, as the runner or recovery saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanReport {
    /// The plan's id in the journal.
    pub plan: u64,
    /// The plan's operation (e.g. `vol.snapshot.create`).
    pub op: String,
    /// One line saying what the plan does.
    pub summary: String,
    /// How it ended.
    pub outcome: PlanOutcome,
    /// Why (recovery) or what happened, for one line of output.
    pub detail: String,
}

/// End a plan `NeedsAttention(reason)` and return the error that says so.
fn needs_attention(j: &Journal, id: PlanId, reason: String) -> vsnap_journal::Result<EngineError> {
    j.append(
        id,
        Record::Finished(Outcome::NeedsAttention(reason.clone())),
    )?;
    Ok(EngineError::NeedsAttention { plan: id.0, reason })
}

fn step_failed(plan: PlanId, i: u32, step: &Step, e: StepError) -> EngineError {
    EngineError::Step {
        plan: plan.0,
        index: i,
        step: step.name(),
        source: e,
    }
}

/// The runner's journal writes. Records that may wait are held until the
/// next write that must be durable, and go with it in one transaction
/// (one flush): `Done(i)` goes with `Started(i + 1)`, the plan itself with
/// `Started(0)`, the last `Done` with `Finished`. Nothing happens between
/// two records written together, so recovery reads the same sequence it
/// would have read had each been flushed alone; a crash keeps all of a
/// batch or none. Each record's crash point is passed once it is durable.
struct Writer<'a> {
    j: &'a Journal,
    /// A plan not yet in the journal: it goes in with the first batch.
    new: Option<(PlanHeader, Vec<u8>)>,
    id: Option<PlanId>,
    pending: Vec<Record>,
    points: Vec<String>,
}

impl<'a> Writer<'a> {
    fn new_plan(j: &'a Journal, plan: &Plan) -> Writer<'a> {
        Writer {
            j,
            new: Some((plan.header(), codec::encode(plan))),
            id: None,
            pending: Vec::new(),
            points: vec!["run.begun".into()],
        }
    }

    fn existing(j: &'a Journal, id: PlanId) -> Writer<'a> {
        Writer {
            j,
            new: None,
            id: Some(id),
            pending: Vec::new(),
            points: Vec::new(),
        }
    }

    /// The plan's id (it is in the journal once a batch was written).
    fn id(&self) -> PlanId {
        self.id.expect("the plan was written with its first record")
    }

    /// Hold `r`; `point` is passed once it is durable.
    fn push(&mut self, r: Record, point: String) {
        self.pending.push(r);
        self.points.push(point);
    }

    /// Write what is held, with `ops`, in one transaction; durable on return.
    fn flush(&mut self, ops: &[CatalogOp]) -> vsnap_journal::Result<()> {
        let records = std::mem::take(&mut self.pending);
        match self.new.take() {
            Some((header, body)) => self.id = Some(self.j.begin_with(header, body, &records, ops)?),
            None => self.j.append_all(self.id(), &records, ops)?,
        }
        for p in std::mem::take(&mut self.points) {
            failpoint::hit(&p);
        }
        Ok(())
    }

    /// End the plan `NeedsAttention(reason)` (with what is held).
    fn needs_attention(&mut self, reason: String) -> Forward {
        self.push(
            Record::Finished(Outcome::NeedsAttention(reason.clone())),
            "run.needs-attention".into(),
        );
        match self.flush(&[]) {
            Ok(()) => Forward::Fatal(EngineError::NeedsAttention {
                plan: self.id().0,
                reason,
            }),
            Err(e) => e.into(),
        }
    }
}

/// Run a new plan journal-first. On a failure before the pivot the plan is
/// rolled back and the step's error returned.
pub fn run(j: &Journal, plan: &Plan, cx: &Cx) -> Result<PlanId> {
    run_with(j, plan, cx, &Vec::new)
}

/// [`run`], and the pivot's transaction also writes the catalog changes
/// `extra` returns when the pivot is reached: what only the steps before
/// it can know (the identity of a file they made). Not part of the
/// journaled plan: a plan finished by recovery writes its own catalog
/// changes only.
pub fn run_with(
    j: &Journal,
    plan: &Plan,
    cx: &Cx,
    extra: &dyn Fn() -> Vec<CatalogOp>,
) -> Result<PlanId> {
    plan.assert_well_formed();
    plan.check_paths()?;
    let mut w = Writer::new_plan(j, plan);
    match forward(&mut w, plan, 0, false, cx, extra) {
        Ok(()) => Ok(w.id()),
        Err(Forward::BeforePivot(i, err)) => {
            // Step i was Started: it may have partly happened; undo it too.
            // The pivot has no undo: it reaches here only when its probe
            // said it did not happen.
            let undo: Vec<u32> = (0..=i).rev().filter(|&k| k != plan.pivot).collect();
            let notes = rollback(j, w.id(), plan, &undo, false, cx)?;
            Err(with_repairs(err, notes))
        }
        Err(Forward::Fatal(err)) => Err(err),
    }
}

enum Forward {
    /// A step before the pivot failed (index, error): roll back.
    BeforePivot(u32, EngineError),
    /// Journal failure, or the plan was ended NeedsAttention.
    Fatal(EngineError),
}

impl From<vsnap_journal::JournalError> for Forward {
    fn from(e: vsnap_journal::JournalError) -> Forward {
        Forward::Fatal(e.into())
    }
}

/// Run steps `from..` forward. With `pivot_applied` (recovery after a
/// positive probe of a `Started` pivot) the pivot is not run again: only
/// its commit transaction is written.
fn forward(
    w: &mut Writer,
    plan: &Plan,
    from: u32,
    pivot_applied: bool,
    cx: &Cx,
    extra: &dyn Fn() -> Vec<CatalogOp>,
) -> std::result::Result<(), Forward> {
    let n = plan.steps.len() as u32;
    for i in from..n {
        let step = &plan.steps[i as usize];
        let last = i + 1 == n;
        if i < plan.pivot {
            w.push(Record::Started(i), format!("run.started.{i}"));
            w.flush(&[])?;
            step.apply(cx)
                .map_err(|e| Forward::BeforePivot(i, step_failed(w.id(), i, step, e)))?;
            failpoint::hit(&format!("run.applied.{i}"));
            w.push(Record::Done(i), format!("run.done.{i}"));
        } else if i == plan.pivot {
            if !pivot_applied {
                w.push(Record::Started(i), format!("run.started.{i}"));
                if matches!(step, Step::Catalog) {
                    // No effect outside the journal: Started, Done and
                    // the catalog go in one transaction.
                    w.points.push(format!("run.applied.{i}"));
                } else {
                    w.flush(&[])?;
                    pivot(w, plan, i, cx)?;
                    failpoint::hit(&format!("run.applied.{i}"));
                }
            }
            w.push(Record::Done(i), format!("run.done.{i}"));
            if last {
                w.push(Record::Finished(Outcome::Committed), "run.finished".into());
            }
            let more = extra();
            if more.is_empty() {
                w.flush(&plan.catalog)?;
            } else {
                let mut ops = plan.catalog.clone();
                ops.extend(more);
                w.flush(&ops)?;
            }
            if last {
                return Ok(());
            }
        } else {
            retry_after_pivot(w, plan, i, cx)?;
        }
    }
    // The last Done (held), or nothing when recovery found every step done.
    w.push(Record::Finished(Outcome::Committed), "run.finished".into());
    w.flush(&[])?;
    Ok(())
}

/// Apply the pivot (its `Started` is durable). A failure is a rollback
/// only when the probe says the pivot did not happen (a QEMU that died
/// under it is decided from the files, [`vsnap_steps::probe_pivot`], and
/// what it left is settled first, [`vsnap_steps::settle_pivot`]).
fn pivot(w: &mut Writer, plan: &Plan, i: u32, cx: &Cx) -> std::result::Result<(), Forward> {
    let step = &plan.steps[i as usize];
    let Err(e) = step.apply(cx) else {
        return Ok(());
    };
    // Did the pivot happen anyway? Only a probe can tell.
    match vsnap_steps::probe_pivot(&plan.steps, i as usize, cx) {
        Ok(Probe::NotApplied) => {
            match vsnap_steps::settle_pivot(&plan.steps, i as usize, false) {
                Ok(_) => Err(Forward::BeforePivot(i, step_failed(w.id(), i, step, e))),
                Err(se) => Err(w.needs_attention(format!(
                    "the pivot ({}) failed ({e}) and did not happen, but what it left could not be removed: {se}",
                    step.describe()
                ))),
            }
        }
        Ok(Probe::Applied) => {
            // Leaks only: a failure to free them does not undo the pivot.
            let _ = vsnap_steps::settle_pivot(&plan.steps, i as usize, true);
            Ok(())
        }
        Ok(Probe::Unknown(why)) => Err(w.needs_attention(format!(
            "the pivot ({}) failed ({e}) and its probe cannot tell whether it happened: {why}",
            step.describe()
        ))),
        Err(pe) => Err(w.needs_attention(format!(
            "the pivot ({}) failed ({e}) and probing it failed too ({pe})",
            step.describe()
        ))),
    }
}

fn retry_after_pivot(
    w: &mut Writer,
    plan: &Plan,
    i: u32,
    cx: &Cx,
) -> std::result::Result<(), Forward> {
    let step = &plan.steps[i as usize];
    w.push(Record::Started(i), format!("run.started.{i}"));
    w.flush(&[])?;
    let mut last = None;
    for attempt in 0..RETRIABLE_TRIES_MAX {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(50 << attempt));
        }
        let again = cx.resumed();
        match step.apply(if attempt > 0 { &again } else { cx }) {
            Ok(()) => {
                failpoint::hit(&format!("run.applied.{i}"));
                w.push(Record::Done(i), format!("run.done.{i}"));
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("at least one attempt");
    // The plan stays unfinished (Started(i) is durable, no Done): recovery
    // rolls it forward from step i. The caller is told the change is
    // committed and what is left.
    let left = plan.steps[i as usize..]
        .iter()
        .enumerate()
        .map(|(k, s)| format!("step {} ({})", i as usize + k, s.describe()))
        .collect::<Vec<_>>()
        .join(", ");
    Err(Forward::Fatal(EngineError::AfterPivot {
        plan: w.id().0,
        index: i,
        step: step.describe(),
        tries: RETRIABLE_TRIES_MAX,
        reason: e.to_string(),
        left,
    }))
}

/// A step's error, and what its rollback had to repair, said in one.
fn with_repairs(err: EngineError, notes: Vec<String>) -> EngineError {
    match err {
        EngineError::Step {
            plan,
            index,
            step,
            source,
        } if !notes.is_empty() => EngineError::StepRepaired {
            plan,
            index,
            step,
            detail: Box::new((source, notes.join("; "))),
        },
        e => e,
    }
}

/// Undo `undo` (newest first), journaling each, then `Finished(RolledBack)`.
/// Returns what the undos repaired besides (see [`Step::undo_noted`]).
fn rollback(
    j: &Journal,
    id: PlanId,
    plan: &Plan,
    undo: &[u32],
    already: bool,
    cx: &Cx,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if !already {
        j.append(id, Record::RollingBack)?;
        failpoint::hit("rollback.begun");
    }
    for &i in undo {
        let step = &plan.steps[i as usize];
        let undone = step.undo_noted(cx);
        if let Ok(Some(note)) = &undone {
            notes.push(note.clone());
        }
        if let Err(e) = undone {
            let reason = format!(
                "rolling back, the undo of step {i} ({}) failed: {e}; nothing else was removed; \
                 fix the cause and undo the remaining steps by hand, newest first (`vsnap plan show {id}` lists them)",
                step.describe()
            );
            return Err(needs_attention(j, id, reason)?);
        }
        failpoint::hit(&format!("rollback.undone.{i}"));
        j.append(id, Record::Undone(i))?;
    }
    j.append(id, Record::Finished(Outcome::RolledBack))?;
    failpoint::hit("rollback.finished");
    Ok(notes)
}

/// What recovery would do (or did) with one unfinished plan.
pub fn recover_one(j: &Journal, stored: &StoredPlan, dry_run: bool, cx: &Cx) -> Result<PlanReport> {
    let plan = Plan::decode(stored)?;
    let mut report = PlanReport {
        plan: stored.id.0,
        op: plan.op.clone(),
        summary: plan.summary.clone(),
        outcome: PlanOutcome::Nothing,
        detail: String::new(),
    };
    let illegal = |e: vsnap_recovery::IllegalSequence| EngineError::IllegalJournal {
        plan: stored.id.0,
        source: e,
    };
    let mut decision = vsnap_recovery::decide(&stored.header, &stored.records).map_err(illegal)?;
    let mut seen_note = String::new();
    let mut settled = Vec::new();
    if decision == Decision::ProbePivot {
        let step = &plan.steps[plan.pivot as usize];
        let seen = match vsnap_steps::probe_pivot(&plan.steps, plan.pivot as usize, cx) {
            Ok(Probe::Applied) => PivotSeen::Applied,
            Ok(Probe::NotApplied) => PivotSeen::NotApplied,
            Ok(Probe::Unknown(why)) => PivotSeen::Unknown(why),
            Err(e) => PivotSeen::Unknown(format!("probing {} failed: {e}", step.describe())),
        };
        let files = if vsnap_steps::pivot_decided_from_files(step) {
            " (QEMU is gone: decided from the files)"
        } else {
            ""
        };
        seen_note = match &seen {
            PivotSeen::Applied => format!("the pivot had happened{files}; "),
            PivotSeen::NotApplied => format!("the pivot had not happened{files}; "),
            PivotSeen::Unknown(_) => String::new(),
        };
        let applied = match seen {
            PivotSeen::Applied => Some(true),
            PivotSeen::NotApplied => Some(false),
            PivotSeen::Unknown(_) => None,
        };
        decision = vsnap_recovery::decide_after_probe(&stored.header, &stored.records, seen)
            .map_err(illegal)?;
        // A QMP pivot of a QEMU that is gone was decided from the files:
        // remove what a cut-short pivot left, free leaked clusters, before
        // anything is journaled (killed here, recovery probes again and
        // decides the same).
        if let (Some(applied), false) = (applied, dry_run) {
            settled = vsnap_steps::settle_pivot(&plan.steps, plan.pivot as usize, applied)
                .map_err(|e| step_failed(stored.id, plan.pivot, step, e))?;
        }
    }
    match decision {
        Decision::Nothing | Decision::ProbePivot => {
            report.outcome = PlanOutcome::Nothing;
            report.detail = "already finished".into();
        }
        Decision::RollBack {
            undo,
            already_rolling_back,
        } => {
            report.outcome = PlanOutcome::RolledBack;
            report.detail = format!(
                "{seen_note}rolled back: undid {} step(s) {:?}, newest first",
                undo.len(),
                undo
            );
            for note in &settled {
                report.detail.push_str("; ");
                report.detail.push_str(note);
            }
            if !dry_run {
                let r = rollback(j, stored.id, &plan, &undo, already_rolling_back, cx);
                if let Err(EngineError::NeedsAttention { reason, .. }) = &r {
                    report.outcome = PlanOutcome::NeedsAttention;
                    report.detail = reason.clone();
                    return Ok(report);
                }
                for note in r? {
                    report.detail.push_str("; ");
                    report.detail.push_str(&note);
                }
            }
        }
        Decision::RollForward { from } => {
            report.outcome = PlanOutcome::Committed;
            report.detail = format!(
                "{seen_note}rolled forward from step {from} of {}",
                plan.steps.len()
            );
            for note in &settled {
                report.detail.push_str("; ");
                report.detail.push_str(note);
            }
            if !dry_run {
                let mut w = Writer::existing(j, stored.id);
                let r = forward(
                    &mut w,
                    &plan,
                    from,
                    from == plan.pivot,
                    &cx.resumed(),
                    &Vec::new,
                );
                match r {
                    Ok(()) => {}
                    Err(Forward::Fatal(EngineError::NeedsAttention { reason, .. })) => {
                        report.outcome = PlanOutcome::NeedsAttention;
                        report.detail = reason;
                    }
                    Err(Forward::Fatal(EngineError::AfterPivot {
                        index,
                        step,
                        tries,
                        reason,
                        ..
                    })) => {
                        // Recovery tried again and it still fails: an
                        // operator must look (the plan ends needs-attention).
                        let id = stored.id;
                        let reason = format!(
                            "the change is committed, but step {index} ({step}) failed {tries} times: {reason}; \
                             fix the cause and do that step and the ones after it by hand (`vsnap plan show {id}` lists the plan)"
                        );
                        j.append(
                            id,
                            Record::Finished(Outcome::NeedsAttention(reason.clone())),
                        )?;
                        report.outcome = PlanOutcome::NeedsAttention;
                        report.detail = reason;
                    }
                    Err(Forward::Fatal(e)) => return Err(e),
                    Err(Forward::BeforePivot(_, e)) => {
                        unreachable!("roll-forward never starts before the pivot: {e}")
                    }
                }
            }
        }
        Decision::NeedsAttention(reason) => {
            let reason = reason.replace(
                "vsnap plan show ID",
                &format!("vsnap plan show {}", stored.id),
            );
            report.outcome = PlanOutcome::NeedsAttention;
            report.detail = reason.clone();
            if !dry_run {
                j.append(stored.id, Record::Finished(Outcome::NeedsAttention(reason)))?;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsnap_steps::{CloneMode, Format};

    fn plan(steps: Vec<Step>) -> Plan {
        Plan {
            op: "test".into(),
            summary: "test".into(),
            pivot: (steps.len() - 1) as u32,
            steps,
            catalog: Vec::new(),
        }
    }

    fn overlay(path: &str) -> Step {
        Step::CreateOverlay {
            path: path.into(),
            backing: "/vm/base.raw".into(),
            backing_format: Format::Raw,
        }
    }

    #[test]
    fn two_steps_creating_one_path_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display().to_string();
        // distinct paths: fine
        plan(vec![
            overlay(&format!("{dir}/a.s1.qcow2")),
            overlay(&format!("{dir}/b.s1.qcow2")),
            Step::Catalog,
        ])
        .check_paths()
        .unwrap();
        // the same path spelled two ways (`.`, `..`, a symlinked directory)
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("link")).unwrap();
        for other in [
            format!("{dir}/./data.s1.qcow2"),
            format!("{dir}/sub/../data.s1.qcow2"),
            format!("{dir}/link/data.s1.qcow2"),
        ] {
            let e = plan(vec![
                overlay(&format!("{dir}/data.s1.qcow2")),
                overlay(&other),
                Step::Catalog,
            ])
            .check_paths()
            .unwrap_err();
            assert!(matches!(e, EngineError::SamePath { .. }), "{other}: {e}");
            assert!(e.to_string().contains("data.s1.qcow2"), "{e}");
        }
        // one existing file under two names (a hard link): by inode
        std::fs::write(d.path().join("x"), b"x").unwrap();
        std::fs::hard_link(d.path().join("x"), d.path().join("y")).unwrap();
        let e = plan(vec![
            Step::Clone {
                src: "/vm/a".into(),
                dst: d.path().join("t1"),
                mode: CloneMode::Copy,
            },
            Step::Rename {
                from: d.path().join("t1"),
                to: d.path().join("x"),
                replace: true,
            },
            Step::Rename {
                from: d.path().join("t2"),
                to: d.path().join("y"),
                replace: true,
            },
        ])
        .check_paths()
        .unwrap_err();
        assert!(matches!(e, EngineError::SamePath { .. }), "{e}");
        // a step's own temporary counts too: an overlay at another's `.part` name
        let top = format!("{dir}/top.qcow2");
        let part = vsnap_steps::fsops::temp_path(Path::new(&top), "part");
        let e = plan(vec![
            overlay(&top),
            Step::Clone {
                src: "/vm/a".into(),
                dst: part,
                mode: CloneMode::Copy,
            },
            Step::Catalog,
        ])
        .check_paths()
        .unwrap_err();
        assert!(matches!(e, EngineError::SamePath { .. }), "{e}");
    }

    #[test]
    fn names_too_long_for_the_filesystem_are_refused() {
        let long = format!("/vm/{}.qcow2", "n".repeat(250));
        let e = plan(vec![overlay(&long), Step::Catalog])
            .check_paths()
            .unwrap_err();
        assert!(matches!(e, EngineError::PathTooLong { .. }), "{e}");
        assert!(e.to_string().contains("at most 255"), "{e}");
        let deep = format!("{}/x.qcow2", "/dir".repeat(1100));
        let e = plan(vec![overlay(&deep), Step::Catalog])
            .check_paths()
            .unwrap_err();
        assert!(e.to_string().contains("4095"), "{e}");
    }

    /// A live disk-only snapshot's plan cut short with its pivot started
    /// and its QEMU gone (a stale monitor socket: a host crash), as the
    /// journal holds it: recovery decides from the overlays, never
    /// "needs attention". No overlay data: rolled back, the overlays
    /// removed; data in one: rolled forward, the catalog written, the
    /// `cont` after the pivot done (nothing to resume).
    #[test]
    fn a_live_pivot_whose_qemu_is_gone_is_decided_from_the_overlays() {
        use vsnap_steps::live::LiveDisk;
        for with_data in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let qmp = d.path().join("qmp.sock");
            drop(std::os::unix::net::UnixListener::bind(&qmp).unwrap());
            let mut steps = Vec::new();
            let mut disks = Vec::new();
            let mut overlays = Vec::new();
            for i in 0..2 {
                let base = d.path().join(format!("d{i}.qcow2"));
                vsnap_steps::qemu_img::create(&base, Format::Qcow2, 1 << 20).unwrap();
                let ov = d.path().join(format!("d{i}.s1.qcow2"));
                steps.push(Step::CreateOverlay {
                    path: ov.clone(),
                    backing: base,
                    backing_format: Format::Qcow2,
                });
                overlays.push(ov);
            }
            for (i, ov) in overlays.iter().enumerate() {
                steps.push(Step::QmpBlockdevAdd {
                    qmp: qmp.clone(),
                    node: format!("vsnap-t-{i}"),
                    file_node: format!("vsnap-t-{i}f"),
                    path: ov.clone(),
                });
                disks.push(LiveDisk {
                    device: format!("vd{i}"),
                    node: format!("top{i}"),
                    overlay: format!("vsnap-t-{i}"),
                });
            }
            let pivot = steps.len() as u32;
            steps.push(Step::QmpSnapshotTransaction {
                qmp: qmp.clone(),
                disks,
            });
            steps.push(Step::QmpCont { qmp: qmp.clone() });
            let plan = Plan {
                op: "domain.snapshot.create".into(),
                summary: "test".into(),
                steps,
                pivot,
                catalog: Vec::new(),
            };
            let cx = Cx::quiet();
            for s in &plan.steps[..pivot as usize] {
                s.apply(&cx).unwrap_or_else(|e| {
                    // blockdev-add needs QEMU: what the dead process did
                    // before the crash is journaled below.
                    assert!(matches!(s, Step::QmpBlockdevAdd { .. }), "{e}");
                });
            }
            if with_data {
                let out = std::process::Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", "write 0 4k"])
                    .arg(&overlays[1])
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
            let state = d.path().join("state");
            let j = Journal::open(&state).unwrap();
            let mut records = Vec::new();
            for i in 0..pivot {
                records.extend([Record::Started(i), Record::Done(i)]);
            }
            records.push(Record::Started(pivot));
            let id = j
                .begin_with(plan.header(), codec::encode(&plan), &records, &[])
                .unwrap();
            let stored = j.plan(id).unwrap();
            let r = recover_one(&j, &stored, false, &cx).unwrap();
            let after = j.plan(id).unwrap();
            if with_data {
                assert_eq!(r.outcome, PlanOutcome::Committed, "{r:?}");
                assert_eq!(after.outcome(), Some(&Outcome::Committed));
                assert!(overlays.iter().all(|o| o.exists()));
            } else {
                assert_eq!(r.outcome, PlanOutcome::RolledBack, "{r:?}");
                assert_eq!(after.outcome(), Some(&Outcome::RolledBack));
                assert!(overlays.iter().all(|o| !o.exists()));
            }
            assert!(
                r.detail.contains("QEMU is gone: decided from the files"),
                "{r:?}"
            );
        }
    }

    /// The words `vsnap-recover` prints and writes in JSON are the ones
    /// the string field had.
    #[test]
    fn plan_outcome_words() {
        for (o, w) in [
            (PlanOutcome::Committed, "committed"),
            (PlanOutcome::RolledBack, "rolled-back"),
            (PlanOutcome::NeedsAttention, "needs-attention"),
            (PlanOutcome::Nothing, "nothing"),
        ] {
            assert_eq!(o.to_string(), w);
            assert_eq!(serde_json::to_value(o).unwrap(), w);
        }
        assert_eq!(format!("{:<9}|", PlanOutcome::Nothing), "nothing  |");
    }
}
