//! vsnap's engine: the public API that VM managers embed.
//!
//! Everything an embedder uses is at the crate root: [`Engine`] (one per
//! state directory per process) with libvirt-named calls
//! (`vol_snapshot_create`, `domain_snapshot_create_xml`, ...), the request
//! and flag types ([`CreateRequest`], [`VolSnapFlags`], [`DomSnapRequest`],
//! [`DomSnapFlags`], ...), the records they return ([`VolSnapshot`],
//! [`DomainRec`], [`DomSnapshot`], ...), the check reports, and typed
//! errors ([`EngineError`], matched through [`EngineError::kind`] and
//! [`RefusalKind`]). The XML formats are in [`xml`]. The modules behind
//! them are private: the catalog's encoding and the journal are not part
//! of the API (every change goes through a plan the engine compiles).
//!
//! Requests (and XML) are compiled into [`Plan`]s with every name and path
//! fixed, then run journal-first: written to the journal before anything
//! is touched, so that each happens completely or not at all.
//! [`Engine::open`] takes the state directory's lock and runs recovery
//! before any new plan.
//!
//! ```no_run
//! use std::path::Path;
//! use vsnap_engine::{CreateRequest, Engine, RefusalKind, SnapKind, VolSnapFlags};
//!
//! # fn main() -> Result<(), vsnap_engine::EngineError> {
//! let (engine, recovered) = Engine::open(Path::new("/var/lib/vsnap"))?;
//! for r in &recovered {
//!     eprintln!("recovered plan {}: {}", r.plan, r.outcome);
//! }
//! let flags = VolSnapFlags {
//!     name: Some("before-upgrade".into()),
//!     kind: Some(SnapKind::External),
//!     ..VolSnapFlags::default()
//! };
//! let req = CreateRequest::new(Path::new("/vm/a.qcow2"), None, flags)?;
//! match engine.vol_snapshot_create(&req, false) {
//!     Ok(done) => println!("made {}", done.snapshot.name),
//!     Err(e) if e.kind() == Some(RefusalKind::NameTaken) => println!("name taken: {e}"),
//!     Err(e) if e.kind() == Some(RefusalKind::NoSpace) => println!("no room: {e}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod catalog;
mod check;
mod domain;
mod domdoc;
mod domsnap;
mod image;
mod launch;
mod plan;
mod volume;
mod volxml;
mod xmltree;

pub use catalog::dom::{
    DiskDevice, DiskMode, DiskSource, DomDisk, DomSnapDisk, DomSnapState, DomSnapshot, DomainRec,
    SnapshotDefault,
};
pub use catalog::{SnapKind, VolSnapshot, VolumeRec};
pub use check::{AdoptReport, AdoptedFile, CheckReport};
pub use domain::DomState;
pub use domsnap::{
    DiskChoice, DomRevertDone, DomRevertFlags, DomSnapDone, DomSnapFlags, DomSnapRequest,
    MemoryChoice,
};
pub use launch::{
    parse_launch_file, LaunchRequest, Launched, Launcher, QemuLauncher, ShutdownVia, Stopped,
};
pub use plan::{Plan, PlanOutcome, PlanReport};
pub use volume::{CreateRequest, DeleteRequest, Done, RevertRequest, VolSnapFlags};
pub use vsnap_journal::{JournalError, Outcome, PlanHeader, PlanId, Record, StoredPlan};
pub use vsnap_recovery::IllegalSequence;
pub use vsnap_steps::launch::{
    ArgvError, BoundDisk, DiskImage, LaunchError, LaunchSpec, PlannedArgv, StartMode,
};
pub use vsnap_steps::{Format, Progress, StepError};

