//! Volume snapshots: compile create / revert / delete into plans, and the
//! read-only queries a manager needs.
//!
//! **A volume is named by its path, and that path stays its active image.**
//! An external snapshot hard-links the image to the frozen name and builds
//! a new overlay backed by it under a temporary name (one step,
//! `ExternalFreeze`), then renames the overlay over the path (the pivot):
//! at every instant the path is a whole chain.
//! Reverts build the reverted state under a temporary name and rename it
//! over the path, except to an internal snapshot: `qemu-img snapshot -a`
//! in place after the pivot (the catalog write comes first; re-applying
//! gives the same state, so a crash is rolled forward; a re-applied step
//! repairs the leaked clusters a killed `qemu-img` leaves). Whole-file snapshots (reflink, copy) clone to a
//! temporary name and move it to the snapshot's name.

use crate::catalog::{self, SnapKind, VolSnapshot, VolumeRec};
use crate::plan::{self, Plan};
use crate::{now_unix, validate_name, Engine, EngineError, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use vsnap_steps::{clone, fsops, qemu_img, CloneMode, Format, Step};

/// Create a snapshot of one volume.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    /// The disk image, by the path it is used under.
    pub image: PathBuf,
    /// Default: the creation time in seconds, as libvirt does; when that
    /// name is in use, `<seconds>-1`, `-2`, ...
    pub name: Option<String>,
    /// Default: the kind of the volume's existing snapshots; else internal
    /// for qcow2, reflink (where the filesystem can) or copy for raw.
    pub kind: Option<SnapKind>,
    /// Where the frozen state (external) or clone (reflink/copy) goes.
    /// Default: beside the image, `<stem>.<name>.<ext>`.
    pub file: Option<PathBuf>,
    /// Free text kept with the snapshot.
    pub description: Option<String>,
    /// The image's format (`--format`), needed the first time vsnap sees
    /// an image whose name does not state it (see `image.rs`); vsnap
    /// never guesses it from the image's bytes.
    pub format: Option<Format>,
}

/// What a caller asks besides (or instead of) a `<volsnapshot>` document:
/// the command line's options, typed. A field left `None` leaves the
/// document's choice (or vsnap's default) alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolSnapFlags {
    /// Wins over the document's `<name>`.
    pub name: Option<String>,
    /// Wins over the document's `<description>`.
    pub description: Option<String>,
    /// Wins over the document's `<kind>`.
    pub kind: Option<SnapKind>,
    /// Wins over the document's `<file>`.
    pub file: Option<PathBuf>,
    /// The image's format (the document has none); see
    /// [`CreateRequest::format`].
    pub format: Option<Format>,
}

impl CreateRequest {
    /// The request for `image`: the `<volsnapshot>` document `xml`, if
    /// any, read with [`crate::xml::parse_volsnapshot`], merged with
    /// `flags`, which win field by field (name, description, kind, file).
    ///
    /// Needs nothing but the text: it reads no catalog and no image, and
    /// changes nothing. Fails only when `xml` is not a `<volsnapshot>`
    /// vsnap accepts ([`EngineError::Xml`], saying why). Whether the
    /// image, the name and the kind fit is checked by
    /// [`Engine::plan_vol_create`], not here.
    pub fn new(image: &Path, xml: Option<&str>, flags: VolSnapFlags) -> Result<CreateRequest> {
        let spec = match xml {
            Some(text) => crate::volxml::parse_volsnapshot(text)?,
            None => crate::volxml::VolSnapshotSpec::default(),
        };
        Ok(CreateRequest {
            image: image.to_path_buf(),
            name: flags.name.or(spec.name),
            kind: flags.kind.or(spec.kind),
            file: flags.file.or(spec.file),
            description: flags.description.or(spec.description),
            format: flags.format,
        })
    }
}

/// Revert a volume to one of its snapshots.
#[derive(Clone, Debug, Default)]
pub struct RevertRequest {
    /// The disk image, by the path it is used under.
    pub image: PathBuf,
    /// The snapshot to revert to.
    pub name: String,
}

/// Delete a volume snapshot.
#[derive(Clone, Debug, Default)]
pub struct DeleteRequest {
    /// The disk image, by the path it is used under.
    pub image: PathBuf,
    /// The snapshot to delete.
    pub name: String,
    /// Delete the snapshot's whole subtree instead of re-parenting children.
    pub children: bool,
}

/// The result of a volume operation.
#[derive(Clone, Debug, Serialize)]
pub struct Done {
    /// The journal's plan id (None for a dry run).
    pub plan: Option<u64>,
    /// The compiled plan, one line per step.
    pub plan_text: String,
    /// The snapshot created, reverted to, or deleted.
    pub snapshot: VolSnapshot,
    /// Snapshots deleted with it (`--children`).
    pub deleted: Vec<String>,
    /// Whether this was a dry run (nothing changed).
    pub dry_run: bool,
}

/// Free space an internal snapshot needs beyond its L1 table: refcount
/// blocks, the snapshot table, and a margin (qemu-img does not say).
const INTERNAL_HEADROOM_BYTES: u64 = 4 << 20;

/// A short, unique tag for temporary names of one plan.
fn temp_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{:x}", nanos ^ ((std::process::id() as u64) << 40))
}

fn canonical_image(image: &Path) -> Result<PathBuf> {
    let p = std::fs::canonicalize(image).map_err(|_| EngineError::NoImage(image.to_path_buf()))?;
    let meta = std::fs::metadata(&p).map_err(|_| EngineError::NoImage(image.to_path_buf()))?;
    if !meta.is_file() {
        return Err(EngineError::not_supported(format!(
            "{} is not a regular file; vsnap snapshots image files (qcow2 or raw)",
            p.display()
        )));
    }
    Ok(p)
}

