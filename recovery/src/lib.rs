//! Recovery's decisions, as pure functions of a plan's journal records.
//!
//! **This crate does no IO.** It reads a plan's [`PlanHeader`] and its
//! progress [`Record`]s (everything written after `Planned`) and says whether
//! they form a sequence the protocol can produce ([`validate`]), and what
//! recovery must do with the plan ([`decide`], then [`decide_after_probe`]
//! when the pivot has to be probed).
//!
//! # The grammar
//!
//! `N` = `header.steps`, `P` = `header.pivot`; the header is legal only when
//! `P < N` (so `N >= 1`). Every step index in a record must be `< N`.
//! Records are written in this order (DESIGN.md sections 2 to 4):
//!
//! ```text
//! forward   = S(0) D(0) S(1) D(1) ... S(P-1) D(P-1)      compensatable, once each
//!             S(P)+ D(P)                                 the pivot; D(P) is the pivot transaction
//!             S(P+1)+ D(P+1) ... S(N-1)+ D(N-1)          retriable
//! rollback  = RollingBack U(k) U(k-1) ... U(0)           every started step but P, newest first
//! ending    = Finished(Committed) | Finished(RolledBack) | Finished(NeedsAttention(_))
//! ```
//!
//! A legal sequence is a **prefix** of one of:
//!
//! ```text
//! forward                                              Finished(Committed)
//! forward cut before D(P)   [ rollback ]               Finished(RolledBack)   (*)
//! any prefix of the above                              Finished(NeedsAttention(_))
//! ```
//!
//! (*) `rollback` may be left out only when it would undo nothing.
//!
//! Spelled out, rule by rule:
//!
//! 1. `Started(i)` needs `Done(i-1)` as the newest step record (or `i == 0`
//!    and no record yet). Several `Started(i)` in a row, with nothing between
//!    them, are legal only for `i >= P`: a retriable step is retried, and the
//!    pivot is re-run when its probe said it happened (roll forward) or is
//!    probed again after a second crash. A step **before** the pivot is never
//!    re-run forward — after a crash it is rolled back — so `Started(i),
//!    Started(i)` with `i < P` is illegal.
//! 2. `Done(i)` must come right after a `Started(i)`.
//! 3. `RollingBack` at most once, only while `Done(P)` is not written (past
//!    the pivot a plan only goes forward), and then nothing but `Undone` and
//!    `Finished` may follow.
//! 4. After `RollingBack`, `Undone(i)` must name exactly the newest step that
//!    was `Started` (done or not: a started step may have partly happened)
//!    and is not yet undone, **skipping the pivot**: the pivot has no undo,
//!    and a plan rolls back past a started pivot only when the pivot did not
//!    happen (it failed cleanly, or its probe said `NotApplied`). So the
//!    `Undone` indices are strictly decreasing with no gap but `P`.
//! 5. `Finished(Committed)` needs `Done(i)` for every step (and so no
//!    `RollingBack`).
//! 6. `Finished(RolledBack)` needs every started step but the pivot undone.
//!    It normally follows `RollingBack`; when there was nothing to undo
//!    (no record at all, or only `Started(P)` with `P == 0`), it may also
//!    come straight from the forward phase, without `RollingBack`.
//! 7. `Finished(NeedsAttention(_))` may come at any point, even first.
//! 8. Nothing follows `Finished`.
//!
//! # States
//!
//! [`replay`] folds the records into a [`Progress`]; `Fwd(n, open)` is
//! [`Progress::Forward`] (`n` steps done, `open`: `Started(n)` is written and
//! `Done(n)` is not), `Back(list)` is [`Progress::RollingBack`] with the steps
//! still to undo.
//!
//! ```text
//!            S(n)                  D(n)
//!   Fwd(n,false) ------> Fwd(n,true) ------> Fwd(n+1,false)      n < N
//!                          |    ^
//!                          +----+  S(n), only n >= P (retry / re-run pivot)
//!
//!   Fwd(n,open) --RollingBack--> Back(started steps but P, newest first)
//!                                                  only n <= P (no D(P) yet)
//!   Back([i, ...]) --U(i)--> Back([...])
//!   Back([])             --Finished(RolledBack)--> End
//!   Fwd(0,false), and Fwd(0,true) if P == 0 --Finished(RolledBack)--> End
//!   Fwd(N,false)         --Finished(Committed)---> End
//!   any state but End    --Finished(NeedsAttention)--> End
//! ```
//!
//! # Decisions
//!
//! | progress | [`decide`] |
//! |---|---|
//! | `End` | [`Decision::Nothing`] |
//! | `Back(list)` | `RollBack { undo: list, already_rolling_back: true }` |
//! | `Fwd(n, _)`, `n > P` (`Done(P)` written) | `RollForward { from: n }` (`n == N`: only `Finished(Committed)` is left) |
//! | `Fwd(P, true)` (pivot started, not done) | [`Decision::ProbePivot`] |
//! | `Fwd(n, open)`, otherwise | `RollBack { undo: started steps, newest first, already_rolling_back: false }` |
//!
//! After [`Decision::ProbePivot`], [`decide_after_probe`]: `Applied` ->
//! `RollForward { from: P }`; `NotApplied` -> `RollBack` of the steps before
//! the pivot (`P-1 ..= 0`; not the pivot, which did not happen and has no
//! undo); `Unknown(why)` -> `NeedsAttention` with a message saying what was
//! seen, that nothing was deleted, and what to do.
//!
//! # What the engine writes
//!
//! - A run: `S(i) D(i)` for each step in order (`D(P)` through the pivot
//!   transaction), then `Finished(Committed)`. A retriable step (`i > P`)
//!   that fails may be retried by writing `S(i)` again.
//! - A step `i <= P` fails (the pivot only when it certainly did not
//!   happen): `RollingBack`, then `Undone(j)` for `j = i, i-1, ..., 0`
//!   skipping `P`, then `Finished(RolledBack)`.
//! - Recovery's `RollBack { undo, already_rolling_back }`: `RollingBack`
//!   unless `already_rolling_back`, `Undone(j)` for each `j` of `undo` in
//!   order, `Finished(RolledBack)`.
//! - Recovery's `RollForward { from }`: `S(i) D(i)` for `i` in `from..N`, then
//!   `Finished(Committed)`. For `from == P` the new `S(P)` may be left out
//!   (`D(P)` may follow the old `S(P)` directly); both are legal.
//! - `NeedsAttention(reason)`: `Finished(NeedsAttention(reason))`.
//!
//! [`check_next`] says whether one record may be appended; the engine can
//! assert it before each append.
//!
//! Recovery is crash-safe because every decision is a function of the
//! records alone: a recovery killed at any point re-reads the records and
//! continues where the previous one stopped (`already_rolling_back`, the
//! first step not `Done`), and a finished plan decides [`Decision::Nothing`].

