use crate::qemu_img::SnapshotOp;
use crate::*;
use std::path::{Path, PathBuf};
use vsnap_journal::failpoint;

/// `qemu-img snapshot -d NAME` unless the image or the snapshot is gone
/// (the undo of InternalCreate, the apply of InternalDelete).
fn delete_internal_if_present(image: &Path, name: &str) -> StepResult<()> {
    if !fsops::exists(image)? || !has_internal(image, name)? {
        return Ok(());
    }
    failpoint::hit("step.internal.before");
    snapshot_nofollow(image, SnapshotOp::Delete, name)
}

/// `qemu-img rebase` of `image` through a descriptor opened without
/// following a link and checked ([`fsops::open_ours`]), when its backing
/// name is absolute (vsnap's overlays always are); by name otherwise (a
/// relative name must be read against the image's own directory).
fn rebase_nofollow(
    image: &Path,
    format: Format,
    new_backing: Option<(&Path, Format)>,
    unsafe_: bool,
) -> StepResult<()> {
    let f = fsops::open_ours(image, false)?;
    let absolute = format == Format::Qcow2
        && crate::qcow2::read_file(&f)
            .is_ok_and(|h| h.backing.as_deref().is_none_or(|b| b.starts_with('/')));
    if absolute {
        qemu_img::rebase_fd(&f, image, format, new_backing, unsafe_)
    } else {
        qemu_img::rebase(image, format, new_backing, unsafe_)
    }
}

/// `qemu-img snapshot` on `image` through a descriptor opened without
/// following a link and checked ([`fsops::open_ours`]): a name replaced by
/// a symlink is refused, one replaced after the check is not what qemu-img
/// writes to.
fn snapshot_nofollow(image: &Path, op: SnapshotOp, name: &str) -> StepResult<()> {
    let f = fsops::open_ours(image, false)?;
    qemu_img::snapshot_fd(&f, image, op, name)
}

fn has_internal(image: &Path, name: &str) -> StepResult<bool> {
    Ok(qemu_img::snapshot_names(image, false)?
        .iter()
        .any(|n| n == name))
}

/// After a `qemu-img snapshot` that may have been cut short (killed, or
/// failed half-way) on `image`: make `qemu-img check` clean again. A
/// `snapshot -c` killed after raising refcounts and before writing the
/// snapshot table leaves refcounts above what is referenced (leaked
/// clusters, and clusters whose COPIED flag no longer matches their
/// refcount: "corruptions" to qemu-img check); a `snapshot -d` killed
/// after the table write leaves leaks. Both are repaired by `qemu-img
/// check -r all` (`-r leaks` when leaks are all there is), which rebuilds
/// the refcounts from the tables that reference clusters. A corrupt bit
/// is not repaired here: QEMU sets it when it finds metadata inconsistent
/// in a way an interrupted snapshot does not cause, and vsnap refused the
/// image at plan time had it been set then ([`StepError::Damaged`]).
///
/// Returns what was repaired, for the plan's report; None when the image
/// was clean (or is gone).
fn repair_after_snapshot(image: &Path) -> StepResult<Option<String>> {
    if !fsops::exists(image)? {
        return Ok(None);
    }
    let (corrupt, dirty) = match qcow2::read(image) {
        Ok(h) => (
            h.incompatible & qcow2::INCOMPAT_CORRUPT != 0,
            h.incompatible & qcow2::INCOMPAT_DIRTY != 0,
        ),
        Err(_) => (false, false),
    };
    if corrupt {
        return Err(StepError::Damaged {
            path: image.to_path_buf(),
            problems: "qemu-img found its metadata inconsistent during vsnap's `qemu-img snapshot` \
                       and marked it corrupt (vsnap's check before the plan, which reads the header \
                       and the top-level tables, had found nothing wrong)"
                .to_string(),
        });
    }
    let before = qemu_img::check(image, Format::Qcow2)?;
    if before.clean && !dirty {
        return Ok(None);
    }
    let all = before.corruptions > 0 || dirty;
    let after = qemu_img::repair(image, all)?;
    if !after.clean {
        return Err(StepError::Damaged {
            path: image.to_path_buf(),
            problems: format!(
                "after the interrupted `qemu-img snapshot`, `qemu-img check -r {}` left {} corruption(s) and {} leaked cluster(s): {}",
                if all { "all" } else { "leaks" },
                after.corruptions,
                after.leaks,
                after.output.trim()
            ),
        });
    }
    Ok(Some(format!(
        "repaired what the interrupted qemu-img left in {}: {} leaked cluster(s), {} refcount error(s){} (`qemu-img check -r {}`; now clean)",
        image.display(),
        before.leaks,
        before.corruptions,
        if dirty { ", dirty bit" } else { "" },
        if all { "all" } else { "leaks" }
    )))
}

/// The undo of [`Step::InternalCreate`]: the snapshot goes if it was
/// made, then what a cut-short `qemu-img snapshot -c` left is repaired.
fn undo_internal_create(image: &Path, name: &str) -> StepResult<Option<String>> {
    if !fsops::exists(image)? {
        return Ok(None);
    }
    if qcow2::read(image).is_ok_and(|h| h.incompatible & qcow2::INCOMPAT_CORRUPT != 0) {
        // qemu-img would refuse to open it read-write: say why.
        return repair_after_snapshot(image);
    }
    delete_internal_if_present(image, name)?;
    repair_after_snapshot(image)
}

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
    /// The step may have run before and been cut short (a retry after an
    /// error, or recovery rolling forward): a step whose cut-short run can
    /// leave something to repair (the leaked clusters of a killed
    /// `qemu-img snapshot -a`) repairs it. A first run skips that cost.
    pub resumed: bool,
}

impl<'a> Cx<'a> {
    pub fn quiet() -> Cx<'static> {
        Cx {
            progress: &|_| {},
            resumed: false,
        }
    }

    /// The same context, for a step that may have run before.
    pub fn resumed(&self) -> Cx<'a> {
        Cx {
            progress: self.progress,
            resumed: true,
        }
    }
}

