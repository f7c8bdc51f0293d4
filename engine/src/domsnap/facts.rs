//! Everything planning needs to know of the world, gathered in one place:
//! the domain's snapshots and run state, the agent, every chosen disk's
//! image (exists, backing chain, links, claim, block device or file,
//! reflink support, internal snapshot names, new files free), free space
//! for a memory file, and, for a running guest, which device and top node
//! each disk runs on (`query-block`). Every IO of a domain snapshot's
//! planning is here; [`super::compile`] does none.
//!
//! The checks run in the order the request reads (the domain, the name,
//! the state, the memory, the quiesce, each disk in turn, the new files,
//! the memory file, QEMU's view), so a request with several faults is
//! refused for the first of them, always the same.

use super::{DiskChoice, DiskMode, DomSnapRequest, DomSnapshot, MemoryChoice};
use crate::catalog::dom::{self as catalog, QemuView};
use crate::domain::{DomDisk, DomState, DomainRec, SnapshotDefault};
use crate::{validate_name, Engine, EngineError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use vsnap_steps::{live, qemu_img, Format};

/// What planning knows, as plain data: the request resolved against the
/// domain and the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    /// The domain as the catalog has it.
    pub domain: DomainRec,
    /// What QEMU says of it now.
    pub state: DomState,
    /// The snapshot's name (given, or the default).
    pub name: String,
    /// The guest's memory is kept inside the disks (`snapshot-save`).
    pub memory: bool,
    /// `--memory external:PATH`, made absolute.
    pub memory_file: Option<PathBuf>,
    /// The chosen disks, in the domain's order (none is `DiskMode::No`).
    pub disks: Vec<Chosen>,
    /// The random tag of this plan's node names, job id and temporary
    /// files.
    pub tag: String,
    /// The snapshot's creation time (seconds since the epoch).
    pub now: i64,
    /// The domain as `<domain>` XML now (what the snapshot keeps for its
    /// revert: [`Engine::domain_xml`]).
    pub domain_xml: String,
    /// A running guest: what its QEMU will run once the plan's pivot is
    /// done (the located view, each external disk on its overlay's
    /// node), written with the plan's records; `None` offline or when
    /// the kernel does not name the QEMU process.
    pub view_after: Option<QemuView>,
}

impl Facts {
    /// QEMU runs the guest (running or paused).
    pub fn live(&self) -> bool {
        self.state != DomState::Shutoff
    }
}

/// One chosen disk, resolved at plan time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chosen {
    /// The disk's target (`vda`).
    pub target: String,
    /// Its image as the domain names it.
    pub source: PathBuf,
    /// The image's real path (links resolved): what steps open.
    pub real: PathBuf,
    /// The image's format.
    pub format: Format,
    /// What the snapshot does with it (never `No`).
    pub mode: DiskMode,
    /// External: the overlay; reflink: the clone (absolute); else `None`.
    pub new_file: Option<PathBuf>,
    /// A running guest's view of the disk (`None` offline).
    pub block: Option<LiveBlock>,
    /// External onto a block device (`<disk type='block'>`): `new_file`
    /// is the device, and this is where its first bytes are saved (in the
    /// state directory) before the overlay's metadata replaces them.
    pub device_head: Option<PathBuf>,
}

/// Where a running guest's disk is in QEMU (from `query-block`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LiveBlock {
    /// The device's key (`device`, else `qdev`).
    pub device: String,
    /// Its top node now.
    pub node: String,
}