fn parent_dir(p: &Path) -> PathBuf {
    p.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

pub(crate) fn check_writable(dir: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| EngineError::bad_request(format!("path {} contains NUL", dir.display())))?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(EngineError::ReadOnly(dir.to_path_buf()));
    }
    Ok(())
}

fn must_not_exist(p: &Path) -> Result<()> {
    if std::fs::symlink_metadata(p).is_ok() {
        return Err(EngineError::Exists {
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// `<dir>/<stem>.<name>.<ext>` beside the image (bytes: a stem that is
/// not UTF-8 is kept as it is).
fn default_file(image: &Path, name: &str, format: Format) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut f = image
        .file_stem()
        .map(|s| s.as_bytes().to_vec())
        .unwrap_or_default();
    f.push(b'.');
    f.extend_from_slice(name.as_bytes());
    f.push(b'.');
    match image.extension() {
        Some(e) => f.extend_from_slice(e.as_bytes()),
        None => f.extend_from_slice(format.as_str().as_bytes()),
    }
    parent_dir(image).join(std::ffi::OsString::from_vec(f))
}

/// Resolve a user's `--file`: absolute, its directory canonical.
fn user_file(file: &Path) -> Result<PathBuf> {
    let abs = if file.is_absolute() {
        file.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| EngineError::io(format!("cannot read the current directory: {e}")))?
            .join(file)
    };
    let name = abs.file_name().ok_or_else(|| {
        EngineError::bad_request(format!("--file {} names no file", file.display()))
    })?;
    not_a_temp_name(&abs, "--file")?;
    let dir = std::fs::canonicalize(parent_dir(&abs)).map_err(|e| {
        let kind = crate::RefusalKind::of_io(&e);
        EngineError::refused(
            kind,
            format!("directory of --file {} is not usable: {e}", file.display()),
        )
    })?;
    Ok(dir.join(name))
}

/// A file the user names (`--file`, `--disk T=external:PATH`, `--memory
/// external:PATH`) must not look like vsnap's temporaries (`.vsnap-*.tmp`):
/// `vol check` reports those as left behind, and recovery may remove them.
pub(crate) fn not_a_temp_name(p: &Path, what: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if p.file_name()
        .is_some_and(|n| fsops::is_vsnap_temp_bytes(n.as_bytes()))
    {
        return Err(EngineError::bad_name(format!(
            "{what} {}: names of the form .vsnap-*.tmp are vsnap's temporary files; choose another name",
            p.display()
        )));
    }
    Ok(())
}

/// External snapshots write a path into a qcow2 header (the overlay's
/// backing file) and read it back through QEMU's JSON, which carries only
/// UTF-8: a name that is not UTF-8 would come back as another name, and a
/// later delete would miss the file that backs the image. Refused.
fn utf8_for_backing(p: &Path) -> Result<()> {
    if p.to_str().is_none() {
        return Err(EngineError::not_supported(format!(
            "{} is not a UTF-8 path; external snapshots store the path in a qcow2 backing-file field that QEMU reports only as UTF-8: rename the image (or give a UTF-8 --file), or use --kind internal, copy or reflink, which take any file name",
            p.display()
        )));
    }
    Ok(())
}

/// The file of an external or whole-file snapshot; a catalog record
/// without one is damaged (an error, not a panic).
fn snap_file(s: &VolSnapshot) -> Result<PathBuf> {
    s.file.clone().ok_or_else(|| {
        EngineError::unsafe_(format!(
            "the catalog's {} snapshot {:?} of {} names no file; the catalog is damaged: run `vsnap vol check {}`",
            s.kind,
            s.name,
            s.volume.display(),
            s.volume.display()
        ))
    })
}

fn same_device(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => false,
    }
}

fn file_len(p: &Path) -> Result<u64> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .map_err(|e| EngineError::io(format!("cannot read {}: {e}", p.display())))
}

/// How to clone into `dir`: reflink where the filesystem can, else copy
/// (after a free-space check).
pub(crate) fn clone_mode_for(dir: &Path, src: &Path, target: &Path) -> Result<CloneMode> {
    if clone::reflink_supported(dir) {
        Ok(CloneMode::Reflink)
    } else {
        clone::require_space(target, file_len(src)?).map_err(EngineError::Check)?;
        Ok(CloneMode::Copy)
    }
}

/// A whole-file clone of `src` (format `format`) placed in `dst_dir` keeps
/// the same backing file: a qcow2 whose backing name is relative is read
/// against the directory of the file that names it, so a clone in another
/// directory would look for another file. Refused (nothing touched) unless
/// both directories resolve the name to the same file.
fn relative_backing_resolves(src: &Path, format: Format, dst_dir: &Path) -> Result<()> {
    if format != Format::Qcow2 {
        return Ok(());
    }
    let Ok(h) = vsnap_steps::qcow2::read(src) else {
        return Ok(()); // the clone's own checks report an unreadable image
    };
    let Some(name) = h.backing else {
        return Ok(());
    };
    let rel = Path::new(&name);
    if rel.is_absolute() || name.contains(':') {
        return Ok(());
    }
    let resolve = |dir: &Path| {
        let p = dir.join(rel);
        std::fs::canonicalize(&p).unwrap_or(p)
    };
    let here = resolve(&parent_dir(src));
    let there = resolve(dst_dir);
    if here == there {
        return Ok(());
    }
    let backing_format = h.backing_format.as_deref().unwrap_or("qcow2");
    Err(EngineError::not_supported(format!(
        "{} has a relative backing file {name:?} ({}); a clone of it in {} would look for {}, another file; \
         keep the snapshot file in the image's directory (omit --file), or make the backing name absolute first: \
         qemu-img rebase -u -f qcow2 -b {} -F {backing_format} {}",
        src.display(),
        here.display(),
        dst_dir.display(),
        there.display(),
        here.display(),
        src.display()
    )))
}