/// One idempotent action. Serialized into the journal (the plan body):
/// **never reorder or remove variants** without bumping the codec version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// `qemu-img snapshot -c NAME` on a qcow2 image.
    /// Prerequisites: `image` is qcow2, no snapshot `name` in it, not in use.
    /// Success: the internal snapshot exists. Failure (or a kill of
    /// qemu-img): leaked clusters and refcounts above their references.
    /// Undo: `snapshot -d` of it if present, then `qemu-img check -r` of
    /// what a cut-short qemu-img left, reported ([`Step::undo_noted`]).
    /// Probe: the snapshot table lists it.
    InternalCreate {
        #[serde(with = "crate::pathser")]
        image: PathBuf,
        name: String,
    },
    /// `qemu-img snapshot -a` of the snapshot named NAME (addressed by its
    /// qcow2 ID, looked up natively: never a name read as an ID) on `image`
    /// (always a temporary copy the plan made). Undo: nothing (removing the
    /// copy undoes it). Probe: Unknown.
    InternalApply {
        #[serde(with = "crate::pathser")]
        image: PathBuf,
        name: String,
    },
    /// `qemu-img snapshot -d NAME` (read as a name only; checked unique,
    /// and checked after that exactly that snapshot went). Irreversible:
    /// only after the pivot. Probe: Applied when the name is absent.
    /// Applied again with the name absent (a retry, recovery), it repairs
    /// the leaks a killed `-d` may have left (`qemu-img check -r`).
    InternalDelete {
        #[serde(with = "crate::pathser")]
        image: PathBuf,
        name: String,
    },
    /// `link(src, dst)`, then fsync of dst's directory.
    /// Probe: Applied when dst is the same inode as src.
    /// Undo: unlink dst when it is the same inode as src.
    HardLink {
        #[serde(with = "crate::pathser")]
        src: PathBuf,
        #[serde(with = "crate::pathser")]
        dst: PathBuf,
    },
    /// New qcow2 overlay at `path` backed by `backing` (absolute path,
    /// explicit `-F`): written to a temporary name, fsynced, renamed to
    /// `path`, directory fsynced. Probe: `path` exists and names `backing`.
    /// Undo: remove `path` and the temporary name.
    CreateOverlay {
        #[serde(with = "crate::pathser")]
        path: PathBuf,
        #[serde(with = "crate::pathser")]
        backing: PathBuf,
        backing_format: Format,
    },
    /// Whole-file clone of `src` at `dst` (dst is created with O_EXCL after
    /// removing a stale one of ours). Copy checks free space and
    /// preallocates first. Probe: dst exists with src's length.
    /// Undo: remove dst.
    Clone {
        #[serde(with = "crate::pathser")]
        src: PathBuf,
        #[serde(with = "crate::pathser")]
        dst: PathBuf,
        mode: CloneMode,
    },
    /// Move `from` to `to`, fsync the directory. With `replace`, an atomic
    /// `rename(2)` over an existing `to` (irreversible: pivot or later);
    /// without it, `link` + `unlink` that never clobbers `to`.
    /// Probe: Applied when `from` is gone and `to` exists.
    /// Undo (only without `replace`): move `to` back to `from`.
    Rename {
        #[serde(with = "crate::pathser")]
        from: PathBuf,
        #[serde(with = "crate::pathser")]
        to: PathBuf,
        replace: bool,
    },
    /// `qemu-img rebase` of `image` onto `new_backing` (None: no backing);
    /// safe (data pulled up, the guest's view unchanged) unless `unsafe_`.
    /// Probe: Applied when image's backing is `new_backing`.
    /// Undo (safe rebase only): unsafe rebase back onto `old_backing`.
    Rebase {
        #[serde(with = "crate::pathser")]
        image: PathBuf,
        format: Format,
        #[serde(with = "crate::pathser::opt_pair")]
        new_backing: Option<(PathBuf, Format)>,
        #[serde(with = "crate::pathser::opt_pair")]
        old_backing: Option<(PathBuf, Format)>,
        unsafe_: bool,
    },
    /// `qemu-img commit` of `image` into its backing file. Irreversible.
    Commit {
        #[serde(with = "crate::pathser")]
        image: PathBuf,
        format: Format,
    },
    /// Remove a file the plan made or freed; fsync the directory.
    /// Irreversible: only after the pivot. Probe: Applied when absent.
    RemoveFile {
        #[serde(with = "crate::pathser")]
        path: PathBuf,
    },
    /// The catalog write: a marker whose `Done` is written in one sled
    /// transaction with the catalog changes. apply/undo do nothing;
    /// probe is always NotApplied (its effect and its Done are atomic).
    Catalog,
    /// QMP `blockdev-add` of the prepared qcow2 overlay at `path` as node
    /// `node` (file node `file_node` inline, `backing: null`).
    /// Prerequisites: `path` exists (CreateOverlay). Probe: QEMU has `node`.
    /// Undo: `blockdev-del` of `node` when QEMU still has it.
    QmpBlockdevAdd {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        node: String,
        file_node: String,
        #[serde(with = "crate::pathser")]
        path: PathBuf,
    },
    /// Guest agent `guest-fsfreeze-freeze`. Probe: status `frozen`.
    /// Undo: thaw. On failure: maybe frozen; the undo thaws.
    AgentFreeze {
        #[serde(with = "crate::pathser")]
        agent: PathBuf,
    },
    /// Guest agent `guest-fsfreeze-thaw`; retriable. An agent socket
    /// nobody accepts on (its QEMU is gone) has no guest to thaw: done.
    /// Probe: not frozen.
    AgentThaw {
        #[serde(with = "crate::pathser")]
        agent: PathBuf,
    },
    /// QMP `stop` (only in plans whose guest was running). Probe: paused.
    /// Undo: `cont`; a QEMU that is gone (socket missing or refusing) is
    /// not paused, so there is nothing to resume.
    QmpStop {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
    },
    /// QMP `cont`; retriable. A QEMU that is gone (monitor socket missing
    /// or refusing) has nothing to resume: done. Probe: running.
    QmpCont {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
    },
    /// The pivot of a live external snapshot: ONE QMP `transaction` of
    /// `blockdev-snapshot` over every disk, atomic against guest I/O.
    /// Probe: every device's top node is its overlay (Applied), none is
    /// (NotApplied), otherwise or when QEMU cannot be asked: Unknown.
    /// Within its plan ([`probe_pivot`]), when QEMU is gone: decided from
    /// the overlays the plan's `QmpBlockdevAdd` steps name (any data
    /// cluster: Applied; none: NotApplied).
    QmpSnapshotTransaction {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        disks: Vec<crate::live::LiveDisk>,
    },
    /// The pivot of a live internal snapshot with memory: QMP
    /// `snapshot-save` job `job` (tag, vmstate node, device nodes).
    /// Probe: the tag is on every device (Applied), on none (NotApplied),
    /// else Unknown; a job still running in QEMU is waited for first.
    QmpSnapshotSave {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        job: String,
        tag: String,
        vmstate: String,
        devices: Vec<String>,
    },
    /// QMP `quit`: QEMU exits (`--halt`: the domain is shut off after the
    /// snapshot). Retriable: a monitor that no longer answers (socket
    /// missing or refusing) means done. Probe: Applied when no QEMU answers.
    QmpQuit {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
    },
    /// The memory state of the (paused) guest into `path`, a new file of
    /// mode 0600 (a temporary name: a later Rename moves it into place):
    /// QMP `getfd` `fdname` with the file's descriptor over the socket,
    /// `migrate` to `fd:<fdname>`, wait for `completed`, fsync.
    /// Probe: `path` starts with `QEVM` and QEMU's migration is completed.
    /// Undo: cancel a migration still going on, remove `path`.
    QmpMigrateToFile {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        fdname: String,
        #[serde(with = "crate::pathser")]
        path: PathBuf,
    },
    /// An external snapshot's files in one step, with one flush of the
    /// journal around it instead of two: [`Step::HardLink`] of `image` as
    /// `file`, then [`Step::CreateOverlay`] at `overlay` backed by `file`
    /// (`-F format`), then one fsync of the directories of `file` and
    /// `overlay` (one when they are the same). The overlay goes in under a
    /// temporary name, fsynced, then renamed to `overlay`, as in
    /// CreateOverlay: `overlay` exists only complete.
    /// Probe: Applied when both halves are. Undo: both halves' undo.
    ExternalFreeze {
        #[serde(with = "crate::pathser")]
        image: PathBuf,
        #[serde(with = "crate::pathser")]
        file: PathBuf,
        #[serde(with = "crate::pathser")]
        overlay: PathBuf,
        format: Format,
    },
    /// A new qcow2 overlay written onto the block device `device` (a
    /// `<disk type='block'>` target the caller made), backed by `backing`
    /// (`-F backing_format`): the device's first bytes are saved to `saved`
    /// (in the state directory) first, then the overlay's metadata is
    /// written over them ([`crate::device`]). Probe: the device starts
    /// with exactly that metadata. Undo: the saved bytes written back,
    /// then `saved` removed. After the pivot a `RemoveFile` of `saved`.
    OverlayOnDevice {
        #[serde(with = "crate::pathser")]
        device: PathBuf,
        #[serde(with = "crate::pathser")]
        backing: PathBuf,
        backing_format: Format,
        #[serde(with = "crate::pathser")]
        saved: PathBuf,
    },
    /// [`Step::QmpSnapshotSave`] that also names each device's image:
    /// `images[i]` is the qcow2 file of `devices[i]`. What lets recovery
    /// decide the pivot from the disks when QEMU is gone (DESIGN.md 10.1;
    /// a plan journaled with the older variant cannot be).
    /// Probe: through QMP as QmpSnapshotSave; when QEMU is gone, the tag in
    /// every image's snapshot table (Applied) or not (NotApplied: the
    /// partial entries are deleted by [`settle_pivot`]).
    QmpSnapshotSaveFiles {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        job: String,
        tag: String,
        vmstate: String,
        devices: Vec<String>,
        #[serde(with = "crate::pathser::vec")]
        images: Vec<PathBuf>,
    },
    /// QMP `snapshot-load` job (a running guest reverted to an internal
    /// snapshot with memory): the disks `devices` (node names) and the VM
    /// state (from node `vmstate`) back to snapshot `tag`. Only after the
    /// pivot: no undo, and loading again is idempotent (the same state).
    /// A job QEMU still has under `job` (vsnap died while it ran) is waited
    /// for first. With no QEMU answering (a host crash), the disks are
    /// reverted offline instead (`qemu-img snapshot -a` of each of
    /// `images`, by ID): the domain is left shut off on the snapshot's
    /// disks. Probe: NotApplied (never probed: it stands after the pivot).
    QmpSnapshotLoad {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        job: String,
        tag: String,
        vmstate: String,
        devices: Vec<String>,
        #[serde(with = "crate::pathser::vec")]
        images: Vec<PathBuf>,
    },
    /// Start a domain's QEMU, paused (`-S`), on the planned images
    /// ([`crate::launch::Launch`]: argv, monitor, log, pidfile, images all
    /// fixed when the plan is compiled). Prerequisites: no QEMU answers on
    /// the monitor. Effects on success: QEMU runs in a session of its own
    /// (it outlives vsnap), its pid in the pidfile, its monitor answers
    /// and `query-block` shows every planned image. On failure: nothing
    /// runs. Probe: the monitor answers and shows the planned images
    /// (Applied); no monitor and no live pidfile process (NotApplied);
    /// other images (Unknown). Undo: the pidfile's QEMU quits (QMP
    /// `quit`), else is killed.
    QemuLaunch { launch: crate::launch::Launch },
    /// The QEMU just started with `-incoming defer` loads the memory state
    /// in `path` ([`crate::launch::migrate_incoming`]: `getfd` `fdname`,
    /// `migrate-incoming fd:<fdname>`, wait for `completed`); the guest
    /// stays paused. Probe: the incoming migration completed. Undo:
    /// nothing of its own (the launch's undo ends that QEMU).
    QmpMigrateFromFile {
        #[serde(with = "crate::pathser")]
        qmp: PathBuf,
        fdname: String,
        #[serde(with = "crate::pathser")]
        path: PathBuf,
    },
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
            Step::QmpBlockdevAdd { .. } => "qmp-blockdev-add",
            Step::AgentFreeze { .. } => "agent-freeze",
            Step::AgentThaw { .. } => "agent-thaw",
            Step::QmpStop { .. } => "qmp-stop",
            Step::QmpCont { .. } => "qmp-cont",
            Step::QmpSnapshotTransaction { .. } => "qmp-transaction",
            Step::QmpSnapshotSave { .. } | Step::QmpSnapshotSaveFiles { .. } => "qmp-snapshot-save",
            Step::QmpQuit { .. } => "qmp-quit",
            Step::QmpMigrateToFile { .. } => "qmp-migrate-to-file",
            Step::ExternalFreeze { .. } => "external-freeze",
            Step::OverlayOnDevice { .. } => "overlay-on-device",
            Step::QmpSnapshotLoad { .. } => "qmp-snapshot-load",
            Step::QemuLaunch { .. } => "qemu-launch",
            Step::QmpMigrateFromFile { .. } => "qmp-migrate-from-file",
        }
    }

    /// Every path this step creates (or puts a file at), its temporary
    /// names included: the plan builder refuses a plan in which two steps
    /// create the same path, or a path the filesystem could not hold
    /// (a name over 255 bytes). Paths a step only modifies, reads or
    /// removes are not listed.
    pub fn created_paths(&self) -> Vec<PathBuf> {
        match self {
            Step::HardLink { dst, .. } => vec![dst.clone()],
            Step::CreateOverlay { path, .. } => {
                vec![path.clone(), fsops::temp_path(path, "part")]
            }
            Step::Clone { dst, .. } => vec![dst.clone()],
            Step::Rename { to, .. } => vec![to.clone()],
            Step::QmpMigrateToFile { path, .. } => vec![path.clone()],
            Step::ExternalFreeze { file, overlay, .. } => vec![
                file.clone(),
                overlay.clone(),
                fsops::temp_path(overlay, "part"),
            ],
            Step::OverlayOnDevice { saved, .. } => {
                vec![saved.clone(), fsops::temp_path(saved, "part")]
            }
            Step::InternalCreate { .. }
            | Step::InternalApply { .. }
            | Step::InternalDelete { .. }
            | Step::Rebase { .. }
            | Step::Commit { .. }
            | Step::RemoveFile { .. }
            | Step::Catalog
            | Step::QmpBlockdevAdd { .. }
            | Step::AgentFreeze { .. }
            | Step::AgentThaw { .. }
            | Step::QmpStop { .. }
            | Step::QmpCont { .. }
            | Step::QmpSnapshotTransaction { .. }
            | Step::QmpSnapshotSave { .. }
            | Step::QmpSnapshotSaveFiles { .. }
            | Step::QmpSnapshotLoad { .. }
            | Step::QmpQuit { .. }
            | Step::QemuLaunch { .. }
            | Step::QmpMigrateFromFile { .. } => Vec::new(),
        }
    }

    /// Whether `undo` exists (a step without one may only stand at or after the pivot).
    pub fn reversible(&self) -> bool {
        match self {
            Step::InternalDelete { .. }
            | Step::Commit { .. }
            | Step::RemoveFile { .. }
            | Step::AgentThaw { .. }
            | Step::QmpCont { .. }
            | Step::QmpSnapshotTransaction { .. }
            | Step::QmpSnapshotSave { .. }
            | Step::QmpSnapshotSaveFiles { .. }
            | Step::QmpSnapshotLoad { .. }
            | Step::QmpQuit { .. } => false,
            Step::Rename { replace, .. } => !replace,
            Step::Rebase { unsafe_, .. } => !unsafe_,
            _ => true,
        }
    }

    /// One line for `--dry-run` and `vsnap plan show`.
    pub fn describe(&self) -> String {
        match self {
            Step::InternalCreate { image, name } => {
                format!("create internal snapshot '{name}' in {}", image.display())
            }
            Step::InternalApply { image, name } => {
                format!("apply internal snapshot '{name}' to {}", image.display())
            }
            Step::InternalDelete { image, name } => {
                format!("delete internal snapshot '{name}' from {}", image.display())
            }
            Step::HardLink { src, dst } => {
                format!("hard-link {} as {}", src.display(), dst.display())
            }
            Step::CreateOverlay {
                path,
                backing,
                backing_format,
            } => format!(
                "create overlay {} backed by {} ({backing_format})",
                path.display(),
                backing.display()
            ),
            Step::Clone { src, dst, mode } => {
                let verb = match mode {
                    CloneMode::Reflink => "reflink",
                    CloneMode::Copy => "copy",
                };
                format!("{verb} {} to {}", src.display(), dst.display())
            }
            Step::Rename {
                from,
                to,
                replace: false,
            } => {
                format!("rename {} to {}", from.display(), to.display())
            }
            Step::Rename {
                from,
                to,
                replace: true,
            } => {
                format!(
                    "rename {} over {} (replacing it)",
                    from.display(),
                    to.display()
                )
            }
            Step::Rebase {
                image,
                format,
                new_backing,
                old_backing: _,
                unsafe_,
            } => {
                let onto = match new_backing {
                    Some((b, f)) => format!("{} ({f})", b.display()),
                    None => "no backing file".to_string(),
                };
                let how = if *unsafe_ {
                    "unsafe: header only"
                } else {
                    "safe: data pulled up"
                };
                format!("rebase {} ({format}) onto {onto} ({how})", image.display())
            }
            Step::Commit { image, format } => {
                format!(
                    "commit {} ({format}) into its backing file",
                    image.display()
                )
            }
            Step::RemoveFile { path } => format!("remove {}", path.display()),
            Step::Catalog => "write the catalog".to_string(),
            Step::QmpBlockdevAdd {
                qmp, node, path, ..
            } => {
                format!(
                    "QMP {}: blockdev-add {} as node {node}",
                    qmp.display(),
                    path.display()
                )
            }
            Step::AgentFreeze { agent } => {
                format!("agent {}: freeze the guest's filesystems", agent.display())
            }
            Step::AgentThaw { agent } => {
                format!("agent {}: thaw the guest's filesystems", agent.display())
            }
            Step::QmpStop { qmp } => format!("QMP {}: pause the guest (stop)", qmp.display()),
            Step::QmpCont { qmp } => format!("QMP {}: resume the guest (cont)", qmp.display()),
            Step::QmpSnapshotTransaction { qmp, disks } => format!(
                "QMP {}: one transaction of blockdev-snapshot switching {}",
                qmp.display(),
                disks
                    .iter()
                    .map(|d| format!("{} -> {}", d.node, d.overlay))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Step::QmpSnapshotSave {
                qmp,
                tag,
                vmstate,
                devices,
                ..
            }
            | Step::QmpSnapshotSaveFiles {
                qmp,
                tag,
                vmstate,
                devices,
                ..
            } => format!(
                "QMP {}: snapshot-save {tag:?} (memory in {vmstate}; disks {})",
                qmp.display(),
                devices.join(", ")
            ),
            Step::QmpQuit { qmp } => format!("QMP {}: QEMU quits", qmp.display()),
            Step::QmpMigrateFromFile { qmp, path, .. } => format!(
                "QMP {}: load the memory state {} (migrate-incoming)",
                qmp.display(),
                path.display()
            ),
            Step::QemuLaunch { launch } => format!(
                "start QEMU {} paused, monitor {}, on {} (log {})",
                launch.program.display(),
                launch.qmp.display(),
                launch
                    .images
                    .iter()
                    .map(|b| format!("{}={}", b.target, b.path.display()))
                    .collect::<Vec<_>>()
                    .join(", "),
                launch.log.display()
            ),
            Step::QmpMigrateToFile { qmp, path, .. } => format!(
                "QMP {}: memory state (migration stream) to {}",
                qmp.display(),
                path.display()
            ),
            Step::ExternalFreeze {
                image,
                file,
                overlay,
                format,
            } => format!(
                "hard-link {} as {}, then create overlay {} backed by it ({format})",
                image.display(),
                file.display(),
                overlay.display()
            ),
            Step::OverlayOnDevice {
                device,
                backing,
                backing_format,
                saved,
            } => format!(
                "write overlay onto block device {} backed by {} ({backing_format}); its first bytes saved to {}",
                device.display(),
                backing.display(),
                saved.display()
            ),
            Step::QmpSnapshotLoad {
                qmp,
                tag,
                vmstate,
                devices,
                ..
            } => format!(
                "QMP {}: snapshot-load {tag:?} (memory from {vmstate}; disks {})",
                qmp.display(),
                devices.join(", ")
            ),
        }
    }

    /// An [`Step::ExternalFreeze`]'s two halves, as the steps they are
    /// (the link, then the overlay); `None` for any other step.
    fn freeze_halves(&self) -> Option<[Step; 2]> {
        let Step::ExternalFreeze {
            image,
            file,
            overlay,
            format,
        } = self
        else {
            return None;
        };
        Some([
            Step::HardLink {
                src: image.clone(),
                dst: file.clone(),
            },
            Step::CreateOverlay {
                path: overlay.clone(),
                backing: file.clone(),
                backing_format: *format,
            },
        ])
    }

    pub fn probe(&self, cx: &Cx) -> StepResult<Probe> {
        let _ = cx;
        match self {
            Step::InternalCreate { image, name } => {
                if !fsops::exists(image)? {
                    return Ok(Probe::NotApplied);
                }
                let names = qemu_img::snapshot_names(image, true)?;
                Ok(if names.iter().any(|n| n == name) {
                    Probe::Applied
                } else {
                    Probe::NotApplied
                })
            }
            Step::InternalApply { .. } => Ok(Probe::Unknown(
                "applying an internal snapshot leaves no trace to probe".to_string(),
            )),
            Step::InternalDelete { image, name } => {
                if !fsops::exists(image)? {
                    return Ok(Probe::Applied);
                }
                let names = qemu_img::snapshot_names(image, true)?;
                Ok(if names.iter().any(|n| n == name) {
                    Probe::NotApplied
                } else {
                    Probe::Applied
                })
            }
            Step::HardLink { src, dst } => Ok(if fsops::same_inode(src, dst)? {
                Probe::Applied
            } else {
                Probe::NotApplied
            }),
            Step::CreateOverlay {
                path,
                backing,
                backing_format: _,
            } => {
                if !fsops::exists(path)? {
                    return Ok(Probe::NotApplied);
                }
                match qemu_img::image_info(path, Format::Qcow2, true) {
                    Ok(info) => Ok(match info.backing {
                        Some(b) if same_path(&b, backing) => Probe::Applied,
                        _ => Probe::NotApplied,
                    }),
                    Err(e) => Ok(Probe::Unknown(format!(
                        "{} exists but is not a readable qcow2 image: {e}",
                        path.display()
                    ))),
                }
            }
            Step::Clone { src, dst, mode: _ } => {
                let dm = match std::fs::symlink_metadata(dst) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Probe::NotApplied)
                    }
                    Err(e) => return Err(fsops::io_err("stat", dst, e)),
                };
                let sm = match std::fs::metadata(src) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Probe::Unknown(format!(
                            "{} exists but its source {} is gone",
                            dst.display(),
                            src.display()
                        )))
                    }
                    Err(e) => return Err(fsops::io_err("stat", src, e)),
                };
                Ok(if dm.is_file() && dm.len() == sm.len() {
                    Probe::Applied
                } else {
                    Probe::NotApplied
                })
            }
            Step::Rename {
                from,
                to,
                replace: _,
            } => match (fsops::exists(from)?, fsops::exists(to)?) {
                (false, true) if !fsops::is_ours(to) => Ok(Probe::Unknown(format!(
                    "{} is not the file vsnap renamed there ({})",
                    to.display(),
                    fsops::verify_ours(to)
                        .err()
                        .map_or(String::new(), |e| e.to_string())
                ))),
                (false, true) => Ok(Probe::Applied),
                (true, _) => Ok(Probe::NotApplied),
                (false, false) => Ok(Probe::Unknown(format!(
                    "neither {} nor {} exists",
                    from.display(),
                    to.display()
                ))),
            },
            Step::Rebase {
                image,
                format,
                new_backing,
                ..
            } => {
                if !fsops::exists(image)? {
                    return Ok(Probe::Unknown(format!(
                        "{} does not exist",
                        image.display()
                    )));
                }
                let info = qemu_img::image_info(image, *format, true)?;
                Ok(
                    if backing_is(&info, new_backing.as_ref().map(|(p, _)| p.as_path())) {
                        Probe::Applied
                    } else {
                        Probe::NotApplied
                    },
                )
            }
            Step::Commit { .. } => Ok(Probe::Unknown(
                "a commit leaves no trace to probe".to_string(),
            )),
            Step::RemoveFile { path } => Ok(if fsops::exists(path)? {
                Probe::NotApplied
            } else {
                Probe::Applied
            }),
            Step::Catalog => Ok(Probe::NotApplied),
            Step::QmpBlockdevAdd { qmp, node, .. } => crate::live::blockdev_add_probe(qmp, node),
            Step::AgentFreeze { agent } => Ok(if crate::live::frozen(agent)? {
                Probe::Applied
            } else {
                Probe::NotApplied
            }),
            Step::AgentThaw { agent } => Ok(if crate::live::frozen(agent)? {
                Probe::NotApplied
            } else {
                Probe::Applied
            }),
            Step::QmpStop { qmp } => Ok(if crate::live::running(qmp)? {
                Probe::NotApplied
            } else {
                Probe::Applied
            }),
            Step::QmpCont { qmp } => Ok(if crate::live::running(qmp)? {
                Probe::Applied
            } else {
                Probe::NotApplied
            }),
            Step::QmpSnapshotTransaction { qmp, disks } => {
                crate::live::transaction_probe(qmp, disks)
            }
            Step::QmpSnapshotSave {
                qmp,
                job,
                tag,
                devices,
                ..
            } => crate::live::snapshot_save_probe(qmp, job, tag, devices),
            Step::QmpSnapshotSaveFiles {
                qmp,
                job,
                tag,
                devices,
                images,
                ..
            } => {
                if crate::live::gone(qmp)? {
                    return Ok(crate::live::snapshot_save_probe_files(tag, images));
                }
                crate::live::snapshot_save_probe(qmp, job, tag, devices)
            }
            Step::QmpMigrateToFile { qmp, path, .. } => {
                crate::live::migrate_to_file_probe(qmp, path)
            }
            Step::QmpQuit { qmp } => Ok(if crate::live::gone(qmp)? {
                Probe::Applied
            } else {
                Probe::NotApplied
            }),
            Step::QemuLaunch { launch } => launch.probe(),
            Step::QmpMigrateFromFile { qmp, .. } => crate::launch::migrate_incoming_probe(qmp),
            Step::ExternalFreeze { .. } => {
                let [link, create] = self.freeze_halves().expect("an ExternalFreeze");
                Ok(match (link.probe(cx)?, create.probe(cx)?) {
                    (Probe::Applied, Probe::Applied) => Probe::Applied,
                    (Probe::Unknown(why), _) | (_, Probe::Unknown(why)) => Probe::Unknown(why),
                    _ => Probe::NotApplied,
                })
            }
            Step::OverlayOnDevice {
                device,
                backing,
                backing_format,
                ..
            } => crate::device::probe(device, backing, *backing_format),
            Step::QmpSnapshotLoad { .. } => Ok(Probe::NotApplied),
        }
    }

    /// Idempotent.
    pub fn apply(&self, cx: &Cx) -> StepResult<()> {
        match self {
            Step::InternalCreate { image, name } => {
                if has_internal(image, name)? {
                    return Ok(());
                }
                failpoint::hit("step.internal.before");
                snapshot_nofollow(image, SnapshotOp::Create, name)
            }
            Step::InternalApply { image, name } => {
                failpoint::hit("step.internal.before");
                snapshot_nofollow(image, SnapshotOp::Apply, name)?;
                if cx.resumed {
                    // A killed `snapshot -a` leaves leaked clusters (QEMU
                    // raises the snapshot's refcounts before it switches
                    // the L1 table, and frees the old ones after).
                    repair_after_snapshot(image)?;
                }
                Ok(())
            }
            Step::InternalDelete { image, name } => {
                if fsops::exists(image)? && !has_internal(image, name)? {
                    // Deleted already (a retry, or recovery rolling
                    // forward): by a qemu-img that may have been killed
                    // before it freed every cluster.
                    return repair_after_snapshot(image).map(drop);
                }
                delete_internal_if_present(image, name)
            }
            Step::HardLink { src, dst } => {
                link_or_same(src, dst)?;
                failpoint::hit("step.hard-link.before-dirsync");
                fsops::fsync_parent(dst)
            }
            Step::CreateOverlay {
                path,
                backing,
                backing_format,
            } => {
                overlay_in_place(path, backing, *backing_format)?;
                failpoint::hit("step.create-overlay.before-dirsync");
                fsops::fsync_parent(path)
            }
            Step::Clone { src, dst, mode } => {
                // the source first: a failure must not cost the old dst
                fsops::verify_ours(src)?;
                if fsops::unlink_ours(dst)? {
                    fsops::fsync_parent(dst)?;
                }
                match mode {
                    CloneMode::Reflink => clone::reflink(src, dst),
                    CloneMode::Copy => clone::copy(src, dst, cx.progress),
                }
            }
            Step::Rename {
                from,
                to,
                replace: false,
            } => {
                if !fsops::exists(from)? && fsops::exists(to)? {
                    // done already (a crash may have hit before the dirsync)
                    return fsync_dirs(from, to);
                }
                // The inode checked and held open is what gets the new
                // name, whatever `from` holds by then.
                let f = fsops::open_ours(from, true)?;
                fsops::link_fd(&f, from, to)?;
                fsops::unlink_ours(from)?;
                failpoint::hit("step.rename.before-dirsync");
                fsync_dirs(from, to)
            }
            Step::Rename {
                from,
                to,
                replace: true,
            } => {
                if !fsops::exists(from)? && fsops::exists(to)? {
                    fsops::verify_ours(to)?;
                    return fsync_dirs(from, to);
                }
                fsops::rename_ours(from, to)?;
                failpoint::hit("step.rename.before-dirsync");
                fsync_dirs(from, to)
            }
            Step::Rebase {
                image,
                format,
                new_backing,
                old_backing: _,
                unsafe_,
            } => {
                let new = new_backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                if fsops::exists(image)?
                    && backing_is(
                        &qemu_img::image_info(image, *format, true)?,
                        new.map(|(p, _)| p),
                    )
                {
                    return Ok(());
                }
                failpoint::hit("step.rebase.before");
                rebase_nofollow(image, *format, new, *unsafe_)
            }
            Step::Commit { image, format } => qemu_img::commit(image, *format),
            Step::RemoveFile { path } => {
                if fsops::unlink_if_exists(path)? {
                    failpoint::hit("step.remove-file.before-dirsync");
                }
                fsops::fsync_parent(path)
            }
            Step::Catalog => Ok(()),
            Step::QmpBlockdevAdd {
                qmp,
                node,
                file_node,
                path,
            } => crate::live::blockdev_add(qmp, node, file_node, path),
            Step::AgentFreeze { agent } => crate::live::freeze(agent),
            Step::AgentThaw { agent } => crate::live::thaw(agent),
            Step::QmpStop { qmp } => crate::live::stop(qmp),
            // A QEMU that is gone has no guest to resume (DESIGN.md 10.1).
            Step::QmpCont { qmp } => crate::live::cont_unless_gone(qmp),
            Step::QmpSnapshotTransaction { qmp, disks } => crate::live::transaction(qmp, disks),
            Step::QmpSnapshotSave {
                qmp,
                job,
                tag,
                vmstate,
                devices,
            }
            | Step::QmpSnapshotSaveFiles {
                qmp,
                job,
                tag,
                vmstate,
                devices,
                ..
            } => crate::live::snapshot_save(qmp, job, tag, vmstate, devices),
            Step::QmpQuit { qmp } => crate::live::quit(qmp),
            Step::QemuLaunch { launch } => launch.apply(),
            Step::QmpMigrateFromFile { qmp, fdname, path } => {
                crate::launch::migrate_incoming(qmp, fdname, path)
            }
            Step::QmpMigrateToFile { qmp, fdname, path } => {
                crate::live::migrate_to_file(qmp, fdname, path)
            }
            Step::ExternalFreeze {
                image,
                file,
                overlay,
                format,
            } => {
                link_or_same(image, file)?;
                failpoint::hit("step.external-freeze.linked");
                overlay_in_place(overlay, file, *format)?;
                failpoint::hit("step.external-freeze.before-dirsync");
                // One fsync covers the link and the overlay's rename when
                // they share a directory (the default).
                fsync_dirs(file, overlay)
            }
            Step::OverlayOnDevice {
                device,
                backing,
                backing_format,
                saved,
            } => crate::device::apply(device, backing, *backing_format, saved),
            Step::QmpSnapshotLoad {
                qmp,
                job,
                tag,
                vmstate,
                devices,
                images,
            } => crate::live::snapshot_load(qmp, job, tag, vmstate, devices, images),
        }
    }

    /// [`Step::undo`], and what the undo had to repair besides, for the
    /// plan's report (an [`Step::InternalCreate`] whose `qemu-img` was cut
    /// short: leaked clusters and refcounts, freed with `qemu-img check -r`).
    pub fn undo_noted(&self, cx: &Cx) -> StepResult<Option<String>> {
        match self {
            Step::InternalCreate { image, name } => undo_internal_create(image, name),
            _ => self.undo(cx).map(|()| None),
        }
    }

    /// Idempotent; `Err(StepError::Invalid)` for an irreversible step.
    pub fn undo(&self, cx: &Cx) -> StepResult<()> {
        let _ = cx;
        if !self.reversible() {
            return Err(StepError::Invalid(format!(
                "step {} cannot be undone ({})",
                self.name(),
                self.describe()
            )));
        }
        match self {
            Step::InternalCreate { image, name } => undo_internal_create(image, name).map(drop),
            // the plan removes the temporary copy it applied the snapshot to
            Step::InternalApply { .. } => Ok(()),
            Step::HardLink { src, dst } => {
                if fsops::same_inode(src, dst)? {
                    fsops::unlink_if_exists(dst)?;
                }
                fsops::fsync_parent(dst)
            }
            Step::CreateOverlay { path, .. } => {
                fsops::unlink_ours(path)?;
                fsops::unlink_ours(&fsops::temp_path(path, "part"))?;
                fsops::fsync_parent(path)
            }
            Step::Clone { dst, .. } => {
                fsops::unlink_ours(dst)?;
                fsops::fsync_parent(dst)
            }
            Step::Rename {
                from,
                to,
                replace: false,
            } => {
                if fsops::exists(to)? && !fsops::exists(from)? {
                    let f = fsops::open_ours(to, true)?;
                    fsops::link_fd(&f, to, from)?;
                    fsops::unlink_ours(to)?;
                } else if fsops::same_inode(from, to)? {
                    // a crash between link and unlink (of apply or of undo)
                    fsops::unlink_if_exists(to)?;
                }
                fsync_dirs(from, to)
            }
            Step::Rebase {
                image,
                format,
                old_backing,
                ..
            } => {
                let old = old_backing.as_ref().map(|(p, f)| (p.as_path(), *f));
                if backing_is(
                    &qemu_img::image_info(image, *format, true)?,
                    old.map(|(p, _)| p),
                ) {
                    return Ok(());
                }
                rebase_nofollow(image, *format, old, true)
            }
            Step::Catalog => Ok(()),
            Step::QmpBlockdevAdd { qmp, node, .. } => crate::live::blockdev_del(qmp, node),
            Step::AgentFreeze { agent } => crate::live::thaw(agent),
            Step::QmpStop { qmp } => crate::live::cont_unless_gone(qmp),
            Step::QmpMigrateToFile { qmp, fdname, path } => {
                crate::live::migrate_to_file_undo(qmp, fdname, path)
            }
            Step::ExternalFreeze { .. } => {
                let [link, create] = self.freeze_halves().expect("an ExternalFreeze");
                create.undo(cx)?;
                link.undo(cx)
            }
            Step::OverlayOnDevice { device, saved, .. } => crate::device::undo(device, saved),
            Step::QemuLaunch { launch } => launch.undo(),
            Step::QmpMigrateFromFile { .. } => Ok(()),
            Step::AgentThaw { .. }
            | Step::QmpCont { .. }
            | Step::QmpSnapshotTransaction { .. }
            | Step::QmpSnapshotSave { .. }
            | Step::QmpSnapshotSaveFiles { .. }
            | Step::QmpSnapshotLoad { .. }
            | Step::QmpQuit { .. } => unreachable!("irreversible steps return above"),
            Step::InternalDelete { .. }
            | Step::Commit { .. }
            | Step::RemoveFile { .. }
            | Step::Rename { replace: true, .. } => unreachable!("irreversible steps return above"),
        }
    }
}