/// The XML formats: `<volsnapshot>`, `<domainsnapshot>` and `<domain>`,
/// parsed and written as the engine does. The `Engine` calls that take
/// XML (`vol_snapshot_create_xml`, `domain_snapshot_create_xml`,
/// `domain_define`) parse with these; the `_get_xml_desc` calls write
/// with them. Read a file of XML with [`crate::read_xml_file`].
pub mod xml {
    pub use crate::domain::{domain_left_out, domain_to_xml, parse_domain_xml};
    pub use crate::domsnap::{domainsnapshot_to_xml, parse_domainsnapshot};
    pub use crate::volxml::{parse_volsnapshot, volsnapshot_to_xml, VolSnapshotSpec};
}

/// Internals for vsnap's own tests (engine/tests, the crash suites):
/// **not part of the API**, hidden from the documentation, and free to
/// change in any release. Read-only: nothing here writes the journal or
/// the catalog.
#[doc(hidden)]
pub mod testing {
    use crate::{Engine, Result, VolSnapshot, VolumeRec};
    use std::path::Path;

    pub use crate::domain::block_key;
    pub use crate::image::{is_claim, CLAIM_PREFIX};

    /// The catalog's record of the volume at `path` (canonical), if any.
    pub fn volume_record(engine: &Engine, path: &Path) -> Result<Option<VolumeRec>> {
        crate::catalog::volume(engine.journal(), path)
    }

    /// The catalog's snapshots of the volume at `path` (canonical), as
    /// stored.
    pub fn volume_snapshots(engine: &Engine, path: &Path) -> Result<Vec<VolSnapshot>> {
        crate::catalog::snapshots(engine.journal(), path)
    }

    /// How many plans of the journal are unfinished.
    pub fn unfinished_plans(engine: &Engine) -> Result<usize> {
        Ok(engine.journal().unfinished()?.len())
    }
}

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use vsnap_journal::Journal;
use vsnap_steps::Cx;

