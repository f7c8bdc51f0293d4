//! A small synchronous client for QEMU's monitor protocol (QMP) over a unix
//! socket (`-qmp unix:PATH,server=on,wait=off`).
//!
//! * [`Qmp::connect`] reads the greeting (QEMU's version is recorded from
//!   it) and negotiates with `qmp_capabilities` (no optional capability is
//!   enabled: no out-of-band commands).
//! * Every command carries an increasing `id`; [`Qmp::execute`] reads until
//!   the reply with *its* id. A reply with another id (the late answer to a
//!   command that timed out earlier) is discarded. Events that arrive
//!   meanwhile (`STOP` and `RESUME` around `stop`/`cont`, `SHUTDOWN` before
//!   `quit`'s reply, `JOB_STATUS_CHANGE`, ...) are queued in arrival order:
//!   [`Qmp::events`] drains the queue, [`Qmp::wait_event`] takes the first
//!   event of a name, reading more if none is queued.
//! * Every read and write has a deadline (the connection's timeout, or the
//!   one given to the call); a line that arrives in pieces counts against
//!   the same deadline. Nothing here blocks forever, not even `connect`.
//! * Errors say what happened and what to do: no socket
//!   ([`StepError::QmpNoSocket`]), a stale socket or a refused connection
//!   ([`StepError::QmpConnect`]), QEMU closing the monitor mid-command
//!   ([`StepError::QmpClosed`]), no answer in time
//!   ([`StepError::QmpTimeout`]), and QEMU's own error for a command
//!   ([`StepError::Qmp`], naming the command, QEMU's class and
//!   description).
//!
//! **One client at a time.** A QEMU monitor serves a single client: while
//! one is connected, QEMU does not accept another, so a second client's
//! `connect` succeeds at the socket level (the kernel queues it) but no
//! greeting comes until the first client disconnects; once the kernel
//! queue is full, `connect(2)` itself would block. [`Qmp::connect`] bounds
//! both by its timeout and then fails with [`StepError::QmpTimeout`] (what:
//! "its greeting"). vsnap therefore connects for the length of a plan or a
//! query and disconnects (drop the [`Qmp`]); a manager that keeps its own
//! monitor connection must give vsnap a monitor of its own (QEMU accepts
//! several `-qmp` options).
//!
//! Only QMP that QEMU 7.2 has is used (`snapshot-save`, `snapshot-load`,
//! `snapshot-delete` and `job-dismiss` exist since 6.0, `blockdev-add` and
//! `blockdev-snapshot` long before).

use crate::{StepError, StepResult};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most events kept in the queue; older ones are dropped first, so a
/// connection whose events nobody drains cannot grow without bound.
const MAX_QUEUED_EVENTS: usize = 10_000;

/// "5s", "0.25s": a duration for an error message.
pub(crate) fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        let n = format!("{:.3}", d.as_secs_f64());
        format!("{}s", n.trim_end_matches('0'))
    }
}

/// QEMU's version, as its greeting or `query-version` states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// Distribution package string, e.g. "Debian 1:7.2+dfsg-7+deb12u18".
    pub package: String,
}

impl QemuVersion {
    fn from_value(v: &Value) -> Option<QemuVersion> {
        let q = v.get("qemu")?;
        Some(QemuVersion {
            major: q.get("major")?.as_u64()?,
            minor: q.get("minor")?.as_u64()?,
            micro: q.get("micro")?.as_u64()?,
            package: v
                .get("package")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
    }

    /// `(major, minor, micro)`, comparable: `v.triple() >= (7, 2, 0)`.
    pub fn triple(&self) -> (u64, u64, u64) {
        (self.major, self.minor, self.micro)
    }
}

/// When QEMU emitted an event (host wall clock, QEMU's `timestamp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// Microseconds since the Unix epoch.
    pub fn as_micros(&self) -> i64 {
        self.seconds * 1_000_000 + self.microseconds
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later): the
    /// pause window is `resume.timestamp.since(&stop.timestamp)`.
    pub fn since(&self, earlier: &Timestamp) -> Duration {
        let d = self.as_micros() - earlier.as_micros();
        Duration::from_micros(d.max(0) as u64)
    }

    pub fn to_system_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.as_micros().max(0) as u64)
    }
}

/// One QMP event (`{"event": NAME, "data": {...}, "timestamp": {...}}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    /// The event's `data`; `Value::Null` when it has none.
    pub data: Value,
    pub timestamp: Timestamp,
}

impl Event {
    fn from_value(v: &Value) -> Option<Event> {
        let name = v.get("event")?.as_str()?.to_string();
        let ts = v.get("timestamp");
        let field = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_i64);
        Some(Event {
            name,
            data: v.get("data").cloned().unwrap_or(Value::Null),
            timestamp: Timestamp {
                seconds: field("seconds").unwrap_or(0),
                microseconds: field("microseconds").unwrap_or(0),
            },
        })
    }
}

/// One entry of `query-jobs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    /// The job type: "snapshot-save", "snapshot-load", "snapshot-delete",
    /// "commit", "stream", ...
    pub kind: String,
    /// "created", "running", "paused", "ready", "standby", "waiting",
    /// "pending", "aborting", "concluded", "null".
    pub status: String,
    /// QEMU's error message, set once a job concluded with a failure.
    pub error: Option<String>,
}

impl JobInfo {
    fn from_value(v: &Value) -> Option<JobInfo> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some(JobInfo {
            id: s("id")?,
            kind: s("type").unwrap_or_default(),
            status: s("status").unwrap_or_default(),
            error: s("error"),
        })
    }
}