/// Gather the facts of `req` on domain `d` (IO: the catalog, QMP, the
/// agent, the images and their directories); refused with the first
/// fault found.
pub(crate) fn gather(e: &Engine, d: &DomainRec, req: &DomSnapRequest) -> Result<Facts> {
    let existing = super::snapshots(e.journal(), &d.name)?;
    let name = match &req.name {
        Some(n) => n.clone(),
        None => crate::default_snapshot_name(|n| existing.iter().any(|s| s.name == n)),
    };
    validate_name(&name)?;
    if existing.iter().any(|s| s.name == name) {
        return Err(EngineError::name_taken(format!(
            "domain {:?} already has a snapshot named {name:?}; choose another name",
            d.name
        )));
    }
    let state = e.domain_state(d)?;
    let live_guest = state != DomState::Shutoff;
    if req.live && !live_guest {
        return Err(EngineError::wrong_state(format!(
            "domain {:?} is not running (no QEMU answers on its monitor {}); drop --live for an offline snapshot",
            d.name,
            d.qmp.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none configured)".into())
        )));
    }
    let memory = memory_choice(req, d, live_guest)?;
    let memory_file: Option<PathBuf> = match &req.memory {
        Some(MemoryChoice::External(p)) => Some(absolute(p)),
        _ => None,
    };
    if req.quiesce {
        check_quiesce(d, state, memory || memory_file.is_some())?;
    }
    let mut disks = choose_disks(req, d, memory, live_guest)?;
    for c in &mut disks {
        check_disk(e, c, req, &name, &existing, memory, live_guest)?;
    }
    check_new_files_distinct(&disks)?;
    if let Some(mf) = &memory_file {
        check_memory_file(d, mf, &disks)?;
    }
    let view = if live_guest {
        locate_in_qemu(e, d, &mut disks, &name, memory)?
    } else {
        None
    };
    let tag = temp_tag8();
    // Where each block device's first bytes are saved: a name of this
    // plan's own (its tag), so no other plan's saved copy is ever taken
    // for this one's.
    for (i, c) in disks.iter_mut().enumerate() {
        if c.device_head.is_some() {
            c.device_head = Some(e.journal().state_dir().join(format!("devhead.{tag}.{i}")));
        }
    }
    let view_after = view.map(|v| view_after(v, &disks, &tag));
    Ok(Facts {
        domain: d.clone(),
        state,
        name,
        memory,
        memory_file,
        disks,
        view_after,
        tag,
        now: crate::now_unix(),
        domain_xml: e.domain_xml_of(d)?,
    })
}

/// `v` as it will be after the pivot: each external disk's device on its
/// overlay's node ([`super::compile::overlay_node`]), one image deeper.
fn view_after(mut v: QemuView, disks: &[Chosen], tag: &str) -> QemuView {
    for (i, c) in disks.iter().enumerate() {
        let (DiskMode::External, Some(o), Some(b)) = (c.mode, &c.new_file, &c.block) else {
            continue;
        };
        if let Some(x) = v.disks.iter_mut().find(|x| x.key == b.device) {
            // The overlay's directory exists (checked); its real path is
            // how the next plan names the disk's image.
            x.file = match (o.parent(), o.file_name()) {
                (Some(dir), Some(f)) => canon(dir).join(f),
                _ => o.clone(),
            };
            x.node = super::compile::overlay_node(tag, i);
            x.depth += 1;
        }
    }
    v
}

/// Whether the memory goes inside the disks (libvirt's rules); a memory
/// choice that contradicts the request or the guest's state is refused.
fn memory_choice(req: &DomSnapRequest, d: &DomainRec, live_guest: bool) -> Result<bool> {
    Ok(match (&req.memory, live_guest, req.disk_only) {
        (Some(MemoryChoice::Internal), _, true) => {
            return Err(EngineError::bad_request(
                "--disk-only and --memory internal contradict each other".into(),
            ))
        }
        (Some(MemoryChoice::Internal), false, _) => {
            return Err(EngineError::wrong_state(format!(
                "a memory snapshot needs a running guest; domain {:?} is shut off",
                d.name
            )))
        }
        (Some(MemoryChoice::Internal), true, false) => true,
        (Some(MemoryChoice::External(_)), _, true) => {
            return Err(EngineError::bad_request(
                "--disk-only and --memory external:PATH contradict each other".into(),
            ))
        }
        (Some(MemoryChoice::External(_)), false, _) => {
            return Err(EngineError::wrong_state(format!(
                "a memory snapshot needs a running guest; domain {:?} is shut off",
                d.name
            )))
        }
        (None, true, false) => true, // libvirt's default for a running guest: a full checkpoint
        (Some(MemoryChoice::No), true, false) => {
            // libvirt: without --disk-only the snapshot is internal,
            // and an internal snapshot of a running guest holds its
            // memory. Not read as "disk-only" in silence.
            return Err(EngineError::bad_request(format!(
                "<memory snapshot='no'/> of a running guest (domain {:?}) without disk-only: an internal \
                 snapshot of a running guest must include the memory state (libvirt's rule); for a \
                 snapshot of the disks alone add --disk-only",
                d.name
            )));
        }
        _ => false,
    })
}