use vsnap_journal::{Outcome, PlanHeader, Record};

/// What the pivot's probe said, when the pivot was `Started` but not `Done`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PivotSeen {
    Applied,
    NotApplied,
    Unknown(String),
}

/// What to do with one plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The plan is `Finished`: nothing to do.
    Nothing,
    /// The pivot was `Started` and not `Done`: probe it, then call
    /// [`decide_after_probe`].
    ProbePivot,
    /// Undo these steps, in this order (newest first), writing `Undone(i)`
    /// after each; `RollingBack` is to be written first unless `already`.
    RollBack {
        undo: Vec<u32>,
        already_rolling_back: bool,
    },
    /// Run steps `from..steps` (the pivot included when `from == pivot`,
    /// whose completion is the pivot transaction), then `Finished(Committed)`.
    RollForward { from: u32 },
    /// Write `Finished(NeedsAttention(reason))` and touch nothing.
    NeedsAttention(String),
}

/// A record sequence that the journal protocol cannot produce: a bug or damage.
///
/// `index` is the position of the offending record in the slice given to
/// [`validate`] (for [`check_next`], `records.len()`: the record that would be
/// appended). A header that is itself illegal (`pivot >= steps`) is reported
/// with `index` 0 and `record` naming the header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("illegal journal sequence at record {index} ({record}): {why}")]
pub struct IllegalSequence {
    pub index: usize,
    pub record: String,
    pub why: String,
}

/// Where a plan stands after its records (see the state diagram in the crate
/// documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Going forward: steps `0..done` are `Done`; `in_flight` means
    /// `Started(done)` was written and `Done(done)` was not.
    Forward { done: u32, in_flight: bool },
    /// `RollingBack` was written; these steps are still to be undone, in
    /// this order (newest first).
    RollingBack { remaining: Vec<u32> },
    /// `Finished` was written.
    Finished(Outcome),
}

impl Progress {
    /// The state before any progress record.
    pub const START: Progress = Progress::Forward {
        done: 0,
        in_flight: false,
    };
}

/// Fold `records` into a [`Progress`], checking every transition.
pub fn replay(header: &PlanHeader, records: &[Record]) -> Result<Progress, IllegalSequence> {
    check_header(header)?;
    let mut progress = Progress::START;
    for (index, record) in records.iter().enumerate() {
        progress = step(header, progress, record).map_err(|why| IllegalSequence {
            index,
            record: format!("{record:?}"),
            why,
        })?;
    }
    Ok(progress)
}

/// Check a record sequence against the protocol.
pub fn validate(header: &PlanHeader, records: &[Record]) -> Result<(), IllegalSequence> {
    replay(header, records).map(|_| ())
}

