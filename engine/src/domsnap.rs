//! Domain snapshots: all chosen disks of a guest at one instant.
//!
//! Plans (DESIGN.md section 2):
//!
//! * **live external, disk-only** — overlays created (qemu-img) and added
//!   to QEMU (`blockdev-add`) before anything else; optional freeze through
//!   the guest agent; the pivot is ONE QMP `transaction` of
//!   `blockdev-snapshot` over every chosen disk (atomic against guest I/O,
//!   no pause); thaw after. The guest's CPUs never stop.
//! * **live internal with memory** — the pivot is QEMU's `snapshot-save`
//!   job over every chosen disk (QEMU pauses the guest for the job itself).
//! * **offline** — `qemu-img snapshot -c` per disk (internal) or a new
//!   overlay per disk (external); the pivot is the catalog write that
//!   points the domain's disks at the overlays.
//!
//! A guest that was paused stays paused; the disks the request leaves out
//! are not touched.

use crate::domain::{
    self, domain_to_xml, put_domain, DiskSource, DomState, DomainRec, SnapshotDefault,
};
use crate::plan::Plan;
use crate::xmltree::{self, esc, Element};
use crate::{now_unix, validate_name, Engine, EngineError, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use vsnap_steps::live::LiveDisk;
use vsnap_steps::{fsops, live, qemu_img, CloneMode, Format, Step};

// The records live in the catalog (which depends on nothing here); their
// paths under `domsnap` are kept for the CLI and the tests.
pub use crate::catalog::dom::{
    delete_snapshot_op, put_snapshot_op, snapshots, DiskMode, DomSnapDisk, DomSnapState,
    DomSnapshot, DOMSNAPS,
};

impl From<DomState> for DomSnapState {
    fn from(s: DomState) -> DomSnapState {
        match s {
            DomState::Running => DomSnapState::Running,
            DomState::Paused => DomSnapState::Paused,
            DomState::Shutoff => DomSnapState::Shutoff,
        }
    }
}

/// What to do with one disk, as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskChoice {
    /// Leave the disk out.
    No,
    /// An internal snapshot (qcow2 only).
    Internal,
    /// The overlay's path (default: `<stem>.<snapshot>.qcow2` beside the image).
    External(Option<PathBuf>),
    /// The clone's path (default: `<stem>.<snapshot>.<ext>` beside the image).
    Reflink(Option<PathBuf>),
}

/// What to do with the guest's memory, as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryChoice {
    /// No memory: disks only.
    No,
    /// Inside the disks (QEMU's `snapshot-save`).
    Internal,
    /// To this file (QEMU's migration stream).
    External(PathBuf),
}

/// A domain snapshot request: flags, or a `<domainsnapshot>` document.
#[derive(Clone, Debug, Default)]
pub struct DomSnapRequest {
    /// The domain's name.
    pub domain: String,
    /// The snapshot's name (default: the creation time in seconds).
    pub name: Option<String>,
    /// Free text kept with the snapshot.
    pub description: Option<String>,
    /// Require a running guest.
    pub live: bool,
    /// Disks only, no memory.
    pub disk_only: bool,
    /// Freeze the guest's filesystems through its agent around the switch.
    pub quiesce: bool,
    /// What to do with the guest's memory (default: see
    /// `plan_domain_snapshot`).
    pub memory: Option<MemoryChoice>,
    /// Per-disk choices, by target or source path.
    pub disks: Vec<(String, DiskChoice)>,
    /// Do not record the snapshot in the catalog (the disks still switch).
    pub no_metadata: bool,
    /// The overlays exist already (made by the caller, backed by the images).
    pub reuse_external: bool,
    /// Shut the guest off after the snapshot.
    pub halt: bool,
}

/// What a caller asks besides (or instead of) a `<domainsnapshot>`
/// document: the command line's flags, typed. Each field left at its
/// default leaves the document's choice (or vsnap's default) alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomSnapFlags {
    /// The snapshot's name; wins over the document's `<name>`.
    pub name: Option<String>,
    /// Wins over the document's `<description>`.
    pub description: Option<String>,
    /// Require a running guest.
    pub live: bool,
    /// Disks only, no memory.
    pub disk_only: bool,
    /// Freeze the guest's filesystems through its agent around the switch.
    pub quiesce: bool,
    /// Wins over the document's `<memory>`. `MemoryChoice::No` means
    /// disk-only (vsnap's `--memory no`).
    pub memory: Option<MemoryChoice>,
    /// Per-disk choices, by target or source path; each replaces what the
    /// document asked for the same name. Given twice, the last one counts.
    pub disks: Vec<(String, DiskChoice)>,
    /// Do not record the snapshot in the catalog.
    pub no_metadata: bool,
    /// The overlays exist already.
    pub reuse_external: bool,
    /// Shut the guest off after the snapshot.
    pub halt: bool,
}

impl DomSnapRequest {
    /// The request for `domain`: the `<domainsnapshot>` document `xml`, if
    /// any, read with [`parse_domainsnapshot`], merged with `flags`, which
    /// win: a name, description or memory choice given in `flags` replaces
    /// the document's; a disk named in `flags.disks` replaces the
    /// document's choice for that disk (by the same name); the booleans
    /// are or-ed with the document's (which has none of its own).
    /// `MemoryChoice::No` sets `disk_only`, and a disk-only request asks
    /// no memory choice.
    ///
    /// Needs nothing but the text: it reads no catalog and no file, and
    /// changes nothing. Fails only when `xml` is not a `<domainsnapshot>`
    /// vsnap accepts ([`EngineError::Xml`], saying why). Whether the domain, its disks
    /// and the choices exist and fit is checked by
    /// [`Engine::plan_domain_snapshot`], not here.
    pub fn new(domain: &str, xml: Option<&str>, flags: DomSnapFlags) -> Result<DomSnapRequest> {
        let mut req = match xml {
            Some(text) => parse_domainsnapshot(text)?,
            None => DomSnapRequest::default(),
        };
        req.domain = domain.to_string();
        if flags.name.is_some() {
            req.name = flags.name;
        }
        if flags.description.is_some() {
            req.description = flags.description;
        }
        req.live |= flags.live;
        req.disk_only |= flags.disk_only;
        req.quiesce |= flags.quiesce;
        req.no_metadata |= flags.no_metadata;
        req.reuse_external |= flags.reuse_external;
        req.halt |= flags.halt;
        if let Some(m) = flags.memory {
            if m == MemoryChoice::No {
                req.disk_only = true;
            }
            req.memory = Some(m);
        }
        if req.disk_only && req.memory == Some(MemoryChoice::No) {
            req.memory = None;
        }
        for (who, choice) in flags.disks {
            req.disks.retain(|(w, _)| *w != who);
            req.disks.push((who, choice));
        }
        Ok(req)
    }
}

/// Parse libvirt's `<domainsnapshot>` (as virsh writes it) plus the seed's
/// extension: a `<disk>` named by target or source path, carrying a
/// nested `<volsnapshot>` with `<kind>` and `<file>`.
pub fn parse_domainsnapshot(text: &str) -> Result<DomSnapRequest> {
    let root = xmltree::parse(text)?;
    if root.name != "domainsnapshot" {
        return Err(EngineError::Xml(format!(
            "the root element is <{}>; expected <domainsnapshot>",
            root.name
        )));
    }
    const KNOWN: &[&str] = &[
        "name",
        "description",
        "memory",
        "disks",
        "state",
        "parent",
        "creationTime",
        "domain",
        "active",
        "cookie",
        "inactiveDomain",
        "inactivedomain",
    ];
    if let Some(u) = root
        .children
        .iter()
        .find(|c| !KNOWN.contains(&c.name.as_str()))
    {
        return Err(EngineError::Xml(format!(
            "unknown element <{}> in <domainsnapshot>; allowed: {}",
            u.name,
            KNOWN.join(", ")
        )));
    }
    root.only_one(&["name", "description", "memory", "disks"])?;
    if root.child_text("name").is_some_and(|n| n.is_empty()) {
        return Err(EngineError::Xml(
            "<name> is empty; give a name, or leave <name> out for the default (the creation time)"
                .into(),
        ));
    }
    let mut r = DomSnapRequest {
        name: root.child_text("name"),
        description: root.child_text("description"),
        ..Default::default()
    };
    if let Some(m) = root.child("memory") {
        r.memory = parse_memory(m)?;
    }
    if let Some(disks) = root.child("disks") {
        disks.only_known("<disks>", &[], &["disk"])?;
        let mut seen = std::collections::BTreeSet::new();
        for d in disks.children_named("disk") {
            let (name, choice) = parse_snapshot_disk(d)?;
            if !seen.insert(name.clone()) {
                return Err(EngineError::Xml(format!(
                    "disk '{name}' is named twice in <disks>; give each disk once"
                )));
            }
            if let Some(choice) = choice {
                r.disks.push((name, choice));
            }
        }
    }
    Ok(r)
}