/// `--quiesce` needs a disk-only snapshot of a running guest whose agent
/// answers (asked now, before anything is touched).
fn check_quiesce(d: &DomainRec, state: DomState, with_memory: bool) -> Result<()> {
    if with_memory {
        return Err(EngineError::bad_request("--quiesce needs --disk-only (a memory snapshot of a frozen guest would restore it frozen)".into()));
    }
    if state != DomState::Running {
        return Err(EngineError::wrong_state(format!(
            "--quiesce needs a running guest with an agent; domain {:?} is {}",
            d.name,
            state.as_str()
        )));
    }
    let Some(agent) = &d.agent else {
        return Err(EngineError::wrong_state(format!(
            "--quiesce: domain {:?} has no guest-agent channel; give one (`vsnap domain attach --agent SOCKET`, or a <channel type='unix'> with target name org.qemu.guest_agent.0 in the domain XML), or drop --quiesce",
            d.name
        )));
    };
    // A silent agent fails here, before anything is touched.
    live::agent(agent)
        .and_then(|mut a| a.ping())
        .map_err(EngineError::Check)?;
    Ok(())
}

/// Resolve every disk's choice: the request's, else the domain's
/// `<disk snapshot=...>` (libvirt's rule), else vsnap's default. The disks
/// left out are dropped; at least one must remain. (No IO: `real` is the
/// source until [`check_disk`] resolves it.)
fn choose_disks(
    req: &DomSnapRequest,
    d: &DomainRec,
    memory: bool,
    live_guest: bool,
) -> Result<Vec<Chosen>> {
    // `None`: `snapshot='manual'`, which vsnap cannot honour.
    let default_mode = |disk: &DomDisk| match disk.snapshot {
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
    // Disks whose overlay goes onto a block device.
    let mut on_device: Vec<&str> = Vec::new();
    let mut picks: Vec<(&DomDisk, Option<DiskMode>, Option<PathBuf>)> = d
        .disks
        .iter()
        .map(|disk| (disk, default_mode(disk), None))
        .collect();
    let mut named: Vec<(&str, &str)> = Vec::new();
    for (who, choice) in &req.disks {
        let disk = d.disk(who).ok_or_else(|| {
            EngineError::not_found(format!(
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
            return Err(EngineError::bad_request(format!(
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
            DiskChoice::ExternalDevice(p) => {
                on_device.push(disk.target.as_str());
                (Some(DiskMode::External), Some(p.clone()))
            }
        };
    }
    let mut chosen: Vec<Chosen> = Vec::new();
    for (disk, mode, new_file) in picks {
        let t = &disk.target;
        let leave_out = format!(
            "leave it out with --disk {t}=no (or <disk name='{t}' snapshot='no'/> in the <domainsnapshot>)"
        );
        let Some(mode) = mode else {
            return Err(EngineError::not_supported(format!(
                "disk {t}: the domain says snapshot='manual' (libvirt leaves this disk's snapshot to you), which vsnap cannot do in the middle of a snapshot; {leave_out}, or name its kind (--disk {t}=internal, --disk {t}=external)"
            )));
        };
        if mode == DiskMode::No {
            continue;
        }
        let Some(image) = disk.image() else {
            return Err(EngineError::not_supported(format!(
                "disk {t}: vsnap cannot snapshot {}; {leave_out}, or mark it snapshot='no' in the domain XML",
                disk.unsupported().unwrap_or("this disk")
            )));
        };
        chosen.push(Chosen {
            target: t.clone(),
            source: image.to_path_buf(),
            real: image.to_path_buf(),
            format: disk.format,
            mode,
            new_file,
            block: None,
            device_head: on_device.contains(&t.as_str()).then(PathBuf::new),
        });
    }
    if chosen.is_empty() {
        return Err(EngineError::bad_request(
            "no disk is selected for the snapshot".into(),
        ));
    }
    Ok(chosen)
}

/// One chosen disk against the world: its image ([`check_image`]), its
/// kind ([`check_mode`]), its new file, resolved here ([`resolve_clone`],
/// [`resolve_overlay`]), or offline the image itself
/// ([`check_offline_image`]). Sets `real` and `new_file`.
fn check_disk(
    e: &Engine,
    c: &mut Chosen,
    req: &DomSnapRequest,
    name: &str,
    existing: &[DomSnapshot],
    memory: bool,
    live_guest: bool,
) -> Result<()> {
    check_image(e, c, live_guest)?;
    check_mode(c, memory, live_guest)?;
    if let Some(p) = &c.new_file {
        crate::volume::not_a_temp_name(
            p,
            &format!("--disk {}={}:PATH", c.target, c.mode.as_str()),
        )?;
    }
    if c.mode == DiskMode::Reflink {
        c.new_file = Some(resolve_clone(c, name)?);
    }
    if c.mode == DiskMode::External && c.device_head.is_some() {
        check_device_target(c, req)?;
    } else if c.mode == DiskMode::External {
        c.new_file = Some(resolve_overlay(c, req, name, existing)?);
    } else if !live_guest {
        check_offline_image(c, name)?;
    }
    c.real = canon(&c.source);
    Ok(())
}

/// The image exists, its backing chain is sound (no loop, not too deep),
/// it is vsnap's to change (one link, no other state directory's claim;
/// not asked of a block device), and a block device is not asked for
/// what needs a file beside it.
///
/// The chain is walked here only for a shut-off guest, whose plan runs
/// `qemu-img` on the image. A running guest's chain is the one its QEMU
/// holds open ([`locate_in_qemu`] finds the image as a device's top
/// node, and QEMU could not have opened a loop); this plan opens none of
/// it (the overlay is written natively from the top image's header
/// alone), and its depth is checked against QEMU's own view of the chain
/// there. A walk here would cost one file per level of every disk: the
/// cost of a live snapshot would grow with chain depth.
fn check_image(e: &Engine, c: &Chosen, live_guest: bool) -> Result<()> {
    if !c.source.exists() {
        return Err(EngineError::not_found(format!(
            "disk {}: its image {} is missing; the domain definition is stale",
            c.target,
            c.source.display()
        )));
    }
    // A backing loop or an over-deep chain, found at once (natively)
    // rather than by the first qemu-img that opens it.
    if !live_guest {
        qemu_img::backing_chain(&c.source, c.format)
            .map_err(|e| EngineError::unsafe_(format!("disk {}: {e}", c.target)))?;
    }
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
        crate::image::check_claim(e.journal(), &c.source)?;
    }
    match (c.mode, &c.new_file) {
        (DiskMode::External, None) if is_block => {
            return Err(EngineError::not_supported(format!(
                "disk {}: its image {} is a block device, and the overlay's default place is beside it (in {}); \
                 give the overlay a path on a filesystem with --disk {}=external:PATH",
                c.target,
                c.source.display(),
                c.source.parent().unwrap_or(Path::new("/")).display(),
                c.target
            )))
        }
        (DiskMode::Reflink, _) if is_block => {
            return Err(EngineError::not_supported(format!(
                "disk {}: its image {} is a block device, which cannot be cloned with a reflink; \
                 use --disk {}=external:PATH with a path on a filesystem",
                c.target,
                c.source.display(),
                c.target
            )))
        }
        _ => {}
    }
    Ok(())
}

/// The disk's kind fits its format, the guest's state and the memory
/// choice (no IO).
fn check_mode(c: &Chosen, memory: bool, live_guest: bool) -> Result<()> {
    match c.mode {
        DiskMode::Internal if c.format != Format::Qcow2 => {
            return Err(EngineError::not_supported(format!(
                "disk {}: internal snapshots need qcow2; {} is raw: use --disk {}=external",
                c.target,
                c.source.display(),
                c.target
            )))
        }
        DiskMode::Internal if memory => {}
        DiskMode::Internal if live_guest => {
            return Err(EngineError::not_supported(format!(
                "disk {}: an internal disk-only snapshot of a running guest is not supported; use --disk {}=external, or a memory snapshot",
                c.target, c.target
            )))
        }
        DiskMode::External if memory => {
            return Err(EngineError::not_supported(format!(
                "disk {}: a memory snapshot keeps every disk internally; add --disk-only for external disk snapshots",
                c.target
            )))
        }
        DiskMode::Reflink if memory => {
            return Err(EngineError::not_supported(format!(
                "disk {}: a memory snapshot keeps every disk internally; add --disk-only for a reflink clone of it",
                c.target
            )))
        }
        DiskMode::Reflink if c.format != Format::Raw => {
            return Err(EngineError::not_supported(format!(
                "disk {}: reflink clones are for raw images; {} is {}: use --disk {}=external (or internal)",
                c.target,
                c.source.display(),
                c.format,
                c.target
            )))
        }
        _ => {}
    }
    Ok(())
}

/// A reflink disk's clone: the request's path (made absolute) or
/// `<stem>.<snapshot>.<ext>` beside the image; it must not exist, and its
/// directory must exist, be writable, and be on the image's filesystem,
/// which can clone.
fn resolve_clone(c: &Chosen, name: &str) -> Result<PathBuf> {
    let dst = match &c.new_file {
        Some(p) => absolute(p),
        None => default_clone(&c.source, name),
    };
    if std::fs::symlink_metadata(&dst).is_ok() {
        return Err(EngineError::exists(format!(
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
        return Err(EngineError::not_supported(format!(
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
    Ok(dst)
}

/// An external disk's overlay: the request's path (made absolute) or the
/// default beside the image; it must not exist (with `--reuse-external`:
/// it must, backed by the image), in a writable directory.
fn resolve_overlay(
    c: &Chosen,
    req: &DomSnapRequest,
    name: &str,
    existing: &[DomSnapshot],
) -> Result<PathBuf> {
    let o = match &c.new_file {
        Some(p) => absolute(p),
        None => default_overlay(&c.source, name, existing),
    };
    let exists = std::fs::symlink_metadata(&o).is_ok();
    if req.reuse_external {
        if !exists {
            return Err(EngineError::not_found(format!(
                "--reuse-external: overlay {} for disk {} does not exist",
                o.display(),
                c.target
            )));
        }
        let info = qemu_img::image_info(&o, Format::Qcow2, true).map_err(EngineError::Check)?;
        if info.backing.as_deref().map(canon) != Some(canon(&c.source)) {
            return Err(EngineError::bad_request(format!(
                "--reuse-external: overlay {} is backed by {:?}, not by disk {}'s image {}",
                o.display(),
                info.backing,
                c.target,
                c.source.display()
            )));
        }
    } else if exists {
        return Err(EngineError::exists(format!(
            "disk {}: overlay {} already exists; vsnap never overwrites a file it did not create: \
             choose another snapshot name or --disk {}=external:PATH",
            c.target,
            o.display(),
            c.target
        )));
    }
    file_dir(&o, &c.target, "overlay", "external")?;
    Ok(o)
}

/// What `device::open` refuses, as a typed refusal: a symlink is unsafe,
/// a device in use is in use, anything else but a block device a bad
/// request; other errors are the check's.
fn device_refusal(e: vsnap_steps::StepError) -> EngineError {
    match e {
        vsnap_steps::StepError::Invalid(m) if m.contains("is a symlink") => EngineError::unsafe_(m),
        vsnap_steps::StepError::Invalid(m) if m.contains("is in use") => EngineError::in_use(m),
        vsnap_steps::StepError::Invalid(m) if m.contains("not a block device") => {
            EngineError::bad_request(m)
        }
        other => EngineError::Check(other),
    }
}

/// A `<disk type='block'>` target: the device must be given by its real
/// path (not a symlink), be a block device nothing uses (opened
/// exclusively: not mounted, not held), hold at least the overlay's
/// metadata, and be neither the disk's own image nor in its chain.
fn check_device_target(c: &Chosen, req: &DomSnapRequest) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = c.new_file.clone().expect("a block target names its device");
    if req.reuse_external {
        return Err(EngineError::not_supported(format!(
            "disk {}: --reuse-external with a block device target is not supported; vsnap writes the overlay onto {} itself",
            c.target,
            dev.display()
        )));
    }
    let f = vsnap_steps::device::open(&dev, false).map_err(device_refusal)?;
    let have = vsnap_steps::device::size(&f, &dev).map_err(EngineError::Check)?;
    let rdev = f.metadata().map(|m| m.rdev()).unwrap_or(0);
    // QEMU locks the block devices it opens as it locks image files; the
    // exclusive open below does not see those locks.
    if vsnap_steps::qcow2::qemu_holds_file(&f)
        .map_err(|e| EngineError::Check(vsnap_steps::fsops::io_err("test the locks of", &dev, e)))?
    {
        return Err(EngineError::in_use(format!(
            "disk {}: block device {} is in use by a QEMU process (it holds QEMU's image locks); \
             give a device nothing uses",
            c.target,
            dev.display()
        )));
    }
    drop(f);
    // Exclusively, as the step will: refused now while mounted or held.
    drop(vsnap_steps::device::open(&dev, true).map_err(device_refusal)?);
    let need = vsnap_steps::device::overlay_bytes(&c.real, c.format)
        .map_err(EngineError::Check)?
        .len() as u64;
    if have < need {
        return Err(EngineError::no_space(format!(
            "disk {}: block device {} holds {have} bytes; the overlay's metadata alone needs {need}: give a larger device",
            c.target,
            dev.display()
        )));
    }
    let chain = qemu_img::backing_chain(&c.real, c.format).map_err(EngineError::Check)?;
    for (file, _) in &chain {
        let same = std::fs::metadata(file).is_ok_and(|m| m.rdev() == rdev && rdev != 0);
        if same || canon(file) == canon(&dev) {
            return Err(EngineError::bad_request(format!(
                "disk {}: block device {} is the disk's own image or in its backing chain; give another device",
                c.target,
                dev.display()
            )));
        }
    }
    Ok(())
}

/// Offline, an internal snapshot or a clone: the image must not be held
/// by some QEMU we do not know of, not be damaged (qcow2), not hold an
/// internal snapshot of the new name, and its directory must be writable.
fn check_offline_image(c: &Chosen, name: &str) -> Result<()> {
    // Offline: the image must not be held by some QEMU we do not know of.
    let info = qemu_img::image_info(&c.source, c.format, false).map_err(EngineError::Check)?;
    if c.format == Format::Qcow2 {
        qemu_img::refuse_damaged(&c.source).map_err(EngineError::Check)?;
    }
    if info.snapshots.iter().any(|s| s == name) {
        return Err(EngineError::name_taken(format!(
            "disk {}: {} already holds an internal snapshot named {name:?}; choose another name",
            c.target,
            c.source.display()
        )));
    }
    writable_for(c.source.parent().unwrap_or(Path::new("/")), &c.target)?;
    Ok(())
}

/// Two disks on one new file would share one overlay (or clone):
/// `data.img` and `data.raw` both default to `data.<snap>.qcow2`.
fn check_new_files_distinct(chosen: &[Chosen]) -> Result<()> {
    for (i, a) in chosen.iter().enumerate() {
        let Some(pa) = &a.new_file else { continue };
        if let Some(b) = chosen[i + 1..].iter().find(|b| {
            b.new_file
                .as_deref()
                .is_some_and(|pb| crate::plan::normalise(pb) == crate::plan::normalise(pa))
        }) {
            return Err(EngineError::bad_request(format!(
                "disks {} and {} would both get the new file {}; give each its own with --disk {}={}:PATH",
                a.target,
                b.target,
                pa.display(),
                b.target,
                b.mode.as_str()
            )));
        }
    }
    Ok(())
}

/// `--memory external:PATH`: a new file, no disk's, in a writable
/// directory with room for the guest's RAM (asked of QEMU).
fn check_memory_file(d: &DomainRec, mf: &Path, chosen: &[Chosen]) -> Result<()> {
    crate::volume::not_a_temp_name(mf, "--memory external:PATH")?;
    if std::fs::symlink_metadata(mf).is_ok() {
        return Err(EngineError::exists(format!(
            "memory file {} already exists; vsnap never overwrites a file it did not create: \
             choose another --memory external:PATH",
            mf.display()
        )));
    }
    if chosen.iter().any(|c| c.new_file.as_deref() == Some(mf)) {
        return Err(EngineError::bad_request(format!(
            "memory file {} is also a disk's new file; choose another --memory external:PATH",
            mf.display()
        )));
    }
    let dir = mf.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(EngineError::not_found(format!(
            "directory {} for the memory file does not exist",
            dir.display()
        )));
    }
    crate::volume::check_writable(dir).map_err(|_| {
        EngineError::not_writable(format!(
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
        return Err(EngineError::no_space(format!(
            "the memory file needs up to {} MiB (the guest's RAM) and {} has {} MiB free; \
             choose another --memory external:PATH",
            ram >> 20,
            dir.display(),
            free >> 20
        )));
    }
    Ok(())
}

/// A running guest: each chosen disk's device and top node, found by its
/// image; its chain no deeper than vsnap's limit (QEMU's own view of it:
/// a chain QEMU opened has no loop); with memory, no disk's top node may
/// hold an internal snapshot of the new name already. Returns the view
/// of QEMU the answer came from (`None` if the kernel does not name the
/// QEMU process).
///
/// Asked of QEMU in one of two ways, the answer the same:
/// - the domain's [`QemuView`] confirmed: the same QEMU process, and each
///   chosen disk's device on the node the view names (`qom-get drive`:
///   one small answer per disk, whatever the chains' depth);
/// - else `query-block`, which describes every image of every chain (at
///   16 disks of depth 20, 185 KB and some 25 ms of QEMU's time).
fn locate_in_qemu(
    e: &Engine,
    d: &DomainRec,
    chosen: &mut [Chosen],
    name: &str,
    memory: bool,
) -> Result<Option<QemuView>> {
    let qmp = d.qmp.clone().expect("a live guest has a monitor");
    let mut q = live::qmp(&qmp).map_err(EngineError::Check)?;
    let inst = q.instance();
    if !memory {
        let cached =
            catalog::qemu_view(e.journal(), &d.name)?.filter(|v| inst.is_some_and(|i| v.of(&i)));
        if let Some(v) = cached {
            if let Some(found) = confirm_view(&mut q, &v, chosen) {
                drop(q);
                for (c, (block, depth)) in chosen.iter_mut().zip(found) {
                    check_depth(c, depth)?;
                    c.block = Some(block);
                }
                return Ok(Some(v));
            }
        }
    }
    let blocks = q.query_block_typed().map_err(EngineError::Check)?;
    // Every node of every chain: asked only when its answer is used (a
    // snapshot with memory), as it costs QEMU a walk of the whole graph
    // (70 ms at 16 disks of depth 30).
    let nodes = if memory {
        q.query_named_block_nodes_typed()
            .map_err(EngineError::Check)?
    } else {
        Vec::new()
    };
    drop(q);
    for c in chosen.iter_mut() {
        let found = blocks.iter().find_map(|b| {
            let ins = b.inserted.as_ref()?;
            (canon(Path::new(&ins.file)) == c.real).then_some((b, ins))
        });
        let Some((entry, ins)) = found else {
            return Err(EngineError::wrong_state(format!(
                "QEMU does not use {} (disk {}) now; the domain definition is stale: `vsnap domain undefine` and `vsnap domain attach` it again",
                c.source.display(),
                c.target
            )));
        };
        check_depth(c, ins.chain.len())?;
        c.block = Some(LiveBlock {
            device: entry.key.clone(),
            node: ins.node_name.clone(),
        });
    }
    if memory {
        for c in chosen.iter() {
            let node = &c.block.as_ref().expect("located above").node;
            let has = nodes
                .iter()
                .any(|n| n.node_name == *node && n.snapshots.iter().any(|s| s == name));
            if has {
                return Err(EngineError::name_taken(format!(
                    "disk {}: its image already holds an internal snapshot named {name:?}; choose another name",
                    c.target
                )));
            }
        }
    }
    Ok(inst.map(|i| QemuView::from_blocks(i, &blocks)))
}

/// Each chosen disk's device and node (and chain depth) as view `v`
/// has them, if QEMU confirms every one: the device still runs on the
/// node `v` names (so on the image `v` names: a node name names one node
/// while it exists). `None` at the first disk `v` does not hold or QEMU
/// does not confirm, or on any QMP error (the caller then asks
/// `query-block`, whose answer decides).
fn confirm_view(
    q: &mut vsnap_steps::qmp::Qmp,
    v: &QemuView,
    chosen: &[Chosen],
) -> Option<Vec<(LiveBlock, usize)>> {
    let mut out = Vec::with_capacity(chosen.len());
    for c in chosen {
        // A device on a `-drive` (keyed by its drive's name) names its
        // drive, not its node: only `-blockdev` devices can confirm.
        let x = v
            .disks
            .iter()
            .find(|x| x.file == c.real && !x.qdev.is_empty() && x.key == x.qdev)?;
        if q.device_drive(&x.qdev).ok()? != x.node {
            return None;
        }
        out.push((
            LiveBlock {
                device: x.key.clone(),
                node: x.node.clone(),
            },
            x.depth,
        ));
    }
    Some(out)
}

/// A running disk's chain (`depth` images, as QEMU holds it) is within
/// vsnap's limit: every later plan walks it before `qemu-img` opens it,
/// and would refuse it.
fn check_depth(c: &Chosen, depth: usize) -> Result<()> {
    if depth > qemu_img::MAX_CHAIN_DEPTH {
        let e = vsnap_steps::StepError::ChainTooDeep {
            path: c.source.clone(),
            limit: qemu_img::MAX_CHAIN_DEPTH,
        };
        return Err(EngineError::unsafe_(format!("disk {}: {e}", c.target)));
    }
    Ok(())
}

/// Eight hex digits from the clock and the process id: the plan's tag.
pub(crate) fn temp_tag8() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0);
    format!(
        "{:08x}",
        (nanos ^ ((std::process::id() as u64) << 16)) & 0xffff_ffff
    )
}

/// `p` with its links resolved, else `p` as it is.
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
pub(crate) fn default_clone(source: &Path, snap: &str) -> PathBuf {
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

/// `dir` must be writable for disk `target` (an external overlay's).
fn writable_for(dir: &Path, target: &str) -> Result<()> {
    writable_as(dir, target, "external")
}

/// `dir` must be writable for disk `target`; the message names the
/// `--disk target=KIND:PATH` that picks another place.
fn writable_as(dir: &Path, target: &str, kind: &str) -> Result<()> {
    crate::volume::check_writable(dir).map_err(|_| {
        EngineError::not_writable(format!(
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
        return Err(EngineError::not_found(format!(
            "directory {} for disk {target}'s {what} does not exist",
            dir.display()
        )));
    }
    writable_as(&dir, target, kind)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::dom::QemuViewDisk;

    fn chosen(target: &str, mode: DiskMode, new_file: Option<&str>) -> Chosen {
        Chosen {
            target: target.into(),
            source: format!("/vm/{target}.qcow2").into(),
            real: format!("/vm/{target}.qcow2").into(),
            format: Format::Qcow2,
            mode,
            new_file: new_file.map(PathBuf::from),
            block: Some(LiveBlock {
                device: target.into(),
                node: target.into(),
            }),
            device_head: None,
        }
    }

    fn seen(target: &str) -> QemuViewDisk {
        QemuViewDisk {
            file: format!("/vm/{target}.qcow2").into(),
            key: target.into(),
            qdev: format!("/machine/peripheral/{target}/virtio-backend"),
            node: target.into(),
            depth: 20,
        }
    }

    #[test]
    fn the_view_after_a_plan_has_each_external_disk_on_its_overlay() {
        let dir = std::env::temp_dir();
        let real_dir = std::fs::canonicalize(&dir).unwrap();
        let overlay = dir.join("vda.s1.qcow2");
        let v = QemuView {
            pid: 1,
            start: 2,
            vcpu_thread: 3,
            disks: vec![seen("vda"), seen("vdb"), seen("vdc")],
        };
        let disks = vec![
            chosen("vda", DiskMode::External, overlay.to_str()),
            // A reflink clone leaves the disk on its image.
            chosen("vdb", DiskMode::Reflink, Some("/vm/vdb.s1.qcow2")),
        ];
        let after = view_after(v.clone(), &disks, "0123abcd");
        assert_eq!(
            after.disks[0],
            QemuViewDisk {
                // Named as the next plan will name the disk's image.
                file: real_dir.join("vda.s1.qcow2"),
                node: super::super::compile::overlay_node("0123abcd", 0),
                depth: 21,
                ..seen("vda")
            }
        );
        assert_eq!(after.disks[1..], v.disks[1..], "vdb, vdc unchanged");
        assert_eq!((after.pid, after.start, after.vcpu_thread), (1, 2, 3));
    }
}