/// Check that `next` may be appended to `records` (which must be legal
/// themselves): the assertion a journal writer makes before each append.
pub fn check_next(
    header: &PlanHeader,
    records: &[Record],
    next: &Record,
) -> Result<(), IllegalSequence> {
    let progress = replay(header, records)?;
    step(header, progress, next)
        .map(|_| ())
        .map_err(|why| IllegalSequence {
            index: records.len(),
            record: format!("{next:?}"),
            why,
        })
}

/// Decide from the records alone (validates first).
pub fn decide(header: &PlanHeader, records: &[Record]) -> Result<Decision, IllegalSequence> {
    let progress = replay(header, records)?;
    let pivot = header.pivot;
    Ok(match progress {
        Progress::Finished(_) => Decision::Nothing,
        Progress::RollingBack { remaining } => Decision::RollBack {
            undo: remaining,
            already_rolling_back: true,
        },
        Progress::Forward { done, .. } if done > pivot => Decision::RollForward { from: done },
        Progress::Forward {
            done,
            in_flight: true,
        } if done == pivot => Decision::ProbePivot,
        Progress::Forward { done, in_flight } => Decision::RollBack {
            undo: undo_list(started_count(done, in_flight), pivot),
            already_rolling_back: false,
        },
    })
}

/// Decide once the pivot has been probed.
///
/// The probe only matters when [`decide`] says [`Decision::ProbePivot`]; for
/// any other plan this returns what [`decide`] returns and ignores `seen`.
pub fn decide_after_probe(
    header: &PlanHeader,
    records: &[Record],
    seen: PivotSeen,
) -> Result<Decision, IllegalSequence> {
    let decision = decide(header, records)?;
    if decision != Decision::ProbePivot {
        return Ok(decision);
    }
    let pivot = header.pivot;
    Ok(match seen {
        PivotSeen::Applied => Decision::RollForward { from: pivot },
        // The pivot did not happen: undo what came before it, never the
        // pivot itself (it has no undo).
        PivotSeen::NotApplied => Decision::RollBack {
            undo: undo_list(pivot, pivot),
            already_rolling_back: false,
        },
        PivotSeen::Unknown(why) => Decision::NeedsAttention(pivot_unknown_reason(header, &why)),
    })
}

/// The operator's message when the pivot's probe cannot tell whether it
/// happened: what was seen, that nothing was deleted, what to do.
fn pivot_unknown_reason(header: &PlanHeader, why: &str) -> String {
    format!(
        "plan {op} ({summary}): its pivot, step {pivot} of {steps}, was started but never \
         recorded done, and probing it could not tell whether it took effect: {why}. \
         Nothing was deleted and no step was undone or re-run, so the state from before \
         the pivot and the state it creates may both still be present. \
         To resolve: inspect the files named in `vsnap plan show ID` for this plan; a \
         running QEMU's query-block shows which images the guest uses, and a guest that \
         ran on the new overlays needs them (do not start it from the old images alone). \
         vsnap-recover records this plan as needing attention and does not act on it again.",
        op = header.op,
        summary = header.summary,
        pivot = header.pivot,
        steps = header.steps,
    )
}

fn check_header(header: &PlanHeader) -> Result<(), IllegalSequence> {
    if header.pivot < header.steps {
        return Ok(());
    }
    Err(IllegalSequence {
        index: 0,
        record: format!(
            "plan header: steps {}, pivot {}",
            header.steps, header.pivot
        ),
        why: format!(
            "the pivot must be one of the plan's steps (pivot < steps), but pivot is {} and \
             the plan has {} steps",
            header.pivot, header.steps
        ),
    })
}

/// How many steps have a `Started` record.
fn started_count(done: u32, in_flight: bool) -> u32 {
    done + u32::from(in_flight)
}

/// Steps `0..started` except the pivot, newest first.
fn undo_list(started: u32, pivot: u32) -> Vec<u32> {
    (0..started).rev().filter(|&i| i != pivot).collect()
}

