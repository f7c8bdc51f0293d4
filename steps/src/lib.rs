//! The closed set of steps a plan is made of, each with a `probe`, an
//! idempotent `apply` and (where one exists) an idempotent `undo`, and the
//! adapters they drive (`qemu_img`, `fsops`, `clone`).
//!
//! Every path a step touches is fixed in the step when the plan is
//! compiled, so recovery never guesses what the dead process meant.
//! Steps never go through a shell.

pub mod clone;
pub mod fsops;
pub mod qemu_img;
mod step;

pub use step::*;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Image format; always passed explicitly to `qemu-img` (`-f`, `-F`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a whole-file clone is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloneMode {
    /// FICLONE only; fails (changing nothing) where the filesystem cannot.
    Reflink,
    /// A full byte copy with progress, after a free-space check and
    /// preallocation of the target.
    Copy,
}

/// Errors of steps and adapters: what failed, on which path, and why.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{program} failed on {path}: {message}")]
    Command {
        program: String,
        path: PathBuf,
        message: String,
    },
    #[error("cannot run {program}: {source}; is it installed (Debian package qemu-utils)?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not enough space for {path}: {needed} bytes needed, {available} available on that filesystem; free space or choose another --file")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("the filesystem of {path} cannot make reflinks ({reason}); use --kind copy")]
    ReflinkUnsupported { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// Another process holds the image's lock (qemu-img/qemu-io said
    /// "Failed to get ... lock").
    #[error("image {path} is in use by another process (a running QEMU?); stop it or use the live domain commands")]
    InUse { path: PathBuf },
}

pub type StepResult<T> = Result<T, StepError>;

/// Progress of a long step, reported through [`Cx::progress`].
#[derive(Clone, Debug)]
pub struct Progress {
    pub what: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}
