//! A domain snapshot's plan compiled from its request and [`Facts`]: one
//! function per plan shape, **no IO** (every path, node, device and name
//! is in the facts; the tag and the time too), so each shape is
//! table-tested without QEMU (below).
//!
//! | shape | steps | pivot |
//! |---|---|---|
//! | [`compile_live_transaction`] | overlays, `blockdev-add` each, (freeze), (stop), (memory to a file), (reflink clones) | one QMP `transaction` (the catalog when every disk is a clone) |
//! | [`compile_live_snapshot_save`] | (stop, with `--halt`) | QMP `snapshot-save` over every disk |
//! | [`compile_offline`] | `qemu-img snapshot -c` or an overlay per disk, (reflink clones) | the catalog |
//!
//! After a live pivot: `quit` (`--halt`), else `cont` if the plan
//! stopped the guest, then thaw if it froze it. [`records`] makes the
//! snapshot's record, the domain's new record and the catalog write.

use super::facts::{Chosen, Facts};
use super::{put_snapshot_op, DiskMode, DomSnapDisk, DomSnapRequest, DomSnapState, DomSnapshot};
use crate::domain::{put_domain, DiskSource, DomState, DomainRec};
use crate::plan::Plan;
use vsnap_steps::live::LiveDisk;
use vsnap_steps::{fsops, CloneMode, Format, Step};

/// The steps of one plan shape, its pivot, and the state it records.
#[derive(Debug)]
pub(crate) struct Shape {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The pivot's index in `steps`.
    pub pivot: u32,
    /// The snapshot's `<state>`.
    pub state: DomSnapState,
}

/// The plan of `req` given `f`: the shape the facts call for, then its
/// records.
pub(crate) fn compile(req: &DomSnapRequest, f: &Facts) -> (Plan, DomSnapshot, DomainRec) {
    let shape = if !f.live() {
        compile_offline(req, f)
    } else if f.memory {
        compile_live_snapshot_save(req, f)
    } else {
        compile_live_transaction(req, f)
    };
    records(req, f, shape)
}