/// The state of one volume, read at plan time.
struct Vol {
    /// Recorded identities of the snapshots' files, by snapshot name.
    ids: std::collections::BTreeMap<String, catalog::SnapFileId>,
    image: PathBuf,
    format: Format,
    /// `qemu-img info` of the image, read once at plan time.
    info: qemu_img::ImageInfo,
    rec: VolumeRec,
    snaps: Vec<VolSnapshot>,
}

impl Vol {
    /// Refuse to use a snapshot's file that is not the one vsnap made (a
    /// symlink, another file, other content): nothing is touched. The
    /// recorded inode is then what the plan's steps must find there
    /// ([`fsops::remember`]): a file swapped after this check is refused
    /// by the step that opens it.
    fn check_file(&self, s: &VolSnapshot) -> Result<()> {
        let Some(f) = &s.file else {
            return Ok(());
        };
        if std::fs::symlink_metadata(f).is_err() {
            return Err(EngineError::unsafe_(format!(
                "the file {} of snapshot {:?} is missing; run `vsnap vol check {}`",
                f.display(),
                s.name,
                self.image.display()
            )));
        }
        let id = self.ids.get(&s.name);
        let why = match id {
            Some(id) => id.mismatch(f),
            None => catalog::plain_file_mismatch(f),
        };
        if let Some(why) = why {
            return Err(EngineError::unsafe_(format!(
                "the file {} of snapshot {:?} is not the file vsnap made: {why}; vsnap does not use it \
                 (whoever can write {} changed it): put the snapshot's own file back, or delete the snapshot \
                 once you have moved that file away; `vsnap vol check {}` lists what is wrong \
                 (if you restored or moved the file yourself: `vsnap vol adopt-files {}`)",
                f.display(),
                s.name,
                parent_dir(f).display(),
                self.image.display(),
                self.image.display()
            )));
        }
        if let Some(id) = id {
            // Held open until the operation ends: the inode checked is the
            // one the steps find (its number cannot be reused meanwhile).
            fsops::remember(f, id.file_id());
            let fh = fsops::open_ours(f, true).map_err(EngineError::Check)?;
            fsops::pin(f, &fh).map_err(EngineError::Check)?;
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Result<&VolSnapshot> {
        self.snaps
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| EngineError::NoSnapshot {
                volume: self.image.clone(),
                name: name.into(),
            })
    }

    /// `name` and every descendant, parents before children.
    fn subtree(&self, name: &str) -> Vec<&VolSnapshot> {
        let mut out: Vec<&VolSnapshot> = self.snaps.iter().filter(|s| s.name == name).collect();
        let mut i = 0;
        while i < out.len() {
            let n = out[i].name.clone();
            out.extend(
                self.snaps
                    .iter()
                    .filter(|s| s.parent.as_deref() == Some(n.as_str())),
            );
            i += 1;
        }
        out
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    let ca = std::fs::canonicalize(a).unwrap_or_else(|_| a.to_path_buf());
    let cb = std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf());
    ca == cb
}

impl Engine {
    /// The catalog's path of `image`: its directory resolved, its own name
    /// as it is, when the catalog knows that path; else the image resolved
    /// through symlinks (a user's link to an image is fine). A volume's
    /// path that is now a symlink or not a regular file was replaced by
    /// someone who can write its directory: refused, never followed.
    pub(crate) fn resolve_image(&self, image: &Path) -> Result<PathBuf> {
        if let Some(p) = self.catalog_path(image)? {
            if let Some(why) = catalog::plain_file_mismatch(&p) {
                return Err(EngineError::unsafe_(format!(
                    "{} is not the image vsnap manages: {why}; vsnap does not follow it \
                     (whoever can write {} replaced it): put the image back, then run `vsnap vol check {}`",
                    p.display(),
                    parent_dir(&p).display(),
                    p.display()
                )));
            }
            return Ok(p);
        }
        canonical_image(image)
    }

    /// `image` with its directory resolved, when the catalog has a volume
    /// at that path.
    pub(crate) fn catalog_path(&self, image: &Path) -> Result<Option<PathBuf>> {
        let abs = if image.is_absolute() {
            image.to_path_buf()
        } else {
            match std::env::current_dir() {
                Ok(d) => d.join(image),
                Err(_) => return Ok(None),
            }
        };
        let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
            return Ok(None);
        };
        let Ok(dir) = std::fs::canonicalize(dir) else {
            return Ok(None);
        };
        let p = dir.join(name);
        Ok(catalog::volume(self.journal(), &p)?.map(|_| p))
    }

    /// Read the volume's catalog entry and check that the image is usable
    /// now: present, one link, of a known format (recorded, or `stated`,
    /// never probed), not claimed by another state directory, not held by
    /// another process (a running QEMU).
    fn load_volume(&self, image: &Path, stated: Option<Format>) -> Result<Vol> {
        let image = self.resolve_image(image)?;
        crate::image::check_links(&image)?;
        crate::image::check_claim(self.journal(), &image)?;
        let format = crate::image::format_of(self.journal(), &image, stated)?;
        // Not force-shared: InUse while a QEMU holds the image (its locks).
        let info = qemu_img::image_info(&image, format, false).map_err(EngineError::Check)?;
        // A backing loop or an over-deep chain, found natively and at once,
        // before any qemu-img opens the chain.
        qemu_img::backing_chain(&image, format).map_err(EngineError::Check)?;
        if format == Format::Qcow2 {
            // A damaged image is refused before anything is touched:
            // qemu-img would write into it, mark it corrupt, and fail
            // half-way. Native and cheap (the header, the L1 and refcount
            // tables); the walk of every table is `qemu-img check`'s.
            qemu_img::refuse_damaged(&image).map_err(EngineError::Check)?;
        }
        let j = self.journal();
        let rec = catalog::volume(j, &image)?.unwrap_or(VolumeRec {
            path: image.clone(),
            current: None,
            next_seq: 0,
        });
        let snaps = catalog::snapshots(j, &image)?;
        let ids = catalog::snapshot_ids(j, &image)?;
        Ok(Vol {
            ids,
            image,
            format,
            info,
            rec,
            snaps,
        })
    }