/// `<memory>` of a `<domainsnapshot>`, by libvirt's rules: a `file`
/// without `snapshot=` means an external memory snapshot; a file with
/// `snapshot='no'` or `'internal'` is a contradiction; the file's path is
/// absolute. No `snapshot=` and no file: the default (`None`).
fn parse_memory(m: &Element) -> Result<Option<MemoryChoice>> {
    m.only_known("<memory>", &["snapshot", "file"], &[])?;
    let file = m.attr("file");
    let choice = match (m.attr("snapshot"), file) {
        (None, None) => return Ok(None),
        (None | Some("external"), Some(f)) => {
            if !Path::new(f).is_absolute() {
                return Err(EngineError::Xml(format!(
                    "<memory file='{f}'>: the memory file's path must be absolute (libvirt's rule)"
                )));
            }
            MemoryChoice::External(PathBuf::from(f))
        }
        (Some("external"), None) => {
            return Err(EngineError::Xml(
                "<memory snapshot='external'> needs file='PATH' (an absolute path)".into(),
            ))
        }
        (Some(mode @ ("no" | "internal")), Some(f)) => {
            return Err(EngineError::Xml(format!(
                "<memory snapshot='{mode}' file='{f}'> contradicts itself: a memory file needs \
                 snapshot='external' (or no snapshot= at all); drop file= for '{mode}'"
            )))
        }
        (Some("no"), None) => MemoryChoice::No,
        (Some("internal"), None) => MemoryChoice::Internal,
        (Some("manual"), _) => {
            return Err(EngineError::Xml(
                "<memory snapshot='manual'>: a 'manual' memory snapshot is not supported (nor by libvirt); \
                 use no, internal or external"
                    .into(),
            ))
        }
        (Some(other), _) => {
            return Err(EngineError::Xml(format!(
                "<memory snapshot='{other}'>: expected no, internal or external"
            )))
        }
    };
    Ok(Some(choice))
}

/// One `<disk>` of `<disks>`: its name and what is asked for it (`None`:
/// the default). libvirt's rules: a `<source>` or `<driver>` without
/// `snapshot=` means external; a source file needs external mode and an
/// absolute path. What vsnap cannot do exactly is refused: overlays that
/// are not local qcow2 files, `snapshot='manual'`, attributes and elements
/// vsnap does not act on.
fn parse_snapshot_disk(d: &Element) -> Result<(String, Option<DiskChoice>)> {
    let name = d
        .attr("name")
        .ok_or_else(|| EngineError::Xml("a <disk> in <disks> has no name='...'".into()))?
        .to_string();
    let what = format!("<disk name='{name}'>");
    d.only_known(
        &what,
        &["name", "snapshot", "type"],
        &["source", "driver", "volsnapshot"],
    )?;
    d.only_one(&["source", "driver", "volsnapshot"])?;
    match d.attr("type").unwrap_or("file") {
        "file" => {}
        "block" => {
            return Err(EngineError::Xml(format!(
                "{what}: type='block' (an overlay written onto a block device) is not supported by vsnap yet; \
                 give the overlay a file, <source file='/absolute/path'/>, or leave the disk out with snapshot='no'"
            )))
        }
        "network" => {
            return Err(EngineError::Xml(format!(
                "{what}: type='network' (an overlay on rbd, gluster, nbd, iscsi...) is not something vsnap can make: \
                 it writes qcow2 overlays to local files; give <source file='/absolute/path'/>, or leave the disk \
                 out with snapshot='no' (--disk {name}=no)"
            )))
        }
        t @ ("volume" | "dir") => {
            return Err(EngineError::Xml(format!(
                "{what}: type='{t}' is not a disk snapshot type (libvirt refuses it too); use type='file'"
            )))
        }
        t => {
            return Err(EngineError::Xml(format!(
                "{what}: unknown type='{t}'; use type='file' (the default)"
            )))
        }
    }
    let mut file = match d.child("source") {
        Some(src) => {
            src.only_known(&format!("{what} <source>"), &["file"], &[])?;
            Some(PathBuf::from(src.attr("file").ok_or_else(|| {
                EngineError::Xml(format!("{what}: <source> needs file='PATH'"))
            })?))
        }
        None => None,
    };
    let driver = match d.child("driver") {
        Some(dr) => {
            dr.only_known(&format!("{what} <driver>"), &["type"], &[])?;
            match dr.attr("type") {
                Some("qcow2") => true,
                Some("raw") => {
                    return Err(EngineError::Xml(format!(
                        "{what}: <driver type='raw'>: an overlay cannot be raw (it needs a backing file; \
                         libvirt refuses it too); vsnap writes qcow2 overlays: drop <driver> or say qcow2"
                    )))
                }
                Some(t) => {
                    return Err(EngineError::Xml(format!(
                        "{what}: <driver type='{t}'>: vsnap writes qcow2 overlays only; drop <driver> or say qcow2"
                    )))
                }
                None => {
                    return Err(EngineError::Xml(format!(
                        "{what}: <driver> without type=; say <driver type='qcow2'/> or drop it"
                    )))
                }
            }
        }
        None => false,
    };
    let mut kind = d.attr("snapshot").map(str::to_string);
    if let Some(v) = d.child("volsnapshot") {
        v.only_known(&format!("{what} <volsnapshot>"), &[], &["kind", "file"])?;
        v.only_one(&["kind", "file"])?;
        if let Some(k) = v.child_text("kind") {
            kind = Some(k);
        }
        if let Some(f) = v.child_text("file") {
            file = Some(PathBuf::from(f));
        }
    }
    if let Some(f) = &file {
        if !f.is_absolute() {
            return Err(EngineError::Xml(format!(
                "{what}: the snapshot file {} must be an absolute path (libvirt's rule)",
                f.display()
            )));
        }
    }
    let kind = kind.unwrap_or_else(|| {
        if file.is_some() || driver {
            "external".into()
        } else {
            "default".into()
        }
    });
    if let Some(f) = &file {
        if kind != "external" && kind != "reflink" {
            return Err(EngineError::Xml(format!(
                "{what}: the file {} needs snapshot='external' (a '{kind}' snapshot makes no file); \
                 drop the <source> or make it external",
                f.display()
            )));
        }
    }
    if driver && kind != "external" {
        return Err(EngineError::Xml(format!(
            "{what}: <driver type='qcow2'> is the format of an external overlay; a '{kind}' snapshot has none: drop <driver>"
        )));
    }
    let choice = match kind.as_str() {
        "no" => DiskChoice::No,
        "internal" => DiskChoice::Internal,
        "external" => DiskChoice::External(file),
        "reflink" => DiskChoice::Reflink(file),
        "default" => return Ok((name, None)),
        "manual" => {
            return Err(EngineError::Xml(format!(
                "{what}: snapshot='manual' (the disk left to you while the guest is paused) is not something \
                 vsnap does; use no, internal or external (or a nested <volsnapshot><kind>reflink</kind></volsnapshot>)"
            )))
        }
        other => {
            return Err(EngineError::Xml(format!(
                "{what}: snapshot='{other}': expected no, internal or external \
                 (or a nested <volsnapshot><kind>reflink</kind></volsnapshot>)"
            )))
        }
    };
    Ok((name, Some(choice)))
}