/// Errors of the engine: each names what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The journal or catalog could not be read or written (nothing was
    /// changed by a plan that had not begun).
    #[error(transparent)]
    Journal(#[from] vsnap_journal::JournalError),
    #[error("plan {plan}: step {index} ({step}) failed: {source}; the plan was rolled back, nothing changed")]
    /// A step before the pivot failed; the plan was rolled back and
    /// nothing changed.
    Step {
        /// The plan's id.
        plan: u64,
        /// The failed step's index in the plan.
        index: u32,
        /// The failed step's name.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: StepError,
    },
    /// As [`EngineError::Step`], and the rollback repaired what the
    /// failed step's tool left (leaked clusters of a cut-short qemu-img):
    /// `detail` is the step's error and what was repaired.
    #[error("plan {plan}: step {index} ({step}) failed: {}; the plan was rolled back and {}", .detail.0, .detail.1)]
    StepRepaired {
        /// The plan's id.
        plan: u64,
        /// The failed step's index in the plan.
        index: u32,
        /// The failed step's name.
        step: &'static str,
        /// The step's error, and what the rollback repaired.
        detail: Box<(StepError, String)>,
    },
    /// Asking QEMU (QMP) or checking an image outside a plan failed;
    /// nothing changed.
    #[error(transparent)]
    Check(StepError),
    /// A step after the pivot failed: the change is committed (this is
    /// not "nothing changed"); the plan stays unfinished so that
    /// `vsnap-recover` (or the next command) finishes it. Exit 1.
    #[error("plan {plan}: the change is committed, but step {index} ({step}) failed {tries} time(s): {reason}; left to do: {left}; fix the cause and run `vsnap-recover` (or any vsnap command on this state directory), which finishes it; `vsnap plan show {plan}` lists the plan")]
    AfterPivot {
        /// The plan's id.
        plan: u64,
        /// The failed step's index in the plan.
        index: u32,
        /// The failed step, described.
        step: String,
        /// How many times it was tried.
        tries: u32,
        /// Why it failed, the last time.
        reason: String,
        /// The steps left to do.
        left: String,
    },
    /// The plan ended needing an operator (recovery could not tell, or
    /// could not finish); nothing was deleted. Exit 1.
    #[error("plan {plan} needs attention: {reason}")]
    NeedsAttention {
        /// The plan's id.
        plan: u64,
        /// Why, and what to do.
        reason: String,
    },
    #[error("plan {plan}: {source}; the journal may be damaged: inspect it with `vsnap plan show {plan}`")]
    /// A plan's records are not a sequence the runner writes: the
    /// journal may be damaged; recovery does nothing with the plan.
    IllegalJournal {
        /// The plan's id.
        plan: u64,
        /// What is wrong with the sequence.
        #[source]
        source: vsnap_recovery::IllegalSequence,
    },
    #[error("invalid {kind} name {name:?}: {why}; choose a name of at most 200 bytes without '/', '..', NUL, control or invisible (format) characters that does not start with '.' or '-'")]
    /// A snapshot or domain name vsnap refuses (see [`validate_name_of`]).
    BadName {
        /// What the name names.
        kind: NameKind,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A request refused before anything was changed: `kind` says what
    /// kind of refusal it is (match on it, not on the text), `message`
    /// says why and what to do. Nothing changed. Exit 2.
    #[error("{message}")]
    Refused {
        /// What kind of refusal: what an embedder matches on.
        kind: RefusalKind,
        /// Why, and what to do (the text `vsnap` prints).
        message: String,
    },
    /// The image does not exist.
    #[error("image {0} does not exist; give the path of an existing disk image")]
    NoImage(PathBuf),
    #[error("volume {volume} has no snapshot named {name:?}; `vsnap vol snapshot list {volume}` lists them")]
    /// The volume has no snapshot of that name.
    NoSnapshot {
        /// The volume (its canonical path).
        volume: PathBuf,
        /// The name asked for.
        name: String,
    },
    #[error("volume {volume} already has a snapshot named {name:?}; choose another name or delete it first")]
    /// The volume has a snapshot of that name already.
    Duplicate {
        /// The volume (its canonical path).
        volume: PathBuf,
        /// The name in use.
        name: String,
    },
    #[error("{path} already exists; vsnap never overwrites a file it did not create: choose another --file or name")]
    /// A file the plan would create exists already.
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The directory the snapshot's files go to is not writable.
    #[error("directory {0} is not writable; vsnap writes the snapshot's files beside the image (or where --file says)")]
    ReadOnly(PathBuf),
    #[error("the plan would create {path} twice: by `{first}` and by `{second}`; give each its own file (--file, or --disk TARGET=external:PATH)")]
    /// Two steps of one plan would create the same file.
    SamePath {
        /// The file.
        path: PathBuf,
        /// The first step, described.
        first: String,
        /// The second step, described.
        second: String,
    },
    #[error("cannot create {path} (for `{step}`): {why}; choose a shorter snapshot name, or a shorter path with --file (--disk TARGET=external:PATH)")]
    /// A file the plan would create has a name or path the filesystem
    /// cannot take.
    PathTooLong {
        /// The file.
        path: PathBuf,
        /// What is too long.
        why: String,
        /// The step that would create it, described.
        step: String,
    },
    /// An XML document vsnap does not accept, and why.
    #[error("malformed XML: {0}")]
    Xml(String),
    /// vsnap does not know the image's format and will not guess it from
    /// the image's bytes.
    #[error("format of {image} unknown: {why}")]
    FormatUnknown {
        /// The image.
        image: PathBuf,
        /// Why vsnap cannot tell (and how to say it: `--format`).
        why: String,
    },
    /// Another state directory manages the image.
    #[error("{image} is managed by another vsnap state directory: {owner} (claim {claim}); an image belongs to one state directory: use that one (--state-dir), or, if it no longer manages the image, remove the claim file")]
    Owned {
        /// The image.
        image: PathBuf,
        /// The owning state directory, as its claim names it.
        owner: String,
        /// The claim file beside the image.
        claim: PathBuf,
    },
    /// The domain has no launch spec: vsnap does not know how to start
    /// its QEMU ([`RefusalKind::WrongState`]).
    #[error("domain {domain} has no launch spec: vsnap does not know how to start its QEMU; record one with `vsnap domain define FILE.xml --launch FILE` (or `vsnap domain attach`, which records the running QEMU's command line)")]
    NoLaunchSpec {
        /// The domain.
        domain: String,
    },
    /// An option of the domain's launch command line that vsnap cannot
    /// rewrite to the catalog's images (or will not start with); found
    /// before anything is touched ([`RefusalKind::NotSupported`]).
    #[error("domain {domain}: cannot start it: {source}; nothing was started")]
    LaunchOption {
        /// The domain.
        domain: String,
        /// The option, and why.
        #[source]
        source: vsnap_steps::launch::ArgvError,
    },
    /// Starting QEMU failed (nothing is left running).
    #[error("domain {domain}: {source}")]
    Launch {
        /// The domain.
        domain: String,
        /// What failed.
        #[source]
        source: vsnap_steps::launch::LaunchError,
    },
    /// `shutdown` with a timeout: the guest was asked, and QEMU still runs.
    #[error("domain {domain} still runs {:.1} s after it was asked to shut down ({}); the guest may ignore the request: `vsnap domain destroy {domain}` ends it", .waited.as_secs_f64(), match .via { crate::launch::ShutdownVia::Agent => "through its guest agent", crate::launch::ShutdownVia::Acpi => "by ACPI power button" })]
    ShutdownTimeout {
        /// The domain.
        domain: String,
        /// How long vsnap waited.
        waited: std::time::Duration,
        /// How the guest was asked.
        via: crate::launch::ShutdownVia,
    },
    /// The image has a second name.
    #[error("{image} has {links} hard links; after a snapshot the other name(s) would be the frozen snapshot (or a stale copy) and whatever writes through them would change it: remove the other link(s) (`find / -xdev -samefile {image}` lists them) or snapshot a copy of the image")]
    HardLinked {
        /// The image.
        image: PathBuf,
        /// Its link count.
        links: u64,
    },
}

/// What kind of refusal an [`EngineError`] is, for an embedder to match
/// on ([`EngineError::kind`]): the message is for people and may be
/// reworded, the kind is not. New kinds may be added, so a `match` needs
/// a `_` arm. Every refusal changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalKind {
    /// What the request names does not exist: a domain, a volume, a
    /// snapshot, a disk, an image, a file or directory it names.
    NotFound,
    /// The name is in use already: a snapshot of that name (in the
    /// catalog or inside a qcow2 image), a domain defined already.
    NameTaken,
    /// A name vsnap refuses (empty, too long, '/', '..', control or
    /// invisible characters, vsnap's own temporary-file names).
    BadName,
    /// The request is malformed or contradicts itself or the domain's
    /// definition: contradictory flags, a disk named twice, malformed or
    /// oversized XML, two new files at one path, an unknown format.
    BadRequest,
    /// What vsnap cannot do: a format, disk type, snapshot kind or
    /// combination it does not support (internal snapshots of raw images,
    /// manual or network disks, reflinks of qcow2 or across filesystems,
    /// paths that are not UTF-8 where one must be...).
    NotSupported,
    /// Another party holds it: another state directory's claim, or
    /// unfinished plans in the journal.
    InUse,
    /// The domain is not in the state the request needs: not running
    /// (or no agent) where a live guest is needed, or QEMU no longer
    /// uses the image the definition names.
    WrongState,
    /// Acting could harm data, because the files are not as vsnap left
    /// them or could change behind it: hard links, an image or snapshot
    /// file replaced or missing, a catalog that disagrees with the
    /// images, a backing chain that loops or is too deep. `vsnap vol
    /// check` lists what is wrong.
    Unsafe,
    /// A file the plan would create exists already; vsnap never
    /// overwrites a file it did not create.
    Exists,
    /// A directory the plan writes to is not writable.
    NotWritable,
    /// Not enough free space for what the plan would write.
    NoSpace,
    /// A file or directory a check needed could not be read (the OS's
    /// error is in the message).
    Io,
}