    /// Compile a snapshot creation (nothing is touched).
    pub fn plan_vol_create(&self, req: &CreateRequest) -> Result<(Plan, VolSnapshot)> {
        crate::validate_description(req.description.as_deref())?;
        let vol = self.load_volume(&req.image, req.format)?;
        let name = match &req.name {
            Some(n) => n.clone(),
            // Never one in use: in the catalog, inside the image, or as the
            // default file name beside it.
            None => crate::default_snapshot_name(|n| {
                vol.snaps.iter().any(|s| s.name == n)
                    || vol.info.snapshots.iter().any(|s| s == n)
                    || std::fs::symlink_metadata(default_file(&vol.image, n, vol.format)).is_ok()
            }),
        };
        validate_name(&name)?;
        if vol.snaps.iter().any(|s| s.name == name) {
            return Err(EngineError::Duplicate {
                volume: vol.image.clone(),
                name,
            });
        }
        let dir = parent_dir(&vol.image);
        let kind = match req.kind {
            Some(k) => k,
            None => match vol.snaps.last() {
                Some(s) => s.kind,
                None if vol.format == Format::Qcow2 => SnapKind::Internal,
                None if clone::reflink_supported(&dir) => SnapKind::Reflink,
                None => SnapKind::Copy,
            },
        };
        if let Some(other) = vol.snaps.iter().find(|s| s.kind.family() != kind.family()) {
            return Err(EngineError::not_supported(format!(
                "volume {} already has {} snapshots (e.g. {:?}); vsnap does not mix them with {} snapshots on one volume; use --kind {} or delete those first",
                vol.image.display(),
                other.kind.family(),
                other.name,
                kind.family(),
                other.kind
            )));
        }
        // Internal snapshots vsnap did not make count too: the image holds
        // them whatever the catalog says.
        if kind.family() != SnapKind::Internal.family() {
            if let Some(foreign) = vol
                .info
                .snapshots
                .iter()
                .find(|n| !vol.snaps.iter().any(|s| &s.name == *n))
            {
                return Err(EngineError::not_supported(format!(
                    "qcow2 image {} holds {} internal snapshot(s) that vsnap did not make (e.g. {foreign:?}); \
                     vsnap does not mix internal snapshots with {} snapshots on one volume (an external \
                     snapshot would freeze them inside its file, a whole-file one would copy them along \
                     unlisted): use --kind internal, or delete them first (`qemu-img snapshot -l` lists them)",
                    vol.image.display(),
                    vol.info.snapshots.len(),
                    kind.family()
                )));
            }
        }
        let image = &vol.image;
        let tag = temp_tag();
        let mut snap = VolSnapshot {
            name: name.clone(),
            volume: image.clone(),
            kind,
            description: req.description.clone(),
            creation_time: now_unix(),
            parent: vol.rec.current.clone(),
            seq: vol.rec.next_seq,
            file: None,
            format: vol.format,
        };
        let steps = match kind {
            SnapKind::Internal => {
                if vol.format != Format::Qcow2 {
                    return Err(EngineError::not_supported(format!(
                        "internal snapshots need a qcow2 image; {} is raw: use --kind external, reflink or copy",
                        image.display()
                    )));
                }
                if req.file.is_some() {
                    return Err(EngineError::bad_request(
                        "--file does not apply to internal snapshots: they live inside the image"
                            .into(),
                    ));
                }
                check_writable(&dir)?;
                // qemu-img writes metadata into the image (a copy of the L1
                // table, refcounts, the snapshot table); refused up front, a
                // full filesystem cannot leave a half-written header behind.
                clone::require_space(
                    image,
                    INTERNAL_HEADROOM_BYTES + vol.info.virtual_size / 8192,
                )
                .map_err(EngineError::Check)?;
                if vol.info.snapshots.contains(&name) {
                    return Err(EngineError::name_taken(format!(
                        "qcow2 image {} already holds an internal snapshot named {name:?} that vsnap did not make; choose another name",
                        image.display()
                    )));
                }
                vec![
                    Step::InternalCreate {
                        image: image.clone(),
                        name: name.clone(),
                    },
                    Step::Catalog,
                ]
            }
            SnapKind::External => {
                if qemu_img::backing_chain(image, vol.format)
                    .map_err(EngineError::Check)?
                    .len()
                    >= qemu_img::MAX_CHAIN_DEPTH
                {
                    return Err(EngineError::Check(vsnap_steps::StepError::ChainTooDeep {
                        path: image.clone(),
                        limit: qemu_img::MAX_CHAIN_DEPTH,
                    }));
                }
                let file = match &req.file {
                    Some(f) => user_file(f)?,
                    None => default_file(image, &name, vol.format),
                };
                utf8_for_backing(image)?;
                utf8_for_backing(&file)?;
                check_writable(&dir)?;
                check_writable(&parent_dir(&file))?;
                must_not_exist(&file)?;
                if !same_device(&parent_dir(&file), &dir) {
                    return Err(EngineError::bad_request(format!(
                        "--file {} must be on the same filesystem as {} (vsnap hard-links the image to it so that the path is never missing)",
                        file.display(),
                        image.display()
                    )));
                }
                let overlay = fsops::temp_path(image, &tag);
                snap.file = Some(file.clone());
                vec![
                    Step::ExternalFreeze {
                        image: image.clone(),
                        file,
                        overlay: overlay.clone(),
                        format: vol.format,
                    },
                    Step::Rename {
                        from: overlay,
                        to: image.clone(),
                        replace: true,
                    },
                ]
            }
            SnapKind::Reflink | SnapKind::Copy => {
                let file = match &req.file {
                    Some(f) => user_file(f)?,
                    None => default_file(image, &name, vol.format),
                };
                let fdir = parent_dir(&file);
                check_writable(&fdir)?;
                must_not_exist(&file)?;
                let mode = if kind == SnapKind::Reflink {
                    if let clone::ReflinkProbe::Unsupported(reason) = clone::reflink_probe(&fdir) {
                        return Err(EngineError::Check(
                            vsnap_steps::StepError::ReflinkUnsupported { path: fdir, reason },
                        ));
                    }
                    CloneMode::Reflink
                } else {
                    clone::require_space(&file, file_len(image)?).map_err(EngineError::Check)?;
                    CloneMode::Copy
                };
                relative_backing_resolves(image, vol.format, &fdir)?;
                let tmp = fsops::temp_path(&file, &tag);
                snap.file = Some(file.clone());
                vec![
                    Step::Clone {
                        src: image.clone(),
                        dst: tmp.clone(),
                        mode,
                    },
                    Step::Rename {
                        from: tmp,
                        to: file,
                        replace: false,
                    },
                    Step::Catalog,
                ]
            }
        };
        let pivot = (steps.len() - 1) as u32;
        let mut rec = vol.rec.clone();
        rec.current = Some(name.clone());
        rec.next_seq += 1;
        // An external snapshot leaves a qcow2 overlay at the image's path.
        let format_after = match kind {
            SnapKind::External => Format::Qcow2,
            _ => vol.format,
        };
        let plan = Plan {
            op: "vol.snapshot.create".into(),
            summary: format!("{kind} snapshot {name:?} of {}", image.display()),
            steps,
            pivot,
            catalog: vec![
                catalog::put_snapshot(&snap),
                catalog::put_volume(&rec),
                catalog::put_volformat(image, format_after),
            ],
        };
        plan.check_paths()?;
        Ok((plan, snap))
    }

