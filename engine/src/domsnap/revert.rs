//! Revert a domain to one of its snapshots (DESIGN.md 10.3; libvirt's
//! `virDomainRevertToSnapshot`).
//!
//! Revert discards the domain's current state; everything a snapshot
//! needs is kept and never written to. The pivot is the catalog switch
//! (the domain's active images and its current snapshot); the files of
//! the discarded branch are removed after it, unless a snapshot needs
//! them. Shapes:
//!
//! * **the disks** (every shape but the next): per disk of the snapshot —
//!   - *internal*, the snapshot inside the disk's active image:
//!     `qemu-img snapshot -a` in place, after the pivot (re-applying is
//!     idempotent, so the plan rolls forward from its first step after
//!     the pivot: no copy of the image);
//!   - *internal*, the image no longer active (a later external snapshot
//!     froze it): a clone of it (reflink, else copy) with the snapshot
//!     applied becomes the active image; the clone's internal snapshot
//!     entries are deleted after the pivot (they belong to the image);
//!   - *external*: a new overlay on the snapshot's frozen file;
//!   - *reflink*: the clone cloned again, renamed over the active image
//!     after the pivot (or, when a snapshot needs that image, put beside
//!     it under a new name);
//!   - disks the snapshot left out: as they are.
//!
//!   A running guest's QEMU quits first after the pivot (what it held is
//!   what the revert discards). Then QEMU is started again, in a second
//!   plan (`domain start`'s, through the embedder's `Launcher` or the
//!   domain's launch spec), when the snapshot holds memory (a memory
//!   file: `-incoming defer` and the file loaded; internal: started
//!   paused, then the next shape), when the guest ran (a disk-only
//!   snapshot: a fresh boot), or when `--running`/`--paused` asks. A
//!   crash between the two plans leaves the domain shut off on the
//!   snapshot's disks, the catalog saying so: `domain start` (or the
//!   revert again) goes on.
//! * **running or paused, an internal snapshot with memory**, the guest
//!   still on the images that hold it: the pivot (catalog) first, then
//!   QEMU's `snapshot-load` job in that QEMU (no new process); a guest to
//!   be left paused is stopped before the pivot, a paused one to run gets
//!   `cont` after the load.
//!
//! Refused, before anything is touched: an unknown snapshot; a snapshot
//! whose files are missing or changed (an internal one absent from its
//! image, or whose name is another snapshot's ID; a frozen file whose
//! chain does not open; a memory file gone); a shape that needs QEMU
//! started when the domain cannot be (no launcher and no launch spec, or
//! an option of the spec that cannot be rewritten to the new images); an
//! internal memory snapshot in images the running guest no longer runs
//! on.

use super::facts::temp_tag8;
use super::{put_snapshot_op, DiskMode, DomSnapState, DomSnapshot};
use crate::catalog::dom::{put_domain, DiskSource, DomainRec};
use crate::domain::DomState;
use crate::plan::Plan;
use crate::{Engine, EngineError, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use vsnap_steps::{fsops, live, qemu_img, CloneMode, Format, Step};

/// How a revert leaves a guest that runs (libvirt's
/// `VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING` / `_PAUSED`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomRevertFlags {
    /// Running after the revert, whatever the snapshot's state.
    pub running: bool,
    /// Paused after the revert, whatever the snapshot's state.
    pub paused: bool,
}

/// The result of a domain revert.
#[derive(Clone, Debug, Serialize)]
pub struct DomRevertDone {
    /// The journal's plan id (None for a dry run).
    pub plan: Option<u64>,
    /// The compiled plan, one line per step.
    pub plan_text: String,
    /// The snapshot reverted to.
    pub snapshot: String,
    /// The domain's state after the revert.
    pub state: DomState,
    /// Files of the discarded branch the plan removes.
    #[serde(serialize_with = "paths")]
    pub removed: Vec<PathBuf>,
    /// The plan that started QEMU again after the revert (`domain
    /// start`'s), when the shape needs one.
    pub started: Option<u64>,
    /// Whether this was a dry run (nothing changed).
    pub dry_run: bool,
}

fn paths<S: serde::Serializer>(v: &[PathBuf], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|p| vsnap_steps::pathser::json(p)))
}