impl RefusalKind {
    /// The kind as one stable word (`not-found`, `name-taken`, ...), as
    /// `vsnap --json` prints it in `{"error": ..., "kind": ...}`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::NotFound => "not-found",
            RefusalKind::NameTaken => "name-taken",
            RefusalKind::BadName => "bad-name",
            RefusalKind::BadRequest => "bad-request",
            RefusalKind::NotSupported => "not-supported",
            RefusalKind::InUse => "in-use",
            RefusalKind::WrongState => "wrong-state",
            RefusalKind::Unsafe => "unsafe",
            RefusalKind::Exists => "exists",
            RefusalKind::NotWritable => "not-writable",
            RefusalKind::NoSpace => "no-space",
            RefusalKind::Io => "io",
        }
    }

    /// The kind of a refusal caused by `e` on a path the request names:
    /// [`RefusalKind::NotFound`] when it does not exist, else
    /// [`RefusalKind::Io`].
    pub(crate) fn of_io(e: &std::io::Error) -> RefusalKind {
        if e.kind() == std::io::ErrorKind::NotFound {
            RefusalKind::NotFound
        } else {
            RefusalKind::Io
        }
    }
}

impl EngineError {
    /// A refusal of `kind` with `message`.
    pub(crate) fn refused(kind: RefusalKind, message: String) -> Self {
        EngineError::Refused { kind, message }
    }
    /// A [`RefusalKind::NotFound`] refusal.
    pub(crate) fn not_found(message: String) -> Self {
        Self::refused(RefusalKind::NotFound, message)
    }
    /// A [`RefusalKind::NameTaken`] refusal.
    pub(crate) fn name_taken(message: String) -> Self {
        Self::refused(RefusalKind::NameTaken, message)
    }
    /// A [`RefusalKind::BadName`] refusal.
    pub(crate) fn bad_name(message: String) -> Self {
        Self::refused(RefusalKind::BadName, message)
    }
    /// A [`RefusalKind::BadRequest`] refusal.
    pub(crate) fn bad_request(message: String) -> Self {
        Self::refused(RefusalKind::BadRequest, message)
    }
    /// A [`RefusalKind::NotSupported`] refusal.
    pub(crate) fn not_supported(message: String) -> Self {
        Self::refused(RefusalKind::NotSupported, message)
    }
    /// A [`RefusalKind::InUse`] refusal.
    pub(crate) fn in_use(message: String) -> Self {
        Self::refused(RefusalKind::InUse, message)
    }
    /// A [`RefusalKind::WrongState`] refusal.
    pub(crate) fn wrong_state(message: String) -> Self {
        Self::refused(RefusalKind::WrongState, message)
    }
    /// A [`RefusalKind::Unsafe`] refusal.
    pub(crate) fn unsafe_(message: String) -> Self {
        Self::refused(RefusalKind::Unsafe, message)
    }
    /// A [`RefusalKind::Exists`] refusal.
    pub(crate) fn exists(message: String) -> Self {
        Self::refused(RefusalKind::Exists, message)
    }
    /// A [`RefusalKind::NotWritable`] refusal.
    pub(crate) fn not_writable(message: String) -> Self {
        Self::refused(RefusalKind::NotWritable, message)
    }
    /// A [`RefusalKind::NoSpace`] refusal.
    pub(crate) fn no_space(message: String) -> Self {
        Self::refused(RefusalKind::NoSpace, message)
    }
    /// A [`RefusalKind::Io`] refusal.
    pub(crate) fn io(message: String) -> Self {
        Self::refused(RefusalKind::Io, message)
    }

