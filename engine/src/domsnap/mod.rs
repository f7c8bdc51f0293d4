//! Domain snapshots: all chosen disks of a guest at one instant.
//!
//! Plans (DESIGN.md section 2; the table is in `compile.rs`):
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
//!
//! Data flow: **request → facts → compile → run**.
//!
//! * `request.rs` — what is asked ([`DomSnapRequest`], from typed flags
//!   and `<domainsnapshot>`); reads no catalog, no file.
//! * `facts.rs` — `facts::gather`: every IO planning needs (catalog, run
//!   state, agent, images, directories, `query-block`), checked in the
//!   request's order, returned as plain data (`Facts`).
//! * `compile.rs` — one pure function per plan shape, `Facts` in,
//!   [`Plan`] and records out; table-tested without QEMU.
//! * `xml.rs` — a snapshot record written as `<domainsnapshot>`.
//! * this file — the engine's API: plan, create (runs the plan through
//!   `plan::run`), list, look up.
//!
//! Records and their catalog trees are in [`crate::catalog::dom`].

mod compile;
mod facts;
mod request;
mod revert;
mod xml;

pub use request::{parse_domainsnapshot, DiskChoice, DomSnapFlags, DomSnapRequest, MemoryChoice};
pub use revert::{DomRevertDone, DomRevertFlags};
pub use xml::domainsnapshot_to_xml;

use crate::domain::{DomState, DomainRec};
use crate::plan::Plan;
use crate::{Engine, EngineError, Result};
use serde::Serialize;
use vsnap_steps::live;

// The records live in the catalog (which depends on nothing here).
pub use crate::catalog::dom::{
    put_snapshot_op, snapshots, DiskMode, DomSnapDisk, DomSnapState, DomSnapshot,
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

impl Engine {
    /// Compile a domain snapshot (nothing is touched): the request checked
    /// and resolved against the world (`facts::gather`: all the IO), then
    /// compiled (`compile::compile`: none), then the plan's new paths
    /// checked.
    pub fn plan_domain_snapshot(
        &self,
        req: &DomSnapRequest,
    ) -> Result<(Plan, DomSnapshot, DomainRec)> {
        crate::validate_description(req.description.as_deref())?;
        let d = self.domain(&req.domain)?;
        let facts = facts::gather(self, &d, req)?;
        let (plan, snap, new_dom) = compile::compile(req, &facts);
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
    /// from [`Engine::plan_domain_snapshot`], `Refused` (of each
    /// [`crate::RefusalKind`]: no such domain, a name in use, a choice
    /// that does not fit its disks or state),
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
    /// nothing. Errors: `Refused` `NotFound` (no such domain), `Journal` (the catalog
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
    /// nothing. Errors: `Refused` `NotFound` (no such domain, or no snapshot of that
    /// name), `Journal`.
    pub fn domain_snapshot_lookup_by_name(&self, domain: &str, name: &str) -> Result<DomSnapshot> {
        self.domain_snapshot_list(domain)?.into_iter().find(|s| s.name == name).ok_or_else(|| {
            EngineError::not_found(format!(
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