    /// Create a snapshot (or, with `dry_run`, only compile its plan).
    pub fn vol_snapshot_create(&self, req: &CreateRequest, dry_run: bool) -> Result<Done> {
        let _g = self.lock_ops();
        let (plan, snap) = self.plan_vol_create(req)?;
        // The identity of the file the steps made (external: the image's
        // inode they linked), recorded with the snapshot in the pivot's
        // transaction.
        let whole_file = matches!(snap.kind, SnapKind::Reflink | SnapKind::Copy);
        let (volume, name, file) = (snap.volume.clone(), snap.name.clone(), snap.file.clone());
        let extra = move || {
            file.as_deref()
                .filter(|f| fsops::known(f).is_some())
                .and_then(|f| fsops::open_ours(f, true).ok())
                .and_then(|fh| catalog::SnapFileId::of(&fh, whole_file).ok())
                .map(|id| vec![catalog::put_snapshot_id(&volume, &name, &id)])
                .unwrap_or_default()
        };
        self.finish_with(plan, snap, Vec::new(), dry_run, &extra)
    }

    fn finish(
        &self,
        plan: Plan,
        snapshot: VolSnapshot,
        deleted: Vec<String>,
        dry_run: bool,
    ) -> Result<Done> {
        self.finish_with(plan, snapshot, deleted, dry_run, &Vec::new)
    }

    fn finish_with(
        &self,
        plan: Plan,
        snapshot: VolSnapshot,
        deleted: Vec<String>,
        dry_run: bool,
        extra: &dyn Fn() -> Vec<vsnap_journal::CatalogOp>,
    ) -> Result<Done> {
        let plan_text = plan.render();
        let id = if dry_run {
            None
        } else {
            let j = self.journal();
            let image = &snapshot.volume;
            // The claim is made before the plan is journaled; of two state
            // directories racing for the image, one makes it, the other is
            // refused here (nothing else was touched).
            let claimed = crate::image::claim(j, image)?;
            let ran = plan::run_with(j, &plan, &self.cx(), extra);
            let left = catalog::snapshots(j, image).map(|v| v.len()).unwrap_or(1);
            let release = left == 0
                && match &ran {
                    Ok(_) => true,
                    // Rolled back: nothing of the plan is left.
                    Err(EngineError::Step { .. }) => claimed,
                    _ => false,
                };
            if release {
                // Rolled back before any snapshot existed, or deleted the
                // last one: the image is free again.
                crate::image::release(j, image);
            }
            Some(ran?.0)
        };
        Ok(Done {
            plan: id,
            plan_text,
            snapshot,
            deleted,
            dry_run,
        })
    }