/// One disk of the snapshot, resolved against the domain and the files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RevDisk {
    pub target: String,
    pub mode: DiskMode,
    /// The snapshot's file for this disk (see `DomSnapDisk::state_file`).
    pub state_file: PathBuf,
    /// Its format when the snapshot was taken.
    pub snap_format: Format,
    /// The disk's active image now.
    pub active: PathBuf,
    /// A snapshot needs the active image (it must be kept unchanged).
    pub active_needed: bool,
    /// The active image is a regular file (a block device is never
    /// removed or renamed over).
    pub active_is_file: bool,
    /// The state file is the active image (same file).
    pub in_place: bool,
    /// A new file's name, unused (`<stem>.<snapshot>.revert-<tag>.<ext>`).
    pub new_file: PathBuf,
    /// The temporary name a reflink clone is made under before it is
    /// renamed over the active image.
    pub temp: PathBuf,
    /// How to clone (internal not in place, reflink).
    pub clone: Option<CloneMode>,
    /// Internal snapshot entries in the state file (a clone of it carries
    /// them; they are deleted from the clone).
    pub entries: Vec<String>,
    /// Live: the disk's top node in QEMU.
    pub node: Option<String>,
}

/// What planning a revert knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RevFacts {
    pub domain: DomainRec,
    pub snap: DomSnapshot,
    pub others: Vec<DomSnapshot>,
    pub state: DomState,
    pub flags: DomRevertFlags,
    pub disks: Vec<RevDisk>,
    pub tag: String,
    /// A running guest on the images that hold an internal snapshot with
    /// memory: QEMU's snapshot-load, no restart.
    pub load: bool,
    /// QEMU started again after the disks are reverted (a second plan:
    /// `domain start`).
    pub then_start: Option<ThenStart>,
    /// The running QEMU's pid (the monitor's peer), waited for after it
    /// quits, before the new one starts.
    pub old_pid: Option<u32>,
}

/// How QEMU is started again after a revert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ThenStart {
    /// Left paused.
    pub paused: bool,
    /// The memory state to load.
    pub memory: Option<MemoryAfter>,
}

/// Where a snapshot's memory comes from when QEMU starts again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MemoryAfter {
    /// QEMU's migration stream in this file (`-incoming defer`).
    File(PathBuf),
    /// Inside the disks (snapshot-load once started, paused).
    Internal,
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `<dir of base>/<stem>.<snapshot>.revert-<tag>.<ext>`, stem the base's
/// name up to its first dot.
fn revert_name(base: &Path, snap: &str, tag: &str, ext: &str) -> PathBuf {
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.split('.').next().unwrap_or("disk");
    base.with_file_name(format!("{stem}.{snap}.revert-{tag}.{ext}"))
}