/// A running guest, disks external (and/or reflink clones), memory not
/// kept or kept in a file: overlays made and added to QEMU first; the
/// guest frozen (`--quiesce`) and paused only where needed (a reflink
/// clone, `--halt`, a memory file); the pivot one atomic transaction.
pub(crate) fn compile_live_transaction(req: &DomSnapRequest, f: &Facts) -> Shape {
    let qmp = monitor(f);
    let tag = &f.tag;
    let mut steps = Vec::new();
    let mut live_disks = Vec::new();
    for (i, c) in f.disks.iter().enumerate() {
        if c.mode != DiskMode::External {
            continue;
        }
        let overlay = c.new_file.clone().expect("external disks have an overlay");
        if !req.reuse_external {
            steps.push(overlay_step(c));
        }
        live_disks.push((i, overlay, c.block.as_ref().expect("a live guest's disk")));
    }
    let mut tx = Vec::new();
    for (i, overlay, block) in live_disks {
        let ov_node = overlay_node(tag, i);
        steps.push(Step::QmpBlockdevAdd {
            qmp: qmp.clone(),
            node: ov_node.clone(),
            file_node: format!("{ov_node}f"),
            path: overlay,
        });
        tx.push(LiveDisk {
            device: block.device.clone(),
            node: block.node.clone(),
            overlay: ov_node,
        });
    }
    let agent = if req.quiesce {
        f.domain.agent.clone()
    } else {
        None
    };
    if let Some(a) = &agent {
        steps.push(Step::AgentFreeze { agent: a.clone() });
    }
    // Raw disks cloned outside QEMU, and --halt, need the guest's CPUs
    // stopped (QEMU drains and flushes every disk on `stop`); a paused
    // guest is paused already.
    let has_reflink = f.disks.iter().any(|c| c.mode == DiskMode::Reflink);
    let pause =
        f.state == DomState::Running && (has_reflink || req.halt || f.memory_file.is_some());
    if pause {
        steps.push(Step::QmpStop { qmp: qmp.clone() });
    }
    if let Some(mf) = &f.memory_file {
        // The paused guest's memory, then the disks at the same instant
        // (nothing runs in between).
        let tmp = fsops::temp_path(mf, tag);
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
    push_clones(&mut steps, &f.disks, tag);
    let pivot = steps.len() as u32;
    if tx.is_empty() {
        steps.push(Step::Catalog);
    } else {
        steps.push(Step::QmpSnapshotTransaction {
            qmp: qmp.clone(),
            disks: tx,
        });
    }
    if req.halt {
        // The guest stays paused and QEMU exits: a frozen guest that
        // never runs again needs no thaw (and a paused guest's agent could
        // not answer one).
        steps.push(Step::QmpQuit { qmp });
    } else {
        if pause {
            steps.push(Step::QmpCont { qmp });
        }
        if let Some(a) = agent {
            steps.push(Step::AgentThaw { agent: a });
        }
    }
    push_device_heads_removal(&mut steps, &f.disks);
    Shape {
        steps,
        pivot,
        state: if f.memory_file.is_some() {
            DomSnapState::from(f.state)
        } else {
            DomSnapState::DiskSnapshot
        },
    }
}

/// A running guest with its memory kept inside the disks: the pivot is
/// QEMU's `snapshot-save` job over every chosen disk (the memory in the
/// first); `--halt` pauses the guest first and quits QEMU after.
pub(crate) fn compile_live_snapshot_save(req: &DomSnapRequest, f: &Facts) -> Shape {
    let qmp = monitor(f);
    let devices: Vec<String> = f
        .disks
        .iter()
        .map(|c| c.block.as_ref().expect("a live guest's disk").node.clone())
        .collect();
    let mut steps = Vec::new();
    // --halt: paused first, so the guest never runs past the snapshot.
    if req.halt && f.state == DomState::Running {
        steps.push(Step::QmpStop { qmp: qmp.clone() });
    }
    let pivot = steps.len() as u32;
    steps.push(Step::QmpSnapshotSaveFiles {
        qmp: qmp.clone(),
        job: format!("vsnap-{}", f.tag),
        tag: f.name.clone(),
        vmstate: devices[0].clone(),
        devices,
        // each device's image, for recovery when QEMU is gone
        images: f.disks.iter().map(|c| c.real.clone()).collect(),
    });
    if req.halt {
        steps.push(Step::QmpQuit { qmp });
    }
    Shape {
        steps,
        pivot,
        state: DomSnapState::from(f.state),
    }
}

/// A shut-off guest: `qemu-img snapshot -c` per internal disk, an overlay
/// per external one (none with `--reuse-external`), reflink clones; the
/// pivot is the catalog write that points the domain at the overlays.
pub(crate) fn compile_offline(req: &DomSnapRequest, f: &Facts) -> Shape {
    let mut steps = Vec::new();
    for c in &f.disks {
        match c.mode {
            DiskMode::Internal => steps.push(Step::InternalCreate {
                // the disk's real file: vsnap opens it without following
                // a link
                image: c.real.clone(),
                name: f.name.clone(),
            }),
            DiskMode::External if !req.reuse_external => steps.push(overlay_step(c)),
            _ => {}
        }
    }
    push_clones(&mut steps, &f.disks, &f.tag);
    let pivot = steps.len() as u32;
    steps.push(Step::Catalog);
    push_device_heads_removal(&mut steps, &f.disks);
    Shape {
        steps,
        pivot,
        state: DomSnapState::Shutoff,
    }
}

/// An external disk's overlay: a new file, or written onto the block
/// device the request named (its first bytes saved first).
fn overlay_step(c: &Chosen) -> Step {
    let overlay = c.new_file.clone().expect("external disks have an overlay");
    match &c.device_head {
        Some(saved) => Step::OverlayOnDevice {
            device: overlay,
            backing: c.real.clone(),
            backing_format: c.format,
            saved: saved.clone(),
        },
        None => Step::CreateOverlay {
            path: overlay,
            backing: c.real.clone(),
            backing_format: c.format,
        },
    }
}

/// After the pivot: the saved first bytes of the block devices the
/// overlays went onto are no longer needed (nothing will undo them).
fn push_device_heads_removal(steps: &mut Vec<Step>, chosen: &[Chosen]) {
    for saved in chosen.iter().filter_map(|c| c.device_head.clone()) {
        steps.push(Step::RemoveFile { path: saved });
    }
}

/// The reflink disks' steps: clone to a temporary name beside the clone,
/// then move it (never clobbering) to the clone's name.
fn push_clones(steps: &mut Vec<Step>, chosen: &[Chosen], tag: &str) {
    for c in chosen.iter().filter(|c| c.mode == DiskMode::Reflink) {
        let dst = c.new_file.clone().expect("reflink disks have a clone path");
        let tmp = fsops::temp_path(&dst, tag);
        steps.push(Step::Clone {
            src: c.real.clone(),
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

/// The node name of the overlay of the plan's `i`-th chosen disk (its
/// file node: this and `f`).
pub(crate) fn overlay_node(tag: &str, i: usize) -> String {
    format!("vsnap-{tag}-{i}")
}

fn monitor(f: &Facts) -> std::path::PathBuf {
    f.domain.qmp.clone().expect("a live guest has a monitor")
}

/// The snapshot's record, the domain's record after the pivot (external
/// disks now on their overlays; current and `next_seq` moved unless
/// `no_metadata`), and the plan around `shape` with its catalog write.
pub(crate) fn records(
    req: &DomSnapRequest,
    f: &Facts,
    shape: Shape,
) -> (Plan, DomSnapshot, DomainRec) {
    let d = &f.domain;
    let name = &f.name;
    let mut new_dom = d.clone();
    for c in &f.disks {
        if let (DiskMode::External, Some(o)) = (c.mode, &c.new_file) {
            let disk = new_dom
                .disks
                .iter_mut()
                .find(|x| x.target == c.target)
                .expect("chosen disks exist");
            disk.source = if c.device_head.is_some() {
                DiskSource::Block(o.clone())
            } else {
                DiskSource::File(o.clone())
            };
            disk.format = Format::Qcow2;
        }
    }
    let snap = DomSnapshot {
        name: name.clone(),
        domain: d.name.clone(),
        description: req.description.clone(),
        creation_time: f.now,
        parent: d.current.clone(),
        seq: d.next_seq,
        state: shape.state,
        memory_internal: f.memory,
        quiesced: req.quiesce,
        // A disk vsnap cannot snapshot (network, ...) is left out.
        disks: d
            .disks
            .iter()
            .filter(|disk| disk.image().is_some())
            .map(
                |disk| match f.disks.iter().find(|c| c.target == disk.target) {
                    Some(c) if c.mode == DiskMode::Reflink => DomSnapDisk {
                        target: c.target.clone(),
                        mode: c.mode,
                        state_file: c.new_file.clone().expect("reflink disks have a clone path"),
                        overlay: None,
                    },
                    Some(c) => DomSnapDisk {
                        target: c.target.clone(),
                        mode: c.mode,
                        state_file: c.source.clone(),
                        overlay: c.new_file.clone(),
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
        domain_xml: f.domain_xml.clone(),
        memory_file: f.memory_file.clone(),
    };
    let mut catalog = Vec::new();
    if !req.no_metadata {
        new_dom.current = Some(name.clone());
        new_dom.next_seq += 1;
        catalog.push(put_snapshot_op(&snap));
    }
    catalog.push(put_domain(&new_dom));
    if let Some(v) = &f.view_after {
        // What QEMU runs once the pivot is done, in the same write.
        catalog.push(crate::catalog::dom::put_qemu_view(&d.name, v));
    }
    let kind = if f.memory {
        "internal snapshot with memory"
    } else if f.memory_file.is_some() {
        "live snapshot with external memory"
    } else if f.live() {
        "live disk-only snapshot"
    } else {
        "offline snapshot"
    };
    let halt = if req.halt && f.live() {
        ", then QEMU quits (--halt)"
    } else {
        ""
    };
    let plan = Plan {
        op: "domain.snapshot.create".into(),
        summary: format!(
            "{kind} {name:?} of domain {} ({}){halt}",
            d.name,
            f.disks
                .iter()
                .map(|c| format!("{}={}", c.target, c.mode.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        steps: shape.steps,
        pivot: shape.pivot,
        catalog,
    };
    (plan, snap, new_dom)
}

/// Each plan shape from facts made by hand (no QEMU, no files): the step
/// kinds in order, the pivot, the records.
#[cfg(test)]
mod tests {
    use super::super::facts::LiveBlock;
    use super::super::MemoryChoice;
    use super::*;
    use crate::domain::domain_to_xml;
    use crate::domain::{DiskDevice, DomDisk};
    use std::path::{Path, PathBuf};
    use vsnap_journal::CatalogOp;

    /// A domain of qcow2 `vda` (`/vm/a.qcow2`), raw `vdb` (`/vm/b.raw`),
    /// qcow2 `vdc` (`/vm/c.qcow2`), with an agent and a monitor.
    fn domain() -> DomainRec {
        let disk = |t: &str, p: &str, format| DomDisk {
            target: t.into(),
            source: DiskSource::File(p.into()),
            format,
            readonly: false,
            shareable: false,
            device: DiskDevice::Disk,
            snapshot: None,
        };
        DomainRec {
            name: "d".into(),
            uuid: None,
            disks: vec![
                disk("vda", "/vm/a.qcow2", Format::Qcow2),
                disk("vdb", "/vm/b.raw", Format::Raw),
                disk("vdc", "/vm/c.qcow2", Format::Qcow2),
            ],
            qmp: Some("/run/d.qmp".into()),
            agent: Some("/run/d.qga".into()),
            current: Some("s0".into()),
            next_seq: 4,
            virt_type: None,
            launch: None,
        }
    }

    /// Disk `target` of [`domain`] as chosen with `mode` (new files at
    /// their default places; QEMU's device and node when `live`).
    fn chosen(target: &str, mode: DiskMode, live: bool) -> Chosen {
        let d = domain();
        let disk = d.disks.iter().find(|x| x.target == target).unwrap();
        let source = disk.image().unwrap().to_path_buf();
        let new_file = match mode {
            DiskMode::External => Some(PathBuf::from(format!("/vm/{target}.s1.qcow2"))),
            DiskMode::Reflink => Some(PathBuf::from(format!("/vm/{target}.s1.raw"))),
            _ => None,
        };
        Chosen {
            target: target.into(),
            real: source.clone(),
            source,
            format: disk.format,
            mode,
            new_file,
            block: live.then(|| LiveBlock {
                device: target.into(),
                node: format!("node-{target}"),
            }),
            device_head: None,
        }
    }

    #[test]
    fn a_live_plan_writes_what_qemu_will_run_with_its_records() {
        use crate::catalog::dom::{QemuView, QemuViewDisk, QEMU_VIEWS};
        let view = QemuView {
            pid: 7,
            start: 8,
            vcpu_thread: 9,
            disks: vec![QemuViewDisk {
                file: "/vm/vda.s1.qcow2".into(),
                key: "vda".into(),
                qdev: "/machine/peripheral/vda/virtio-backend".into(),
                node: overlay_node("0123abcd", 0),
                depth: 2,
            }],
        };
        let mut f = facts(
            DomState::Running,
            vec![chosen("vda", DiskMode::External, true)],
        );
        f.view_after = Some(view.clone());
        let (plan, _, _) = compile(&DomSnapRequest::default(), &f);
        // In the same catalog write as the records, at the pivot.
        let Some(CatalogOp::Put { tree, key, value }) = plan.catalog.last() else {
            panic!("{:?}", plan.catalog)
        };
        assert_eq!(
            (tree.as_str(), key.as_slice()),
            (QEMU_VIEWS, b"d".as_slice())
        );
        assert_eq!(
            vsnap_journal::codec::decode::<QemuView>(value).unwrap(),
            view
        );
        // The node the plan adds is the one the view names.
        assert!(plan.steps.iter().any(|s| matches!(
            s,
            Step::QmpBlockdevAdd { node, .. } if *node == view.disks[0].node
        )));
        // Offline, or without a view: nothing of the kind.
        f.view_after = None;
        let (plan, _, _) = compile(&DomSnapRequest::default(), &f);
        assert!(plan.catalog.iter().all(|op| !matches!(
            op,
            CatalogOp::Put { tree, .. } if tree == QEMU_VIEWS
        )));
    }

    /// [`chosen`], external onto block device `dev`.
    fn on_device(target: &str, dev: &str, live: bool) -> Chosen {
        let mut c = chosen(target, DiskMode::External, live);
        c.new_file = Some(dev.into());
        c.device_head = Some(format!("/state/devhead.d.s1.{target}").into());
        c
    }

    fn facts(state: DomState, disks: Vec<Chosen>) -> Facts {
        Facts {
            domain: domain(),
            state,
            name: "s1".into(),
            memory: false,
            memory_file: None,
            disks,
            tag: "0123abcd".into(),
            now: 1_700_000_000,
            domain_xml: domain_to_xml(&domain()),
            view_after: None,
        }
    }

    /// The step kinds, the pivot marked `*`.
    fn kinds(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let star = if i as u32 == p.pivot { "*" } else { "" };
                format!("{star}{}", s.name())
            })
            .collect()
    }

    #[test]
    fn every_shape_compiles_to_its_steps() {
        use DiskMode::{External as Ext, Internal as Int, Reflink as Ref};
        use DomState::{Paused, Running, Shutoff};
        let req = |f: fn(&mut DomSnapRequest)| {
            let mut r = DomSnapRequest {
                domain: "d".into(),
                ..Default::default()
            };
            f(&mut r);
            r
        };
        let mem_file = |mut f: Facts| {
            f.memory_file = Some("/vm/d.mem".into());
            f
        };
        let mem_internal = |mut f: Facts| {
            f.memory = true;
            f
        };
        type Case = (&'static str, DomSnapRequest, Facts, &'static [&'static str]);
        let live = |modes: &[(&str, DiskMode)], state| {
            facts(
                state,
                modes.iter().map(|(t, m)| chosen(t, *m, true)).collect(),
            )
        };
        let off = |modes: &[(&str, DiskMode)]| {
            facts(
                Shutoff,
                modes.iter().map(|(t, m)| chosen(t, *m, false)).collect(),
            )
        };
        let cases: Vec<Case> = vec![
            (
                "live disk-only, 2 disks, quiesced",
                req(|r| (r.disk_only, r.quiesce) = (true, true)),
                live(&[("vda", Ext), ("vdc", Ext)], Running),
                &[
                    "create-overlay",
                    "create-overlay",
                    "qmp-blockdev-add",
                    "qmp-blockdev-add",
                    "agent-freeze",
                    "*qmp-transaction",
                    "agent-thaw",
                ],
            ),
            (
                "live disk-only, not quiesced: the guest never stops",
                req(|r| r.disk_only = true),
                live(&[("vda", Ext)], Running),
                &["create-overlay", "qmp-blockdev-add", "*qmp-transaction"],
            ),
            (
                "live disk-only, overlays reused",
                req(|r| (r.disk_only, r.reuse_external) = (true, true)),
                live(&[("vda", Ext), ("vdc", Ext)], Running),
                &["qmp-blockdev-add", "qmp-blockdev-add", "*qmp-transaction"],
            ),
            (
                "live reflink mix: paused around clone and switch",
                req(|r| r.disk_only = true),
                live(&[("vda", Ext), ("vdb", Ref)], Running),
                &[
                    "create-overlay",
                    "qmp-blockdev-add",
                    "qmp-stop",
                    "clone",
                    "rename",
                    "*qmp-transaction",
                    "qmp-cont",
                ],
            ),
            (
                "live reflink only: the catalog is the pivot",
                req(|r| r.disk_only = true),
                live(&[("vdb", Ref)], Running),
                &["qmp-stop", "clone", "rename", "*catalog", "qmp-cont"],
            ),
            (
                "live reflink of a paused guest: no stop, no cont",
                req(|r| r.disk_only = true),
                live(&[("vdb", Ref)], Paused),
                &["clone", "rename", "*catalog"],
            ),
            (
                "live disk-only --halt, quiesced: stop, switch, quit (no thaw)",
                req(|r| (r.disk_only, r.halt, r.quiesce) = (true, true, true)),
                live(&[("vda", Ext)], Running),
                &[
                    "create-overlay",
                    "qmp-blockdev-add",
                    "agent-freeze",
                    "qmp-stop",
                    "*qmp-transaction",
                    "qmp-quit",
                ],
            ),
            (
                "live, memory to a file",
                req(|r| r.memory = Some(MemoryChoice::External("/vm/d.mem".into()))),
                mem_file(live(&[("vda", Ext), ("vdb", Ext)], Running)),
                &[
                    "create-overlay",
                    "create-overlay",
                    "qmp-blockdev-add",
                    "qmp-blockdev-add",
                    "qmp-stop",
                    "qmp-migrate-to-file",
                    "rename",
                    "*qmp-transaction",
                    "qmp-cont",
                ],
            ),
            (
                "live, memory inside the disks",
                req(|_| ()),
                mem_internal(live(&[("vda", Int), ("vdc", Int)], Running)),
                &["*qmp-snapshot-save"],
            ),
            (
                "live, memory inside the disks, --halt",
                req(|r| r.halt = true),
                mem_internal(live(&[("vda", Int), ("vdc", Int)], Running)),
                &["qmp-stop", "*qmp-snapshot-save", "qmp-quit"],
            ),
            (
                "live, memory inside the disks, --halt of a paused guest",
                req(|r| r.halt = true),
                mem_internal(live(&[("vda", Int)], Paused)),
                &["*qmp-snapshot-save", "qmp-quit"],
            ),
            (
                "offline internal and external",
                req(|_| ()),
                off(&[("vda", Int), ("vdb", Ext), ("vdc", Int)]),
                &[
                    "internal-create",
                    "create-overlay",
                    "internal-create",
                    "*catalog",
                ],
            ),
            (
                "offline external: overlays, then the catalog",
                req(|r| r.disk_only = true),
                off(&[("vda", Ext), ("vdb", Ext), ("vdc", Ext)]),
                &[
                    "create-overlay",
                    "create-overlay",
                    "create-overlay",
                    "*catalog",
                ],
            ),
            (
                "offline reflink and reused overlay",
                req(|r| r.reuse_external = true),
                off(&[("vda", Ext), ("vdb", Ref)]),
                &["clone", "rename", "*catalog"],
            ),
            (
                "offline --halt changes nothing",
                req(|r| r.halt = true),
                off(&[("vda", Int)]),
                &["internal-create", "*catalog"],
            ),
        ];
        for (what, r, f, want) in cases {
            let (plan, _, _) = compile(&r, &f);
            assert_eq!(kinds(&plan), want, "{what}");
            plan.assert_well_formed();
        }
    }

    /// `<disk type='block'>` targets: the overlay written onto the device
    /// (its first bytes saved) instead of a new file, the saved copy
    /// removed after the pivot; the domain's disk becomes that device.
    #[test]
    fn block_device_targets_compile_to_overlays_on_the_device() {
        let req = DomSnapRequest {
            domain: "d".into(),
            disk_only: true,
            ..Default::default()
        };
        let live = facts(
            DomState::Running,
            vec![
                on_device("vda", "/dev/loop7", true),
                chosen("vdc", DiskMode::External, true),
            ],
        );
        let (plan, snap, dom) = compile(&req, &live);
        assert_eq!(
            kinds(&plan),
            [
                "overlay-on-device",
                "create-overlay",
                "qmp-blockdev-add",
                "qmp-blockdev-add",
                "*qmp-transaction",
                "remove-file",
            ]
        );
        plan.assert_well_formed();
        let Step::OverlayOnDevice { device, saved, .. } = &plan.steps[0] else {
            panic!("{:?}", plan.steps[0]);
        };
        assert_eq!(
            (device.to_str(), saved.to_str()),
            (Some("/dev/loop7"), Some("/state/devhead.d.s1.vda"))
        );
        assert_eq!(
            plan.steps[5],
            Step::RemoveFile {
                path: saved.clone()
            }
        );
        let vda = dom.disks.iter().find(|d| d.target == "vda").unwrap();
        assert_eq!(vda.source, DiskSource::Block("/dev/loop7".into()));
        assert_eq!(
            snap.disks[0].overlay.as_deref(),
            Some(Path::new("/dev/loop7"))
        );
        let off = facts(
            DomState::Shutoff,
            vec![on_device("vda", "/dev/loop7", false)],
        );
        let (plan, _, _) = compile(&req, &off);
        assert_eq!(
            kinds(&plan),
            ["overlay-on-device", "*catalog", "remove-file"]
        );
        plan.assert_well_formed();
    }

    #[test]
    fn live_steps_carry_the_facts() {
        let mut f = facts(
            DomState::Running,
            vec![
                chosen("vda", DiskMode::External, true),
                chosen("vdb", DiskMode::Reflink, true),
                chosen("vdc", DiskMode::External, true),
            ],
        );
        f.disks[0].real = "/real/a.qcow2".into();
        let req = DomSnapRequest {
            domain: "d".into(),
            disk_only: true,
            ..Default::default()
        };
        let s = compile_live_transaction(&req, &f);
        let Step::CreateOverlay { path, backing, .. } = &s.steps[0] else {
            panic!("{:?}", s.steps[0])
        };
        assert_eq!(
            (path.as_path(), backing.as_path()),
            (Path::new("/vm/vda.s1.qcow2"), Path::new("/real/a.qcow2"))
        );
        // Node names count the chosen disks, reflinks included.
        let Step::QmpSnapshotTransaction { disks, qmp } = &s.steps[s.pivot as usize] else {
            panic!("{:?}", s.steps)
        };
        assert_eq!(qmp, Path::new("/run/d.qmp"));
        let tx: Vec<_> = disks
            .iter()
            .map(|d| (d.device.as_str(), d.node.as_str(), d.overlay.as_str()))
            .collect();
        assert_eq!(
            tx,
            [
                ("vda", "node-vda", "vsnap-0123abcd-0"),
                ("vdc", "node-vdc", "vsnap-0123abcd-2")
            ]
        );
        let Step::Clone { src, dst, .. } = &s.steps[5] else {
            panic!("{:?}", s.steps)
        };
        assert_eq!(src, Path::new("/vm/b.raw"));
        assert_eq!(
            dst,
            &fsops::temp_path(Path::new("/vm/vdb.s1.raw"), "0123abcd")
        );
        assert_eq!(s.state, DomSnapState::DiskSnapshot);

        let mut m = facts(
            DomState::Paused,
            vec![
                chosen("vdc", DiskMode::Internal, true),
                chosen("vda", DiskMode::Internal, true),
            ],
        );
        m.memory = true;
        let s = compile_live_snapshot_save(&DomSnapRequest::default(), &m);
        let Step::QmpSnapshotSaveFiles {
            job,
            tag,
            vmstate,
            devices,
            images,
            ..
        } = &s.steps[0]
        else {
            panic!("{:?}", s.steps)
        };
        assert_eq!(
            (job.as_str(), tag.as_str(), vmstate.as_str()),
            ("vsnap-0123abcd", "s1", "node-vdc")
        );
        assert_eq!(devices, &["node-vdc", "node-vda"]);
        assert_eq!(
            images,
            &[PathBuf::from("/vm/c.qcow2"), PathBuf::from("/vm/a.qcow2")]
        );
        assert_eq!(s.state, DomSnapState::Paused);
    }

    #[test]
    fn records_follow_the_request() {
        let f = facts(
            DomState::Shutoff,
            vec![
                chosen("vda", DiskMode::External, false),
                chosen("vdb", DiskMode::Reflink, false),
            ],
        );
        let req = DomSnapRequest {
            domain: "d".into(),
            description: Some("before the upgrade".into()),
            ..Default::default()
        };
        let (plan, snap, dom) = compile(&req, &f);
        assert_eq!(
            plan.summary,
            "offline snapshot \"s1\" of domain d (vda=external, vdb=reflink)"
        );
        assert_eq!(plan.op, "domain.snapshot.create");
        assert_eq!(
            (snap.creation_time, snap.seq, snap.parent.as_deref()),
            (1_700_000_000, 4, Some("s0"))
        );
        assert_eq!(snap.state, DomSnapState::Shutoff);
        assert_eq!(snap.description.as_deref(), Some("before the upgrade"));
        let disks: Vec<_> = snap
            .disks
            .iter()
            .map(|d| {
                (
                    d.target.as_str(),
                    d.mode,
                    d.state_file.clone(),
                    d.overlay.clone(),
                )
            })
            .collect();
        assert_eq!(
            disks,
            [
                (
                    "vda",
                    DiskMode::External,
                    "/vm/a.qcow2".into(),
                    Some("/vm/vda.s1.qcow2".into())
                ),
                ("vdb", DiskMode::Reflink, "/vm/vdb.s1.raw".into(), None),
                ("vdc", DiskMode::No, "/vm/c.qcow2".into(), None),
            ]
        );
        assert_eq!(snap.domain_xml, domain_to_xml(&domain()));
        // The domain now runs vda on its overlay, qcow2; the reflink's
        // image stays; current and next_seq move.
        assert_eq!(dom.disks[0].image(), Some(Path::new("/vm/vda.s1.qcow2")));
        assert_eq!(dom.disks[0].format, Format::Qcow2);
        assert_eq!(dom.disks[1], domain().disks[1]);
        assert_eq!((dom.current.as_deref(), dom.next_seq), (Some("s1"), 5));
        let trees: Vec<_> = plan
            .catalog
            .iter()
            .map(|op| match op {
                CatalogOp::Put { tree, .. } => tree.as_str(),
                CatalogOp::Delete { tree, .. } => tree.as_str(),
            })
            .collect();
        assert_eq!(trees, ["domsnaps", "domains"]);

        // --no-metadata: the disks switch, nothing is recorded of the
        // snapshot, the domain's current stays.
        let req = DomSnapRequest {
            no_metadata: true,
            ..req
        };
        let (plan, _, dom) = compile(&req, &f);
        assert_eq!((dom.current.as_deref(), dom.next_seq), (Some("s0"), 4));
        assert_eq!(dom.disks[0].image(), Some(Path::new("/vm/vda.s1.qcow2")));
        assert_eq!(plan.catalog.len(), 1);

        // Live summaries name the shape and --halt.
        let mut m = facts(
            DomState::Running,
            vec![chosen("vda", DiskMode::Internal, true)],
        );
        m.memory = true;
        let halt = DomSnapRequest {
            halt: true,
            ..Default::default()
        };
        assert_eq!(
            compile(&halt, &m).0.summary,
            "internal snapshot with memory \"s1\" of domain d (vda=internal), then QEMU quits (--halt)"
        );
        m.memory = false;
        m.memory_file = Some("/vm/d.mem".into());
        m.disks = vec![chosen("vda", DiskMode::External, true)];
        let (_, snap, _) = compile(&DomSnapRequest::default(), &m);
        assert_eq!(snap.state, DomSnapState::Running);
        assert_eq!(snap.memory_file.as_deref(), Some(Path::new("/vm/d.mem")));
    }
}