    /// Compile a revert: the image's path becomes the snapshot's state;
    /// what was written since is discarded.
    pub fn plan_vol_revert(&self, req: &RevertRequest) -> Result<(Plan, VolSnapshot)> {
        let vol = self.load_volume(&req.image, None)?;
        let snap = vol.find(&req.name)?.clone();
        let image = &vol.image;
        let dir = parent_dir(image);
        check_writable(&dir)?;
        let tmp = fsops::temp_path(image, &temp_tag());
        let mut rec = vol.rec.clone();
        rec.current = Some(snap.name.clone());
        let summary = format!(
            "revert {} to {} snapshot {:?}",
            image.display(),
            snap.kind,
            snap.name
        );
        if snap.kind == SnapKind::Internal {
            if !vol.info.snapshots.contains(&snap.name) {
                return Err(EngineError::unsafe_(format!(
                    "the catalog names internal snapshot {:?} but {} does not hold it; run `vsnap vol check {}`",
                    snap.name,
                    image.display(),
                    image.display()
                )));
            }
            // Written in place: refused now, not after the pivot.
            check_writable(image)?;
            // In place, the pivot first: revert discards the image's
            // state by definition, and applying a snapshot again gives
            // the same state, so the plan rolls forward from its first
            // step (no copy of the image; see the module's doc).
            let plan = Plan {
                op: "vol.snapshot.revert".into(),
                summary,
                steps: vec![
                    Step::Catalog,
                    Step::InternalApply {
                        image: image.clone(),
                        name: snap.name.clone(),
                    },
                ],
                pivot: 0,
                catalog: vec![catalog::put_volume(&rec)],
            };
            plan.check_paths()?;
            return Ok((plan, snap));
        }
        let mut steps = match snap.kind {
            SnapKind::Internal => unreachable!("compiled above"),
            SnapKind::External => {
                let file = snap_file(&snap)?;
                utf8_for_backing(image)?;
                utf8_for_backing(&file)?;
                // The new overlay runs on the snapshot's file and the
                // chain below it: all of them vsnap's.
                for s in &vol.snaps {
                    vol.check_file(s)?;
                }
                vec![Step::CreateOverlay {
                    path: tmp.clone(),
                    backing: file,
                    backing_format: snap.format,
                }]
            }
            SnapKind::Reflink | SnapKind::Copy => {
                let file = snap_file(&snap)?;
                vol.check_file(&snap)?;
                relative_backing_resolves(&file, snap.format, &dir)?;
                let mode = clone_mode_for(&dir, &file, &tmp)?;
                vec![Step::Clone {
                    src: file,
                    dst: tmp.clone(),
                    mode,
                }]
            }
        };
        steps.push(Step::Rename {
            from: tmp,
            to: image.clone(),
            replace: true,
        });
        let pivot = (steps.len() - 1) as u32;
        // A whole-file revert brings back the file's format; the others
        // leave a qcow2 image (an overlay, or the reverted internal one).
        let format_after = match snap.kind {
            SnapKind::Reflink | SnapKind::Copy => snap.format,
            SnapKind::Internal | SnapKind::External => Format::Qcow2,
        };
        let plan = Plan {
            op: "vol.snapshot.revert".into(),
            summary,
            steps,
            pivot,
            catalog: vec![
                catalog::put_volume(&rec),
                catalog::put_volformat(image, format_after),
            ],
        };
        plan.check_paths()?;
        Ok((plan, snap))
    }

    /// Revert the volume to snapshot `req.name` (or, with `dry_run`, only
    /// compile the plan): the image's path becomes the snapshot's state;
    /// what was written to the image since is discarded; the snapshot
    /// becomes current.
    ///
    /// Needs the image unused by any running QEMU and this state
    /// directory's. On failure before the pivot nothing is left changed
    /// (the plan rolled back); after it, see
    /// [`EngineError::needs_attention`]. Errors: `NoSnapshot`, `NoImage`,
    /// those of [`Engine::plan_vol_revert`], and those of running the plan.
    pub fn vol_snapshot_revert(&self, req: &RevertRequest, dry_run: bool) -> Result<Done> {
        let _g = self.lock_ops();
        let (plan, snap) = self.plan_vol_revert(req)?;
        self.finish(plan, snap, Vec::new(), dry_run)
    }

    /// Compile a delete. Default: the snapshot's children are re-parented
    /// onto its parent (external: their files are safely rebased onto the
    /// parent's file, which keeps every guest-visible byte). With
    /// `children`: the whole subtree goes.
    pub fn plan_vol_delete(&self, req: &DeleteRequest) -> Result<(Plan, VolSnapshot, Vec<String>)> {
        let vol = self.load_volume(&req.image, None)?;
        let snap = vol.find(&req.name)?.clone();
        let image = &vol.image;
        check_writable(&parent_dir(image))?;
        let doomed: Vec<VolSnapshot> = if req.children {
            vol.subtree(&snap.name).into_iter().cloned().collect()
        } else {
            vec![snap.clone()]
        };
        let doomed_names: BTreeSet<&str> = doomed.iter().map(|s| s.name.as_str()).collect();

        // Catalog: drop the doomed, re-parent the survivors, move `current`.
        // Every file the plan removes or rebases must be vsnap's.
        if snap.kind == SnapKind::External {
            for s in &vol.snaps {
                vol.check_file(s)?;
            }
        } else {
            for s in &doomed {
                vol.check_file(s)?;
            }
        }
        let mut ops: Vec<_> = doomed
            .iter()
            .flat_map(|s| {
                [
                    catalog::delete_snapshot(image, &s.name),
                    catalog::delete_snapshot_id(image, &s.name),
                ]
            })
            .collect();
        for child in vol.snaps.iter().filter(|s| {
            s.parent.as_deref() == Some(snap.name.as_str())
                && !doomed_names.contains(s.name.as_str())
        }) {
            let mut c = child.clone();
            c.parent = snap.parent.clone();
            ops.push(catalog::put_snapshot(&c));
        }
        let mut rec = vol.rec.clone();
        if rec
            .current
            .as_deref()
            .is_some_and(|c| doomed_names.contains(c))
        {
            rec.current = snap.parent.clone();
        }
        ops.push(catalog::put_volume(&rec));
        if doomed.len() < vol.snaps.len() {
            ops.push(catalog::put_volformat(image, vol.format));
        } else {
            // No snapshot left: vsnap lets go of the image (its claim is
            // removed after the plan), and of what it knew of its format.
            ops.push(catalog::delete_volformat(image));
        }

        let mut before = Vec::new();
        let mut after = Vec::new();
        match snap.kind {
            SnapKind::Internal => {
                for s in &doomed {
                    after.push(Step::InternalDelete {
                        image: image.clone(),
                        name: s.name.clone(),
                    });
                }
            }
            SnapKind::Reflink | SnapKind::Copy => {
                for s in &doomed {
                    after.push(Step::RemoveFile {
                        path: snap_file(s)?,
                    });
                }
            }
            SnapKind::External => {
                let file = snap_file(&snap)?;
                utf8_for_backing(image)?;
                utf8_for_backing(&file)?;
                let info =
                    qemu_img::image_info(&file, snap.format, false).map_err(EngineError::Check)?;
                let new_backing = match (info.backing, info.backing_format) {
                    (Some(b), Some(f)) => Some((b, f)),
                    (Some(b), None) => {
                        // Never probed: the format the catalog gives the
                        // file, else raw (opening as raw follows nothing).
                        let f = vol
                            .snaps
                            .iter()
                            .find(|s| s.file.as_deref().is_some_and(|f| same_path(f, &b)))
                            .map_or(Format::Raw, |s| s.format);
                        Some((b, f))
                    }
                    (None, _) => None,
                };
                let doomed_files: Vec<PathBuf> =
                    doomed.iter().filter_map(|s| s.file.clone()).collect();
                // Every surviving file directly backed by a doomed file is
                // rebased onto the deleted snapshot's own backing file.
                let mut candidates: Vec<(PathBuf, Format)> = vec![(image.clone(), vol.format)];
                for s in vol
                    .snaps
                    .iter()
                    .filter(|s| !doomed_names.contains(s.name.as_str()))
                {
                    if let Some(f) = &s.file {
                        candidates.push((f.clone(), s.format));
                    }
                }
                for (path, fmt) in candidates {
                    let i = qemu_img::image_info(&path, fmt, false).map_err(EngineError::Check)?;
                    if let Some(b) = &i.backing {
                        if doomed_files.iter().any(|d| same_path(b, d)) {
                            before.push(Step::Rebase {
                                image: path.clone(),
                                format: fmt,
                                new_backing: new_backing.clone(),
                                old_backing: Some((
                                    b.clone(),
                                    i.backing_format.unwrap_or(snap.format),
                                )),
                                unsafe_: false,
                            });
                        }
                    }
                }
                for f in doomed_files {
                    after.push(Step::RemoveFile { path: f });
                }
            }
        }
        let pivot = before.len() as u32;
        let mut steps = before;
        steps.push(Step::Catalog);
        steps.extend(after);
        let deleted: Vec<String> = doomed.iter().skip(1).map(|s| s.name.clone()).collect();
        let plan = Plan {
            op: "vol.snapshot.delete".into(),
            summary: format!(
                "delete {} snapshot {:?} of {}{}",
                snap.kind,
                snap.name,
                image.display(),
                if req.children {
                    format!(" and its {} descendant(s)", deleted.len())
                } else {
                    String::new()
                }
            ),
            steps,
            pivot,
            catalog: ops,
        };
        plan.check_paths()?;
        Ok((plan, snap, deleted))
    }