/// A new qcow2 overlay at `path` backed by `backing` (absolute): written
/// natively into a temporary name of ours (created O_EXCL), fsynced, then
/// renamed to `path`. The caller fsyncs the directory.
fn overlay_in_place(path: &Path, backing: &Path, backing_format: Format) -> StepResult<()> {
    if !backing.is_absolute() {
        return Err(StepError::Invalid(format!(
            "backing file {} of overlay {} must be an absolute path",
            backing.display(),
            path.display()
        )));
    }
    let temp = fsops::temp_path(path, "part");
    fsops::unlink_ours(path)?;
    fsops::unlink_ours(&temp)?;
    // Ours, new, not a symlink planted there; qemu-img writes into this
    // very file through its descriptor (/proc/self/fd/N), never through a
    // name someone could replace meanwhile.
    let f = fsops::create_excl(&temp)?;
    if let Err(e) = qemu_img::create_overlay_fd(&f, &temp, backing, backing_format) {
        drop(f);
        let _ = fsops::unlink_ours(&temp).and_then(|_| fsops::fsync_parent(&temp));
        return Err(e);
    }
    f.sync_all().map_err(|e| fsops::io_err("fsync", &temp, e))?;
    drop(f);
    failpoint::hit("step.create-overlay.before-rename");
    fsops::rename_ours(&temp, path)
}

