//! vsnap's journal: the sled database that records plans and their progress
//! **before** anything is done, and the catalog trees, in one database per
//! state directory.
//!
//! **This crate knows nothing of QEMU.** A plan's body is opaque bytes (the
//! engine's serialized plan); the journal only knows how many steps it has
//! and which one is the pivot.
//!
//! Durability protocol (DESIGN.md section 3), each line durable (flushed)
//! before the next action:
//! 1. the whole plan (header and opaque body) is written before any step
//!    runs: a plan with no record yet is one that has not started;
//! 2. `Started(i)` before a step and `Done(i)` after it;
//! 3. `Done(pivot)` and the catalog changes it implies in **one** sled
//!    transaction;
//! 4. on failure before the pivot: `RollingBack`, then `Undone(i)` per step;
//! 5. at the end `Finished(outcome)`.
//!
//! The engine's runner writes these through [`Journal::begin_with`] (the
//! plan with its first records, and catalog changes when the first step is
//! a no-op pivot) and [`Journal::append_all`] (the records that have no
//! action between them, with the pivot's catalog changes when they carry
//! `Done(pivot)`): one transaction, one flush each. [`Journal::begin`],
//! [`Journal::append`] and [`Journal::commit_pivot`] are the one-record
//! forms (tests, tools). Every one returns only after the flush that covers
//! its records (group commit, see [`group`]).

pub mod codec;
pub mod failpoint;
mod group;
mod lock;
pub mod statedir;
mod store;

pub use lock::StateLock;
pub use store::Journal;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Identifier of one plan; increasing in the order plans were begun.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PlanId(pub u64);

impl std::fmt::Display for PlanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the journal (and recovery) needs to know of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanHeader {
    /// Operation name, e.g. `vol.snapshot.create`.
    pub op: String,
    /// One line for operators, e.g. `external snapshot s1 of /vm/a.qcow2`.
    pub summary: String,
    /// Number of steps in the plan.
    pub steps: u32,
    /// Index of the pivot step (`< steps`).
    pub pivot: u32,
    /// Unix time (seconds) the plan was begun.
    pub created_unix: i64,
}

/// How a plan ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    RolledBack,
    NeedsAttention(String),
}

/// One progress record (DESIGN.md section 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Started(u32),
    Done(u32),
    RollingBack,
    Undone(u32),
    Finished(Outcome),
}

/// One change to a catalog tree, applied atomically with the pivot's `Done`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogOp {
    Put {
        tree: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        tree: String,
        key: Vec<u8>,
    },
}

/// A plan as stored: header, opaque body, and its progress records in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPlan {
    pub id: PlanId,
    pub header: PlanHeader,
    pub body: Vec<u8>,
    pub records: Vec<Record>,
}

impl StoredPlan {
    /// The plan's outcome, if a `Finished` record was written.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.records.iter().rev().find_map(|r| match r {
            Record::Finished(o) => Some(o),
            _ => None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("state directory {dir} is locked by process {pid}; wait for it to finish or stop it (lock file {lock})")]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        pid: String,
    },
    #[error("cannot use state directory {dir}: {source}")]
    StateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing state directory {dir}: {why}")]
    StateDirRefused { dir: PathBuf, why: String },
    #[error("journal database error: {0}")]
    Db(#[from] sled::Error),
    /// sled found its files unreadable at open: the journal is damaged.
    #[error("the journal of state directory {dir} is damaged: its database {db} cannot be read ({detail}); \
             vsnap cannot use its plans or its catalog. Keep a copy first (`cp -a {dir} {dir}.copy`). \
             To start afresh, move the database aside (`mv {db} {db}.damaged`): the next vsnap command \
             starts an empty journal and catalog; snapshots already taken stay in the images and their \
             files but vsnap no longer lists them, and a plan left unfinished in the damaged journal is \
             neither finished nor undone (look for `.vsnap-*` temporary files beside its images)")]
    Damaged {
        dir: PathBuf,
        db: PathBuf,
        detail: String,
    },
    /// The state directory's filesystem cannot hold what the journal must
    /// write.
    #[error("the filesystem of state directory {dir} is full: {what}; free space there, then retry \
             (a command that was interrupted is finished or undone by `vsnap-recover` or the next command)")]
    NoSpace { dir: PathBuf, what: String },
    #[error("journal transaction failed: {0}")]
    Transaction(String),
    #[error("unreadable journal record for plan {plan} ({what}): {reason}; the journal may be damaged, inspect it with `vsnap plan show {plan}`")]
    Corrupt {
        plan: PlanId,
        what: String,
        reason: String,
    },
    #[error("unreadable catalog record {tree}/{key}: {reason}")]
    CorruptCatalog {
        tree: String,
        key: String,
        reason: String,
    },
    #[error("no plan {0} in the journal")]
    NoSuchPlan(PlanId),
    #[error("the journal is closed")]
    Closed,
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;