    /// Delete snapshot `req.name` (with `req.children`, its whole
    /// subtree; else its children get its parent) or, with `dry_run`, only
    /// compile the plan. The image's current state is kept; the snapshot's
    /// files are removed (an external one's data merged where a survivor
    /// needs it, by a safe rebase).
    ///
    /// Needs the image unused by any running QEMU and this state
    /// directory's. On failure before the pivot nothing is left changed;
    /// after it, see [`EngineError::needs_attention`]. Errors:
    /// `NoSnapshot`, `NoImage`, those of [`Engine::plan_vol_delete`], and
    /// those of running the plan.
    pub fn vol_snapshot_delete(&self, req: &DeleteRequest, dry_run: bool) -> Result<Done> {
        let _g = self.lock_ops();
        let (plan, snap, deleted) = self.plan_vol_delete(req)?;
        self.finish(plan, snap, deleted, dry_run)
    }

    /// Every snapshot of the volume, oldest first, optionally of one kind
    /// (libvirt's `virStorageVolListAllSnapshots`, were there one).
    ///
    /// Needs the image to exist (a regular file; any spelling of its path:
    /// it is canonicalized). Changes nothing. Errors: `NoImage`, `Refused`
    /// `NotSupported` (not a regular file), `Journal` (the catalog cannot be read). An
    /// image vsnap never snapshotted has none (an empty list, not an error).
    pub fn vol_snapshot_list(
        &self,
        image: &Path,
        kind: Option<SnapKind>,
    ) -> Result<Vec<VolSnapshot>> {
        let image = canonical_image(image)?;
        let mut v = catalog::snapshots(self.journal(), &image)?;
        if let Some(k) = kind {
            v.retain(|s| s.kind == k);
        }
        Ok(v)
    }