/// `<domainsnapshot>` as libvirt writes it.
pub fn domainsnapshot_to_xml(s: &DomSnapshot, current: bool) -> String {
    let mut x = String::from("<domainsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&s.name)));
    if let Some(d) = &s.description {
        x.push_str(&format!("  <description>{}</description>\n", esc(d)));
    }
    x.push_str(&format!("  <state>{}</state>\n", s.state));
    if let Some(p) = &s.parent {
        x.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            esc(p)
        ));
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        s.creation_time
    ));
    match &s.memory_file {
        Some(f) => x.push_str(&format!(
            "  <memory snapshot='external' file='{}'/>\n",
            esc(&f.to_string_lossy())
        )),
        None => x.push_str(&format!(
            "  <memory snapshot='{}'/>\n",
            if s.memory_internal { "internal" } else { "no" }
        )),
    }
    x.push_str("  <disks>\n");
    for d in &s.disks {
        match (&d.mode, &d.overlay) {
            (DiskMode::External, Some(o)) => {
                x.push_str(&format!(
                    "    <disk name='{}' snapshot='external' type='file'>\n",
                    esc(&d.target)
                ));
                x.push_str("      <driver type='qcow2'/>\n");
                x.push_str(&format!(
                    "      <source file='{}'/>\n",
                    esc(&o.to_string_lossy())
                ));
                x.push_str("    </disk>\n");
            }
            (DiskMode::Reflink, _) => {
                // libvirt's 'manual' (made outside libvirt); the seed's
                // <volsnapshot> says how, and where the clone is.
                x.push_str(&format!(
                    "    <disk name='{}' snapshot='manual'>\n      <volsnapshot>\n        <kind>reflink</kind>\n        <file>{}</file>\n      </volsnapshot>\n    </disk>\n",
                    esc(&d.target),
                    esc(&d.state_file.to_string_lossy())
                ));
            }
            (mode, _) => x.push_str(&format!(
                "    <disk name='{}' snapshot='{}'/>\n",
                esc(&d.target),
                mode.as_str()
            )),
        }
    }
    x.push_str("  </disks>\n");
    x.push_str(&format!("  <active>{}</active>\n", u8::from(current)));
    for line in s.domain_xml.lines() {
        x.push_str("  ");
        x.push_str(line);
        x.push('\n');
    }
    x.push_str("</domainsnapshot>\n");
    x
}

fn temp_tag8() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0);
    format!(
        "{:08x}",
        (nanos ^ ((std::process::id() as u64) << 16)) & 0xffff_ffff
    )
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `<stem>.<snapshot>.qcow2` beside the image, where `<stem>` drops the
/// `.<name>` of an earlier snapshot whose overlay the image is (so a chain
/// reads vda.qcow2, vda.s1.qcow2, vda.s2.qcow2, not vda.s1.s2.qcow2).
fn default_overlay(source: &Path, snap: &str, earlier: &[DomSnapshot]) -> PathBuf {
    let mut stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for e in earlier {
        let made_it = e.disks.iter().any(|d| d.overlay.as_deref() == Some(source));
        if let (true, Some(base)) = (made_it, stem.strip_suffix(&format!(".{}", e.name))) {
            stem = base.to_string();
            break;
        }
    }
    source
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{stem}.{snap}.qcow2"))
}