/// `link(src, dst)`; an existing `dst` that is already `src` is fine,
/// anything else there is an error (never clobbered). `src` is opened
/// without following a link and linked by its descriptor: a symlink put at
/// `src` is refused, never linked.
fn link_or_same(src: &Path, dst: &Path) -> StepResult<()> {
    let f = fsops::open_ours(src, true)?;
    fsops::link_fd(&f, src, dst)
}

/// fsync the directories of `a` and `b` (once when they are the same).
fn fsync_dirs(a: &Path, b: &Path) -> StepResult<()> {
    let (da, db) = (fsops::parent_dir(a), fsops::parent_dir(b));
    fsops::fsync_dir(db)?;
    if da != db {
        fsops::fsync_dir(da)?;
    }
    Ok(())
}

/// `p` resolved through symlinks as far as it exists (a missing last
/// component is joined to its resolved directory).
fn canonical(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| p.to_path_buf()),
        _ => p.to_path_buf(),
    }
}

/// Whether two paths name the same file (compared canonicalized).
fn same_path(a: &Path, b: &Path) -> bool {
    a == b || canonical(a) == canonical(b)
}

/// Whether an image's backing file is `want` (None: no backing file).
fn backing_is(info: &qemu_img::ImageInfo, want: Option<&Path>) -> bool {
    match (&info.backing, want) {
        (None, None) => true,
        (Some(have), Some(want)) => same_path(have, want),
        _ => false,
    }
}