/// A connection to one QEMU monitor. Dropping it disconnects, which frees
/// the monitor for the next client.
pub struct Qmp {
    conn: wire::Conn,
    path: PathBuf,
    timeout: Duration,
    next_id: u64,
    events: VecDeque<Event>,
    version: QemuVersion,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

/// What one message from the monitor was.
enum Msg {
    Reply(Value),
    Event(Event),
    Other,
}

impl Qmp {
    /// Connects to the monitor at `path`, reads the greeting and leaves
    /// capabilities negotiation mode. `timeout` bounds the connection and
    /// the greeting, and becomes the default timeout of every later call
    /// ([`Qmp::set_timeout`] changes it).
    pub fn connect(path: &Path, timeout: Duration) -> StepResult<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = match wire::connect(path, deadline) {
            Ok(s) => s,
            Err(wire::ConnectFail::Missing) => {
                return Err(StepError::QmpNoSocket {
                    path: path.to_path_buf(),
                })
            }
            Err(wire::ConnectFail::Timeout) => return Err(greeting_timeout(path, timeout)),
            Err(wire::ConnectFail::Io(source)) => {
                return Err(StepError::QmpConnect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut conn = wire::Conn::new(stream);
        let line = match conn.read_line(deadline) {
            Ok(l) => l,
            Err(wire::Fail::Timeout) => return Err(greeting_timeout(path, timeout)),
            Err(f) => return Err(fail_to_error(path, f, "the greeting", timeout)),
        };
        let greeting: Value =
            serde_json::from_slice(&line).map_err(|e| StepError::QmpProtocol {
                path: path.to_path_buf(),
                message: format!(
                "the greeting is not JSON ({e}): {:?}; is this a QMP socket (-qmp, not -monitor)?",
                String::from_utf8_lossy(&line)
            ),
            })?;
        let version = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(QemuVersion::from_value)
            .ok_or_else(|| StepError::QmpProtocol {
                path: path.to_path_buf(),
                message: format!("expected a QMP greeting with a version, got {greeting}"),
            })?;
        let mut qmp = Qmp {
            conn,
            path: path.to_path_buf(),
            timeout,
            next_id: 1,
            events: VecDeque::new(),
            version,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        qmp.execute_with_timeout("qmp_capabilities", Value::Null, left)?;
        Ok(qmp)
    }

    /// The socket path this client is connected to.
    /// Whether QEMU closed the connection (EOF seen).
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// The default timeout of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `cmd` with `args` (an object, or `Value::Null` for none) and
    /// returns its `return` value. QEMU's error reply becomes
    /// [`StepError::Qmp`]. Uses the connection's timeout.
    pub fn execute(&mut self, cmd: &str, args: Value) -> StepResult<Value> {
        let timeout = self.timeout;
        self.execute_with_timeout(cmd, args, timeout)
    }

    /// [`Qmp::execute`] with its own timeout. After a timeout the command
    /// may still run in QEMU; its late reply is recognised by its id and
    /// discarded by later calls.
    pub fn execute_with_timeout(
        &mut self,
        cmd: &str,
        args: Value,
        timeout: Duration,
    ) -> StepResult<Value> {
        self.run(cmd, args, timeout, false)
    }

    fn run(&mut self, cmd: &str, args: Value, timeout: Duration, quit: bool) -> StepResult<Value> {
        self.run_fd(cmd, args, timeout, quit, None)
    }

    fn run_fd(
        &mut self,
        cmd: &str,
        args: Value,
        timeout: Duration,
        quit: bool,
        fd: Option<std::os::unix::io::RawFd>,
    ) -> StepResult<Value> {
        let deadline = Instant::now() + timeout;
        if self.conn.is_closed() {
            return Err(fail_to_error(&self.path, wire::Fail::Closed, cmd, timeout));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(cmd.to_string()));
        match args {
            Value::Null => {}
            Value::Object(_) => {
                msg.insert("arguments".into(), args);
            }
            other => {
                return Err(StepError::Invalid(format!(
                    "QMP {cmd}: arguments must be a JSON object, not {other}"
                )))
            }
        }
        msg.insert("id".into(), json!(id));
        let mut bytes = serde_json::to_vec(&Value::Object(msg)).expect("JSON of a JSON value");
        bytes.push(b'\n');
        match fd {
            None => self.conn.send(&bytes, deadline),
            Some(fd) => self.conn.send_with_fd(&bytes, fd, deadline),
        }
        .map_err(|f| fail_to_error(&self.path, f, cmd, timeout))?;
        loop {
            let msg = match self.read_msg(deadline) {
                Ok(m) => m,
                // EOF after `quit` was sent: QEMU went away as asked.
                Err(wire::Fail::Closed) if quit => return Ok(json!({})),
                Err(f) => return Err(fail_to_error(&self.path, f, cmd, timeout)),
            };
            let reply = match msg {
                Msg::Reply(r) => r,
                Msg::Event(_) | Msg::Other => continue,
            };
            match reply.get("id") {
                Some(rid) if *rid == json!(id) => {}
                // A stale reply to an earlier command that timed out.
                Some(_) => continue,
                // QEMU answers without an id only when it could not parse
                // the request, which can only be the one in flight.
                None if reply.get("error").is_some() => {}
                None => continue,
            }
            if let Some(err) = reply.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(StepError::Qmp {
                    command: cmd.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Reads one message, queueing it if it is an event.
    fn read_msg(&mut self, deadline: Instant) -> Result<Msg, wire::Fail> {
        loop {
            let line = self.conn.read_line(deadline)?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&line).map_err(|e| {
                wire::Fail::Protocol(format!(
                    "not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&line)
                ))
            })?;
            if let Some(ev) = Event::from_value(&v) {
                if self.events.len() >= MAX_QUEUED_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(ev.clone());
                return Ok(Msg::Event(ev));
            }
            if v.get("return").is_some() || v.get("error").is_some() {
                return Ok(Msg::Reply(v));
            }
            return Ok(Msg::Other);
        }
    }

    /// Drains the queued events, oldest first.
    pub fn events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Reads whatever QEMU has already sent (without waiting) and returns
    /// the queued events, like [`Qmp::events`].
    pub fn poll_events(&mut self) -> StepResult<Vec<Event>> {
        loop {
            while self.conn.has_line() {
                let deadline = Instant::now() + self.timeout;
                self.read_msg(deadline)
                    .map_err(|f| fail_to_error(&self.path, f, "reading events", self.timeout))?;
            }
            match self.conn.read_ready() {
                Ok(true) => continue,
                Ok(false) => return Ok(self.events()),
                // What was queued stays for `events()`.
                Err(f) => return Err(fail_to_error(&self.path, f, "reading events", self.timeout)),
            }
        }
    }

    /// Removes and returns the first queued event named `name`, or reads
    /// until one arrives (other events stay queued, in order).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> StepResult<Event> {
        self.wait_event_where(name, |_| true, timeout)
    }

    /// [`Qmp::wait_event`] for the first event named `name` that `pred`
    /// accepts (for example a `JOB_STATUS_CHANGE` of one job).
    pub fn wait_event_where(
        &mut self,
        name: &str,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> StepResult<Event> {
        if let Some(i) = self.events.iter().position(|e| e.name == name && pred(e)) {
            return Ok(self.events.remove(i).expect("index in range"));
        }
        let deadline = Instant::now() + timeout;
        let what = format!("(event {name})");
        loop {
            match self.read_msg(deadline) {
                Ok(Msg::Event(e)) if e.name == name && pred(&e) => {
                    // It was queued last; take it back out.
                    self.events.pop_back();
                    return Ok(e);
                }
                Ok(_) => continue,
                Err(f) => return Err(fail_to_error(&self.path, f, &what, timeout)),
            }
        }
    }

    /// `query-status`: `(running, status)`, status being QEMU's run state
    /// ("running", "paused", "prelaunch", "shutdown", "inmigrate",
    /// "postmigrate", "save-vm", "restore-vm", "suspended", ...).
    pub fn query_status(&mut self) -> StepResult<(bool, String)> {
        let r = self.execute("query-status", Value::Null)?;
        let running = r.get("running").and_then(Value::as_bool);
        let status = r.get("status").and_then(Value::as_str);
        match (running, status) {
            (Some(running), Some(status)) => Ok((running, status.to_string())),
            _ => Err(self.protocol(format!("query-status returned {r}"))),
        }
    }

    /// `stop`: pauses the guest's CPUs (a no-op when they are paused; QEMU
    /// emits `STOP` only on a change).
    pub fn stop(&mut self) -> StepResult<()> {
        self.execute("stop", Value::Null).map(drop)
    }

    /// `cont`: resumes the guest's CPUs (`RESUME` on a change).
    pub fn cont(&mut self) -> StepResult<()> {
        self.execute("cont", Value::Null).map(drop)
    }

    /// `query-block`: one entry per block device (its `device` or `qdev`
    /// id, and the `inserted` top node with its `node-name` and `file`).
    pub fn query_block(&mut self) -> StepResult<Value> {
        self.execute("query-block", Value::Null)
    }

    /// `query-named-block-nodes`, QEMU's full form: every node once (its
    /// `node-name`, `drv`, `file`, `backing_file`, `backing_file_depth`,
    /// `image` with the nested `backing-image` chain). No node names the
    /// node-name of its backing node (QEMU 7.2): match by file name. (With
    /// `flat: true` QEMU 7.2 reports `backing_file_depth` 0 for every node,
    /// hence not used here.)
    pub fn query_named_block_nodes(&mut self) -> StepResult<Value> {
        self.execute("query-named-block-nodes", Value::Null)
    }

    /// `query-named-block-nodes` with `flat: true`: every node once, its
    /// `image` without the nested `backing-image` chain (a quarter of the
    /// full form at 16 disks of depth 17; the full form repeats each
    /// chain under every node of it). Enough for node names, drivers,
    /// files and a node's own internal snapshots; not for
    /// `backing_file_depth` (0 for every node in QEMU 7.2).
    pub fn query_named_block_nodes_flat(&mut self) -> StepResult<Value> {
        self.execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
    }

    /// `blockdev-add` with `args` as they are (see [`qcow2_overlay_args`]).
    pub fn blockdev_add(&mut self, args: Value) -> StepResult<()> {
        self.execute("blockdev-add", args).map(drop)
    }

    /// `blockdev-del` of a node that nothing uses (QEMU refuses otherwise);
    /// children defined inline in its `blockdev-add` go with it.
    pub fn blockdev_del(&mut self, node_name: &str) -> StepResult<()> {
        self.execute("blockdev-del", json!({ "node-name": node_name }))
            .map(drop)
    }

    /// `transaction` of `actions` (see [`blockdev_snapshot_action`]): all
    /// or none take effect, atomically against guest I/O.
    pub fn transaction(&mut self, actions: Vec<Value>) -> StepResult<()> {
        self.execute("transaction", json!({ "actions": actions }))
            .map(drop)
    }

    /// `query-version`: `(major, minor, micro)`.
    pub fn query_version(&mut self) -> StepResult<(u64, u64, u64)> {
        let r = self.execute("query-version", Value::Null)?;
        QemuVersion::from_value(&r)
            .map(|v| v.triple())
            .ok_or_else(|| self.protocol(format!("query-version returned {r}")))
    }

    /// `quit`. QEMU may send `SHUTDOWN` first (queued), and may close the
    /// socket before or after its reply: a close after the command was sent
    /// is success. The connection is closed afterwards.
    pub fn quit(&mut self) -> StepResult<()> {
        let timeout = self.timeout;
        self.run("quit", Value::Null, timeout, true)?;
        self.conn.close();
        Ok(())
    }

    /// `getfd`: hands `fd` (a duplicate, sent with `SCM_RIGHTS`) to QEMU
    /// under `name`, for a later `fd:NAME` (a migration's target). The
    /// caller keeps and closes its own descriptor.
    pub fn getfd(&mut self, name: &str, fd: &impl std::os::unix::io::AsRawFd) -> StepResult<()> {
        let timeout = self.timeout;
        self.run_fd(
            "getfd",
            json!({ "fdname": name }),
            timeout,
            false,
            Some(fd.as_raw_fd()),
        )?;
        Ok(())
    }

    /// `closefd`: drops a descriptor handed over with [`Qmp::getfd`]
    /// (an error when QEMU has none of that name).
    pub fn closefd(&mut self, name: &str) -> StepResult<()> {
        self.execute("closefd", json!({ "fdname": name }))?;
        Ok(())
    }

    /// `query-migrate`: the migration's `status` ("none" when none ran)
    /// and QEMU's `error-desc`, if any.
    pub fn query_migrate(&mut self) -> StepResult<(String, Option<String>)> {
        let r = self.execute("query-migrate", Value::Null)?;
        Ok((
            r.get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            r.get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
        ))
    }

    /// `query-jobs`: every job QEMU has (running or concluded and not yet
    /// dismissed).
    pub fn query_jobs(&mut self) -> StepResult<Vec<JobInfo>> {
        let r = self.execute("query-jobs", Value::Null)?;
        let list = r
            .as_array()
            .ok_or_else(|| self.protocol(format!("query-jobs returned {r}")))?;
        Ok(list.iter().filter_map(JobInfo::from_value).collect())
    }

    /// The job `job_id`, if QEMU has it.
    pub fn query_job(&mut self, job_id: &str) -> StepResult<Option<JobInfo>> {
        Ok(self.query_jobs()?.into_iter().find(|j| j.id == job_id))
    }

    /// `job-dismiss` of a concluded job.
    pub fn job_dismiss(&mut self, job_id: &str) -> StepResult<()> {
        self.execute("job-dismiss", json!({ "id": job_id }))
            .map(drop)
    }

    /// Waits until job `job_id` concluded, dismisses it, and returns its
    /// outcome: `Ok` or [`StepError::QmpJob`] with QEMU's error. Polls
    /// `query-jobs` and sleeps on `JOB_STATUS_CHANGE` events in between.
    /// Works for a job started by another (dead) process too. A job QEMU
    /// does not have is [`StepError::QmpNoJob`]; on timeout the job is left
    /// as it is ([`StepError::QmpTimeout`]).
    pub fn wait_job(&mut self, job_id: &str, timeout: Duration) -> StepResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Status changes seen so far are reflected in what query-jobs
            // returns next; drop them so the wait below sees only new ones.
            self.events
                .retain(|e| !(e.name == "JOB_STATUS_CHANGE" && e.data["id"] == job_id));
            let job = self.query_job(job_id)?.ok_or_else(|| StepError::QmpNoJob {
                job: job_id.to_string(),
            })?;
            if job.status == "concluded" {
                self.job_dismiss(job_id)?;
                return match job.error {
                    None => Ok(()),
                    Some(error) => Err(StepError::QmpJob {
                        job: job.id,
                        kind: job.kind,
                        error,
                    }),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StepError::QmpTimeout {
                    path: self.path.clone(),
                    what: format!("the end of job {job_id} ({}, {})", job.kind, job.status),
                    timeout,
                });
            }
            // Wake on the job's next status change, and re-check at least
            // every second in case an event was missed.
            let slice = (deadline - now).min(Duration::from_secs(1));
            match self.wait_event_where("JOB_STATUS_CHANGE", |e| e.data["id"] == job_id, slice) {
                Ok(_) | Err(StepError::QmpTimeout { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts `cmd` (a job command with `job-id` in `args`) and waits for
    /// the job as [`Qmp::wait_job`] does.
    pub fn run_job(
        &mut self,
        cmd: &str,
        args: Value,
        job_id: &str,
        timeout: Duration,
    ) -> StepResult<()> {
        let deadline = Instant::now() + timeout;
        self.execute(cmd, args)?;
        self.wait_job(job_id, deadline.saturating_duration_since(Instant::now()))
    }

    /// `snapshot-save` job: internal snapshot `tag` of the qcow2 nodes
    /// `devices`, with the VM state written into node `vmstate` (one of
    /// them). QEMU pauses a running guest for the save and resumes it.
    pub fn snapshot_save(
        &mut self,
        job_id: &str,
        tag: &str,
        vmstate: &str,
        devices: &[&str],
        timeout: Duration,
    ) -> StepResult<()> {
        let args = json!({"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices});
        self.run_job("snapshot-save", args, job_id, timeout)
    }

    /// `snapshot-load` job: reverts `devices` and the VM state (from node
    /// `vmstate`) to snapshot `tag`.
    ///
    /// Beware: QEMU 7.2 checks that `tag` exists by *name*, then applies
    /// it to each disk with `bdrv_snapshot_goto`, which looks it up by
    /// *ID first*: a tag `1` on a disk whose snapshot of ID 1 has another
    /// name applies that one. Whoever loads a snapshot through QEMU must
    /// first check that no disk holds a snapshot whose ID is `tag`
    /// (vsnap's revert does, from QEMU's `query-block`; or
    /// [`crate::qemu_img::snapshot_id`]).
    /// (`snapshot-save` and `snapshot-delete` look `tag` up by name only.)
    pub fn snapshot_load(
        &mut self,
        job_id: &str,
        tag: &str,
        vmstate: &str,
        devices: &[&str],
        timeout: Duration,
    ) -> StepResult<()> {
        let args = json!({"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices});
        self.run_job("snapshot-load", args, job_id, timeout)
    }

    /// Starts the `snapshot-load` job of [`Qmp::snapshot_load`] and
    /// returns at once (the caller waits for it with [`Qmp::wait_job`]).
    pub fn snapshot_load_start(
        &mut self,
        job_id: &str,
        tag: &str,
        vmstate: &str,
        devices: &[&str],
    ) -> StepResult<()> {
        let args = json!({"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices});
        self.execute("snapshot-load", args).map(drop)
    }

    /// `snapshot-delete` job: deletes snapshot `tag` from `devices`.
    pub fn snapshot_delete(
        &mut self,
        job_id: &str,
        tag: &str,
        devices: &[&str],
        timeout: Duration,
    ) -> StepResult<()> {
        let args = json!({"job-id": job_id, "tag": tag, "devices": devices});
        self.run_job("snapshot-delete", args, job_id, timeout)
    }

    fn protocol(&self, message: String) -> StepError {
        StepError::QmpProtocol {
            path: self.path.clone(),
            message,
        }
    }
}

/// One entry of `query-block`, typed: the one place its JSON is read, for
/// the engine and the live steps' own probes alike
/// ([`crate::live::top_node`] finds a device by [`BlockDevice::key`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockDevice {
    /// `device` if QEMU gives one, else `qdev`: what a step's `device`
    /// names ([`crate::live::LiveDisk::device`]).
    pub key: String,
    /// `device` (empty for a device whose drive is a `-blockdev` node).
    pub device: String,
    /// `qdev`: the guest device's id or QOM path
    /// (`/machine/peripheral/vda/virtio-backend`).
    pub qdev: String,
    /// The medium, `None` for an empty drive (a cdrom without a disc).
    pub inserted: Option<BlockInserted>,
}

/// The `inserted` part of a [`BlockDevice`]: the device's top node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockInserted {
    /// The top node's `node-name`.
    pub node_name: String,
    /// Its `file` as QEMU names it (a path, or a `json:` pseudo-filename).
    pub file: String,
    /// Its driver (`qcow2`, `raw`).
    pub drv: String,
    /// Whether it is read-only (`ro`).
    pub ro: bool,
    /// Every file of the chain from `image` down through `backing-image`,
    /// top first, as QEMU names them.
    pub chain: Vec<String>,
    /// The internal snapshots of the top image (`image.snapshots`), as
    /// (qcow2 ID, name), in table order.
    pub snapshots: Vec<(String, String)>,
}

impl BlockDevice {
    /// The name a domain gives the device: `device`, else the peripheral
    /// id inside `qdev` (`/machine/peripheral/vda/virtio-backend` gives
    /// `vda`), else `qdev` whole; `None` when QEMU gives neither.
    pub fn target(&self) -> Option<String> {
        if !self.device.is_empty() {
            return Some(self.device.clone());
        }
        if self.qdev.is_empty() {
            return None;
        }
        match self.qdev.strip_prefix("/machine/peripheral/") {
            Some(rest) => rest.split('/').next().map(str::to_string),
            None => Some(self.qdev.clone()),
        }
    }

    /// One `query-block` entry; a field QEMU leaves out reads as empty
    /// (`qdev` absent is `None` for [`BlockDevice::target`]).
    pub fn from_value(entry: &Value) -> BlockDevice {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let device = text(entry, "device");
        let qdev = text(entry, "qdev");
        let inserted = entry.get("inserted").map(|ins| {
            let mut chain = Vec::new();
            let mut img = ins.get("image");
            while let Some(i) = img {
                if let Some(f) = i.get("filename").and_then(Value::as_str) {
                    chain.push(f.to_string());
                }
                img = i.get("backing-image");
            }
            let snapshots = ins["image"]["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| (text(s, "id"), text(s, "name")))
                .collect();
            BlockInserted {
                node_name: text(ins, "node-name"),
                file: text(ins, "file"),
                drv: text(ins, "drv"),
                ro: ins.get("ro").and_then(Value::as_bool).unwrap_or(false),
                chain,
                snapshots,
            }
        });
        BlockDevice {
            key: if device.is_empty() {
                qdev.clone()
            } else {
                device.clone()
            },
            device,
            qdev,
            inserted,
        }
    }

    /// Every entry of a `query-block` answer, in QEMU's order.
    pub fn parse_all(blocks: &Value) -> Vec<BlockDevice> {
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .map(BlockDevice::from_value)
            .collect()
    }
}

/// One node of `query-named-block-nodes` (flat), typed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockNode {
    /// Its `node-name`.
    pub node_name: String,
    /// Its driver (`qcow2`, `raw`, `file`).
    pub drv: String,
    /// Its `file` as QEMU names it.
    pub file: String,
    /// The names of the internal snapshots its own image holds
    /// (`image.snapshots`).
    pub snapshots: Vec<String>,
}

impl BlockNode {
    /// Every node of a `query-named-block-nodes` answer, in QEMU's order.
    pub fn parse_all(nodes: &Value) -> Vec<BlockNode> {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| BlockNode {
                node_name: text(n, "node-name"),
                drv: text(n, "drv"),
                file: text(n, "file"),
                snapshots: n["image"]["snapshots"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s["name"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// One QEMU process, told apart from any other that ever ran on this
/// host: the process at the other end of the monitor socket (its pid and
/// start time, `/proc/PID/stat` in clock ticks since boot: a pid can be
/// reused, the pair cannot while the host runs), and the host thread of
/// QEMU's first vCPU as QEMU itself names it (`query-cpus-fast`): a QEMU
/// started anew behind the same peer (a proxy in front of the monitor)
/// has new threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuInstance {
    /// The peer process's id.
    pub pid: u32,
    /// When it started, in clock ticks since the host booted.
    pub start: u64,
    /// The host thread id of QEMU's first vCPU.
    pub vcpu_thread: u64,
}

/// The start time of process (or thread) `pid`, in clock ticks since the
/// host booted (`/proc/PID/stat`, field 22); `None` if it does not exist.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces
    // and parentheses: count the fields after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Qmp {
    /// The QEMU process answering on this connection
    /// ([`QemuInstance`]: `SO_PEERCRED`, `/proc`, one small
    /// `query-cpus-fast`); `None` when any of them does not say.
    pub fn instance(&mut self) -> Option<QemuInstance> {
        let pid = self.conn.peer_pid()?;
        let start = process_start(pid)?;
        let cpus = self.execute("query-cpus-fast", Value::Null).ok()?;
        let vcpu_thread = cpus.get(0)?.get("thread-id")?.as_u64()?;
        Some(QemuInstance {
            pid,
            start,
            vcpu_thread,
        })
    }

    /// `qom-get` of property `drive` of the guest device at QOM path
    /// `qdev` (a [`BlockDevice::qdev`]): the name of the node the device
    /// runs on now, for a device on a `-blockdev` node (for one on a
    /// `-drive`, its drive's name). One small answer, whatever the depth
    /// of the device's chain.
    pub fn device_drive(&mut self, qdev: &str) -> StepResult<String> {
        let v = self.execute("qom-get", json!({"path": qdev, "property": "drive"}))?;
        v.as_str().map(str::to_string).ok_or_else(|| {
            self.protocol(format!(
                "qom-get {qdev} drive: expected a node name, got {v}"
            ))
        })
    }

    /// `query-block`, typed ([`BlockDevice::parse_all`]).
    pub fn query_block_typed(&mut self) -> StepResult<Vec<BlockDevice>> {
        Ok(BlockDevice::parse_all(&self.query_block()?))
    }

    /// `query-named-block-nodes` with `flat: true`, typed
    /// ([`BlockNode::parse_all`]).
    pub fn query_named_block_nodes_typed(&mut self) -> StepResult<Vec<BlockNode>> {
        Ok(BlockNode::parse_all(&self.query_named_block_nodes_flat()?))
    }
}

/// `blockdev-add` arguments for an overlay prepared beforehand (a qcow2
/// file, e.g. `qemu-img create -b ... -F ...`): a qcow2 node `node_name`
/// on a file node `file_node_name` defined inline (deleted with it), with
/// `backing: null` so that `blockdev-snapshot` can attach the old top.
pub fn qcow2_overlay_args(node_name: &str, file_node_name: &str, path: &Path) -> Value {
    // An overlay on a block device (a `<disk type='block'>` target) is
    // opened by QEMU's host_device driver; a file by its file driver.
    let protocol = {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_block_device() => "host_device",
            _ => "file",
        }
    };
    json!({
        "driver": "qcow2",
        "node-name": node_name,
        "file": {
            "driver": protocol,
            "node-name": file_node_name,
            "filename": path.to_string_lossy(),
        },
        "backing": null,
    })
}

/// A `blockdev-snapshot` action for [`Qmp::transaction`]: `overlay` (added
/// with `backing: null`) becomes the top of `node`'s device, backed by it.
pub fn blockdev_snapshot_action(node: &str, overlay: &str) -> Value {
    json!({"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}})
}

fn greeting_timeout(path: &Path, timeout: Duration) -> StepError {
    StepError::QmpTimeout {
        path: path.to_path_buf(),
        what: "with its greeting (a monitor serves one client at a time: is another \
               client connected? is QEMU stopped or hung?)"
            .to_string(),
        timeout,
    }
}

fn fail_to_error(path: &Path, f: wire::Fail, what: &str, timeout: Duration) -> StepError {
    match f {
        wire::Fail::Timeout => StepError::QmpTimeout {
            path: path.to_path_buf(),
            what: what.to_string(),
            timeout,
        },
        wire::Fail::Closed => StepError::QmpClosed {
            path: path.to_path_buf(),
            during: what.to_string(),
        },
        wire::Fail::Protocol(message) => StepError::QmpProtocol {
            path: path.to_path_buf(),
            message: format!("during {what}: {message}"),
        },
        wire::Fail::Io(source) => StepError::QmpConnect {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Byte-level plumbing shared with the guest-agent client: a bounded
/// connect, and a buffered socket whose every read and write has a
/// deadline.
pub(crate) mod wire {
    use std::io::{self, Read};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// Longest line accepted (a `query-named-block-nodes` of a big domain
    /// is large, but not this large).
    const MAX_LINE: usize = 64 << 20;

    #[derive(Debug)]
    pub(crate) enum ConnectFail {
        /// No socket file (ENOENT, ENOTDIR).
        Missing,
        /// The listener's queue stayed full until the deadline.
        Timeout,
        Io(io::Error),
    }

    #[derive(Debug)]
    pub(crate) enum Fail {
        Timeout,
        /// EOF, reset or broken pipe.
        Closed,
        Protocol(String),
        Io(io::Error),
    }

    fn remaining(deadline: Instant) -> Option<Duration> {
        let now = Instant::now();
        (now < deadline).then(|| (deadline - now).max(Duration::from_millis(1)))
    }

    /// Connects to the unix socket `path` without ever blocking past
    /// `deadline` (a blocking `connect(2)` waits indefinitely when the
    /// listener's backlog is full, which QEMU's backlog of 1 makes easy).
    pub(crate) fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, ConnectFail> {
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
            return Err(ConnectFail::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a unix socket path must be shorter than {} bytes and have no NUL",
                    addr.sun_path.len()
                ),
            )));
        }
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        loop {
            // SAFETY: plain syscall; the fd is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    0,
                )
            };
            if fd < 0 {
                return Err(ConnectFail::Io(io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor nobody else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: addr is a valid sockaddr_un of `len` bytes.
            let r = unsafe {
                libc::connect(
                    fd,
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    len,
                )
            };
            if r != 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) => return Err(ConnectFail::Missing),
                    Some(libc::EINTR) => continue,
                    // The listener's queue is full: try again shortly.
                    Some(libc::EAGAIN) => {
                        let Some(left) = remaining(deadline) else {
                            return Err(ConnectFail::Timeout);
                        };
                        std::thread::sleep(left.min(Duration::from_millis(10)));
                        continue;
                    }
                    Some(libc::EINPROGRESS) => wait_connected(&owned, deadline)?,
                    _ => return Err(ConnectFail::Io(err)),
                }
            }
            let stream = UnixStream::from(owned);
            stream.set_nonblocking(false).map_err(ConnectFail::Io)?;
            return Ok(stream);
        }
    }

    fn wait_connected(fd: &OwnedFd, deadline: Instant) -> Result<(), ConnectFail> {
        loop {
            let Some(left) = remaining(deadline) else {
                return Err(ConnectFail::Timeout);
            };
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ConnectFail::Io(e));
            }
            if r == 0 {
                continue;
            }
            let mut so_err: libc::c_int = 0;
            let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: valid out-pointers of the right sizes.
            let r = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    &mut so_err as *mut libc::c_int as *mut libc::c_void,
                    &mut l,
                )
            };
            if r < 0 {
                return Err(ConnectFail::Io(io::Error::last_os_error()));
            }
            return match so_err {
                0 => Ok(()),
                libc::ENOENT => Err(ConnectFail::Missing),
                e => Err(ConnectFail::Io(io::Error::from_raw_os_error(e))),
            };
        }
    }

    /// A connected socket with a read buffer.
    pub(crate) struct Conn {
        stream: Option<UnixStream>,
        buf: Vec<u8>,
        eof: bool,
    }

    fn closed_kind(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
        )
    }

    impl Conn {
        pub(crate) fn new(stream: UnixStream) -> Conn {
            Conn {
                stream: Some(stream),
                buf: Vec::new(),
                eof: false,
            }
        }

        /// Shuts the connection; later calls see [`Fail::Closed`].
        pub(crate) fn close(&mut self) {
            self.stream = None;
            self.eof = true;
        }

        fn stream(&self) -> Result<&UnixStream, Fail> {
            self.stream.as_ref().ok_or(Fail::Closed)
        }

        /// The process at the other end of the socket, as the kernel
        /// recorded it when it connected (`SO_PEERCRED`); `None` once
        /// closed or when the kernel does not say.
        pub(crate) fn peer_pid(&self) -> Option<u32> {
            let s = self.stream.as_ref()?;
            let cred = crate::fdpass::peer_cred(s.as_raw_fd()).ok()?;
            (cred.pid > 0).then_some(cred.pid as u32)
        }

        /// Reads more bytes into the buffer (at least one), by `deadline`.
        fn fill(&mut self, deadline: Instant) -> Result<(), Fail> {
            if self.eof {
                return Err(Fail::Closed);
            }
            let mut chunk = [0u8; 16 << 10];
            loop {
                let left = remaining(deadline).ok_or(Fail::Timeout)?;
                let mut s = self.stream()?;
                s.set_read_timeout(Some(left)).map_err(Fail::Io)?;
                match s.read(&mut chunk) {
                    Ok(0) => {
                        self.eof = true;
                        return Err(Fail::Closed);
                    }
                    Ok(n) => {
                        self.buf.extend_from_slice(&chunk[..n]);
                        return Ok(());
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted
                                | io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue
                    }
                    Err(e) if closed_kind(&e) => {
                        self.eof = true;
                        return Err(Fail::Closed);
                    }
                    Err(e) => return Err(Fail::Io(e)),
                }
            }
        }

        /// Whether EOF was seen (or the connection was closed): nothing
        /// more will arrive.
        pub(crate) fn is_closed(&self) -> bool {
            self.eof
        }

        /// Whether a complete line is buffered.
        pub(crate) fn has_line(&self) -> bool {
            self.buf.contains(&b'\n')
        }

        /// Reads what is available now without waiting; `Ok(true)` when
        /// something was read.
        pub(crate) fn read_ready(&mut self) -> Result<bool, Fail> {
            if self.eof {
                return Err(Fail::Closed);
            }
            let s = self.stream()?;
            s.set_nonblocking(true).map_err(Fail::Io)?;
            let mut chunk = [0u8; 16 << 10];
            let r = (&mut &*s).read(&mut chunk);
            s.set_nonblocking(false).map_err(Fail::Io)?;
            match r {
                Ok(0) => {
                    self.eof = true;
                    Err(Fail::Closed)
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(e) if closed_kind(&e) => {
                    self.eof = true;
                    Err(Fail::Closed)
                }
                Err(e) => Err(Fail::Io(e)),
            }
        }

        /// The next line (with its `\n`), by `deadline`. Complete lines
        /// buffered before an EOF are still returned; a partial one is not.
        pub(crate) fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, Fail> {
            let mut scanned = 0;
            loop {
                if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                    return Ok(self.buf.drain(..=scanned + i).collect());
                }
                scanned = self.buf.len();
                if scanned > MAX_LINE {
                    return Err(Fail::Protocol(format!(
                        "a line longer than {MAX_LINE} bytes"
                    )));
                }
                self.fill(deadline)?;
            }
        }

        /// Discards input up to and including the next `byte`.
        pub(crate) fn discard_until(&mut self, byte: u8, deadline: Instant) -> Result<(), Fail> {
            loop {
                if let Some(i) = self.buf.iter().position(|&b| b == byte) {
                    self.buf.drain(..=i);
                    return Ok(());
                }
                self.buf.clear();
                self.fill(deadline)?;
            }
        }

        /// Like [`Conn::send`], with `fd` passed along with the first byte
        /// (`SCM_RIGHTS`: QMP `getfd` takes the descriptor that arrives
        /// with its command).
        pub(crate) fn send_with_fd(
            &mut self,
            data: &[u8],
            fd: std::os::unix::io::RawFd,
            deadline: Instant,
        ) -> Result<(), Fail> {
            let s = self.stream()?;
            let left = remaining(deadline).ok_or(Fail::Timeout)?;
            s.set_write_timeout(Some(left)).map_err(Fail::Io)?;
            // The first byte goes alone with the descriptor; the rest as usual.
            loop {
                match crate::fdpass::send(s.as_raw_fd(), &data[..1], &[fd]) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if closed_kind(&e) => {
                        self.eof = true;
                        return Err(Fail::Closed);
                    }
                    Err(e) => return Err(Fail::Io(e)),
                }
            }
            self.send(&data[1..], deadline)
        }

        /// Writes all of `data` by `deadline` (MSG_NOSIGNAL: a closed peer
        /// is an error, never a SIGPIPE).
        pub(crate) fn send(&mut self, data: &[u8], deadline: Instant) -> Result<(), Fail> {
            let mut off = 0;
            while off < data.len() {
                let left = remaining(deadline).ok_or(Fail::Timeout)?;
                let s = self.stream()?;
                s.set_write_timeout(Some(left)).map_err(Fail::Io)?;
                let rest = &data[off..];
                // SAFETY: rest is a valid buffer of rest.len() bytes.
                let n = unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        rest.as_ptr() as *const libc::c_void,
                        rest.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut => continue,
                        _ if closed_kind(&e) => {
                            self.eof = true;
                            return Err(Fail::Closed);
                        }
                        _ => return Err(Fail::Io(e)),
                    }
                }
                off += n as usize;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;

    #[test]
    fn names_the_process_at_the_other_end_of_the_socket() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let conn = wire::Conn::new(a);
        // The peer of a socket pair made here is this process.
        assert_eq!(conn.peer_pid(), Some(std::process::id()));
        drop(b);
        let me = process_start(std::process::id()).expect("this process has a start time");
        // A process that started earlier (pid 1) has a start time no later.
        assert!(process_start(1).is_some_and(|t| t <= me));
        // One with a ')' and spaces in its name is read past its name
        // (the kernel names a process after its program file).
        let dir = std::env::temp_dir().join(format!("vsnap-pstart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("a) b c");
        std::fs::copy("/bin/sleep", &prog).unwrap();
        let mut child = std::process::Command::new(&prog).arg("5").spawn().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let started = process_start(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(comm.contains("(a) b c)"), "{comm}");
        assert!(started.is_some_and(|t| t >= me), "{started:?} vs {me}");
        assert_eq!(process_start(u32::MAX), None);
    }

    #[test]
    fn reads_query_block_and_named_nodes() {
        let blocks = json!([
            {"device": "", "qdev": "/machine/peripheral/vdb/virtio-backend",
             "inserted": {"node-name": "n1", "file": "/vm/b.s1.qcow2", "drv": "qcow2", "ro": false,
                          "image": {"filename": "/vm/b.s1.qcow2",
                                    "backing-image": {"filename": "/vm/b.qcow2"}}}},
            {"device": "ide0-cd0", "qdev": "/machine/unattached/device[20]"},
            {"device": "vda", "qdev": "/machine/peripheral/vda-dev/virtio-backend",
             "inserted": {"node-name": "n2", "file": "/vm/a.raw", "drv": "raw", "ro": true}}
        ]);
        let b = BlockDevice::parse_all(&blocks);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].key, "/machine/peripheral/vdb/virtio-backend");
        assert_eq!(b[0].target().as_deref(), Some("vdb"));
        let ins = b[0].inserted.as_ref().unwrap();
        assert_eq!(
            (ins.node_name.as_str(), ins.drv.as_str(), ins.ro),
            ("n1", "qcow2", false)
        );
        assert_eq!(ins.chain, ["/vm/b.s1.qcow2", "/vm/b.qcow2"]);
        assert_eq!(b[1].inserted, None);
        assert_eq!(b[2].key, "vda");
        assert_eq!(b[2].target().as_deref(), Some("vda"));
        assert!(b[2].inserted.as_ref().unwrap().ro);
        // The steps' own lookup finds each device by `key`.
        for d in &b {
            assert_eq!(
                crate::live::top_node(&b, &d.key),
                d.inserted.as_ref().map(|i| i.node_name.clone())
            );
        }

        let nodes = json!([
            {"node-name": "n1", "drv": "qcow2", "file": "/vm/b.s1.qcow2",
             "image": {"snapshots": [{"name": "s0"}, {"name": "s1"}]}},
            {"node-name": "n1f", "drv": "file", "file": "/vm/b.s1.qcow2", "image": {}}
        ]);
        let n = BlockNode::parse_all(&nodes);
        assert_eq!(n[0].snapshots, ["s0", "s1"]);
        assert!(n[1].snapshots.is_empty());
        assert_eq!(
            (n[1].node_name.as_str(), n[1].drv.as_str()),
            ("n1f", "file")
        );
    }
}
