//! Steps that act on a running guest: through its QEMU monitor (QMP) and
//! its guest agent, with timeouts everywhere: a dead QEMU or a silent agent
//! is an error, never a hang. A monitor serves one client at a time: each
//! call connects for its own length, unless the caller holds the
//! connection for a whole plan ([`hold_connections`]: the engine does, so
//! a plan and its planning use one connection).

use crate::agent::Agent;
use crate::qmp::{blockdev_snapshot_action, qcow2_overlay_args, BlockDevice, Qmp};
use crate::{Probe, StepError, StepResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vsnap_journal::failpoint;

/// Connect timeout for a monitor or an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one agent command may take (a freeze syncs every filesystem).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `snapshot-save` job may take.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// One disk switched by a live external snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDisk {
    /// How `query-block` names the device: `device`, or `qdev` when
    /// `device` is empty (`-blockdev` configurations).
    pub device: String,
    /// The device's top node before the snapshot.
    pub node: String,
    /// The overlay's node, added beforehand.
    pub overlay: String,
}

// --- one monitor connection per plan -------------------------------------

thread_local! {
    /// The monitor connection kept between the calls of one plan (and its
    /// planning): see [`hold_connections`].
    static HELD: std::cell::RefCell<Option<Qmp>> = const { std::cell::RefCell::new(None) };
    /// How many [`Held`] guards are alive on this thread.
    static HOLDING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Keep the monitor connection open between calls until the returned guard
/// is dropped: a plan (with its planning) talks to QEMU over ONE connection
/// instead of connecting once per step and per query. A QEMU monitor
/// serves one client at a time, so the guard must not outlive the plan;
/// dropping the last guard disconnects. Connections made without a guard
/// last as long as their [`QmpLease`].
pub fn hold_connections() -> Held {
    HOLDING.with(|h| h.set(h.get() + 1));
    Held(())
}

/// See [`hold_connections`].
#[must_use = "the connection is held only while the guard lives"]
pub struct Held(());

impl Drop for Held {
    fn drop(&mut self) {
        let left = HOLDING.with(|h| {
            h.set(h.get().saturating_sub(1));
            h.get()
        });
        if left == 0 {
            // Disconnect (outside the borrow: Qmp's drop does I/O).
            let q = HELD.with(|c| c.borrow_mut().take());
            drop(q);
        }
    }
}

/// A monitor connection: the held one when it is to the same socket and
/// still open (QEMU may have gone since: then a new one), else a new one.
/// Derefs to [`Qmp`]. Dropped while [`hold_connections`] is in force, it
/// goes back to be held (unless QEMU closed it).
pub struct QmpLease(Option<Qmp>);

impl std::ops::Deref for QmpLease {
    type Target = Qmp;
    fn deref(&self) -> &Qmp {
        self.0
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl std::ops::DerefMut for QmpLease {
    fn deref_mut(&mut self) -> &mut Qmp {
        self.0
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for QmpLease {
    fn drop(&mut self) {
        let Some(q) = self.0.take() else { return };
        if HOLDING.with(|h| h.get()) > 0 && !q.is_closed() {
            let old = HELD.with(|c| c.borrow_mut().replace(q));
            drop(old);
        }
    }
}

/// Connections made to QEMU monitors by this process (tests and benches
/// count them: one per plan is the promise).
pub fn connections_made() -> u64 {
    CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn qmp(path: &Path) -> StepResult<QmpLease> {
    let held = HELD.with(|c| c.borrow_mut().take());
    if let Some(mut q) = held {
        // Still open (what QEMU sent meanwhile is read; its events are
        // dropped: a step waits only for events of its own commands).
        if q.path() == path && q.poll_events().is_ok() {
            return Ok(QmpLease(Some(q)));
        }
    }
    let q = Qmp::connect(path, CONNECT_TIMEOUT)?;
    CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(QmpLease(Some(q)))
}

pub fn agent(path: &Path) -> StepResult<Agent> {
    let mut a = Agent::connect(path, CONNECT_TIMEOUT)?;
    a.set_timeout(AGENT_TIMEOUT);
    Ok(a)
}

/// The top node of `device` (its [`BlockDevice::key`]: `device`, else
/// `qdev`) in a typed `query-block` answer ([`Qmp::query_block_typed`]).
pub fn top_node(blocks: &[BlockDevice], device: &str) -> Option<String> {
    blocks
        .iter()
        .find(|b| b.key == device)?
        .inserted
        .as_ref()
        .map(|i| i.node_name.clone())
}

fn node_names(q: &mut Qmp) -> StepResult<Vec<String>> {
    let nodes = q.query_named_block_nodes_flat()?;
    Ok(nodes
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| {
                    n.get("node-name")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default())
}

// --- blockdev-add of a prepared overlay ---------------------------------

pub fn blockdev_add_probe(qmp_path: &Path, node: &str) -> StepResult<Probe> {
    let mut q = qmp(qmp_path)?;
    Ok(if node_names(&mut q)?.iter().any(|n| n == node) {
        Probe::Applied
    } else {
        Probe::NotApplied
    })
}

/// Idempotent without asking first: the node names are this plan's own
/// (random tag), and a `blockdev-add` is all or nothing, so QEMU's
/// "Duplicate nodes with node-name" means a run before this one added it.
/// (Asking `query-named-block-nodes` before each add cost QEMU a walk of
/// every node of every chain: about 35 ms per disk at 16 disks of depth
/// 20.)
pub fn blockdev_add(qmp_path: &Path, node: &str, file_node: &str, path: &Path) -> StepResult<()> {
    let mut q = qmp(qmp_path)?;
    match q.blockdev_add(qcow2_overlay_args(node, file_node, path)) {
        Err(StepError::Qmp { desc, .. })
            if desc.contains("Duplicate nodes with node-name")
                && node_names(&mut q)?.iter().any(|n| n == node) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// `blockdev-del` of a node this plan added, if QEMU still has it and no
/// device uses it (after a pivot it is in use and must stay). A QEMU that
/// is gone ([`is_gone`]) holds no node: nothing to delete.
pub fn blockdev_del(qmp_path: &Path, node: &str) -> StepResult<()> {
    let mut q = match qmp(qmp_path) {
        Ok(q) => q,
        Err(e) if is_gone(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if !node_names(&mut q)?.iter().any(|n| n == node) {
        return Ok(());
    }
    q.blockdev_del(node)
}

// --- the pivot: one atomic transaction ----------------------------------

pub fn transaction_probe(qmp_path: &Path, disks: &[LiveDisk]) -> StepResult<Probe> {
    let mut q = match qmp(qmp_path) {
        Ok(q) => q,
        Err(e) => {
            return Ok(Probe::Unknown(format!(
                "cannot ask QEMU whether the disks were switched: {e}"
            )))
        }
    };
    let blocks = q.query_block_typed()?;
    let mut switched = 0;
    let mut seen = Vec::new();
    for d in disks {
        let top = top_node(&blocks, &d.device);
        if top.as_deref() == Some(d.overlay.as_str()) {
            switched += 1;
        }
        seen.push(format!(
            "{}: {}",
            d.device,
            top.unwrap_or_else(|| "(no such device)".into())
        ));
    }
    Ok(if switched == disks.len() {
        Probe::Applied
    } else if switched == 0 {
        Probe::NotApplied
    } else {
        Probe::Unknown(format!(
            "only {switched} of {} disks run on their overlay: {}",
            disks.len(),
            seen.join(", ")
        ))
    })
}

/// Idempotent without asking first (the guest may be frozen meanwhile:
/// `query-block` nests every disk's whole chain, about 35 ms at 16 disks
/// of depth 30): the transaction goes first; if QEMU refuses it (an
/// overlay that is a device's top already has its backing), the disks
/// are switched already when every device's top is its overlay (a run
/// before this one did it), and QEMU's error stands otherwise.
pub fn transaction(qmp_path: &Path, disks: &[LiveDisk]) -> StepResult<()> {
    let mut q = qmp(qmp_path)?;
    let actions = disks
        .iter()
        .map(|d| blockdev_snapshot_action(&d.node, &d.overlay))
        .collect();
    failpoint::hit("step.qmp-transaction.before");
    match q.transaction(actions) {
        Ok(()) => {}
        Err(e @ StepError::Qmp { .. }) => {
            let blocks = q.query_block_typed()?;
            let switched = disks
                .iter()
                .all(|d| top_node(&blocks, &d.device).as_deref() == Some(d.overlay.as_str()));
            if !switched {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    failpoint::hit("step.qmp-transaction.after");
    Ok(())
}

// --- pause and resume -----------------------------------------------------

pub fn running(qmp_path: &Path) -> StepResult<bool> {
    Ok(qmp(qmp_path)?.query_status()?.0)
}

pub fn stop(qmp_path: &Path) -> StepResult<()> {
    let mut q = qmp(qmp_path)?;
    if q.query_status()?.0 {
        q.stop()?;
    }
    Ok(())
}

pub fn cont(qmp_path: &Path) -> StepResult<()> {
    let mut q = qmp(qmp_path)?;
    if !q.query_status()?.0 {
        q.cont()?;
    }
    Ok(())
}

/// `cont`, unless QEMU is gone ([`is_gone`]): a dead guest is not left
/// paused, there is nothing to resume. The undo of a `stop` (the rollback
/// goes on and leaves the files as they were) and the apply of a `cont`
/// after the pivot (the domain is shut off; DESIGN.md 10.1).
pub fn cont_unless_gone(qmp_path: &Path) -> StepResult<()> {
    match cont(qmp_path) {
        Err(e) if is_gone(&e) => Ok(()),
        r => r,
    }
}

// --- memory state to a file: migrate to fd:NAME ---------------------------

/// Migration states in which a migration is still going on.
fn migration_active(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
    )
}

/// Cancel a migration still going on and wait (bounded) until it ended.
fn migration_settle(q: &mut Qmp) -> StepResult<String> {
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    let mut cancelled = false;
    loop {
        let (status, _) = q.query_migrate()?;
        if !migration_active(&status) {
            return Ok(status);
        }
        if !cancelled {
            q.execute("migrate_cancel", Value::Null)?;
            cancelled = true;
        }
        if std::time::Instant::now() > deadline {
            return Err(StepError::Invalid(format!(
                "a migration in QEMU ({}) is still {status} {} s after migrate_cancel",
                q.path().display(),
                JOB_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The memory state (QEMU's migration stream) of a paused guest into
/// `path`, a new file (mode 0600) handed to QEMU over the monitor socket
/// (`getfd` with `SCM_RIGHTS`, `migrate` to `fd:NAME`: QEMU 7.2 has no
/// `file:` URI); waits for `completed`, then fsyncs the file. Idempotent:
/// a migration still going on (from a process that died) is cancelled
/// first; a completed one whose file is there is only fsynced again.
/// After it, QEMU's block nodes are inactive (handed to a destination
/// that never comes) until `cont` takes them back.
pub fn migrate_to_file(qmp_path: &Path, fdname: &str, path: &Path) -> StepResult<()> {
    let mut q = qmp(qmp_path)?;
    let status = migration_settle(&mut q)?;
    let (_, run) = q.query_status()?;
    if status == "completed" && run == "postmigrate" && crate::fsops::exists(path)? {
        return crate::fsops::fsync_file(path);
    }
    crate::fsops::remove_if_exists(path)?;
    // A name left by a process that died before its migrate consumed it.
    let _ = q.closefd(fdname);
    let file = crate::fsops::create_excl_mode(path, 0o600)?;
    q.getfd(fdname, &file)?;
    drop(file);
    failpoint::hit("step.migrate.before");
    q.execute(
        "migrate",
        serde_json::json!({ "uri": format!("fd:{fdname}") }),
    )?;
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    loop {
        let (status, err) = q.query_migrate()?;
        match status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(StepError::Invalid(format!(
                    "QEMU's migration of the memory state to {} {status}: {}",
                    path.display(),
                    err.unwrap_or_else(|| "no reason given".into())
                )))
            }
            _ if std::time::Instant::now() > deadline => {
                return Err(StepError::Invalid(format!(
                    "the memory state to {} is not written after {} s (migration {status})",
                    path.display(),
                    JOB_TIMEOUT.as_secs()
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    failpoint::hit("step.migrate.before-fsync");
    crate::fsops::fsync_file(path)?;
    crate::fsops::fsync_parent(path)
}

/// The undo of [`migrate_to_file`]: a migration still going on is
/// cancelled, the descriptor name dropped, the file removed. A QEMU that
/// is gone holds nothing: the file is removed all the same.
pub fn migrate_to_file_undo(qmp_path: &Path, fdname: &str, path: &Path) -> StepResult<()> {
    match qmp(qmp_path) {
        Ok(mut q) => {
            migration_settle(&mut q)?;
            let _ = q.closefd(fdname);
        }
        Err(e) if is_gone(&e) => {}
        Err(e) => return Err(e),
    }
    crate::fsops::unlink_if_exists(path)?;
    crate::fsops::fsync_parent(path)
}

/// Whether `path` holds a complete migration stream as far as a probe
/// can tell: it exists, starts with QEMU's `QEVM` magic, and no migration
/// is going on.
pub fn migrate_to_file_probe(qmp_path: &Path, path: &Path) -> StepResult<Probe> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let have = match std::fs::File::open(path) {
        Ok(mut f) => f.read_exact(&mut magic).is_ok() && &magic == b"QEVM",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::NotApplied),
        Err(e) => return Err(crate::fsops::io_err("open", path, e)),
    };
    if !have {
        return Ok(Probe::NotApplied);
    }
    let mut q = match qmp(qmp_path) {
        Ok(q) => q,
        // The stream is known complete only once renamed from this, its
        // temporary name (the rename follows the fsync): with no QEMU to
        // say "completed", a file here is a partial one.
        Err(e) if is_gone(&e) => return Ok(Probe::NotApplied),
        Err(e) => {
            return Ok(Probe::Unknown(format!(
                "cannot ask QEMU whether the memory state in {} is complete: {e}",
                path.display()
            )))
        }
    };
    Ok(match q.query_migrate()?.0.as_str() {
        "completed" => Probe::Applied,
        s if migration_active(s) => Probe::Unknown(format!("the migration is still {s}")),
        _ => Probe::NotApplied,
    })
}

// --- halt: QEMU quits -------------------------------------------------------

/// Whether no QEMU answers on `qmp_path` any more (socket missing or
/// refusing connections: [`is_gone`]). A QEMU that answers, or whose
/// monitor fails otherwise (busy with another client, permission denied,
/// not speaking QMP), is not gone: that is an error or an answer, never
/// taken for a dead QEMU.
pub fn gone(qmp_path: &Path) -> StepResult<bool> {
    match qmp(qmp_path) {
        Ok(_) => Ok(false),
        Err(e) if is_gone(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Whether connecting to a monitor failed because no QEMU is there: the
/// socket is missing, or nobody accepts on it (a killed QEMU leaves a
/// stale socket: `ECONNREFUSED`). Any other failure (a timeout, permission
/// denied, a peer that closed or spoke something else) is not "gone".
pub fn is_gone(e: &StepError) -> bool {
    use std::io::ErrorKind;
    match e {
        StepError::QmpNoSocket { .. } => true,
        StepError::QmpConnect { source, .. } => {
            matches!(
                source.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::NotFound
            )
        }
        _ => false,
    }
}

/// [`is_gone`] for the guest agent's socket. The agent's socket is a
/// chardev QEMU serves: nobody accepting on it means that QEMU is gone.
pub fn agent_is_gone(e: &StepError) -> bool {
    use std::io::ErrorKind;
    match e {
        StepError::AgentNoSocket { .. } => true,
        StepError::AgentConnect { source, .. } => {
            matches!(
                source.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::NotFound
            )
        }
        _ => false,
    }
}

/// How long QEMU may take to go away after `quit`.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(30);

/// QMP `quit`, then wait until the monitor no longer answers. A QEMU that
/// is gone already is success (the step is retried after a crash).
pub fn quit(qmp_path: &Path) -> StepResult<()> {
    match qmp(qmp_path) {
        Ok(mut q) => {
            failpoint::hit("step.qmp-quit.before");
            match q.quit() {
                Ok(()) => {}
                // Closed under us: it is going away.
                Err(e) if qmp_error_is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) if is_gone(&e) => return Ok(()),
        // Accepted and closed before a greeting: QEMU is exiting already.
        Err(StepError::QmpClosed { .. }) => {}
        Err(e) => return Err(e),
    }
    let deadline = std::time::Instant::now() + QUIT_TIMEOUT;
    loop {
        match gone(qmp_path) {
            Ok(true) => break,
            // While QEMU exits it may still accept and then close, or
            // reset the connection.
            Ok(false) | Err(StepError::QmpClosed { .. } | StepError::QmpConnect { .. }) => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() > deadline {
            return Err(StepError::Invalid(format!(
                "QEMU still answers on {} {} s after quit",
                qmp_path.display(),
                QUIT_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// --- quiesce ----------------------------------------------------------------

pub fn frozen(agent_path: &Path) -> StepResult<bool> {
    Ok(agent(agent_path)?.fsfreeze_status()? == "frozen")
}

pub fn freeze(agent_path: &Path) -> StepResult<()> {
    let mut a = agent(agent_path)?;
    if a.fsfreeze_status()? == "frozen" {
        return Ok(());
    }
    failpoint::hit("step.agent-freeze.before");
    a.fsfreeze_freeze()?;
    Ok(())
}

/// Thaw the guest's filesystems if frozen. An agent socket nobody
/// accepts on ([`agent_is_gone`]) means its QEMU is gone: no guest is
/// left to thaw (the retriable thaw after a pivot, and the undo of a
/// freeze, succeed).
pub fn thaw(agent_path: &Path) -> StepResult<()> {
    let mut a = match agent(agent_path) {
        Ok(a) => a,
        Err(e) if agent_is_gone(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if a.fsfreeze_status()? != "frozen" {
        return Ok(());
    }
    a.fsfreeze_thaw()?;
    Ok(())
}

// --- internal snapshot with memory: the snapshot-save job -------------------

/// Internal snapshot names of a node (from `query-named-block-nodes`).
fn node_snapshots(nodes: &Value, node: &str) -> Option<Vec<String>> {
    let n = nodes
        .as_array()?
        .iter()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))?;
    Some(
        n.get("image")
            .and_then(|i| i.get("snapshots"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

pub fn snapshot_save_probe(
    qmp_path: &Path,
    job: &str,
    tag: &str,
    devices: &[String],
) -> StepResult<Probe> {
    let mut q = match qmp(qmp_path) {
        Ok(q) => q,
        Err(e) => {
            return Ok(Probe::Unknown(format!(
                "cannot ask QEMU whether snapshot {tag:?} was saved: {e}"
            )))
        }
    };
    // A job started by a process that died goes on inside QEMU: let it end.
    if q.query_job(job)?.is_some() {
        let _ = q.wait_job(job, JOB_TIMEOUT);
    }
    let nodes = q.query_named_block_nodes_flat()?;
    let have = devices
        .iter()
        .filter(|d| node_snapshots(&nodes, d).is_some_and(|s| s.iter().any(|n| n == tag)))
        .count();
    Ok(if have == devices.len() {
        Probe::Applied
    } else if have == 0 {
        Probe::NotApplied
    } else {
        Probe::Unknown(format!(
            "snapshot {tag:?} is on {have} of {} disks",
            devices.len()
        ))
    })
}

pub fn snapshot_save(
    qmp_path: &Path,
    job: &str,
    tag: &str,
    vmstate: &str,
    devices: &[String],
) -> StepResult<()> {
    if snapshot_save_probe(qmp_path, job, tag, devices)? == Probe::Applied {
        return Ok(());
    }
    let mut q = qmp(qmp_path)?;
    let devs: Vec<&str> = devices.iter().map(String::as_str).collect();
    failpoint::hit("step.snapshot-save.before");
    q.snapshot_save(job, tag, vmstate, &devs, JOB_TIMEOUT)
}

/// Revert a running guest to internal snapshot `tag` (its disks and its
/// memory) through QEMU's `snapshot-load` job ([`crate::Step::QmpSnapshotLoad`]).
/// The caller checked that no disk holds a snapshot whose *ID* is `tag`
/// (QEMU looks the tag up by ID first). A job of that id that a dead
/// process started is waited for; its success is the step's. With no
/// QEMU answering, the images are reverted offline, by the snapshot's ID.
pub fn snapshot_load(
    qmp_path: &Path,
    job: &str,
    tag: &str,
    vmstate: &str,
    devices: &[String],
    images: &[PathBuf],
) -> StepResult<()> {
    let mut q = match qmp(qmp_path) {
        Ok(q) => q,
        Err(e) if is_gone(&e) => {
            for image in images {
                crate::qemu_img::snapshot(image, crate::qemu_img::SnapshotOp::Apply, tag)?;
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if q.query_job(job)?.is_some() && q.wait_job(job, JOB_TIMEOUT).is_ok() {
        return Ok(());
    }
    let devs: Vec<&str> = devices.iter().map(String::as_str).collect();
    failpoint::hit("step.snapshot-load.before");
    q.snapshot_load_start(job, tag, vmstate, &devs)?;
    // The job runs in QEMU: a process dying here leaves it to recovery.
    failpoint::hit("step.snapshot-load.started");
    q.wait_job(job, JOB_TIMEOUT)
}

/// Delete an internal snapshot from every device through QEMU.
pub fn snapshot_delete(
    qmp_path: &Path,
    job: &str,
    tag: &str,
    devices: &[String],
) -> StepResult<()> {
    let mut q = qmp(qmp_path)?;
    let nodes = q.query_named_block_nodes_flat()?;
    let with: Vec<&str> = devices
        .iter()
        .filter(|d| node_snapshots(&nodes, d).is_some_and(|s| s.iter().any(|n| n == tag)))
        .map(String::as_str)
        .collect();
    if with.is_empty() {
        return Ok(());
    }
    q.snapshot_delete(job, tag, &with, JOB_TIMEOUT)
}

pub fn qmp_error_is_gone(e: &StepError) -> bool {
    matches!(
        e,
        StepError::QmpNoSocket { .. } | StepError::QmpConnect { .. } | StepError::QmpClosed { .. }
    )
}

// --- after a host crash: the files decide (DESIGN.md 10.1) -----------------

/// Open an image to read its metadata: read-only, without following a
/// link, a regular file or a block device. `Err(why)` otherwise.
fn open_image(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{} is gone", path.display()),
            _ if e.raw_os_error() == Some(libc::ELOOP) => format!(
                "{} is a symlink, which vsnap did not make and does not follow",
                path.display()
            ),
            _ => format!("cannot open {}: {e}", path.display()),
        })?;
    let m = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !(m.is_file() || m.file_type().is_block_device()) {
        return Err(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        ));
    }
    Ok(f)
}

/// Whether vsnap's qcow2 overlay at `path` maps any guest data
/// ([`crate::qcow2::has_data`]: its own L1/L2 tables only, never its
/// backing file; read as qcow2 because vsnap made it so, never by a
/// format guessed from its content). `Err(why)` when that cannot be told.
pub fn overlay_has_data(path: &Path) -> Result<bool, String> {
    let f = open_image(path)?;
    let h = crate::qcow2::read_file(&f).map_err(|e| {
        format!(
            "{} is not the qcow2 overlay vsnap made: {e}",
            path.display()
        )
    })?;
    crate::qcow2::has_data(&f, &h)
        .map_err(|e| format!("cannot read the tables of {}: {e}", path.display()))
}

/// A live disk-only switch (the pivot `transaction`) decided from its
/// overlays, for when QEMU is gone and cannot be asked: an overlay with
/// any data cluster proves the switch happened (the guest wrote through
/// it; the transaction is atomic, so one decides for every disk):
/// Applied. No overlay with data: NotApplied (an overlay without data is
/// its backing file, so removing it loses nothing the guest flushed).
/// An overlay gone or unreadable: Unknown (a disk vanished, or someone
/// else changed the file).
pub fn transaction_probe_files(overlays: &[std::path::PathBuf]) -> Probe {
    let mut with_data = Vec::new();
    let mut trouble = Vec::new();
    for o in overlays {
        match overlay_has_data(o) {
            Ok(true) => with_data.push(o.display().to_string()),
            Ok(false) => {}
            Err(why) => trouble.push(why),
        }
    }
    if !trouble.is_empty() {
        return Probe::Unknown(format!(
            "QEMU is gone, and the overlays cannot decide: {}",
            trouble.join("; ")
        ));
    }
    if with_data.is_empty() {
        Probe::NotApplied
    } else {
        Probe::Applied
    }
}

/// Whether the qcow2 image at `path` has an internal snapshot `tag` in
/// its snapshot table (read natively: the image is qcow2 as the plan
/// recorded it). `Err(why)` when that cannot be told.
pub fn image_has_snapshot(path: &Path, tag: &str) -> Result<bool, String> {
    let f = open_image(path)?;
    let h = crate::qcow2::read_file(&f)
        .map_err(|e| format!("{} is not a readable qcow2 image: {e}", path.display()))?;
    Ok(h.snapshots.iter().any(|n| n == tag))
}

/// An internal snapshot with memory (the pivot `snapshot-save`) decided
/// from the disks, for when QEMU is gone: QEMU writes the memory state
/// before the snapshot-table entries, so the entry in every image means a
/// complete snapshot: Applied; in some or none: NotApplied (the partial
/// entries are deleted afterwards, [`snapshot_save_discard_offline`]). An
/// image gone or unreadable: Unknown.
pub fn snapshot_save_probe_files(tag: &str, images: &[std::path::PathBuf]) -> Probe {
    let mut have = 0;
    let mut trouble = Vec::new();
    for i in images {
        match image_has_snapshot(i, tag) {
            Ok(true) => have += 1,
            Ok(false) => {}
            Err(why) => trouble.push(why),
        }
    }
    if !trouble.is_empty() {
        return Probe::Unknown(format!(
            "QEMU is gone, and the disks cannot decide whether snapshot {tag:?} was saved: {}",
            trouble.join("; ")
        ));
    }
    if have == images.len() {
        Probe::Applied
    } else {
        Probe::NotApplied
    }
}

/// After a `snapshot-save` that did not complete in a QEMU that is gone:
/// delete the entries `tag` it left in some images (`qemu-img snapshot
/// -d`, offline; `qemu-img` takes the image's write lock, so an image a
/// process holds is refused, never written). Returns the images it
/// deleted the entry from. Idempotent.
pub fn snapshot_save_discard_offline(
    tag: &str,
    images: &[std::path::PathBuf],
) -> StepResult<Vec<std::path::PathBuf>> {
    let mut done = Vec::new();
    for i in images {
        if !crate::fsops::exists(i)? {
            continue;
        }
        if image_has_snapshot(i, tag).map_err(StepError::Invalid)? {
            if crate::qcow2::qemu_holds(i).unwrap_or(false) {
                return Err(StepError::InUse { path: i.clone() });
            }
            let f = crate::fsops::open_ours(i, false)?;
            crate::qemu_img::snapshot_fd(&f, i, crate::qemu_img::SnapshotOp::Delete, tag)?;
            done.push(i.clone());
        }
    }
    Ok(done)
}