    /// The kind of a refusal (nothing changed, exit 2): every refusal,
    /// whether a [`EngineError::Refused`] or one of the variants that
    /// carry their own fields ([`EngineError::NoSnapshot`] is
    /// [`RefusalKind::NotFound`], [`EngineError::Duplicate`]
    /// [`RefusalKind::NameTaken`], [`EngineError::Owned`]
    /// [`RefusalKind::InUse`], ...). `None` for what is not a refusal: a
    /// journal error, a failed step (rolled back), a failed check of
    /// QEMU or an image, a change left for recovery.
    pub fn kind(&self) -> Option<RefusalKind> {
        use RefusalKind as K;
        Some(match self {
            EngineError::Refused { kind, .. } => *kind,
            EngineError::BadName { .. } => K::BadName,
            EngineError::NoImage(_) | EngineError::NoSnapshot { .. } => K::NotFound,
            EngineError::Duplicate { .. } => K::NameTaken,
            EngineError::Exists { .. } => K::Exists,
            EngineError::ReadOnly(_) => K::NotWritable,
            EngineError::SamePath { .. }
            | EngineError::PathTooLong { .. }
            | EngineError::Xml(_)
            | EngineError::FormatUnknown { .. } => K::BadRequest,
            EngineError::Owned { .. } => K::InUse,
            EngineError::HardLinked { .. } => K::Unsafe,
            EngineError::NoLaunchSpec { .. } => K::WrongState,
            EngineError::LaunchOption { .. } => K::NotSupported,
            EngineError::Launch { .. } | EngineError::ShutdownTimeout { .. } => return None,
            EngineError::Journal(_)
            | EngineError::Step { .. }
            | EngineError::StepRepaired { .. }
            | EngineError::Check(_)
            | EngineError::AfterPivot { .. }
            | EngineError::NeedsAttention { .. }
            | EngineError::IllegalJournal { .. } => return None,
        })
    }