/// Gather what a revert of `domain` to `name` needs (IO), or refuse.
pub(crate) fn gather(
    e: &Engine,
    domain: &str,
    name: &str,
    flags: DomRevertFlags,
) -> Result<RevFacts> {
    if flags.running && flags.paused {
        return Err(EngineError::bad_request(
            "--running and --paused contradict each other; give one".to_string(),
        ));
    }
    let d = e.domain(domain)?;
    let all = super::snapshots(e.journal(), &d.name)?;
    let snap = e.domain_snapshot_lookup_by_name(domain, name)?;
    let others: Vec<DomSnapshot> = all.into_iter().filter(|s| s.name != name).collect();
    let state = e.domain_state(&d)?;
    // Everything a snapshot needs: its files (state files and their
    // chains are never written to; memory files are never touched).
    let mut needed: BTreeSet<PathBuf> = BTreeSet::new();
    for s in others.iter().chain(std::iter::once(&snap)) {
        for sd in &s.disks {
            if sd.mode != DiskMode::No {
                needed.insert(canon(&sd.state_file));
            }
        }
    }
    let at_snapshot = crate::domain::parse_domain_xml(&snap.domain_xml).ok();
    let tag = temp_tag8();
    let live_guest = state != DomState::Shutoff;
    let blocks = if live_guest {
        let qmp = d.qmp.as_ref().expect("a running domain has a monitor");
        let mut q = live::qmp(qmp).map_err(EngineError::Check)?;
        q.query_block_typed().map_err(EngineError::Check)?
    } else {
        Vec::new()
    };
    let mut disks = Vec::new();
    for sd in snap.disks.iter().filter(|x| x.mode != DiskMode::No) {
        let what = format!("snapshot {name:?}, disk {}", sd.target);
        let Some(disk) = d.disks.iter().find(|x| x.target == sd.target) else {
            return Err(EngineError::unsafe_(format!(
                "{what}: the domain has no disk {} any more; vsnap reverts only disks the domain still has",
                sd.target
            )));
        };
        let (DiskSource::File(_) | DiskSource::Block(_)) = &disk.source else {
            return Err(EngineError::not_supported(format!(
                "{what}: the disk is not a local image now ({})",
                disk.unsupported().unwrap_or("")
            )));
        };
        let active = disk.image().expect("a local image").to_path_buf();
        let meta = std::fs::metadata(&sd.state_file).map_err(|err| {
            EngineError::unsafe_(format!(
                "{what}: its file {} cannot be read ({err}); the snapshot cannot be reverted to (`vsnap domain check {domain}`)",
                sd.state_file.display()
            ))
        })?;
        let snap_format = match sd.mode {
            DiskMode::Internal => Format::Qcow2,
            _ => at_snapshot
                .as_ref()
                .and_then(|a| a.disks.iter().find(|x| x.target == sd.target))
                .map(|x| x.format)
                .unwrap_or(disk.format),
        };
        let in_place = canon(&sd.state_file) == canon(&active);
        let active_is_file = std::fs::metadata(&active).is_ok_and(|m| m.is_file());
        // QEMU's top node of this disk (a running guest).
        let inserted = live_guest
            .then(|| {
                blocks.iter().find_map(|b| {
                    let ins = b.inserted.as_ref()?;
                    (canon(Path::new(&ins.file)) == canon(&active)).then_some(ins)
                })
            })
            .flatten();
        let mut entries = Vec::new();
        match sd.mode {
            DiskMode::Internal => {
                // (ID, name) of the image's internal snapshots: from QEMU
                // when it runs the image (no qemu-img process), else read.
                let table: Vec<(String, String)> = match inserted {
                    Some(ins) if in_place => ins.snapshots.clone(),
                    _ => {
                        let info = qemu_img::image_info(&sd.state_file, Format::Qcow2, true)
                            .map_err(EngineError::Check)?;
                        info.snapshot_ids.into_iter().zip(info.snapshots).collect()
                    }
                };
                if !table.iter().any(|(_, n)| n == name) {
                    return Err(EngineError::unsafe_(format!(
                        "{what}: {} does not hold internal snapshot {name:?} any more; `vsnap domain check {domain}` shows what changed",
                        sd.state_file.display()
                    )));
                }
                if live_guest {
                    if let Some((_, other)) = table.iter().find(|(id, n)| id == name && n != name) {
                        return Err(EngineError::not_supported(format!(
                            "{what}: {} holds another snapshot ({other:?}) whose ID is {name:?}, and QEMU's snapshot-load looks a name up as an ID first: it would load that one; shut the domain off and revert offline (which addresses snapshots by ID)",
                            sd.state_file.display()
                        )));
                    }
                }
                entries = table.into_iter().map(|(_, n)| n).collect();
            }
            DiskMode::External => {
                qemu_img::backing_chain(&sd.state_file, snap_format)
                    .map_err(|err| EngineError::unsafe_(format!("{what}: {err}")))?;
                if !meta.is_file() {
                    return Err(EngineError::not_supported(format!(
                        "{what}: its state is on block device {}; a new overlay on it would need a place vsnap does not choose: not supported yet",
                        sd.state_file.display()
                    )));
                }
            }
            DiskMode::Reflink => {
                if !meta.is_file() {
                    return Err(EngineError::unsafe_(format!(
                        "{what}: its clone {} is not a regular file",
                        sd.state_file.display()
                    )));
                }
            }
            DiskMode::No => unreachable!("filtered"),
        }
        let ext = match sd.mode {
            DiskMode::Reflink => sd
                .state_file
                .extension()
                .map(|x| x.to_string_lossy().into_owned())
                .unwrap_or_else(|| "raw".into()),
            _ => "qcow2".into(),
        };
        let new_file = revert_name(&sd.state_file, name, &tag, &ext);
        if fsops::exists(&new_file).map_err(EngineError::Check)? {
            return Err(EngineError::exists(format!(
                "{what}: {} exists already; vsnap never overwrites a file it did not create",
                new_file.display()
            )));
        }
        // Everything the plan writes is writable now, not found read-only
        // after the pivot: the new file's directory, the active image's
        // (a rename over it, a removal) and, in place, the image.
        let parent = |p: &Path| p.parent().unwrap_or(Path::new("/")).to_path_buf();
        crate::volume::check_writable(&parent(&new_file))?;
        if active_is_file {
            crate::volume::check_writable(&parent(&active))?;
        }
        if in_place && sd.mode == DiskMode::Internal {
            crate::volume::check_writable(&active)?;
        }
        let temp = fsops::temp_path(&active, &tag);
        let active_needed = needed.contains(&canon(&active));
        let clone = match sd.mode {
            DiskMode::Internal if !in_place => {
                let dir = new_file.parent().unwrap_or(Path::new("/"));
                Some(crate::volume::clone_mode_for(
                    dir,
                    &sd.state_file,
                    &new_file,
                )?)
            }
            DiskMode::Reflink => {
                let target = if active_needed || !active_is_file {
                    &new_file
                } else {
                    &temp
                };
                let dir = target.parent().unwrap_or(Path::new("/"));
                Some(crate::volume::clone_mode_for(dir, &sd.state_file, target)?)
            }
            _ => None,
        };
        let node = inserted.map(|ins| ins.node_name.clone());
        disks.push(RevDisk {
            target: sd.target.clone(),
            mode: sd.mode,
            state_file: sd.state_file.clone(),
            snap_format,
            active,
            active_needed,
            active_is_file,
            in_place,
            new_file,
            temp,
            clone,
            entries,
            node,
        });
    }
    // The shape: QEMU's snapshot-load in the running QEMU when the guest
    // runs on the very images that hold the snapshot; else the disks
    // reverted with QEMU gone (quit first when it runs), then QEMU
    // started again when the snapshot holds memory, the guest ran, or
    // --running / --paused asks for it.
    let load = live_guest
        && snap.memory_internal
        && disks
            .iter()
            .all(|x| x.mode == DiskMode::Internal && x.in_place && x.node.is_some());
    if snap.memory_internal
        && disks
            .iter()
            .any(|x| x.mode == DiskMode::Internal && !x.in_place)
    {
        // The state would be loaded from a clone whose internal entries
        // the plan deletes: refused rather than started without it.
        return Err(EngineError::not_supported(format!(
            "snapshot {name:?} holds the guest's memory inside images a later external snapshot froze; vsnap loads such a memory state only from the images the domain runs on: not supported yet"
        )));
    }
    if live_guest && snap.memory_internal && !load {
        return Err(EngineError::wrong_state(format!(
            "snapshot {name:?}: QEMU does not run on the images the catalog names for it; the domain definition is stale: `vsnap domain check {domain}`"
        )));
    }
    let after_paused = flags.paused || (!flags.running && snap.state == DomSnapState::Paused);
    let then_start = if load {
        None
    } else if let Some(m) = &snap.memory_file {
        Some(ThenStart {
            paused: after_paused,
            memory: Some(MemoryAfter::File(m.clone())),
        })
    } else if snap.memory_internal {
        Some(ThenStart {
            paused: after_paused,
            memory: Some(MemoryAfter::Internal),
        })
    } else if live_guest || flags.running || flags.paused {
        // A disk-only snapshot: QEMU started again on its disks, a fresh
        // boot (libvirt stops and starts the guest too).
        Some(ThenStart {
            paused: flags.paused,
            memory: None,
        })
    } else {
        None
    };
    if let Some(MemoryAfter::File(m)) = then_start.as_ref().and_then(|t| t.memory.as_ref()) {
        if !m.is_file() {
            return Err(EngineError::unsafe_(format!(
                "snapshot {name:?}: its memory file {} is missing; the snapshot cannot be reverted to (`vsnap domain check {domain}`)",
                m.display()
            )));
        }
    }
    let mut f = RevFacts {
        domain: d,
        snap,
        others,
        state,
        flags,
        disks,
        tag,
        load,
        then_start,
        old_pid: None,
    };
    if f.then_start.is_some() {
        // Refused now, not after the disks moved: QEMU must be startable
        // on the snapshot's disks (an embedder's launcher, or the
        // domain's launch spec with every disk's option rewritable).
        e.check_startable(&compile(&f).domain)?;
        if live_guest {
            let qmp = f
                .domain
                .qmp
                .as_ref()
                .expect("a running domain has a monitor");
            f.old_pid = vsnap_steps::launch::peer_pid(qmp).ok();
        }
    }
    Ok(f)
}