// --- the pivot within its plan: a QEMU that is gone (DESIGN.md 10.1) ------

/// The overlay files of a [`Step::QmpSnapshotTransaction`]'s disks, from
/// the `QmpBlockdevAdd` steps of the same plan (by node name), in the
/// transaction's order; `Err(node)` for a node no step added.
fn transaction_overlays(
    steps: &[Step],
    disks: &[crate::live::LiveDisk],
) -> Result<Vec<PathBuf>, String> {
    disks
        .iter()
        .map(|d| {
            steps
                .iter()
                .find_map(|s| match s {
                    Step::QmpBlockdevAdd { node, path, .. } if *node == d.overlay => {
                        Some(path.clone())
                    }
                    _ => None,
                })
                .ok_or_else(|| d.overlay.clone())
        })
        .collect()
}

/// The image an overlay of the plan was made on, with its format as the
/// plan recorded it (the overlay's creating step); None when the plan did
/// not make the overlay (`--reuse-external`).
fn overlay_backing(steps: &[Step], overlay: &Path) -> Option<(PathBuf, Format)> {
    steps.iter().find_map(|s| match s {
        Step::CreateOverlay {
            path,
            backing,
            backing_format,
        } if path == overlay => Some((backing.clone(), *backing_format)),
        Step::OverlayOnDevice {
            device,
            backing,
            backing_format,
            ..
        } if device == overlay => Some((backing.clone(), *backing_format)),
        Step::ExternalFreeze {
            file,
            overlay: o,
            format,
            ..
        } if o == overlay => Some((file.clone(), *format)),
        _ => None,
    })
}