    /// Whether something was changed and is left for recovery or an
    /// operator (exit 1, "needs attention"), rather than refused or rolled
    /// back with nothing changed (exit 2).
    pub fn needs_attention(&self) -> bool {
        matches!(
            self,
            EngineError::AfterPivot { .. } | EngineError::NeedsAttention { .. }
        )
    }
}

/// The engine's result: [`EngineError`] unless said otherwise.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The default name of a new snapshot: the creation time in seconds, as
/// libvirt names it; when that name is `taken` (a snapshot made in the
/// same second, or any other use), `<seconds>-1`, `<seconds>-2`, ...
pub(crate) fn default_snapshot_name(taken: impl Fn(&str) -> bool) -> String {
    let base = now_unix().to_string();
    if !taken(&base) {
        return base;
    }
    (1u64..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken(n))
        .expect("an unbounded range has a free name")
}

/// Whether `c` is invisible or changes how text around it is shown: a
/// Unicode format character (general category Cf: bidi embeddings,
/// overrides and isolates U+202A-202E, U+2066-2069, marks U+200E/200F
/// and U+061C, zero-width U+200B-200D, U+2060-2064, U+FEFF, soft hyphen,
/// tags...), a line or paragraph separator, a variation selector, or a
/// filler that renders as nothing. A name holding one can print as
/// another name (`s1\u{202e}txt.exe`), so vsnap refuses them.
pub fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        // Cf, Unicode 15.
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F
        // Zl, Zp.
        | 0x2028 | 0x2029
        // Invisible others: combining grapheme joiner, Hangul fillers,
        // variation selectors (Mongolian, standard, supplement).
        | 0x034F | 0x115F | 0x1160 | 0x3164 | 0xFFA0 | 0x180B..=0x180D | 0x180F
        | 0xFE00..=0xFE0F | 0xE0100..=0xE01EF)
}

/// What a name names, for errors ("invalid domain name", not "snapshot").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A snapshot's name (volume or domain).
    Snapshot,
    /// A domain's name.
    Domain,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Snapshot => "snapshot",
            NameKind::Domain => "domain",
        })
    }
}

/// Snapshot names become file names: reject what would escape or confuse
/// a directory listing (see [`validate_name_of`]).
pub fn validate_name(name: &str) -> Result<()> {
    validate_name_of(NameKind::Snapshot, name)
}