/// The state the guest is left in.
fn state_after(f: &RevFacts) -> DomState {
    if let Some(t) = &f.then_start {
        if t.paused {
            DomState::Paused
        } else {
            DomState::Running
        }
    } else if !f.load {
        DomState::Shutoff
    } else if f.flags.running {
        DomState::Running
    } else if f.flags.paused || f.snap.state == DomSnapState::Paused {
        DomState::Paused
    } else {
        DomState::Running
    }
}

/// A compiled revert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Compiled {
    /// The plan (its catalog write holds `domain`).
    pub plan: Plan,
    /// Files of the discarded branch the plan removes.
    pub removed: Vec<PathBuf>,
    /// The guest's state after the revert (and the start, if any).
    pub state: DomState,
    /// The domain record after the plan.
    pub domain: DomainRec,
}

/// Compile a revert (pure): the plan, the files it removes, the state.
pub(crate) fn compile(f: &RevFacts) -> Compiled {
    let name = &f.snap.name;
    let mut dom = f.domain.clone();
    dom.current = Some(name.clone());
    let mut pre = Vec::new();
    let mut post = Vec::new();
    let mut removed = Vec::new();
    if f.load {
        let qmp = f
            .domain
            .qmp
            .clone()
            .expect("a running domain has a monitor");
        let devices: Vec<String> = f
            .disks
            .iter()
            .map(|x| x.node.clone().expect("located"))
            .collect();
        // QEMU's snapshot-load leaves the guest as it found it (running or
        // paused): a guest to be left paused is paused first, so it never
        // runs between the load and a stop.
        let after = state_after(f);
        if after == DomState::Paused && f.state == DomState::Running {
            pre.push(Step::QmpStop { qmp: qmp.clone() });
        }
        post.push(Step::QmpSnapshotLoad {
            qmp: qmp.clone(),
            job: format!("vsnap-{}", f.tag),
            tag: name.clone(),
            vmstate: devices[0].clone(),
            devices,
            images: f.disks.iter().map(|x| x.active.clone()).collect(),
        });
        if after == DomState::Running && f.state == DomState::Paused {
            post.push(Step::QmpCont { qmp });
        }
    } else {
        if f.state != DomState::Shutoff {
            // The running QEMU goes first (after the pivot: what it held
            // is discarded): the images are then free to change.
            post.push(Step::QmpQuit {
                qmp: f
                    .domain
                    .qmp
                    .clone()
                    .expect("a running domain has a monitor"),
            });
        }
        for x in &f.disks {
            let (active, format) = match x.mode {
                DiskMode::Internal if x.in_place => {
                    post.push(Step::InternalApply {
                        image: x.active.clone(),
                        name: name.clone(),
                    });
                    (x.active.clone(), Format::Qcow2)
                }
                DiskMode::Internal => {
                    pre.push(Step::Clone {
                        src: x.state_file.clone(),
                        dst: x.new_file.clone(),
                        mode: x.clone.expect("a clone mode"),
                    });
                    pre.push(Step::InternalApply {
                        image: x.new_file.clone(),
                        name: name.clone(),
                    });
                    for n in &x.entries {
                        post.push(Step::InternalDelete {
                            image: x.new_file.clone(),
                            name: n.clone(),
                        });
                    }
                    (x.new_file.clone(), Format::Qcow2)
                }
                DiskMode::External => {
                    pre.push(Step::CreateOverlay {
                        path: x.new_file.clone(),
                        backing: x.state_file.clone(),
                        backing_format: x.snap_format,
                    });
                    (x.new_file.clone(), Format::Qcow2)
                }
                DiskMode::Reflink if !x.active_needed && x.active_is_file => {
                    pre.push(Step::Clone {
                        src: x.state_file.clone(),
                        dst: x.temp.clone(),
                        mode: x.clone.expect("a clone mode"),
                    });
                    post.push(Step::Rename {
                        from: x.temp.clone(),
                        to: x.active.clone(),
                        replace: true,
                    });
                    (x.active.clone(), x.snap_format)
                }
                DiskMode::Reflink => {
                    pre.push(Step::Clone {
                        src: x.state_file.clone(),
                        dst: x.new_file.clone(),
                        mode: x.clone.expect("a clone mode"),
                    });
                    (x.new_file.clone(), x.snap_format)
                }
                DiskMode::No => unreachable!("gather leaves them out"),
            };
            if active != x.active && !x.active_needed && x.active_is_file {
                removed.push(x.active.clone());
            }
            if let Some(disk) = dom.disks.iter_mut().find(|d| d.target == x.target) {
                disk.source = DiskSource::File(active);
                disk.format = format;
            }
        }
        for r in &removed {
            post.push(Step::RemoveFile { path: r.clone() });
        }
    }
    let pivot = pre.len() as u32;
    let mut steps = pre;
    steps.push(Step::Catalog);
    steps.extend(post);
    // Snapshots whose overlay (the active image they made) is removed:
    // the record stops naming it (the snapshot's state is its frozen file).
    let mut catalog = vec![put_domain(&dom)];
    let domain = dom.clone();
    for s in f.others.iter().chain(std::iter::once(&f.snap)) {
        let mut changed = s.clone();
        for sd in &mut changed.disks {
            if sd
                .overlay
                .as_ref()
                .is_some_and(|o| removed.iter().any(|r| r == o))
            {
                sd.overlay = None;
            }
        }
        if changed != *s {
            catalog.push(put_snapshot_op(&changed));
        }
    }
    let state = state_after(f);
    let plan = Plan {
        op: "domain.snapshot.revert".into(),
        summary: format!(
            "revert domain {} to snapshot {name:?} ({}; {} after)",
            f.domain.name,
            f.snap.state,
            state.as_str()
        ),
        steps,
        pivot,
        catalog,
    };
    Compiled {
        plan,
        removed,
        state,
        domain,
    }
}