/// The probe of the pivot `steps[pivot]` within its plan: [`Step::probe`],
/// except that a QMP pivot whose QEMU is gone (its monitor socket missing
/// or refusing connections, [`crate::live::gone`]) is decided from the
/// files (DESIGN.md 10.1): a live `transaction` from the overlays the
/// plan added ([`crate::live::transaction_probe_files`]), a
/// `snapshot-save` from the disks' snapshot tables
/// ([`Step::QmpSnapshotSaveFiles`]). A QEMU that answers is asked, as
/// before; one that answers something odd stays Unknown.
pub fn probe_pivot(steps: &[Step], pivot: usize, cx: &Cx) -> StepResult<Probe> {
    let step = &steps[pivot];
    if let Step::QmpSnapshotTransaction { qmp, disks } = step {
        if crate::live::gone(qmp)? {
            return Ok(match transaction_overlays(&steps[..pivot], disks) {
                Ok(overlays) => crate::live::transaction_probe_files(&overlays),
                Err(node) => Probe::Unknown(format!(
                    "QEMU is gone ({} refuses connections or is missing), and no step of \
                     the plan names the file of overlay node {node}",
                    qmp.display()
                )),
            });
        }
    }
    step.probe(cx)
}

/// Whether the pivot `step` is a QMP one whose QEMU is gone, so that
/// [`probe_pivot`] decides it from the files (for the recovery report).
pub fn pivot_decided_from_files(step: &Step) -> bool {
    match step {
        Step::QmpSnapshotTransaction { qmp, .. } | Step::QmpSnapshotSaveFiles { qmp, .. } => {
            crate::live::gone(qmp).unwrap_or(false)
        }
        _ => false,
    }
}

