use crate::*;
use std::path::PathBuf;

/// What a probe saw in the real world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    NotApplied,
    Applied,
    Unknown(String),
}

/// Context handed to every step: where progress goes.
pub struct Cx<'a> {
    pub progress: &'a (dyn Fn(&Progress) + Sync),
}

impl Cx<'_> {
    pub fn quiet() -> Cx<'static> {
        Cx { progress: &|_| {} }
    }
}

/// One idempotent action. Serialized into the journal (the plan body):
/// **never reorder or remove variants** without bumping the codec version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// `qemu-img snapshot -c NAME` on a qcow2 image.
    /// Prerequisites: `image` is qcow2, no snapshot `name` in it, not in use.
    /// Success: the internal snapshot exists. Failure: at most leaked clusters.
    /// Undo: `snapshot -d NAME` if present. Probe: `snapshot -l` lists it.
    InternalCreate { image: PathBuf, name: String },
    /// `qemu-img snapshot -a NAME` on `image` (always a temporary copy the
    /// plan made). Undo: nothing (removing the copy undoes it). Probe: Unknown.
    InternalApply { image: PathBuf, name: String },
    /// `qemu-img snapshot -d NAME`. Irreversible: only after the pivot.
    /// Probe: Applied when the name is absent.
    InternalDelete { image: PathBuf, name: String },
    /// `link(src, dst)`, then fsync of dst's directory.
    /// Probe: Applied when dst is the same inode as src.
    /// Undo: unlink dst when it is the same inode as src.
    HardLink { src: PathBuf, dst: PathBuf },
    /// New qcow2 overlay at `path` backed by `backing` (absolute path,
    /// explicit `-F`): written to a temporary name, fsynced, renamed to
    /// `path`, directory fsynced. Probe: `path` exists and names `backing`.
    /// Undo: remove `path` and the temporary name.
    CreateOverlay { path: PathBuf, backing: PathBuf, backing_format: Format },
    /// Whole-file clone of `src` at `dst` (dst is created with O_EXCL after
    /// removing a stale one of ours). Copy checks free space and
    /// preallocates first. Probe: dst exists with src's length.
    /// Undo: remove dst.
    Clone { src: PathBuf, dst: PathBuf, mode: CloneMode },
    /// Move `from` to `to`, fsync the directory. With `replace`, an atomic
    /// `rename(2)` over an existing `to` (irreversible: pivot or later);
    /// without it, `link` + `unlink` that never clobbers `to`.
    /// Probe: Applied when `from` is gone and `to` exists.
    /// Undo (only without `replace`): move `to` back to `from`.
    Rename { from: PathBuf, to: PathBuf, replace: bool },
    /// `qemu-img rebase` of `image` onto `new_backing` (None: no backing);
    /// safe (data pulled up, the guest's view unchanged) unless `unsafe_`.
    /// Probe: Applied when image's backing is `new_backing`.
    /// Undo (safe rebase only): unsafe rebase back onto `old_backing`.
    Rebase {
        image: PathBuf,
        format: Format,
        new_backing: Option<(PathBuf, Format)>,
        old_backing: Option<(PathBuf, Format)>,
        unsafe_: bool,
    },
    /// `qemu-img commit` of `image` into its backing file. Irreversible.
    Commit { image: PathBuf, format: Format },
    /// Remove a file the plan made or freed; fsync the directory.
    /// Irreversible: only after the pivot. Probe: Applied when absent.
    RemoveFile { path: PathBuf },
    /// The catalog write: a marker whose `Done` is written in one sled
    /// transaction with the catalog changes. apply/undo do nothing;
    /// probe is always NotApplied (its effect and its Done are atomic).
    Catalog,
}

impl Step {
    /// Stable name, used in the journal display and in crash point names.
    pub fn name(&self) -> &'static str {
        match self {
            Step::InternalCreate { .. } => "internal-create",
            Step::InternalApply { .. } => "internal-apply",
            Step::InternalDelete { .. } => "internal-delete",
            Step::HardLink { .. } => "hard-link",
            Step::CreateOverlay { .. } => "create-overlay",
            Step::Clone { .. } => "clone",
            Step::Rename { .. } => "rename",
            Step::Rebase { .. } => "rebase",
            Step::Commit { .. } => "commit",
            Step::RemoveFile { .. } => "remove-file",
            Step::Catalog => "catalog",
        }
    }

    /// Whether `undo` exists (a step without one may only stand at or after the pivot).
    pub fn reversible(&self) -> bool {
        match self {
            Step::InternalDelete { .. } | Step::Commit { .. } | Step::RemoveFile { .. } => false,
            Step::Rename { replace, .. } => !replace,
            Step::Rebase { unsafe_, .. } => !unsafe_,
            _ => true,
        }
    }

    /// One line for `--dry-run` and `vsnap plan show`.
    pub fn describe(&self) -> String {
        todo!()
    }

    pub fn probe(&self, cx: &Cx) -> StepResult<Probe> {
        let _ = cx;
        todo!()
    }

    /// Idempotent.
    pub fn apply(&self, cx: &Cx) -> StepResult<()> {
        let _ = cx;
        todo!()
    }

    /// Idempotent; `Err(StepError::Invalid)` for an irreversible step.
    pub fn undo(&self, cx: &Cx) -> StepResult<()> {
        let _ = cx;
        todo!()
    }
}