/// Snapshot and domain names become file names and are printed: reject
/// what would escape a directory, confuse a listing, or print as another
/// name (control, format and other invisible characters).
pub fn validate_name_of(kind: NameKind, name: &str) -> Result<()> {
    let bad = |why: String| {
        Err(EngineError::BadName {
            kind,
            name: name.into(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty".into());
    }
    if name.len() > 200 {
        return bad("longer than 200 bytes".into());
    }
    if name.contains('/') {
        return bad("contains '/'".into());
    }
    if name.contains("..") {
        return bad("contains '..'".into());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("starts with '.' or '-'".into());
    }
    if name.chars().any(|c| c == '\0' || c.is_control()) {
        return bad("contains NUL or a control character".into());
    }
    if let Some(c) = name.chars().find(|&c| is_invisible(c)) {
        return bad(format!(
            "contains U+{:04X}, an invisible or text-direction (format) character, which can make a name print as another",
            c as u32
        ));
    }
    Ok(())
}

/// The largest XML document vsnap reads (`--xml`, `domain define`):
/// virsh's own limit for an XML file (`VSH_MAX_XML_FILE`, 10 MiB).
pub const MAX_XML_BYTES: usize = 10 << 20;

/// The longest description kept with a snapshot, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 64 << 10;

/// What a file of type `ft` is, for messages ("a directory", "a FIFO",
/// ...): what the XML reader and the domain disk check say they found.
pub(crate) fn file_type_name(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "of another file type"
    }
}

/// Read an XML document from a file: a regular file (not a directory, a
/// device such as `/dev/zero`, or a FIFO) of at most [`MAX_XML_BYTES`],
/// in UTF-8. Nothing larger is read into memory.
pub fn read_xml_file(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| {
        let kind = RefusalKind::of_io(&e);
        EngineError::refused(kind, format!("cannot read {}: {e}", path.display()))
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    let ft = f.metadata().map_err(cannot)?.file_type();
    if !ft.is_file() {
        let what = file_type_name(&ft);
        return Err(EngineError::bad_request(format!(
            "{} is {what}; give the path of an XML file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    f.take(MAX_XML_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    check_xml_size(bytes.len())
        .map_err(|_| EngineError::bad_request(format!("{}: {}", path.display(), too_big_xml())))?;
    String::from_utf8(bytes).map_err(|e| {
        EngineError::bad_request(format!(
            "{} is not UTF-8 (invalid byte at offset {}); XML documents are read as UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

fn too_big_xml() -> String {
    format!(
        "the document is larger than {} MiB, the most vsnap (like virsh) reads",
        MAX_XML_BYTES >> 20
    )
}

/// An XML document of `len` bytes is refused above [`MAX_XML_BYTES`].
pub(crate) fn check_xml_size(len: usize) -> Result<()> {
    if len > MAX_XML_BYTES {
        return Err(EngineError::Xml(too_big_xml()));
    }
    Ok(())
}

/// A description is refused above [`MAX_DESCRIPTION_BYTES`].
pub fn validate_description(d: Option<&str>) -> Result<()> {
    if let Some(d) = d {
        if d.len() > MAX_DESCRIPTION_BYTES {
            return Err(EngineError::bad_request(format!(
                "the description is {} bytes long; a description may have at most {} KiB",
                d.len(),
                MAX_DESCRIPTION_BYTES >> 10
            )));
        }
    }
    Ok(())
}

/// Whether `dir` may be a state directory as far as owners and modes go
/// (it and the directories above it; see [`vsnap_journal::statedir`]).
/// Nothing is created. `vsnap`'s client checks it before it hands a
/// `vsnap serve` listening there its terminal.
pub fn check_state_dir(dir: &Path) -> Result<()> {
    Ok(vsnap_journal::statedir::check_safe(dir)?)
}

/// The default state directory: `/var/lib/vsnap` for root,
/// `$XDG_STATE_HOME/vsnap` (or `~/.local/state/vsnap`) otherwise.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VSNAP_STATE_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/vsnap");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(x).join("vsnap");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/vsnap")
}

/// The engine: one per state directory per process.
///
/// The journal it writes is not reachable from outside: plans are read
/// through [`Engine::plans`] and [`Engine::plan`], changed only by the
/// calls that compile and run them.
///
/// ```compile_fail,E0624
/// fn raw(engine: &vsnap_engine::Engine) {
///     let _ = engine.journal(); // private: no raw journal
/// }
/// ```
///
/// ```compile_fail,E0603
/// use vsnap_engine::catalog::put_volume; // private: no catalog encoders
/// ```
pub struct Engine {
    journal: Journal,
    /// Plans run one at a time (they read the catalog when compiled).
    op_lock: Mutex<()>,
    progress: Box<dyn Fn(&Progress) + Send + Sync>,
    /// An embedder's launcher; `None`: vsnap's own (`QemuLauncher`).
    launcher: Option<Box<dyn Launcher>>,
}

impl Engine {
    /// Open the state directory and recover every unfinished plan.
    pub fn open(state_dir: &Path) -> Result<(Engine, Vec<PlanReport>)> {
        let engine = Engine::open_without_recovery(state_dir)?;
        let reports = engine.recover(false)?;
        Ok((engine, reports))
    }

    /// Open without recovering (for `vsnap-recover --dry-run` and `plan show`).
    pub fn open_without_recovery(state_dir: &Path) -> Result<Engine> {
        Ok(Engine {
            journal: Journal::open(state_dir)?,
            op_lock: Mutex::new(()),
            progress: Box::new(|_| {}),
            launcher: None,
        })
    }

    /// Where long steps (copies) report progress.
    pub fn set_progress(&mut self, f: impl Fn(&Progress) + Send + Sync + 'static) {
        self.progress = Box::new(f);
    }

    /// The journal (and catalog store) this engine writes. Not public:
    /// every change goes through a plan.
    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// When opening made the state directory and nothing was journaled
    /// since (a query, a dry run, a refused request): remove it again, so
    /// that such a call leaves nothing behind (see
    /// [`Journal::remove_if_unused`]). The engine takes no writes after
    /// it returns true.
    pub fn remove_state_if_unused(&self) -> Result<bool> {
        let _g = self.lock_ops();
        Ok(self.journal.remove_if_unused()?)
    }

    pub(crate) fn cx(&self) -> Cx<'_> {
        Cx {
            progress: &*self.progress,
            resumed: false,
        }
    }

    pub(crate) fn lock_ops(&self) -> std::sync::MutexGuard<'_, ()> {
        let g = self.op_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Each operation checks files against what it made or read itself.
        vsnap_steps::fsops::forget_all();
        g
    }

    /// Finish or undo every unfinished plan, oldest first. With `dry_run`,
    /// only say what would be done (the pivot may be probed: read-only).
    pub fn recover(&self, dry_run: bool) -> Result<Vec<PlanReport>> {
        let _g = self.lock_ops();
        let cx = self.cx();
        let mut out = Vec::new();
        for stored in self.journal.unfinished()? {
            // One monitor connection per plan, as when it ran.
            let _held = vsnap_steps::live::hold_connections();
            out.push(plan::recover_one(&self.journal, &stored, dry_run, &cx)?);
        }
        Ok(out)
    }

    /// Every plan in the journal, oldest first (read-only copies: its
    /// header and records).
    pub fn plans(&self) -> Result<Vec<StoredPlan>> {
        Ok(self.journal.plans()?)
    }

    /// The id of the newest plan in the journal, if any.
    pub fn last_plan_id(&self) -> Result<Option<u64>> {
        Ok(self.journal.last_plan()?.map(|p| p.0))
    }

    /// One plan (a read-only copy of its header and records) and its
    /// decoded steps.
    pub fn plan(&self, id: u64) -> Result<(StoredPlan, Plan)> {
        let stored = self.journal.plan(vsnap_journal::PlanId(id))?;
        let plan = Plan::decode(&stored)?;
        Ok((stored, plan))
    }
}