    /// The names of the volume's snapshots, oldest first, optionally of
    /// one kind (libvirt's `virDomainSnapshotListNames`). Needs, changes
    /// and fails as [`Engine::vol_snapshot_list`].
    pub fn vol_snapshot_list_names(
        &self,
        image: &Path,
        kind: Option<SnapKind>,
    ) -> Result<Vec<String>> {
        Ok(self
            .vol_snapshot_list(image, kind)?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    /// How many snapshots the volume has, optionally of one kind
    /// (libvirt's `virDomainSnapshotNum`). Needs, changes and fails as
    /// [`Engine::vol_snapshot_list`].
    pub fn vol_snapshot_num(&self, image: &Path, kind: Option<SnapKind>) -> Result<usize> {
        Ok(self.vol_snapshot_list(image, kind)?.len())
    }

    /// The snapshot named `name` (libvirt's
    /// `virDomainSnapshotLookupByName`). Needs the image to exist; changes
    /// nothing. Errors: `NoSnapshot` (no snapshot of that name), `NoImage`,
    /// `Refused` `NotSupported` (not a regular file), `Journal`.
    pub fn vol_snapshot_lookup_by_name(&self, image: &Path, name: &str) -> Result<VolSnapshot> {
        let image = canonical_image(image)?;
        catalog::snapshots(self.journal(), &image)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| EngineError::NoSnapshot {
                volume: image,
                name: name.into(),
            })
    }

    /// The current snapshot (the last made or reverted to), if any
    /// (libvirt's `virDomainSnapshotCurrent`, which fails where this
    /// returns `None`). Needs, changes and fails as
    /// [`Engine::vol_snapshot_list`].
    pub fn vol_snapshot_current(&self, image: &Path) -> Result<Option<VolSnapshot>> {
        let image = canonical_image(image)?;
        let Some(rec) = catalog::volume(self.journal(), &image)? else {
            return Ok(None);
        };
        match rec.current {
            None => Ok(None),
            Some(name) => self.vol_snapshot_lookup_by_name(&image, &name).map(Some),
        }
    }

    /// Whether the volume has a current snapshot (libvirt's
    /// `virDomainHasCurrentSnapshot`). Needs, changes and fails as
    /// [`Engine::vol_snapshot_list`].
    pub fn vol_has_current_snapshot(&self, image: &Path) -> Result<bool> {
        Ok(self.vol_snapshot_current(image)?.is_some())
    }

    /// Take a snapshot from a `<volsnapshot>` document and typed flags
    /// (libvirt's `virDomainSnapshotCreateXML`): [`CreateRequest::new`]
    /// then [`Engine::vol_snapshot_create`]. With `dry_run`, only the plan
    /// is compiled and nothing is changed.
    ///
    /// Needs the image to exist, unused by any running QEMU and not
    /// claimed by another state directory. Changes: the snapshot is made
    /// (files as the kind needs, the catalog records it and makes it
    /// current). On failure before the pivot, nothing is left changed
    /// (the plan rolled back; `Xml` and every refusal before a plan change
    /// nothing); after it, see [`EngineError::needs_attention`]. Errors:
    /// `Xml` (the document), then those of [`Engine::plan_vol_create`] and
    /// of running the plan.
    pub fn vol_snapshot_create_xml(
        &self,
        image: &Path,
        xml: Option<&str>,
        flags: VolSnapFlags,
        dry_run: bool,
    ) -> Result<Done> {
        self.vol_snapshot_create(&CreateRequest::new(image, xml, flags)?, dry_run)
    }

    /// Names of the snapshots whose parent is `name`.
    pub fn vol_snapshot_children(&self, image: &Path, name: &str) -> Result<Vec<String>> {
        let all = self.vol_snapshot_list(image, None)?;
        if !all.iter().any(|s| s.name == name) {
            return Err(EngineError::NoSnapshot {
                volume: image.to_path_buf(),
                name: name.into(),
            });
        }
        Ok(all
            .into_iter()
            .filter(|s| s.parent.as_deref() == Some(name))
            .map(|s| s.name)
            .collect())
    }

    /// The snapshot named `name` as a `<volsnapshot>` document, with
    /// `<current>` (libvirt's `virDomainSnapshotGetXMLDesc`); it reads
    /// back with [`crate::xml::parse_volsnapshot`]. Changes nothing.
    /// Errors: those of [`Engine::vol_snapshot_lookup_by_name`], and
    /// `Refused` `NotSupported` when the image's or the snapshot file's path is not UTF-8
    /// (XML cannot carry it).
    pub fn vol_snapshot_get_xml_desc(&self, image: &Path, name: &str) -> Result<String> {
        let s = self.vol_snapshot_lookup_by_name(image, name)?;
        for p in std::iter::once(&s.volume).chain(s.file.as_ref()) {
            if p.to_str().is_none() {
                return Err(EngineError::not_supported(format!(
                    "{} is not a UTF-8 path and XML carries only UTF-8; use `vsnap --json vol snapshot info` (a path that is not UTF-8 is written as {{\"lossy\": ..., \"hex\": ...}})",
                    p.display()
                )));
            }
        }
        let current = self
            .vol_snapshot_current(image)?
            .map(|c| c.name == s.name)
            .unwrap_or(false);
        Ok(crate::volxml::volsnapshot_to_xml(&s, current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<volsnapshot><name>x</name><description>from xml</description>\
        <kind>external</kind><file>/f/x.qcow2</file></volsnapshot>";

    #[test]
    fn create_request_new_flags_win_over_xml() {
        let img = Path::new("/vm/a.qcow2");
        let r = CreateRequest::new(img, Some(XML), VolSnapFlags::default()).unwrap();
        assert_eq!(r.image, img);
        assert_eq!(r.name.as_deref(), Some("x"));
        assert_eq!(r.description.as_deref(), Some("from xml"));
        assert_eq!(r.kind, Some(SnapKind::External));
        assert_eq!(r.file.as_deref(), Some(Path::new("/f/x.qcow2")));
        assert_eq!(r.format, None);
        let r = CreateRequest::new(
            img,
            Some(XML),
            VolSnapFlags {
                name: Some("y".into()),
                description: Some("from flags".into()),
                kind: Some(SnapKind::Internal),
                file: Some("/g/y".into()),
                format: Some(Format::Qcow2),
            },
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("y"));
        assert_eq!(r.description.as_deref(), Some("from flags"));
        assert_eq!(r.kind, Some(SnapKind::Internal));
        assert_eq!(r.file.as_deref(), Some(Path::new("/g/y")));
        assert_eq!(r.format, Some(Format::Qcow2));
        // Only some flags: the document fills the rest.
        let r = CreateRequest::new(
            img,
            Some(XML),
            VolSnapFlags {
                name: Some("z".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("z"));
        assert_eq!(r.kind, Some(SnapKind::External));
    }

    #[test]
    fn create_request_new_without_xml_and_with_a_bad_one() {
        let img = Path::new("/vm/a.raw");
        let r = CreateRequest::new(img, None, VolSnapFlags::default()).unwrap();
        assert_eq!(r.name, None);
        assert_eq!(r.kind, None);
        let e = CreateRequest::new(
            img,
            Some("<volsnapshot><colour/></volsnapshot>"),
            VolSnapFlags::default(),
        )
        .unwrap_err();
        assert!(matches!(e, EngineError::Xml(_)), "{e}");
    }
}