/// One transition of the state diagram; `Err(why)` when `record` cannot
/// follow `progress`.
fn step(header: &PlanHeader, progress: Progress, record: &Record) -> Result<Progress, String> {
    let (steps, pivot) = (header.steps, header.pivot);
    if let Record::Started(i) | Record::Done(i) | Record::Undone(i) = *record {
        if i >= steps {
            return Err(format!(
                "step index {i} is out of range: the plan has {steps} steps (0..{steps})"
            ));
        }
    }
    match (progress, record) {
        (Progress::Finished(outcome), _) => Err(format!(
            "nothing may follow Finished({outcome:?}), the plan's last record"
        )),
        (_, Record::Finished(Outcome::NeedsAttention(reason))) => {
            Ok(Progress::Finished(Outcome::NeedsAttention(reason.clone())))
        }

        // Forward.
        (Progress::Forward { done, in_flight }, Record::Started(i)) => {
            let i = *i;
            // A retry (`in_flight` already) is legal from the pivot on.
            if i == done && (!in_flight || i >= pivot) {
                Ok(Progress::Forward {
                    done,
                    in_flight: true,
                })
            } else if i == done {
                Err(format!(
                    "step {i} was already started, and it comes before the pivot (step \
                     {pivot}): a step before the pivot is never re-run forward, after a \
                     crash it is rolled back"
                ))
            } else if i < done {
                Err(format!("step {i} is already done"))
            } else if in_flight {
                Err(format!(
                    "step {i} started while step {done} is started and not done"
                ))
            } else {
                Err(format!(
                    "step {i} started before step {} is done; steps run in order",
                    i - 1
                ))
            }
        }
        (
            Progress::Forward {
                done,
                in_flight: true,
            },
            Record::Done(i),
        ) if *i == done => Ok(Progress::Forward {
            done: done + 1,
            in_flight: false,
        }),
        (Progress::Forward { done, in_flight }, Record::Done(i)) => Err(if *i < done {
            format!("step {i} is already done")
        } else if in_flight {
            format!("Done({i}) does not follow Started({i}): step {done} is the one in flight")
        } else {
            format!("Done({i}) without Started({i})")
        }),
        (Progress::Forward { done, in_flight }, Record::RollingBack) => {
            if done > pivot {
                Err(format!(
                    "RollingBack after Done({pivot}), the pivot: past the pivot a plan only \
                     goes forward"
                ))
            } else {
                Ok(Progress::RollingBack {
                    remaining: undo_list(started_count(done, in_flight), pivot),
                })
            }
        }
        (Progress::Forward { .. }, Record::Undone(i)) => {
            Err(format!("Undone({i}) without a RollingBack before it"))
        }
        (Progress::Forward { done, in_flight }, Record::Finished(Outcome::Committed)) => {
            if done == steps {
                Ok(Progress::Finished(Outcome::Committed))
            } else {
                let missing = if in_flight {
                    format!("step {done} is started but not done")
                } else {
                    format!("step {done} is not done")
                };
                Err(format!(
                    "Finished(Committed) needs every step done, but {missing}"
                ))
            }
        }
        (Progress::Forward { done, .. }, Record::Finished(Outcome::RolledBack)) if done > pivot => {
            Err(format!(
                "Finished(RolledBack) after Done({pivot}), the pivot: past the pivot a plan \
                 only goes forward"
            ))
        }
        (Progress::Forward { done, in_flight }, Record::Finished(Outcome::RolledBack)) => {
            match undo_list(started_count(done, in_flight), pivot).first() {
                None => Ok(Progress::Finished(Outcome::RolledBack)),
                Some(i) => Err(format!(
                    "Finished(RolledBack) without RollingBack, and step {i} was started and \
                     never undone"
                )),
            }
        }

        // Rolling back.
        (Progress::RollingBack { .. }, Record::RollingBack) => Err(
            "a second RollingBack: a plan rolls back at most once; recovery continues \
                 an interrupted rollback without writing it again"
                .to_string(),
        ),
        (Progress::RollingBack { .. }, Record::Started(i) | Record::Done(i)) => Err(format!(
            "{record:?} during a rollback: once RollingBack is written no step runs forward \
             (step {i})"
        )),
        (Progress::RollingBack { mut remaining }, Record::Undone(i)) => {
            let i = *i;
            match remaining.first().copied() {
                Some(next) if next == i => {
                    remaining.remove(0);
                    Ok(Progress::RollingBack { remaining })
                }
                _ if i == pivot => Err(format!(
                    "Undone({i}) names the pivot, which has no undo: a plan rolls back past \
                     its pivot only when the pivot did not happen"
                )),
                Some(next) if remaining.contains(&i) => Err(format!(
                    "Undone({i}) out of order: step {next} is the newest started step not yet \
                     undone, and undo runs newest first"
                )),
                next => Err(format!(
                    "Undone({i}) names a step that was never started or is already undone \
                     ({})",
                    match next {
                        Some(n) => format!("step {n} is next to undo"),
                        None => "nothing is left to undo".to_string(),
                    }
                )),
            }
        }
        (Progress::RollingBack { remaining }, Record::Finished(Outcome::RolledBack)) => {
            match remaining.first() {
                None => Ok(Progress::Finished(Outcome::RolledBack)),
                Some(i) => Err(format!(
                    "Finished(RolledBack) while step {i} (and {} step(s) in all) is still to \
                     be undone",
                    remaining.len()
                )),
            }
        }
        (Progress::RollingBack { .. }, Record::Finished(Outcome::Committed)) => Err(
            "Finished(Committed) during a rollback: a plan that rolls back ends RolledBack"
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests;