/// What recovery does to the files once [`probe_pivot`] decided a QMP
/// pivot of a QEMU that is gone (`applied`: forward), before it rolls
/// forward or back; nothing while QEMU answers. Idempotent (a recovery
/// killed here probes again and decides the same).
///
/// - `snapshot-save` rolled back: the partial entries it left are deleted
///   (offline `qemu-img snapshot -d`; refused while a process holds an
///   image).
/// - Leaked clusters: a QEMU killed mid-write leaves clusters it
///   allocated and never referenced (and a `snapshot-save` cut short, its
///   whole memory state) in the images it had open. Recovery frees them
///   (`qemu-img check -r leaks`) in the qcow2 images the domain will run
///   on: forward, the overlays; back, the images the overlays were made
///   on; a `snapshot-save`, every disk. Only when no process holds the
///   image (QEMU's image locks) and `qemu-img check` finds leaks and
///   nothing worse; corruption is left for `vsnap domain check` to
///   report, never repaired blindly.
///
/// Returns one line per change, for the recovery report.
pub fn settle_pivot(steps: &[Step], pivot: usize, applied: bool) -> StepResult<Vec<String>> {
    let mut notes = Vec::new();
    let mut repair: Vec<PathBuf> = Vec::new();
    match &steps[pivot] {
        Step::QmpSnapshotTransaction { qmp, disks } => {
            if !crate::live::gone(qmp)? {
                return Ok(notes);
            }
            let Ok(overlays) = transaction_overlays(&steps[..pivot], disks) else {
                return Ok(notes);
            };
            if applied {
                repair = overlays;
            } else {
                repair = overlays
                    .iter()
                    .filter_map(|o| overlay_backing(&steps[..pivot], o))
                    .filter(|(_, f)| *f == Format::Qcow2)
                    .map(|(b, _)| b)
                    .collect();
            }
        }
        Step::QmpSnapshotSaveFiles {
            qmp, tag, images, ..
        } => {
            if !crate::live::gone(qmp)? {
                return Ok(notes);
            }
            if !applied {
                for i in crate::live::snapshot_save_discard_offline(tag, images)? {
                    notes.push(format!(
                        "deleted the partial internal snapshot {tag:?} from {} (QEMU died during snapshot-save)",
                        i.display()
                    ));
                }
            }
            repair = images.clone();
        }
        _ => {}
    }
    for image in repair {
        if let Some(n) = repair_leaks_offline(&image)? {
            notes.push(n);
        }
    }
    Ok(notes)
}

/// `qemu-img check -r leaks` of the qcow2 `image` when it exists, no
/// process holds it, and its check finds leaked clusters and nothing
/// worse. Returns what was freed.
fn repair_leaks_offline(image: &Path) -> StepResult<Option<String>> {
    if !fsops::exists(image)? || qcow2::qemu_holds(image).unwrap_or(true) {
        return Ok(None);
    }
    let dirty = qcow2::read(image).is_ok_and(|h| h.incompatible & qcow2::INCOMPAT_DIRTY != 0);
    let before = qemu_img::check(image, Format::Qcow2)?;
    if before.clean || before.corruptions > 0 || before.leaks == 0 || dirty {
        return Ok(None);
    }
    let after = match qemu_img::repair(image, false) {
        Ok(a) => a,
        // A process opened it meanwhile (qemu-img takes the write lock):
        // its leaks are left, as any running image's are.
        Err(StepError::InUse { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(format!(
        "freed {} leaked cluster(s) in {} (QEMU was killed with it open; `qemu-img check -r leaks`{})",
        before.leaks,
        image.display(),
        if after.clean { "; now clean" } else { "; not clean yet" }
    )))
}