/// A path the user gave, made absolute against the current directory.
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir()
        .map(|d| d.join(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// `<stem>.<snapshot>.<ext>` beside the image (a reflink clone).
fn default_clone(source: &Path, snap: &str) -> PathBuf {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match source.extension() {
        Some(e) => format!("{stem}.{snap}.{}", e.to_string_lossy()),
        None => format!("{stem}.{snap}"),
    };
    source.parent().unwrap_or(Path::new("/")).join(name)
}

fn writable_for(dir: &Path, target: &str) -> Result<()> {
    writable_as(dir, target, "external")
}

/// `dir` must be writable for disk `target`; the message names the
/// `--disk target=KIND:PATH` that picks another place.
fn writable_as(dir: &Path, target: &str, kind: &str) -> Result<()> {
    crate::volume::check_writable(dir).map_err(|_| {
        EngineError::Invalid(format!(
            "disk {target}: directory {} is not writable; choose a writable place with --disk {target}={kind}:PATH",
            dir.display()
        ))
    })
}

/// The directory of `file` (disk `target`'s new `what`): it must exist and
/// be writable.
fn file_dir(file: &Path, target: &str, what: &str, kind: &str) -> Result<PathBuf> {
    let dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    if !dir.is_dir() {
        return Err(EngineError::Invalid(format!(
            "directory {} for disk {target}'s {what} does not exist",
            dir.display()
        )));
    }
    writable_as(&dir, target, kind)?;
    Ok(dir)
}

/// One chosen disk, resolved at plan time.
struct Chosen {
    target: String,
    source: PathBuf,
    format: Format,
    mode: DiskMode,
    overlay: Option<PathBuf>,
}

/// The reflink disks' steps: clone to a temporary name beside the clone,
/// then move it (never clobbering) to the clone's name.
fn push_clones(steps: &mut Vec<Step>, chosen: &[Chosen], tag: &str) {
    for c in chosen.iter().filter(|c| c.mode == DiskMode::Reflink) {
        let dst = c.overlay.clone().expect("reflink disks have a clone path");
        let tmp = fsops::temp_path(&dst, tag);
        steps.push(Step::Clone {
            src: canon(&c.source),
            dst: tmp.clone(),
            mode: CloneMode::Reflink,
        });
        steps.push(Step::Rename {
            from: tmp,
            to: dst,
            replace: false,
        });
    }
}

impl Engine {
    /// Compile a domain snapshot (nothing is touched).
    pub fn plan_domain_snapshot(
        &self,
        req: &DomSnapRequest,
    ) -> Result<(Plan, DomSnapshot, DomainRec)> {
        crate::validate_description(req.description.as_deref())?;
        let d = self.domain(&req.domain)?;
        let existing = snapshots(self.journal(), &d.name)?;
        let name = match &req.name {
            Some(n) => n.clone(),
            None => crate::default_snapshot_name(|n| existing.iter().any(|s| s.name == n)),
        };
        validate_name(&name)?;
        if existing.iter().any(|s| s.name == name) {
            return Err(EngineError::Invalid(format!(
                "domain {:?} already has a snapshot named {name:?}; choose another name",
                d.name
            )));
        }
        let state = self.domain_state(&d)?;
        let live_guest = state != DomState::Shutoff;
        if req.live && !live_guest {
            return Err(EngineError::Invalid(format!(
                "domain {:?} is not running (no QEMU answers on its monitor {}); drop --live for an offline snapshot",
                d.name,
                d.qmp.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none configured)".into())
            )));
        }
        let memory = match (&req.memory, live_guest, req.disk_only) {
            (Some(MemoryChoice::Internal), _, true) => {
                return Err(EngineError::Invalid(
                    "--disk-only and --memory internal contradict each other".into(),
                ))
            }
            (Some(MemoryChoice::Internal), false, _) => {
                return Err(EngineError::Invalid(format!(
                    "a memory snapshot needs a running guest; domain {:?} is shut off",
                    d.name
                )))
            }
            (Some(MemoryChoice::Internal), true, false) => true,
            (Some(MemoryChoice::External(_)), _, true) => {
                return Err(EngineError::Invalid(
                    "--disk-only and --memory external:PATH contradict each other".into(),
                ))
            }
            (Some(MemoryChoice::External(_)), false, _) => {
                return Err(EngineError::Invalid(format!(
                    "a memory snapshot needs a running guest; domain {:?} is shut off",
                    d.name
                )))
            }
            (None, true, false) => true, // libvirt's default for a running guest: a full checkpoint
            (Some(MemoryChoice::No), true, false) => {
                // libvirt: without --disk-only the snapshot is internal,
                // and an internal snapshot of a running guest holds its
                // memory. Not read as "disk-only" in silence.
                return Err(EngineError::Invalid(format!(
                    "<memory snapshot='no'/> of a running guest (domain {:?}) without disk-only: an internal \
                     snapshot of a running guest must include the memory state (libvirt's rule); for a \
                     snapshot of the disks alone add --disk-only",
                    d.name
                )));
            }
            _ => false,
        };
        let memory_file: Option<PathBuf> = match &req.memory {
            Some(MemoryChoice::External(p)) if p.is_absolute() => Some(p.clone()),
            Some(MemoryChoice::External(p)) => Some(
                std::env::current_dir()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|_| p.clone()),
            ),
            _ => None,
        };
        if req.quiesce {
            if memory || memory_file.is_some() {
                return Err(EngineError::Invalid("--quiesce needs --disk-only (a memory snapshot of a frozen guest would restore it frozen)".into()));
            }
            if state != DomState::Running {
                return Err(EngineError::Invalid(format!(
                    "--quiesce needs a running guest with an agent; domain {:?} is {}",
                    d.name,
                    state.as_str()
                )));
            }
            let Some(agent) = &d.agent else {
                return Err(EngineError::Invalid(format!(
                    "--quiesce: domain {:?} has no guest-agent channel; give one (`vsnap domain attach --agent SOCKET`, or a <channel type='unix'> with target name org.qemu.guest_agent.0 in the domain XML), or drop --quiesce",
                    d.name
                )));
            };
            // A silent agent fails here, before anything is touched.
            live::agent(agent)
                .and_then(|mut a| a.ping())
                .map_err(EngineError::Check)?;
        }

        // Resolve every disk's choice: the request's, else the domain's
        // `<disk snapshot=...>` (libvirt's rule), else vsnap's default.
        // `None`: `snapshot='manual'`, which vsnap cannot honour.
        let default_mode = |disk: &domain::DomDisk| match disk.snapshot {
            Some(SnapshotDefault::No) => Some(DiskMode::No),
            Some(SnapshotDefault::Internal) => Some(DiskMode::Internal),
            Some(SnapshotDefault::External) => Some(DiskMode::External),
            Some(SnapshotDefault::Manual) => None,
            None => Some(if disk.readonly || disk.shareable {
                DiskMode::No
            } else if memory {
                DiskMode::Internal
            } else if live_guest || req.disk_only || disk.format == Format::Raw {
                // --disk-only of a shut-off guest: external overlays of
                // every disk, as `virsh snapshot-create --disk-only` makes.
                DiskMode::External
            } else {
                DiskMode::Internal
            }),
        };
        let mut picks: Vec<(&domain::DomDisk, Option<DiskMode>, Option<PathBuf>)> = d
            .disks
            .iter()
            .map(|disk| (disk, default_mode(disk), None))
            .collect();
        let mut named: Vec<(&str, &str)> = Vec::new();
        for (who, choice) in &req.disks {
            let disk = d.disk(who).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "domain {:?} has no disk {who:?}; its disks: {}",
                    d.name,
                    d.disks
                        .iter()
                        .map(|x| x.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            if let Some((first, _)) = named.iter().find(|(_, t)| *t == disk.target.as_str()) {
                return Err(EngineError::Invalid(format!(
                    "disk {} is named twice in the request (as {first:?} and as {who:?}); name each disk once",
                    disk.target
                )));
            }
            named.push((who.as_str(), disk.target.as_str()));
            let pick = picks
                .iter_mut()
                .find(|p| p.0.target == disk.target)
                .expect("every disk is in picks");
            (pick.1, pick.2) = match choice {
                DiskChoice::No => (Some(DiskMode::No), None),
                DiskChoice::Internal => (Some(DiskMode::Internal), None),
                DiskChoice::External(p) => (Some(DiskMode::External), p.clone()),
                DiskChoice::Reflink(p) => (Some(DiskMode::Reflink), p.clone()),
            };
        }
        let mut chosen: Vec<Chosen> = Vec::new();
        for (disk, mode, overlay) in picks {
            let t = &disk.target;
            let leave_out = format!(
                "leave it out with --disk {t}=no (or <disk name='{t}' snapshot='no'/> in the <domainsnapshot>)"
            );
            let Some(mode) = mode else {
                return Err(EngineError::Invalid(format!(
                    "disk {t}: the domain says snapshot='manual' (libvirt leaves this disk's snapshot to you), which vsnap cannot do in the middle of a snapshot; {leave_out}, or name its kind (--disk {t}=internal, --disk {t}=external)"
                )));
            };
            if mode == DiskMode::No {
                continue;
            }
            let Some(image) = disk.image() else {
                return Err(EngineError::Invalid(format!(
                    "disk {t}: vsnap cannot snapshot {}; {leave_out}, or mark it snapshot='no' in the domain XML",
                    disk.unsupported().unwrap_or("this disk")
                )));
            };
            chosen.push(Chosen {
                target: t.clone(),
                source: image.to_path_buf(),
                format: disk.format,
                mode,
                overlay,
            });
        }
        chosen.retain(|c| c.mode != DiskMode::No);
        if chosen.is_empty() {
            return Err(EngineError::Invalid(
                "no disk is selected for the snapshot".into(),
            ));
        }
        let has_reflink = chosen.iter().any(|c| c.mode == DiskMode::Reflink);
        for c in &mut chosen {
            if !c.source.exists() {
                return Err(EngineError::Invalid(format!(
                    "disk {}: its image {} is missing; the domain definition is stale",
                    c.target,
                    c.source.display()
                )));
            }
            // A backing loop or an over-deep chain, found at once (natively)
            // rather than by the first qemu-img that opens it.
            qemu_img::backing_chain(&c.source, c.format)
                .map_err(|e| EngineError::Invalid(format!("disk {}: {e}", c.target)))?;
            let is_block = {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(&c.source).is_ok_and(|m| m.file_type().is_block_device())
            };
            // The same rules as a volume's: an image another state
            // directory manages, or one with a second name (which would
            // become the frozen snapshot, writable behind vsnap's back),
            // is refused before anything is touched.
            if !is_block {
                crate::image::check_links(&c.source)?;
                crate::image::check_claim(self.journal(), &c.source)?;
            }
            match (c.mode, &c.overlay) {
                (DiskMode::External, None) if is_block => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: its image {} is a block device, and the overlay's default place is beside it (in {}); \
                         give the overlay a path on a filesystem with --disk {}=external:PATH",
                        c.target,
                        c.source.display(),
                        c.source.parent().unwrap_or(Path::new("/")).display(),
                        c.target
                    )))
                }
                (DiskMode::Reflink, _) if is_block => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: its image {} is a block device, which cannot be cloned with a reflink; \
                         use --disk {}=external:PATH with a path on a filesystem",
                        c.target,
                        c.source.display(),
                        c.target
                    )))
                }
                _ => {}
            }
            match c.mode {
                DiskMode::Internal if c.format != Format::Qcow2 => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: internal snapshots need qcow2; {} is raw: use --disk {}=external",
                        c.target,
                        c.source.display(),
                        c.target
                    )))
                }
                DiskMode::Internal if memory => {}
                DiskMode::Internal if live_guest => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: an internal disk-only snapshot of a running guest is not supported; use --disk {}=external, or a memory snapshot",
                        c.target, c.target
                    )))
                }
                DiskMode::External if memory => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: a memory snapshot keeps every disk internally; add --disk-only for external disk snapshots",
                        c.target
                    )))
                }
                DiskMode::Reflink if memory => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: a memory snapshot keeps every disk internally; add --disk-only for a reflink clone of it",
                        c.target
                    )))
                }
                DiskMode::Reflink if c.format != Format::Raw => {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: reflink clones are for raw images; {} is {}: use --disk {}=external (or internal)",
                        c.target,
                        c.source.display(),
                        c.format,
                        c.target
                    )))
                }
                _ => {}
            }
            if let Some(p) = &c.overlay {
                crate::volume::not_a_temp_name(
                    p,
                    &format!("--disk {}={}:PATH", c.target, c.mode.as_str()),
                )?;
            }
            if c.mode == DiskMode::Reflink {
                let dst = match &c.overlay {
                    Some(p) => absolute(p),
                    None => default_clone(&c.source, &name),
                };
                if std::fs::symlink_metadata(&dst).is_ok() {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: {} already exists; vsnap never overwrites a file it did not create: \
                         choose another snapshot name or --disk {}=reflink:PATH",
                        c.target,
                        dst.display(),
                        c.target
                    )));
                }
                let dir = file_dir(&dst, &c.target, "clone", "reflink")?;
                use std::os::unix::fs::MetadataExt;
                let same_fs = match (std::fs::metadata(&dir), std::fs::metadata(&c.source)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev(),
                    _ => false,
                };
                if !same_fs || !vsnap_steps::clone::reflink_supported(&dir) {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: {} cannot hold a reflink clone of {} ({}); reflinks need one \
                         filesystem that can clone (btrfs, xfs): use --disk {}=external",
                        c.target,
                        dir.display(),
                        c.source.display(),
                        if same_fs {
                            "its filesystem cannot clone"
                        } else {
                            "another filesystem"
                        },
                        c.target
                    )));
                }
                c.overlay = Some(dst);
            }
            if c.mode == DiskMode::External {
                let o = match &c.overlay {
                    Some(p) => absolute(p),
                    None => default_overlay(&c.source, &name, &existing),
                };
                let exists = std::fs::symlink_metadata(&o).is_ok();
                if req.reuse_external {
                    if !exists {
                        return Err(EngineError::Invalid(format!(
                            "--reuse-external: overlay {} for disk {} does not exist",
                            o.display(),
                            c.target
                        )));
                    }
                    let info = qemu_img::image_info(&o, Format::Qcow2, true)
                        .map_err(EngineError::Check)?;
                    if info.backing.as_deref().map(canon) != Some(canon(&c.source)) {
                        return Err(EngineError::Invalid(format!(
                            "--reuse-external: overlay {} is backed by {:?}, not by disk {}'s image {}",
                            o.display(),
                            info.backing,
                            c.target,
                            c.source.display()
                        )));
                    }
                } else if exists {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: overlay {} already exists; vsnap never overwrites a file it did not create: \
                         choose another snapshot name or --disk {}=external:PATH",
                        c.target,
                        o.display(),
                        c.target
                    )));
                }
                file_dir(&o, &c.target, "overlay", "external")?;
                c.overlay = Some(o);
            } else if !live_guest {
                // Offline: the image must not be held by some QEMU we do not know of.
                let info =
                    qemu_img::image_info(&c.source, c.format, false).map_err(EngineError::Check)?;
                if c.format == Format::Qcow2 {
                    qemu_img::refuse_damaged(&c.source).map_err(EngineError::Check)?;
                }
                if info.snapshots.contains(&name) {
                    return Err(EngineError::Invalid(format!(
                        "disk {}: {} already holds an internal snapshot named {name:?}; choose another name",
                        c.target,
                        c.source.display()
                    )));
                }
                writable_for(c.source.parent().unwrap_or(Path::new("/")), &c.target)?;
            }
        }

        // Two disks on one new file would share one overlay (or clone):
        // `data.img` and `data.raw` both default to `data.<snap>.qcow2`.
        for (i, a) in chosen.iter().enumerate() {
            let Some(pa) = &a.overlay else { continue };
            if let Some(b) = chosen[i + 1..].iter().find(|b| {
                b.overlay
                    .as_deref()
                    .is_some_and(|pb| crate::plan::normalise(pb) == crate::plan::normalise(pa))
            }) {
                return Err(EngineError::Invalid(format!(
                    "disks {} and {} would both get the new file {}; give each its own with --disk {}={}:PATH",
                    a.target,
                    b.target,
                    pa.display(),
                    b.target,
                    b.mode.as_str()
                )));
            }
        }

        if let Some(mf) = &memory_file {
            crate::volume::not_a_temp_name(mf, "--memory external:PATH")?;
            if std::fs::symlink_metadata(mf).is_ok() {
                return Err(EngineError::Invalid(format!(
                    "memory file {} already exists; vsnap never overwrites a file it did not create: \
                     choose another --memory external:PATH",
                    mf.display()
                )));
            }
            if chosen
                .iter()
                .any(|c| c.overlay.as_deref() == Some(mf.as_path()))
            {
                return Err(EngineError::Invalid(format!(
                    "memory file {} is also a disk's new file; choose another --memory external:PATH",
                    mf.display()
                )));
            }
            let dir = mf.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() {
                return Err(EngineError::Invalid(format!(
                    "directory {} for the memory file does not exist",
                    dir.display()
                )));
            }
            crate::volume::check_writable(dir).map_err(|_| {
                EngineError::Invalid(format!(
                    "directory {} for the memory file is not writable; choose another --memory external:PATH",
                    dir.display()
                ))
            })?;
            let qmp = d.qmp.clone().expect("a live guest has a monitor");
            let ram = live::qmp(&qmp)
                .and_then(|mut q| q.execute("query-memory-size-summary", Value::Null))
                .map_err(EngineError::Check)?["base-memory"]
                .as_u64()
                .unwrap_or(0);
            let free = vsnap_steps::clone::available_space(dir).map_err(EngineError::Check)?;
            if free < ram {
                return Err(EngineError::Invalid(format!(
                    "the memory file needs up to {} MiB (the guest's RAM) and {} has {} MiB free; \
                     choose another --memory external:PATH",
                    ram >> 20,
                    dir.display(),
                    free >> 20
                )));
            }
        }

        let tag = temp_tag8();
        let mut steps = Vec::new();
        let pivot;
        let snap_state;
        let mut new_dom = d.clone();
        if live_guest {
            let qmp = d.qmp.clone().expect("a live guest has a monitor");
            let mut q = live::qmp(&qmp).map_err(EngineError::Check)?;
            let blocks = q.query_block_typed().map_err(EngineError::Check)?;
            let nodes = q
                .query_named_block_nodes_typed()
                .map_err(EngineError::Check)?;
            drop(q);
            // Each chosen disk's device and top node, found by its image.
            let mut found: Vec<(String, String)> = Vec::new();
            for c in &chosen {
                let entry = blocks.iter().find_map(|b| {
                    let ins = b.inserted.as_ref()?;
                    (canon(Path::new(&ins.file)) == canon(&c.source)).then_some((b, ins))
                });
                let Some((entry, ins)) = entry else {
                    return Err(EngineError::Invalid(format!(
                        "QEMU does not use {} (disk {}) now; the domain definition is stale: `vsnap domain undefine` and `vsnap domain attach` it again",
                        c.source.display(),
                        c.target
                    )));
                };
                found.push((entry.key.clone(), ins.node_name.clone()));
            }
            if memory {
                for (c, (_, node)) in chosen.iter().zip(&found) {
                    let has = nodes
                        .iter()
                        .any(|n| n.node_name == *node && n.snapshots.contains(&name));
                    if has {
                        return Err(EngineError::Invalid(format!(
                            "disk {}: its image already holds an internal snapshot named {name:?}; choose another name",
                            c.target
                        )));
                    }
                }
                let devices: Vec<String> = found.iter().map(|(_, n)| n.clone()).collect();
                // --halt: paused first, so the guest never runs past the snapshot.
                let pause = req.halt && state == DomState::Running;
                if pause {
                    steps.push(Step::QmpStop { qmp: qmp.clone() });
                }
                pivot = steps.len() as u32;
                steps.push(Step::QmpSnapshotSave {
                    qmp: qmp.clone(),
                    job: format!("vsnap-{tag}"),
                    tag: name.clone(),
                    vmstate: devices[0].clone(),
                    devices,
                });
                if req.halt {
                    steps.push(Step::QmpQuit { qmp: qmp.clone() });
                }
                snap_state = DomSnapState::from(state);
            } else {
                let mut live_disks = Vec::new();
                for (i, (c, (dev, node))) in chosen.iter().zip(&found).enumerate() {
                    if c.mode != DiskMode::External {
                        continue;
                    }
                    let overlay = c.overlay.clone().expect("external disks have an overlay");
                    if !req.reuse_external {
                        steps.push(Step::CreateOverlay {
                            path: overlay.clone(),
                            backing: canon(&c.source),
                            backing_format: c.format,
                        });
                    }
                    live_disks.push((i, overlay, dev.clone(), node.clone()));
                }
                let mut tx = Vec::new();
                for (i, overlay, dev, node) in live_disks {
                    let ov_node = format!("vsnap-{tag}-{i}");
                    steps.push(Step::QmpBlockdevAdd {
                        qmp: qmp.clone(),
                        node: ov_node.clone(),
                        file_node: format!("{ov_node}f"),
                        path: overlay,
                    });
                    tx.push(LiveDisk {
                        device: dev,
                        node,
                        overlay: ov_node,
                    });
                }
                let agent = if req.quiesce { d.agent.clone() } else { None };
                if let Some(a) = &agent {
                    steps.push(Step::AgentFreeze { agent: a.clone() });
                }
                // Raw disks cloned outside QEMU, and --halt, need the
                // guest's CPUs stopped (QEMU drains and flushes every disk
                // on `stop`); a paused guest is paused already.
                let pause = state == DomState::Running
                    && (has_reflink || req.halt || memory_file.is_some());
                if pause {
                    steps.push(Step::QmpStop { qmp: qmp.clone() });
                }
                if let Some(mf) = &memory_file {
                    // The paused guest's memory, then the disks at the
                    // same instant (nothing runs in between).
                    let tmp = fsops::temp_path(mf, &tag);
                    steps.push(Step::QmpMigrateToFile {
                        qmp: qmp.clone(),
                        fdname: format!("vsnap-{tag}"),
                        path: tmp.clone(),
                    });
                    steps.push(Step::Rename {
                        from: tmp,
                        to: mf.clone(),
                        replace: false,
                    });
                }
                push_clones(&mut steps, &chosen, &tag);
                pivot = steps.len() as u32;
                if tx.is_empty() {
                    steps.push(Step::Catalog);
                } else {
                    steps.push(Step::QmpSnapshotTransaction {
                        qmp: qmp.clone(),
                        disks: tx,
                    });
                }
                if req.halt {
                    // The guest stays paused and QEMU exits: a frozen
                    // guest that never runs again needs no thaw (and a
                    // paused guest's agent could not answer one).
                    steps.push(Step::QmpQuit { qmp: qmp.clone() });
                } else {
                    if pause {
                        steps.push(Step::QmpCont { qmp: qmp.clone() });
                    }
                    if let Some(a) = agent {
                        steps.push(Step::AgentThaw { agent: a });
                    }
                }
                snap_state = if memory_file.is_some() {
                    DomSnapState::from(state)
                } else {
                    DomSnapState::DiskSnapshot
                };
            }
        } else {
            for c in &chosen {
                match c.mode {
                    DiskMode::Internal => steps.push(Step::InternalCreate {
                        // the disk's real file: vsnap opens it without
                        // following a link
                        image: canon(&c.source),
                        name: name.clone(),
                    }),
                    DiskMode::External if !req.reuse_external => steps.push(Step::CreateOverlay {
                        path: c.overlay.clone().expect("external disks have an overlay"),
                        backing: canon(&c.source),
                        backing_format: c.format,
                    }),
                    _ => {}
                }
            }
            push_clones(&mut steps, &chosen, &tag);
            pivot = steps.len() as u32;
            steps.push(Step::Catalog);
            snap_state = DomSnapState::Shutoff;
        }

        // The catalog after the pivot.
        for c in &chosen {
            if let (DiskMode::External, Some(o)) = (c.mode, &c.overlay) {
                let disk = new_dom
                    .disks
                    .iter_mut()
                    .find(|x| x.target == c.target)
                    .expect("chosen disks exist");
                disk.source = DiskSource::File(o.clone());
                disk.format = Format::Qcow2;
            }
        }
        let snap = DomSnapshot {
            name: name.clone(),
            domain: d.name.clone(),
            description: req.description.clone(),
            creation_time: now_unix(),
            parent: d.current.clone(),
            seq: d.next_seq,
            state: snap_state,
            memory_internal: memory,
            quiesced: req.quiesce,
            // A disk vsnap cannot snapshot (network, ...) is left out.
            disks: d
                .disks
                .iter()
                .filter(|disk| disk.image().is_some())
                .map(
                    |disk| match chosen.iter().find(|c| c.target == disk.target) {
                        Some(c) if c.mode == DiskMode::Reflink => DomSnapDisk {
                            target: c.target.clone(),
                            mode: c.mode,
                            state_file: c.overlay.clone().expect("reflink disks have a clone path"),
                            overlay: None,
                        },
                        Some(c) => DomSnapDisk {
                            target: c.target.clone(),
                            mode: c.mode,
                            state_file: c.source.clone(),
                            overlay: c.overlay.clone(),
                        },
                        None => DomSnapDisk {
                            target: disk.target.clone(),
                            mode: DiskMode::No,
                            state_file: disk.image().expect("filtered").to_path_buf(),
                            overlay: None,
                        },
                    },
                )
                .collect(),
            domain_xml: domain_to_xml(&d),
            memory_file: memory_file.clone(),
        };
        let mut catalog = Vec::new();
        if !req.no_metadata {
            new_dom.current = Some(name.clone());
            new_dom.next_seq += 1;
            catalog.push(put_snapshot_op(&snap));
        }
        catalog.push(put_domain(&new_dom));
        let kind = if memory {
            "internal snapshot with memory"
        } else if memory_file.is_some() {
            "live snapshot with external memory"
        } else if live_guest {
            "live disk-only snapshot"
        } else {
            "offline snapshot"
        };
        let halt = if req.halt && live_guest {
            ", then QEMU quits (--halt)"
        } else {
            ""
        };
        let plan = Plan {
            op: "domain.snapshot.create".into(),
            summary: format!(
                "{kind} {name:?} of domain {} ({}){halt}",
                d.name,
                chosen
                    .iter()
                    .map(|c| format!("{}={}", c.target, c.mode.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            steps,
            pivot,
            catalog,
        };
        plan.check_paths()?;
        Ok((plan, snap, new_dom))
    }

    /// Take a domain snapshot (or, with `dry_run`, only compile its plan).
    pub fn domain_snapshot_create(
        &self,
        req: &DomSnapRequest,
        dry_run: bool,
    ) -> Result<DomSnapDone> {
        let _g = self.lock_ops();
        // One QEMU monitor connection for the planning's questions and
        // every step of the plan (released when this call returns).
        let _held = live::hold_connections();
        let (plan, snapshot, _) = self.plan_domain_snapshot(req)?;
        let plan_text = plan.render();
        let id = if dry_run {
            None
        } else {
            Some(crate::plan::run(self.journal(), &plan, &self.cx())?.0)
        };
        Ok(DomSnapDone {
            plan: id,
            plan_text,
            snapshot,
            dry_run,
        })
    }

    /// Take a domain snapshot from a `<domainsnapshot>` document and typed
    /// flags (libvirt's `virDomainSnapshotCreateXML`):
    /// [`DomSnapRequest::new`] then [`Engine::domain_snapshot_create`].
    /// With `dry_run`, only the plan is compiled and nothing is changed.
    ///
    /// Needs the domain defined (`domain_define`/`domain_attach`); a
    /// running one, its QMP socket (and the agent's, to quiesce). Changes:
    /// the chosen disks are snapshotted (overlays, internal snapshots or
    /// clones; a running guest's disks switched by QEMU), the snapshot is
    /// recorded and made current (unless `no_metadata`). On failure before
    /// the pivot nothing is left changed (the plan rolled back; `Xml` and
    /// every refusal before a plan change nothing); after it, see
    /// [`EngineError::needs_attention`]. Errors: `Xml` (the document);
    /// from [`Engine::plan_domain_snapshot`], `Invalid` (no such domain, a
    /// name in use, a choice that does not fit its disks or state),
    /// `BadName`, `Check` (an image or QEMU found unfit); and those of
    /// running the plan (`Step`, `StepRepaired`, `AfterPivot`, `Journal`).
    pub fn domain_snapshot_create_xml(
        &self,
        domain: &str,
        xml: Option<&str>,
        flags: DomSnapFlags,
        dry_run: bool,
    ) -> Result<DomSnapDone> {
        self.domain_snapshot_create(&DomSnapRequest::new(domain, xml, flags)?, dry_run)
    }

    /// Every snapshot of the domain, oldest first (libvirt's
    /// `virDomainListAllSnapshots`). Needs the domain defined; changes
    /// nothing. Errors: `Invalid` (no such domain), `Journal` (the catalog
    /// cannot be read, or a record does not decode).
    pub fn domain_snapshot_list(&self, domain: &str) -> Result<Vec<DomSnapshot>> {
        let d = self.domain(domain)?;
        snapshots(self.journal(), &d.name)
    }

    /// The names of the domain's snapshots, oldest first (libvirt's
    /// `virDomainSnapshotListNames`). Needs, changes and fails as
    /// [`Engine::domain_snapshot_list`].
    pub fn domain_snapshot_list_names(&self, domain: &str) -> Result<Vec<String>> {
        Ok(self
            .domain_snapshot_list(domain)?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    /// How many snapshots the domain has (libvirt's
    /// `virDomainSnapshotNum`). Needs, changes and fails as
    /// [`Engine::domain_snapshot_list`].
    pub fn domain_snapshot_num(&self, domain: &str) -> Result<usize> {
        Ok(self.domain_snapshot_list(domain)?.len())
    }

    /// The snapshot named `name` (libvirt's
    /// `virDomainSnapshotLookupByName`). Needs the domain defined; changes
    /// nothing. Errors: `Invalid` (no such domain, or no snapshot of that
    /// name), `Journal`.
    pub fn domain_snapshot_lookup_by_name(&self, domain: &str, name: &str) -> Result<DomSnapshot> {
        self.domain_snapshot_list(domain)?.into_iter().find(|s| s.name == name).ok_or_else(|| {
            EngineError::Invalid(format!(
                "domain {domain:?} has no snapshot named {name:?}; `vsnap snapshot list {domain}` lists them"
            ))
        })
    }

    /// The current snapshot (the last made or reverted to), if any
    /// (libvirt's `virDomainSnapshotCurrent`, which fails where this
    /// returns `None`). Needs, changes and fails as
    /// [`Engine::domain_snapshot_list`].
    pub fn domain_snapshot_current(&self, domain: &str) -> Result<Option<DomSnapshot>> {
        let d = self.domain(domain)?;
        match d.current {
            None => Ok(None),
            Some(c) => self.domain_snapshot_lookup_by_name(domain, &c).map(Some),
        }
    }

    /// Whether the domain has a current snapshot (libvirt's
    /// `virDomainHasCurrentSnapshot`). Needs, changes and fails as
    /// [`Engine::domain_snapshot_list`].
    pub fn domain_has_current_snapshot(&self, domain: &str) -> Result<bool> {
        Ok(self.domain_snapshot_current(domain)?.is_some())
    }

    /// The snapshot named `name` as a `<domainsnapshot>` document, with
    /// the domain as it was and `<active>` for the current one (libvirt's
    /// `virDomainSnapshotGetXMLDesc`); [`parse_domainsnapshot`] reads it
    /// back. Changes nothing. Errors: those of
    /// [`Engine::domain_snapshot_lookup_by_name`].
    pub fn domain_snapshot_get_xml_desc(&self, domain: &str, name: &str) -> Result<String> {
        let s = self.domain_snapshot_lookup_by_name(domain, name)?;
        let cur = self.domain(domain)?.current.as_deref() == Some(name);
        Ok(domainsnapshot_to_xml(&s, cur))
    }
}

/// The result of a domain snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct DomSnapDone {
    /// The journal's plan id (None for a dry run).
    pub plan: Option<u64>,
    /// The compiled plan, one line per step.
    pub plan_text: String,
    /// The snapshot made (or that a dry run would make).
    pub snapshot: DomSnapshot,
    /// Whether this was a dry run (nothing changed).
    pub dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_or_empty_elements_are_refused() {
        for (bad, says) in [
            ("<domainsnapshot><name>a</name><name>b</name></domainsnapshot>", "more than one <name>"),
            ("<domainsnapshot><name></name></domainsnapshot>", "<name> is empty"),
            (
                "<domainsnapshot><disks><disk name='vda'><source file='/a'/><source file='/b'/></disk></disks></domainsnapshot>",
                "more than one <source>",
            ),
            (
                "<domainsnapshot><disks><disk name='vda'><volsnapshot><kind>reflink</kind><kind>no</kind></volsnapshot></disk></disks></domainsnapshot>",
                "more than one <kind>",
            ),
        ] {
            let e = parse_domainsnapshot(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let r = parse_domainsnapshot("<domainsnapshot><name>s<!-- -->1</name></domainsnapshot>")
            .unwrap();
        assert_eq!(r.name.as_deref(), Some("s1"));
    }

    #[test]
    fn accepts_libvirt_snapshot_xml() {
        let r = parse_domainsnapshot(
            "<domainsnapshot><name>s1</name><description>d</description><memory snapshot='no'/>\
             <disks><disk name='vda' snapshot='external'><driver type='qcow2'/><source file='/o/a.qcow2'/></disk>\
             <disk name='vdb' snapshot='no'/><disk name='/vm/c.qcow2'><volsnapshot><kind>internal</kind></volsnapshot></disk></disks>\
             <state>disk-snapshot</state><creationTime>1</creationTime></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(r.name.as_deref(), Some("s1"));
        assert_eq!(r.memory, Some(MemoryChoice::No));
        assert_eq!(
            r.disks[0],
            (
                "vda".into(),
                DiskChoice::External(Some("/o/a.qcow2".into()))
            )
        );
        assert_eq!(r.disks[1], ("vdb".into(), DiskChoice::No));
        assert_eq!(r.disks[2], ("/vm/c.qcow2".into(), DiskChoice::Internal));
    }

    #[test]
    fn reflink_disks_round_trip_through_xml() {
        let snap = DomSnapshot {
            name: "r1".into(),
            domain: "d".into(),
            description: None,
            creation_time: 1,
            parent: None,
            seq: 0,
            state: DomSnapState::DiskSnapshot,
            memory_internal: false,
            quiesced: false,
            disks: vec![DomSnapDisk {
                target: "vdb".into(),
                mode: DiskMode::Reflink,
                state_file: "/vm/vdb.r1.raw".into(),
                overlay: None,
            }],
            domain_xml: String::new(),
            memory_file: None,
        };
        let x = domainsnapshot_to_xml(&snap, true);
        assert!(x.contains("<disk name='vdb' snapshot='manual'>"), "{x}");
        let r = parse_domainsnapshot(&x).unwrap();
        assert_eq!(
            r.disks,
            vec![(
                "vdb".to_string(),
                DiskChoice::Reflink(Some("/vm/vdb.r1.raw".into()))
            )]
        );
        assert_eq!(
            default_clone(Path::new("/vm/vdb.raw"), "s1"),
            Path::new("/vm/vdb.s1.raw")
        );
    }

    /// libvirt's `<domainsnapshot>` rules (formatsnapshot), a document
    /// each: what vsnap reads, or the words of its refusal.
    #[test]
    fn domainsnapshot_documents_are_read_as_libvirt_reads_them_or_refused() {
        fn doc(inner: &str) -> String {
            format!("<domainsnapshot><name>s</name>{inner}</domainsnapshot>")
        }
        let ext = |p: &str| DiskChoice::External(Some(PathBuf::from(p)));
        // Read: (document, memory, disks)
        type Read<'a> = (&'a str, Option<MemoryChoice>, Vec<(&'a str, DiskChoice)>);
        let read: &[Read] = &[
            ("", None, vec![]),
            // a memory file without snapshot= is an external memory snapshot
            ("<memory file='/vm/m.mem'/>", Some(MemoryChoice::External("/vm/m.mem".into())), vec![]),
            ("<memory snapshot='external' file='/vm/m.mem'/>", Some(MemoryChoice::External("/vm/m.mem".into())), vec![]),
            ("<memory snapshot='no'/>", Some(MemoryChoice::No), vec![]),
            ("<memory snapshot='internal'/>", Some(MemoryChoice::Internal), vec![]),
            ("<memory/>", None, vec![]),
            // a <source> or a <driver> without snapshot= means external
            ("<disks><disk name='vda'><source file='/o/a.qcow2'/></disk></disks>", None, vec![("vda", ext("/o/a.qcow2"))]),
            ("<disks><disk name='vda'><driver type='qcow2'/></disk></disks>", None, vec![("vda", DiskChoice::External(None))]),
            (
                "<disks><disk name='vda' snapshot='external' type='file'><driver type='qcow2'/><source file='/o/a.qcow2'/></disk></disks>",
                None,
                vec![("vda", ext("/o/a.qcow2"))],
            ),
            ("<disks><disk name='vda'/></disks>", None, vec![]),
            ("<disks><disk name='vda' snapshot='no'/><disk name='vdb' snapshot='internal'/></disks>", None,
             vec![("vda", DiskChoice::No), ("vdb", DiskChoice::Internal)]),
            (
                "<disks><disk name='vdb' snapshot='manual'><volsnapshot><kind>reflink</kind><file>/vm/b.r.raw</file></volsnapshot></disk></disks>",
                None,
                vec![("vdb", DiskChoice::Reflink(Some("/vm/b.r.raw".into())))],
            ),
            // output-only elements of libvirt's own dumpxml are ignored on create, as libvirt does
            ("<state>running</state><creationTime>5</creationTime><parent><name>p</name></parent><active>1</active>", None, vec![]),
        ];
        for (inner, memory, disks) in read {
            let r = parse_domainsnapshot(&doc(inner)).unwrap_or_else(|e| panic!("{inner}: {e}"));
            assert_eq!(&r.memory, memory, "{inner}");
            let want: Vec<(String, DiskChoice)> = disks
                .iter()
                .map(|(n, c)| (n.to_string(), c.clone()))
                .collect();
            assert_eq!(r.disks, want, "{inner}");
        }
        // Refused: (document, words of the error)
        let refused: &[(&str, &[&str])] = &[
            ("<memory snapshot='no' file='/vm/m.mem'/>", &["contradicts", "snapshot='external'"]),
            ("<memory snapshot='internal' file='/vm/m.mem'/>", &["contradicts"]),
            ("<memory snapshot='external'/>", &["needs file="]),
            ("<memory snapshot='manual'/>", &["'manual' memory snapshot is not supported"]),
            ("<memory file='m.mem'/>", &["m.mem", "must be absolute"]),
            ("<memory snapshot='external' file='/m' colour='red'/>", &["colour", "not something vsnap acts on"]),
            ("<disks><disk name='vda' snapshot='no'/><disk name='vda' snapshot='external'/></disks>", &["disk 'vda' is named twice"]),
            ("<disks><disk name='vda' snapshot='internal'><source file='/o/a.qcow2'/></disk></disks>", &["/o/a.qcow2", "needs snapshot='external'"]),
            ("<disks><disk name='vda' snapshot='no'><source file='/o/a.qcow2'/></disk></disks>", &["needs snapshot='external'"]),
            ("<disks><disk name='vda'><source file='a.qcow2'/></disk></disks>", &["a.qcow2", "must be an absolute path"]),
            ("<disks><disk name='vda'><driver type='raw'/><source file='/o/a.raw'/></disk></disks>", &["type='raw'", "cannot be raw"]),
            ("<disks><disk name='vda'><driver type='qed'/><source file='/o/a.qed'/></disk></disks>", &["type='qed'", "qcow2 overlays only"]),
            ("<disks><disk name='vda' snapshot='internal'><driver type='qcow2'/></disk></disks>", &["drop <driver>"]),
            ("<disks><disk name='vda' snapshot='manual'/></disks>", &["snapshot='manual'", "no, internal or external"]),
            ("<disks><disk name='vda' snapshot='external' type='network'><source protocol='rbd' name='pool/a'><host name='h'/></source></disk></disks>",
             &["<disk name='vda'>", "type='network'", "snapshot='no'"]),
            ("<disks><disk name='vda' snapshot='external' type='block'><source dev='/dev/sdz'/></disk></disks>", &["type='block'", "not supported"]),
            ("<disks><disk name='vda' type='volume'/></disks>", &["type='volume'"]),
            ("<disks><disk name='vda'><source file='/o/a.qcow2' startupPolicy='optional'/></disk></disks>", &["startupPolicy", "not something vsnap acts on"]),
            ("<disks><disk name='vda'><source dev='/dev/sdz'/></disk></disks>", &["dev=", "not something vsnap acts on"]),
            ("<disks><disk name='vda'><source file='/o/a.qcow2'><seclabel/></source></disk></disks>", &["<seclabel>"]),
            ("<disks><disk name='vda' persistent='yes'/></disks>", &["persistent"]),
            ("<disks><disk name='vda'><target dev='vda'/></disk></disks>", &["<target>"]),
            ("<disks><disk name='vda'><driver type='qcow2'><metadata_cache/></driver></disk></disks>", &["<metadata_cache>"]),
            ("<disks><volume name='x'/></disks>", &["<volume>"]),
        ];
        for (inner, words) in refused {
            let e = parse_domainsnapshot(&doc(inner))
                .map(|r| format!("accepted: {r:?}"))
                .unwrap_or_else(|e| e.to_string());
            for w in *words {
                assert!(e.contains(w), "{inner}: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn names_an_unknown_element() {
        let e = parse_domainsnapshot("<domainsnapshot><colour/></domainsnapshot>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("<colour>"), "{e}");
    }

    const MERGE_XML: &str = "<domainsnapshot><name>x</name><description>from xml</description>\
        <memory snapshot='external' file='/m/mem'/>\
        <disks><disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='no'/></disks>\
        </domainsnapshot>";

    #[test]
    fn request_new_without_xml_is_the_flags() {
        let r = DomSnapRequest::new(
            "d",
            None,
            DomSnapFlags {
                name: Some("s".into()),
                live: true,
                quiesce: true,
                halt: true,
                disks: vec![("vda".into(), DiskChoice::External(None))],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.domain, "d");
        assert_eq!(r.name.as_deref(), Some("s"));
        assert!(r.live && r.quiesce && r.halt);
        assert!(!r.disk_only && !r.no_metadata && !r.reuse_external);
        assert_eq!(r.memory, None);
        assert_eq!(r.disks, vec![("vda".into(), DiskChoice::External(None))]);
    }

    #[test]
    fn request_new_flags_win_over_xml() {
        // Nothing given: the document's choices stand.
        let r = DomSnapRequest::new("d", Some(MERGE_XML), DomSnapFlags::default()).unwrap();
        assert_eq!(r.name.as_deref(), Some("x"));
        assert_eq!(r.description.as_deref(), Some("from xml"));
        assert_eq!(r.memory, Some(MemoryChoice::External("/m/mem".into())));
        assert_eq!(
            r.disks,
            vec![
                ("vda".into(), DiskChoice::Internal),
                ("vdb".into(), DiskChoice::No)
            ]
        );
        // Given: the flags win.
        let r = DomSnapRequest::new(
            "d",
            Some(MERGE_XML),
            DomSnapFlags {
                name: Some("y".into()),
                description: Some("from flags".into()),
                memory: Some(MemoryChoice::Internal),
                no_metadata: true,
                reuse_external: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.domain, "d");
        assert_eq!(r.name.as_deref(), Some("y"));
        assert_eq!(r.description.as_deref(), Some("from flags"));
        assert_eq!(r.memory, Some(MemoryChoice::Internal));
        assert!(r.no_metadata && r.reuse_external && !r.disk_only);
    }

    #[test]
    fn request_new_memory_no_is_disk_only() {
        let r = DomSnapRequest::new(
            "d",
            Some(MERGE_XML),
            DomSnapFlags {
                memory: Some(MemoryChoice::No),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.disk_only);
        assert_eq!(r.memory, None);
        // --disk-only alone keeps the document's memory choice for the
        // planner to judge; with the document's snapshot='no' it is dropped.
        let r = DomSnapRequest::new(
            "d",
            Some("<domainsnapshot><memory snapshot='no'/></domainsnapshot>"),
            DomSnapFlags {
                disk_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.disk_only);
        assert_eq!(r.memory, None);
        // The document's snapshot='no' alone does not make it disk-only.
        let r = DomSnapRequest::new(
            "d",
            Some("<domainsnapshot><memory snapshot='no'/></domainsnapshot>"),
            DomSnapFlags::default(),
        )
        .unwrap();
        assert!(!r.disk_only);
        assert_eq!(r.memory, Some(MemoryChoice::No));
    }

    #[test]
    fn request_new_disk_flag_replaces_the_xml_choice() {
        let r = DomSnapRequest::new(
            "d",
            Some(MERGE_XML),
            DomSnapFlags {
                disks: vec![
                    (
                        "vdb".into(),
                        DiskChoice::External(Some("/o/b.qcow2".into())),
                    ),
                    ("vdc".into(), DiskChoice::Internal),
                    ("vdc".into(), DiskChoice::No),
                ],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            r.disks,
            vec![
                ("vda".into(), DiskChoice::Internal),
                (
                    "vdb".into(),
                    DiskChoice::External(Some("/o/b.qcow2".into()))
                ),
                ("vdc".into(), DiskChoice::No),
            ]
        );
    }

    #[test]
    fn request_new_refuses_a_bad_document() {
        let e = DomSnapRequest::new(
            "d",
            Some("<domainsnapshot><colour/></domainsnapshot>"),
            DomSnapFlags {
                name: Some("s".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, EngineError::Xml(_)), "{e}");
    }
}
