//! Recovery's decisions, as pure functions of a plan's journal records.
//! **This crate does no IO.** TODO(helper): implement + table tests.
use vsnap_journal::{PlanHeader, Record};

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
    RollBack { undo: Vec<u32>, already_rolling_back: bool },
    /// Run steps `from..steps` (the pivot included when `from == pivot`,
    /// whose completion is the pivot transaction), then `Finished(Committed)`.
    RollForward { from: u32 },
    /// Write `Finished(NeedsAttention(reason))` and touch nothing.
    NeedsAttention(String),
}

/// A record sequence that the journal protocol cannot produce: a bug or damage.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("illegal journal sequence at record {index} ({record}): {why}")]
pub struct IllegalSequence {
    pub index: usize,
    pub record: String,
    pub why: String,
}

/// Check a record sequence against the protocol.
pub fn validate(header: &PlanHeader, records: &[Record]) -> Result<(), IllegalSequence> {
    let _ = (header, records);
    todo!()
}

/// Decide from the records alone (validates first).
pub fn decide(header: &PlanHeader, records: &[Record]) -> Result<Decision, IllegalSequence> {
    let _ = (header, records);
    todo!()
}

/// Decide once the pivot has been probed.
pub fn decide_after_probe(header: &PlanHeader, records: &[Record], seen: PivotSeen) -> Result<Decision, IllegalSequence> {
    let _ = (header, records, seen);
    todo!()
}