impl Engine {
    /// Revert domain `domain` to its snapshot `name` (libvirt's
    /// `virDomainRevertToSnapshot`), or with `dry_run` only compile the
    /// plan.
    ///
    /// Needs: the snapshot's files as vsnap left them; a shut-off domain
    /// for a snapshot without memory; a running or paused guest, still on
    /// the images that hold it, for an internal snapshot with memory.
    /// Changes: the domain's disks are put back to the snapshot's state
    /// (new overlays on its frozen files, its internal snapshots applied,
    /// its clones cloned back), what the domain held since is discarded,
    /// the files of the discarded branch that no snapshot needs are
    /// removed, and the snapshot becomes the current one (the next
    /// snapshot is its child). A running guest is left running or paused
    /// as the snapshot was, unless `flags` says. Nothing a snapshot needs
    /// is written to. On a refusal nothing is touched; a failure before
    /// the pivot rolls back; after it the plan rolls forward (see
    /// [`EngineError::needs_attention`]). Errors: `Refused` (`NotFound`:
    /// no such domain or snapshot; `Unsafe`: a snapshot file missing or
    /// changed; `WrongState`/`NotSupported`: a shape that needs QEMU
    /// started, see the module documentation; `BadRequest`: both flags;
    /// `Exists`, `NoSpace`), `Check`, and those of running the plan.
    pub fn domain_snapshot_revert(
        &self,
        domain: &str,
        name: &str,
        flags: DomRevertFlags,
        dry_run: bool,
    ) -> Result<DomRevertDone> {
        let (done, then, old_pid) = {
            let _g = self.lock_ops();
            let _held = live::hold_connections();
            let f = gather(self, domain, name, flags)?;
            let c = compile(&f);
            c.plan.check_paths()?;
            let mut plan_text = c.plan.render();
            if let Some(t) = &f.then_start {
                plan_text.push_str(&format!(
                    "then: start QEMU on the snapshot's disks ({}{}; `domain start`'s own plan)\n",
                    match &t.memory {
                        Some(MemoryAfter::File(m)) =>
                            format!("loading the memory state {}", m.display()),
                        Some(MemoryAfter::Internal) => "paused, then QEMU's snapshot-load".into(),
                        None => "a fresh boot".into(),
                    },
                    if t.paused { ", left paused" } else { "" }
                ));
            }
            let id = if dry_run {
                None
            } else {
                Some(crate::plan::run(self.journal(), &c.plan, &self.cx())?.0)
            };
            (
                DomRevertDone {
                    plan: id,
                    plan_text,
                    snapshot: name.to_string(),
                    state: c.state,
                    removed: c.removed,
                    started: None,
                    dry_run,
                },
                f.then_start,
                f.old_pid,
            )
        };
        let (Some(t), false) = (then, dry_run) else {
            return Ok(done);
        };
        // The disks are the snapshot's and the catalog says so: a crash
        // from here leaves the domain shut off on them (`domain start`,
        // or this revert again, goes on).
        if let Some(pid) = old_pid {
            if let Ok(fd) = vsnap_steps::launch::Pidfd::open(pid) {
                fd.wait_exit(std::time::Duration::from_secs(10));
            }
        }
        let mut done = done;
        let mode =
            |paused: bool, incoming: bool| vsnap_steps::launch::StartMode { paused, incoming };
        match &t.memory {
            Some(MemoryAfter::File(m)) => {
                done.started = self
                    .start_inner(domain, mode(t.paused, true), Some(m))?
                    .plan;
            }
            None => {
                done.started = self.start_inner(domain, mode(t.paused, false), None)?.plan;
            }
            Some(MemoryAfter::Internal) => {
                // Started paused on the disks that hold it, then loaded
                // in that QEMU (the running-guest shape).
                done.started = self.start_inner(domain, mode(true, false), None)?.plan;
                let load = self.domain_snapshot_revert(domain, name, flags, false)?;
                done.plan_text.push_str(&load.plan_text);
                done.state = load.state;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domsnap::DomSnapDisk;

    fn domain(live: bool) -> DomainRec {
        let mut d = crate::domain::parse_domain_xml(
            "<domain type='kvm'><name>d</name><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/vm/a.s2.qcow2'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/vm/b.raw'/><target dev='vdb'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/vm/c.qcow2'/><target dev='vdc'/></disk>\
             </devices></domain>",
        )
        .unwrap();
        if live {
            d.qmp = Some("/run/d.qmp".into());
        }
        d
    }

    fn snap(name: &str, disks: Vec<DomSnapDisk>, state: DomSnapState, memory: bool) -> DomSnapshot {
        DomSnapshot {
            name: name.into(),
            domain: "d".into(),
            description: None,
            creation_time: 0,
            parent: None,
            seq: 0,
            state,
            memory_internal: memory,
            quiesced: false,
            disks,
            domain_xml: String::new(),
            memory_file: None,
        }
    }

    fn sd(t: &str, mode: DiskMode, state: &str, overlay: Option<&str>) -> DomSnapDisk {
        DomSnapDisk {
            target: t.into(),
            mode,
            state_file: state.into(),
            overlay: overlay.map(PathBuf::from),
        }
    }

    fn rd(t: &str, mode: DiskMode, state: &str, active: &str, needed: bool) -> RevDisk {
        RevDisk {
            target: t.into(),
            mode,
            state_file: state.into(),
            snap_format: if mode == DiskMode::Reflink {
                Format::Raw
            } else {
                Format::Qcow2
            },
            active: active.into(),
            active_needed: needed,
            active_is_file: true,
            in_place: state == active,
            new_file: format!("/vm/{t}.s1.revert-t.qcow2").into(),
            temp: format!("/vm/.vsnap-t.{t}").into(),
            clone: Some(CloneMode::Reflink),
            entries: vec!["s1".into()],
            node: Some(format!("node-{t}")),
        }
    }

    fn kinds(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{}{}", if i as u32 == p.pivot { "*" } else { "" }, s.name()))
            .collect()
    }

    #[test]
    fn offline_shapes_compile_to_new_files_before_the_pivot_and_removals_after() {
        // s1: vda external (a.qcow2 frozen, overlay a.s1.qcow2, later
        // frozen by s2 whose overlay a.s2.qcow2 is active), vdb reflink,
        // vdc internal in place.
        let s1 = snap(
            "s1",
            vec![
                sd(
                    "vda",
                    DiskMode::External,
                    "/vm/a.qcow2",
                    Some("/vm/a.s1.qcow2"),
                ),
                sd("vdb", DiskMode::Reflink, "/vm/b.s1.raw", None),
                sd("vdc", DiskMode::Internal, "/vm/c.qcow2", None),
            ],
            DomSnapState::Shutoff,
            false,
        );
        let s2 = snap(
            "s2",
            vec![sd(
                "vda",
                DiskMode::External,
                "/vm/a.s1.qcow2",
                Some("/vm/a.s2.qcow2"),
            )],
            DomSnapState::Shutoff,
            false,
        );
        let f = RevFacts {
            domain: domain(false),
            snap: s1.clone(),
            others: vec![s2],
            state: DomState::Shutoff,
            flags: DomRevertFlags::default(),
            disks: vec![
                rd(
                    "vda",
                    DiskMode::External,
                    "/vm/a.qcow2",
                    "/vm/a.s2.qcow2",
                    false,
                ),
                rd("vdb", DiskMode::Reflink, "/vm/b.s1.raw", "/vm/b.raw", false),
                rd(
                    "vdc",
                    DiskMode::Internal,
                    "/vm/c.qcow2",
                    "/vm/c.qcow2",
                    true,
                ),
            ],
            tag: "t".into(),
            load: false,
            then_start: None,
            old_pid: None,
        };
        let Compiled {
            plan,
            removed,
            state,
            ..
        } = compile(&f);
        plan.assert_well_formed();
        assert_eq!(
            kinds(&plan),
            [
                "create-overlay",
                "clone",
                "*catalog",
                "rename",
                "internal-apply",
                "remove-file"
            ]
        );
        assert_eq!(removed, [PathBuf::from("/vm/a.s2.qcow2")]);
        assert_eq!(state, DomState::Shutoff);
        // The domain: vda on its new overlay, vdb and vdc where they were;
        // s1 current; s2 no longer names the removed overlay.
        let CatalogOpView { domain, snaps } = view(&plan);
        assert_eq!(domain.current.as_deref(), Some("s1"));
        let imgs: Vec<_> = domain
            .disks
            .iter()
            .map(|d| d.image().unwrap().to_path_buf())
            .collect();
        assert_eq!(
            imgs,
            [
                PathBuf::from("/vm/vda.s1.revert-t.qcow2"),
                PathBuf::from("/vm/b.raw"),
                PathBuf::from("/vm/c.qcow2")
            ]
        );
        assert_eq!(domain.disks[1].format, Format::Raw);
        assert_eq!(snaps.len(), 1);
        assert_eq!(snaps[0].name, "s2");
        assert_eq!(snaps[0].disks[0].overlay, None);
    }

    #[test]
    fn a_needed_active_image_is_never_renamed_over_or_removed() {
        let s1 = snap(
            "s1",
            vec![sd("vdb", DiskMode::Reflink, "/vm/b.s1.raw", None)],
            DomSnapState::Shutoff,
            false,
        );
        let f = RevFacts {
            domain: domain(false),
            snap: s1,
            others: vec![],
            state: DomState::Shutoff,
            flags: DomRevertFlags::default(),
            disks: vec![rd(
                "vdb",
                DiskMode::Reflink,
                "/vm/b.s1.raw",
                "/vm/b.raw",
                true,
            )],
            tag: "t".into(),
            load: false,
            then_start: None,
            old_pid: None,
        };
        let Compiled { plan, removed, .. } = compile(&f);
        assert_eq!(kinds(&plan), ["clone", "*catalog"]);
        assert!(removed.is_empty());
    }

    #[test]
    fn a_running_guest_loads_an_internal_memory_snapshot_after_the_pivot() {
        let m1 = snap(
            "m1",
            vec![
                sd("vda", DiskMode::Internal, "/vm/a.s2.qcow2", None),
                sd("vdc", DiskMode::Internal, "/vm/c.qcow2", None),
            ],
            DomSnapState::Paused,
            true,
        );
        let mut f = RevFacts {
            domain: domain(true),
            snap: m1,
            others: vec![],
            state: DomState::Running,
            flags: DomRevertFlags::default(),
            disks: vec![
                rd(
                    "vda",
                    DiskMode::Internal,
                    "/vm/a.s2.qcow2",
                    "/vm/a.s2.qcow2",
                    true,
                ),
                rd(
                    "vdc",
                    DiskMode::Internal,
                    "/vm/c.qcow2",
                    "/vm/c.qcow2",
                    true,
                ),
            ],
            tag: "t".into(),
            load: true,
            then_start: None,
            old_pid: None,
        };
        let Compiled {
            plan,
            removed,
            state,
            ..
        } = compile(&f);
        plan.assert_well_formed();
        assert_eq!(kinds(&plan), ["qmp-stop", "*catalog", "qmp-snapshot-load"]);
        assert!(removed.is_empty());
        assert_eq!(state, DomState::Paused, "as the snapshot was");
        let Step::QmpSnapshotLoad {
            vmstate,
            devices,
            images,
            ..
        } = &plan.steps[2]
        else {
            panic!("{:?}", plan.steps)
        };
        assert_eq!(vmstate, "node-vda");
        assert_eq!(devices, &["node-vda", "node-vdc"]);
        assert_eq!(images.len(), 2);
        f.flags.running = true;
        let Compiled { plan, state, .. } = compile(&f);
        assert_eq!(
            kinds(&plan),
            ["*catalog", "qmp-snapshot-load"],
            "it stays running"
        );
        assert_eq!(state, DomState::Running);
        f.state = DomState::Paused;
        let Compiled { plan, .. } = compile(&f);
        assert_eq!(kinds(&plan), ["*catalog", "qmp-snapshot-load", "qmp-cont"]);
    }

    struct CatalogOpView {
        domain: DomainRec,
        snaps: Vec<DomSnapshot>,
    }

    fn view(p: &Plan) -> CatalogOpView {
        use vsnap_journal::CatalogOp;
        let mut domain = None;
        let mut snaps = Vec::new();
        for op in &p.catalog {
            if let CatalogOp::Put { tree, value, .. } = op {
                if tree == crate::catalog::dom::DOMAINS {
                    domain = Some(crate::catalog::dom::decode_domain(value).unwrap());
                } else {
                    snaps.push(crate::catalog::dom::decode_snapshot(value).unwrap());
                }
            }
        }
        CatalogOpView {
            domain: domain.unwrap(),
            snaps,
        }
    }
}
