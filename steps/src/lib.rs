//! The closed set of steps a plan is made of, each with a `probe`, an
//! idempotent `apply` and (where one exists) an idempotent `undo`, and the
//! adapters they drive (`qemu_img`, `fsops`, `clone`, the QMP client `qmp`
//! and the guest-agent client `agent`).
//!
//! Every path a step touches is fixed in the step when the plan is
//! compiled, so recovery never guesses what the dead process meant.
//! Steps never go through a shell.

pub mod agent;
pub mod clone;
pub mod device;
pub mod fdpass;
pub mod fsops;
pub mod launch;
pub mod live;
pub mod pathser;
pub mod qcow2;
pub mod qemu_img;
pub mod qmp;
pub mod spawn;
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
    /// ENOSPC where no byte count says how much was needed (a reflink's
    /// metadata): the filesystem is full, which is not "cannot reflink".
    #[error("the filesystem of {path} is full ({available} bytes available): no room for {what}; free space on it (or choose another --file)")]
    FilesystemFull {
        path: PathBuf,
        available: u64,
        what: &'static str,
    },
    #[error("the filesystem of {path} cannot make reflinks ({reason}); use --kind copy")]
    ReflinkUnsupported { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// A backing chain that comes back to one of its own files
    /// ([`crate::qemu_img::backing_chain`]): `files` from the first file of
    /// the loop round to it again.
    #[error("backing-file loop: {} (each file is backed by the next); no program can open these images: fix the backing file names (`qemu-img rebase -u`) first", display_chain(.files))]
    BackingLoop { files: Vec<PathBuf> },
    /// A backing chain longer than [`crate::qemu_img::MAX_CHAIN_DEPTH`] files.
    #[error("the backing chain of {} is longer than {limit} files, vsnap's limit; shorten it first (`qemu-img commit` or a safe `qemu-img rebase` of its files)", .path.display())]
    ChainTooDeep { path: PathBuf, limit: usize },
    /// A qcow2 image whose metadata is damaged (the native check,
    /// [`crate::qemu_img::damage`], or what qemu-img left behind).
    #[error("qcow2 image {} is damaged: {problems}; vsnap does not work on a damaged image: back it up (`cp --sparse=always`), then repair it with `qemu-img check -r all -f qcow2 {}` and check the guest's data", .path.display(), .path.display())]
    Damaged { path: PathBuf, problems: String },
    /// A file vsnap made or recorded is not what it was: a symlink, not a
    /// regular file, or another inode (someone who can write its directory
    /// replaced it). vsnap neither follows nor uses it.
    #[error("{path} is not the file vsnap made or recorded: {why}; vsnap does not use it (someone who can write that directory changed it): check the directory, then `vsnap vol check`")]
    NotOurs { path: PathBuf, why: String },
    /// Another process holds the image's lock (qemu-img/qemu-io said
    /// "Failed to get ... lock").
    #[error("image {path} is in use by another process (a running QEMU?); stop it or use the live domain commands")]
    InUse { path: PathBuf },
    /// No socket file at the QMP monitor path (or a directory on it is missing).
    #[error("no QEMU monitor at {}: is the guest running? start QEMU with -qmp unix:{},server=on,wait=off", .path.display(), .path.display())]
    QmpNoSocket { path: PathBuf },
    /// The socket file exists but nobody accepts on it (QEMU was killed and
    /// left a stale socket), or connecting failed otherwise.
    #[error("cannot connect to the QEMU monitor at {}: {source}; has QEMU exited (a stale socket left by a killed QEMU)?", .path.display())]
    QmpConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The monitor closed (EOF or reset) while a command or wait was in
    /// flight: QEMU exited or was killed.
    #[error("QEMU closed the monitor at {} during {during} (did it exit?)", .path.display())]
    QmpClosed { path: PathBuf, during: String },
    /// Nothing (or no complete answer) within the timeout. While connecting,
    /// this is what another client holding the monitor looks like.
    #[error("the QEMU monitor at {} did not answer {what} within {}", .path.display(), crate::qmp::fmt_secs(*.timeout))]
    QmpTimeout {
        path: PathBuf,
        what: String,
        timeout: std::time::Duration,
    },
    /// The peer does not speak QMP as expected.
    #[error("unexpected data from the QEMU monitor at {}: {message}", .path.display())]
    QmpProtocol { path: PathBuf, message: String },
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {desc} ({class})")]
    Qmp {
        command: String,
        class: String,
        desc: String,
    },
    /// A QEMU job (snapshot-save, snapshot-load, snapshot-delete) concluded
    /// with an error.
    #[error("QEMU's {kind} job {job} failed: {error}")]
    QmpJob {
        job: String,
        kind: String,
        error: String,
    },
    /// `query-jobs` does not list the job (dismissed already, or a new QEMU).
    #[error("QEMU has no job {job} (already dismissed, or QEMU was restarted)")]
    QmpNoJob { job: String },
    /// No socket file at the guest-agent path.
    #[error("no guest-agent socket at {}: is the guest running, with -chardev socket,path={},server=on,wait=off,id=qga0 -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0?", .path.display(), .path.display())]
    AgentNoSocket { path: PathBuf },
    #[error("cannot connect to the guest-agent socket at {}: {source}; has QEMU exited?", .path.display())]
    AgentConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent did not answer in time: no agent in the guest, one not
    /// started yet, a guest that is paused, or another client on the socket.
    #[error("the guest agent at {} did not answer {what} within {}: is qemu-guest-agent running in the guest?", .path.display(), crate::qmp::fmt_secs(*.timeout))]
    AgentTimeout {
        path: PathBuf,
        what: String,
        timeout: std::time::Duration,
    },
    #[error("the guest-agent socket at {} closed during {what} (did QEMU exit?)", .path.display())]
    AgentClosed { path: PathBuf, what: String },
    #[error("unexpected data from the guest agent at {}: {message}", .path.display())]
    AgentProtocol { path: PathBuf, message: String },
    /// The agent answered a command with an error.
    #[error("guest-agent command {command} failed: {desc} ({class})")]
    Agent {
        command: String,
        class: String,
        desc: String,
    },
}

pub type StepResult<T> = Result<T, StepError>;

fn display_chain(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Progress of a long step, reported through [`Cx::progress`].
#[derive(Clone, Debug)]
pub struct Progress {
    pub what: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}
