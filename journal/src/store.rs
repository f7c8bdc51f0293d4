//! The sled-backed journal and catalog.
//!
//! Layout of the database at `<state_dir>/db`:
//!
//! | tree       | key                                   | value                                  |
//! |------------|---------------------------------------|----------------------------------------|
//! | `plans`    | plan id, u64 BE                       | codec(`(PlanHeader, body)`)            |
//! | `records`  | plan id u64 BE ++ record seq u64 BE   | codec(`Record`)                        |
//! | `finished` | plan id, u64 BE                       | empty: the plan has a `Finished` record |
//! | `active`   | plan id, u64 BE                       | empty: the plan has no `Finished` record yet |
//! | `meta`     | `active-index`                        | present once `active` is complete      |
//! | `cat/NAME` | the engine's key                      | the engine's value (a codec envelope)  |
//!
//! Record sequence numbers come from sled's `generate_id`, which is
//! strictly increasing across restarts and crashes (sled persists a high
//! water mark and skips ahead past it on recovery). A plan's records are
//! therefore in append order under its key prefix. (The largest *key* of
//! `records` would not do: it is the last record of the newest plan, and an
//! older plan can have newer records.) Plan ids are one more than the
//! largest key of `plans`: a plan id is handed out only once its header is
//! durable, so the ids of durable plans strictly increase across restarts.
//!
//! Every write goes through the group commit ([`crate::group`]): it
//! returns once the flush that covers it has returned.
//!
//! **What a flush is.** sled 0.34.7's `Db::flush` writes its log buffer
//! with `pwrite` + `sync_file_range(2)` and nothing else: no `fdatasync`
//! (so neither a grown file size nor the disk's write cache is made
//! durable), and large values, which sled keeps as separate files under
//! `db/blobs/`, are never synced at all. That survives a killed process
//! (the page cache survives it) but not a power cut. So a flush here is
//! `db.flush()`, then `fsync` of every blob file not yet synced and of the
//! blob directory, then `fdatasync` of sled's log file `db/db`; and at
//! open the directories holding sled's files are synced once.
//!
//! Crash points (`failpoint::hit`), each after a sled write and before the
//! flush that makes it durable: `journal.begin.inserted`,
//! `journal.append.inserted`, `journal.finished.inserted`,
//! `journal.pivot.committed`, `journal.catalog.committed`; then
//! `journal.flushed` after each flush and before the writers are answered;
//! `journal.opened` once [`Journal::open`] has succeeded.
use crate::codec;
use crate::group::{CommitError, GroupCommit, Sink};
use crate::lock::StateLock;
use crate::*;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{IVec, Tree};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const PLANS: &str = "plans";
const RECORDS: &str = "records";
const FINISHED: &str = "finished";
/// The index of unfinished plans: `unfinished` reads it instead of every
/// plan ever run (a manager's journal grows with its history).
const ACTIVE: &str = "active";
const META: &str = "meta";
const META_ACTIVE_INDEX: &[u8] = b"active-index";
/// Present once the state directory and `db/` have been fsynced after
/// their files were created (see [`sync_dirs_once`]).
const META_DIRS_SYNCED: &[u8] = b"dirs-synced";
/// Catalog trees are named `cat/<caller's name>` so that no caller's name
/// can clash with a journal tree.
const CATALOG_PREFIX: &str = "cat/";

pub struct Journal {
    // Field order is drop order: the flusher is joined in `Drop` before
    // any of these go; the lock is released last, after sled is closed.
    commit: GroupCommit<SledSink>,
    plans: Tree,
    records: Tree,
    finished: Tree,
    active: Tree,
    catalog: Mutex<HashMap<String, Tree>>,
    next_plan: AtomicU64,
    db: sled::Db,
    /// sled's log file, opened for writing to keep space allocated past
    /// its end ([`Journal::ensure_headroom`]).
    log: std::fs::File,
    /// Bytes of log kept allocated past its end before a plan begins.
    headroom: u64,
    dir: PathBuf,
    /// What opening made of the state directory, until
    /// [`Journal::remove_if_unused`] takes it.
    made: Mutex<Option<statedir::Made>>,
    _lock: StateLock,
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Answer every writer still waiting, then stop the flusher; sled
        // itself is flushed and closed when `db` drops.
        self.commit.close();
    }
}

/// One unit of work for the flusher, everything precomputed: applying it
/// does no encoding and no tree lookup, and a transaction's closure only
/// replays `writes`.
pub(crate) enum Op {
    Insert {
        tree: Tree,
        key: IVec,
        value: IVec,
        point: &'static str,
    },
    Txn {
        trees: Vec<Tree>,
        writes: Vec<Write>,
        point: &'static str,
    },
}

/// One write in a transaction: index into `trees`, key, value (`None`
/// removes).
pub(crate) struct Write {
    tree: usize,
    key: IVec,
    value: Option<IVec>,
}

/// sled plus what sled's own `flush()` leaves out for power-loss
/// durability (see the module docs): an `fdatasync` of its log file and an
/// `fsync` of every new blob file and of the blob directory.
pub(crate) struct SledSink {
    db: sled::Db,
    /// sled's log file (`db/db`), opened for its `fdatasync`.
    log: std::fs::File,
    /// sled's directory of large values (`db/blobs`).
    blobs: PathBuf,
    /// Blob files known to be durable.
    synced_blobs: HashSet<std::ffi::OsString>,
}

impl SledSink {
    fn new(db: sled::Db, db_dir: &Path) -> std::io::Result<SledSink> {
        let log = std::fs::File::open(db_dir.join("db"))?;
        Ok(SledSink {
            db,
            log,
            blobs: db_dir.join("blobs"),
            // None yet: the first flush syncs any left by an earlier run.
            synced_blobs: HashSet::new(),
        })
    }

    /// fsync every blob file not yet known durable, then the directory.
    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced_blobs.contains(&name) {
                match std::fs::File::open(self.blobs.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // Collected by sled meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            sync_dir(&self.blobs)?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

/// sled's log segment size for a new journal. At every open sled reads
/// the segment its log ends in and, after a crash left its tail dirty,
/// zeroes and fsyncs that tail (before VSNAP-PATCH 5: at every open), so
/// the segment size is a cost per process: 64 KiB instead of sled's 512 KiB
/// took 0.7 ms off each `vsnap` call (`vol snapshot count` p50 3.21 ->
/// 2.44 ms, before that patch).
/// Values over about a quarter of it (16 KiB: a plan body for very many
/// disks) go to sled's blob files, which the flush makes durable too.
const NEW_SEGMENT_SIZE: usize = 64 * 1024;

/// The segment size a journal was created with (sled refuses another),
/// from sled's `conf` file; [`NEW_SEGMENT_SIZE`] for a new one.
fn segment_size(db: &Path) -> usize {
    let Ok(conf) = std::fs::read(db.join("conf")) else {
        return NEW_SEGMENT_SIZE;
    };
    String::from_utf8_lossy(&conf)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: ")?.trim().parse().ok())
        // Unreadable: let sled open with its default and say what is wrong.
        .unwrap_or(512 * 1024)
}

/// How long [`open_sled`] waits for a previous sled instance of this
/// process to let go of its file.
const SLED_LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Open sled at `path`. sled takes its own lock on `db/db`; we already
/// hold the state lock, so a sled lock still taken can only be a closed
/// journal's sled of this same process whose background task (an
/// asynchronous file truncation + fsync that recovery starts) still holds
/// the file. It lets go when that task ends: wait for it, bounded.
fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let config = sled::Config::new()
        .path(path)
        .segment_size(segment_size(path))
        // We flush ourselves, once per batch; a timer flush on top would
        // only compete with ours for the disk.
        .flush_every_ms(None);
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < SLED_LOCK_WAIT_MAX =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Build the `active` index of a journal written before it existed: every
/// plan without a finished marker. The `meta` mark goes in last; sled
/// recovers a prefix of its log, so a mark that survives a crash has the
/// whole index before it (no flush needed: without the mark, the next open
/// builds it again).
fn build_active_index(db: &sled::Db, plans: &Tree, finished: &Tree, active: &Tree) -> Result<()> {
    let meta = db.open_tree(META)?;
    if meta.contains_key(META_ACTIVE_INDEX)? {
        return Ok(());
    }
    active.clear()?;
    for kv in plans.iter() {
        let (k, _) = kv?;
        if !finished.contains_key(&k)? {
            active.insert(k, IVec::default())?;
        }
    }
    meta.insert(META_ACTIVE_INDEX, IVec::from(&[1u8][..]))?;
    Ok(())
}

/// sled creates `db/db`, `db/conf` and `db/blobs` without syncing their
/// directory entries, and we create `lock` and `db/`: fsync both
/// directories once, then mark it in `meta`. The mark goes in after the
/// fsyncs and is durable with the next flush; until then (a crash, or
/// only reads) every open syncs again. (sled's later snapshot files are
/// synced by sled itself: VSNAP-PATCH 6.)
fn sync_dirs_once(db: &sled::Db, state_dir: &Path) -> Result<()> {
    let meta = db.open_tree(META)?;
    if meta.contains_key(META_DIRS_SYNCED)? {
        return Ok(());
    }
    for dir in [state_dir.join("db"), state_dir.to_path_buf()] {
        sync_dir(&dir).map_err(|source| JournalError::StateDir { dir, source })?;
    }
    meta.insert(META_DIRS_SYNCED, IVec::from(&[1u8][..]))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Sink for SledSink {
    type Op = Op;
    type Error = sled::Error;

    fn apply(&mut self, op: &Op) -> Result<(), sled::Error> {
        match op {
            Op::Insert {
                tree,
                key,
                value,
                point,
            } => {
                tree.insert(key, value.clone())?;
                failpoint::hit(point);
            }
            Op::Txn {
                trees,
                writes,
                point,
            } => {
                trees
                    .as_slice()
                    .transaction(|t| {
                        for w in writes {
                            match &w.value {
                                Some(v) => t[w.tree].insert(&w.key, v.clone())?,
                                None => t[w.tree].remove(&w.key)?,
                            };
                        }
                        Ok::<(), ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| match e {
                        TransactionError::Storage(e) => e,
                        TransactionError::Abort(()) => {
                            sled::Error::ReportableBug("journal transaction aborted".into())
                        }
                    })?;
                failpoint::hit(point);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), sled::Error> {
        self.db.flush()?;
        self.sync_new_blobs()?;
        self.log.sync_data()?;
        Ok(())
    }
}

fn plan_key(id: PlanId) -> [u8; 8] {
    id.0.to_be_bytes()
}

fn record_key(id: PlanId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&id.0.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// A key for an error message: text if it is printable, hex otherwise.
fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_string(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn committed(dir: &Path, r: Result<(), CommitError<sled::Error>>) -> Result<()> {
    r.map_err(|e| match e {
        CommitError::Closed => JournalError::Closed,
        CommitError::Sink(e) => db_error(dir, e),
        CommitError::Abandoned => JournalError::Transaction(
            "the journal's flusher stopped before confirming this write; it may or may not be durable, \
             and the journal takes no more writes: reopen it"
                .into(),
        ),
    })
}

/// A sled error, named for what it means to the operator: a full
/// filesystem, a damaged database; anything else as sled says it.
fn db_error(dir: &Path, e: sled::Error) -> JournalError {
    match e {
        sled::Error::Io(io) if is_enospc(&io) => JournalError::NoSpace {
            dir: dir.to_path_buf(),
            what: format!("the journal could not be written ({io})"),
        },
        sled::Error::Corruption { at, .. } => JournalError::Damaged {
            dir: dir.to_path_buf(),
            db: dir.join("db"),
            detail: match at {
                Some(at) => format!("sled: corrupted data at {at}"),
                None => "sled: corrupted data".into(),
            },
        },
        e => JournalError::Db(e),
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

/// The file in the state directory that holds [`RESERVE_SIZE`] bytes of
/// the filesystem for the journal: released when sled cannot open for lack
/// of space (so that recovery can run on a full filesystem), made again
/// before the next plan when there is room. No plan begins without it.
pub(crate) const RESERVE: &str = "reserve";
const RESERVE_SIZE: u64 = 256 * 1024;

/// Log segments kept allocated past the end of sled's log file before a
/// plan begins, and as much free besides (see
/// [`Journal::ensure_headroom`]): a plan's records, its rollback and its
/// recovery need a few KiB; four segments are 256 KiB for a new journal.
const LOG_HEADROOM_SEGMENTS: u64 = 4;

/// `fallocate(2)`: allocate `[0, len)` of `file` (past its end too,
/// without changing its size when `keep_size`).
fn allocate(file: &std::fs::File, len: u64, keep_size: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = if keep_size {
        libc::FALLOC_FL_KEEP_SIZE
    } else {
        0
    };
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    loop {
        // SAFETY: fallocate(2) on an open descriptor; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, len) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Free bytes for an unprivileged writer on the filesystem of `dir`.
fn available(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs buffer we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Hold (or make) the reserve file: true when it is in place at full size.
/// A reserve that cannot be made whole (the filesystem is full) is removed:
/// a partial one would only take space.
fn hold_reserve(state_dir: &Path) -> bool {
    let path = state_dir.join(RESERVE);
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() >= RESERVE_SIZE) {
        return true;
    }
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .and_then(|f| allocate(&f, RESERVE_SIZE, false));
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made.is_ok()
}

/// Let go of the reserve file: true if there was one to free.
fn release_reserve(state_dir: &Path) -> bool {
    std::fs::remove_file(state_dir.join(RESERVE)).is_ok()
}

/// Open sled at `<state_dir>/db`. When sled cannot for lack of space (its
/// open writes a snapshot file, and after a crash zeroes the log's torn
/// tail), release the reserve and try once more: recovery must be able to
/// run on a full filesystem. A damaged database is named as such.
fn open_journal_db(state_dir: &Path) -> Result<sled::Db> {
    let db = state_dir.join("db");
    let r = match open_sled(&db) {
        Err(sled::Error::Io(e)) if is_enospc(&e) && release_reserve(state_dir) => open_sled(&db),
        r => r,
    };
    r.map_err(|e| db_error(state_dir, e))
}

impl Journal {
    /// Check the state directory and create it (mode 0700) if missing
    /// ([`statedir::prepare`]: a directory that is not vsnap's, or that
    /// another user could write, is refused untouched), take its lock
    /// (`lock` file, holder pid written inside), open sled at `db/`.
    pub fn open(state_dir: &Path) -> Result<Journal> {
        let made = statedir::prepare(state_dir)?;
        let lock = StateLock::acquire(state_dir)?;
        let db = open_journal_db(state_dir)?;
        let plans = db.open_tree(PLANS)?;
        let records = db.open_tree(RECORDS)?;
        let finished = db.open_tree(FINISHED)?;
        let active = db.open_tree(ACTIVE)?;
        build_active_index(&db, &plans, &finished, &active)?;
        let next_plan = match plans.last()? {
            Some((k, _)) => key_plan(&k)?.0 + 1,
            None => 1,
        };
        let sink = SledSink::new(db.clone(), &state_dir.join("db")).map_err(|source| {
            JournalError::StateDir {
                dir: state_dir.to_path_buf(),
                source,
            }
        })?;
        sync_dirs_once(&db, state_dir)?;
        let db_dir = state_dir.join("db");
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(db_dir.join("db"))
            .map_err(|source| JournalError::StateDir {
                dir: state_dir.to_path_buf(),
                source,
            })?;
        let headroom = LOG_HEADROOM_SEGMENTS * segment_size(&db_dir) as u64;
        // Room for the records of recovery: best effort here (a full
        // filesystem must not stop recovery or reads). The reserve is made
        // by the first plan's `ensure_headroom` (a command that only reads
        // leaves nothing new behind).
        let _ = allocate(&log, log.metadata().map_or(0, |m| m.len()) + headroom, true);
        let commit = GroupCommit::start(sink);
        failpoint::hit("journal.opened");
        Ok(Journal {
            commit,
            plans,
            records,
            finished,
            active,
            catalog: Mutex::new(HashMap::new()),
            next_plan: AtomicU64::new(next_plan),
            db,
            log,
            headroom,
            dir: state_dir.to_path_buf(),
            made: Mutex::new(Some(made)),
            _lock: lock,
        })
    }

    /// If this journal made its state directory (or adopted an empty
    /// one) when it opened, and holds no plan and no catalog entry (a
    /// query, a dry run or a refused request was all that ran): close it
    /// and remove what it made, so that such a command leaves nothing
    /// behind. True when it did. The journal takes no writes afterwards.
    pub fn remove_if_unused(&self) -> Result<bool> {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if !made.as_ref().is_some_and(statedir::Made::anything) {
            return Ok(false);
        }
        if !self.plans.is_empty() {
            return Ok(false);
        }
        for name in self.db.tree_names() {
            if name.starts_with(CATALOG_PREFIX.as_bytes()) && !self.db.open_tree(&name)?.is_empty()
            {
                return Ok(false);
            }
        }
        self.commit.close();
        if let Some(m) = made.take() {
            statedir::unmake(&self.dir, &m);
        }
        Ok(true)
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Before a plan begins, make sure that the journal can write
    /// everything the plan, its rollback and its recovery will write, even
    /// if the filesystem fills meanwhile: [`LOG_HEADROOM_SEGMENTS`] of
    /// sled's log allocated past its end (`fallocate` with
    /// `FALLOC_FL_KEEP_SIZE`: sled sees the same file), and the reserve
    /// file in place for the next open. Refused with
    /// [`JournalError::NoSpace`] otherwise, before anything is written.
    /// (sled stops taking writes after its first I/O error, so running out
    /// of space in the middle of a plan would leave it to recovery.)
    pub fn ensure_headroom(&self) -> Result<()> {
        let no_space = |what: String| JournalError::NoSpace {
            dir: self.dir.clone(),
            what,
        };
        let len = self
            .log
            .metadata()
            .map_err(|source| JournalError::StateDir {
                dir: self.dir.clone(),
                source,
            })?
            .len();
        match allocate(&self.log, len + self.headroom, true) {
            Ok(()) => {}
            Err(e) if is_enospc(&e) => {
                return Err(no_space(format!(
                    "the journal needs {} KiB allocated before a plan begins; nothing was changed",
                    self.headroom / 1024
                )))
            }
            // A filesystem without fallocate: its free space must do.
            Err(_) => {
                let free = available(&self.dir).unwrap_or(u64::MAX);
                if free < self.headroom + RESERVE_SIZE {
                    return Err(no_space(format!(
                        "{free} bytes free, the journal needs {} KiB before a plan begins; nothing was changed",
                        (self.headroom + RESERVE_SIZE) / 1024
                    )));
                }
                return Ok(());
            }
        }
        // What cannot be allocated in advance: sled writes a tree node
        // larger than a quarter of a segment to a file of its own (a
        // blob) whenever it rewrites it.
        let free = available(&self.dir).unwrap_or(u64::MAX);
        if free < self.headroom {
            return Err(no_space(format!(
                "{} KiB free, the journal needs {} KiB free before a plan begins; nothing was changed",
                free / 1024,
                self.headroom / 1024
            )));
        }
        if !hold_reserve(&self.dir) {
            return Err(no_space(format!(
                "the journal's {} KiB reserve ({}) cannot be kept; nothing was changed",
                RESERVE_SIZE / 1024,
                self.dir.join(RESERVE).display()
            )));
        }
        Ok(())
    }

    /// Stop taking writes: every writer already waiting is answered (its
    /// record flushed), later writes get [`JournalError::Closed`]. Reads
    /// still work. Dropping the journal does this too.
    pub fn close(&self) {
        self.commit.close();
    }

    /// Append a new plan, with no record yet (not started); durable on
    /// return.
    pub fn begin(&self, header: PlanHeader, body: Vec<u8>) -> Result<PlanId> {
        self.begin_with(header, body, &[], &[])
    }

    /// Append one progress record; durable on return.
    pub fn append(&self, plan: PlanId, record: Record) -> Result<()> {
        self.must_exist(plan)?;
        let key = IVec::from(&record_key(plan, self.db.generate_id()?));
        let value = IVec::from(codec::encode(&record));
        let op = if matches!(record, Record::Finished(_)) {
            // The finished marker and the end of the active mark are
            // written atomically with the record they stand for.
            let (mut trees, mut writes) = (Vec::new(), Vec::new());
            self.record_writes(plan, &[record], &mut trees, &mut writes)?;
            Op::Txn {
                trees,
                writes,
                point: "journal.finished.inserted",
            }
        } else {
            Op::Insert {
                tree: self.records.clone(),
                key,
                value,
                point: "journal.append.inserted",
            }
        };
        committed(&self.dir, self.commit.submit(op))
    }

    /// `Done(pivot)` and `ops` in one sled transaction; durable on return.
    pub fn commit_pivot(&self, plan: PlanId, pivot: u32, ops: &[CatalogOp]) -> Result<()> {
        self.append_all(plan, &[Record::Done(pivot)], ops)
    }

    /// A new plan, its first records and the catalog changes `ops` (a
    /// plan whose first step is a no-op pivot commits with its begin), in
    /// one sled transaction: one flush where [`begin`](Self::begin) and
    /// [`append_all`](Self::append_all) take two. Durable on return.
    pub fn begin_with(
        &self,
        header: PlanHeader,
        body: Vec<u8>,
        records: &[Record],
        ops: &[CatalogOp],
    ) -> Result<PlanId> {
        self.ensure_headroom()?;
        let id = PlanId(self.next_plan.fetch_add(1, Ordering::SeqCst));
        let (mut trees, mut writes) = (Vec::new(), Vec::new());
        self.plan_writes(id, &header, &body, &mut trees, &mut writes);
        self.record_writes(id, records, &mut trees, &mut writes)?;
        self.catalog_writes(ops, &mut trees, &mut writes)?;
        committed(
            &self.dir,
            self.commit.submit(Op::Txn {
                trees,
                writes,
                point: "journal.begin.inserted",
            }),
        )?;
        Ok(id)
    }

    /// Several progress records, in order, and the catalog changes `ops`,
    /// all in one sled transaction: a crash keeps all or none of them.
    /// The records must be a legal continuation of the plan's sequence
    /// with nothing done between them (recovery reads them one by one).
    /// Durable on return.
    pub fn append_all(&self, plan: PlanId, records: &[Record], ops: &[CatalogOp]) -> Result<()> {
        match (records, ops.is_empty()) {
            ([], true) => return Ok(()),
            ([one], true) => return self.append(plan, one.clone()),
            _ => {}
        }
        self.must_exist(plan)?;
        let (mut trees, mut writes) = (Vec::new(), Vec::new());
        self.record_writes(plan, records, &mut trees, &mut writes)?;
        self.catalog_writes(ops, &mut trees, &mut writes)?;
        let point = if !ops.is_empty() {
            "journal.pivot.committed"
        } else if records.iter().any(|r| matches!(r, Record::Finished(_))) {
            "journal.finished.inserted"
        } else {
            "journal.append.inserted"
        };
        committed(
            &self.dir,
            self.commit.submit(Op::Txn {
                trees,
                writes,
                point,
            }),
        )
    }

    /// The writes of a new plan: its header and body, its `active` mark.
    fn plan_writes(
        &self,
        id: PlanId,
        header: &PlanHeader,
        body: &[u8],
        trees: &mut Vec<Tree>,
        writes: &mut Vec<Write>,
    ) {
        let key = IVec::from(&plan_key(id));
        trees.push(self.plans.clone());
        writes.push(Write {
            tree: trees.len() - 1,
            key: key.clone(),
            value: Some(IVec::from(encode_plan(header, body))),
        });
        trees.push(self.active.clone());
        writes.push(Write {
            tree: trees.len() - 1,
            key,
            value: Some(IVec::default()),
        });
    }

    /// The writes of `records` (keys in order), and the finished marker
    /// (and the end of the `active` mark) if one of them is `Finished`.
    fn record_writes(
        &self,
        plan: PlanId,
        records: &[Record],
        trees: &mut Vec<Tree>,
        writes: &mut Vec<Write>,
    ) -> Result<()> {
        let base = trees.len();
        trees.push(self.records.clone());
        for r in records {
            writes.push(Write {
                tree: base,
                key: IVec::from(&record_key(plan, self.db.generate_id()?)),
                value: Some(IVec::from(codec::encode(r))),
            });
            if matches!(r, Record::Finished(_)) {
                trees.push(self.finished.clone());
                writes.push(Write {
                    tree: trees.len() - 1,
                    key: IVec::from(&plan_key(plan)),
                    value: Some(IVec::default()),
                });
                trees.push(self.active.clone());
                writes.push(Write {
                    tree: trees.len() - 1,
                    key: IVec::from(&plan_key(plan)),
                    value: None,
                });
            }
        }
        Ok(())
    }

    /// Catalog changes outside any plan, one transaction; durable on return.
    pub fn catalog_apply(&self, ops: &[CatalogOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let (mut trees, mut writes) = (Vec::new(), Vec::new());
        self.catalog_writes(ops, &mut trees, &mut writes)?;
        committed(
            &self.dir,
            self.commit.submit(Op::Txn {
                trees,
                writes,
                point: "journal.catalog.committed",
            }),
        )
    }

    pub fn catalog_get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let t = self.catalog_tree(tree)?;
        match t.get(key)? {
            None => Ok(None),
            Some(v) => {
                check_catalog_value(tree, key, &v)?;
                Ok(Some(v.to_vec()))
            }
        }
    }

    /// All (key, value) pairs of `tree` whose key starts with `prefix`, in key order.
    pub fn catalog_scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let t = self.catalog_tree(tree)?;
        let mut out = Vec::new();
        for kv in t.scan_prefix(prefix) {
            let (k, v) = kv?;
            check_catalog_value(tree, &k, &v)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    pub fn plan(&self, id: PlanId) -> Result<StoredPlan> {
        match self.plans.get(plan_key(id))? {
            None => Err(JournalError::NoSuchPlan(id)),
            Some(v) => decode_plan(id, &v, self.records.scan_prefix(plan_key(id))),
        }
    }

    /// The newest plan's id, if there is any plan (one key read).
    pub fn last_plan(&self) -> Result<Option<PlanId>> {
        match self.plans.last()? {
            Some((k, _)) => Ok(Some(key_plan(&k)?)),
            None => Ok(None),
        }
    }

    /// Every plan, oldest first.
    pub fn plans(&self) -> Result<Vec<StoredPlan>> {
        // One merged pass over both trees, which are in the same order.
        let mut out = Vec::new();
        let mut records = self.records.iter().peekable();
        for kv in self.plans.iter() {
            let (k, v) = kv?;
            let id = key_plan(&k)?;
            let mine = std::iter::from_fn(|| match records.peek() {
                Some(Ok((rk, _))) if rk.len() >= 8 && rk[..8] < k[..] => {
                    let orphan = PlanId(u64::from_be_bytes(rk[..8].try_into().expect("8 bytes")));
                    Some(Err(orphan_error(orphan)))
                }
                Some(Ok((rk, _))) if rk.starts_with(&k) => {
                    records.next().map(|r| r.map_err(JournalError::Db))
                }
                Some(Ok(_)) | None => None,
                Some(Err(_)) => records.next().map(|r| r.map_err(JournalError::Db)),
            });
            out.push(decode_plan_records(id, &v, mine)?);
        }
        // Records after the last plan (or with a short key) have no plan.
        if let Some(kv) = records.next() {
            let (rk, _) = kv?;
            let orphan = rk.get(..8).map_or(PlanId(0), |p| {
                PlanId(u64::from_be_bytes(p.try_into().expect("8 bytes")))
            });
            return Err(orphan_error(orphan));
        }
        Ok(out)
    }

    /// Plans with no `Finished` record, oldest first (from the `active`
    /// index: the cost does not grow with the journal's history).
    pub fn unfinished(&self) -> Result<Vec<StoredPlan>> {
        let mut out = Vec::new();
        for kv in self.active.iter() {
            let (k, _) = kv?;
            let id = key_plan(&k)?;
            let Some(v) = self.plans.get(&k)? else {
                return Err(JournalError::Corrupt {
                    plan: id,
                    what: "active index".into(),
                    reason: "it names a plan the journal does not have".into(),
                });
            };
            let plan = decode_plan(id, &v, self.records.scan_prefix(&k))?;
            if plan.outcome().is_none() {
                out.push(plan);
            }
        }
        Ok(out)
    }

    fn must_exist(&self, plan: PlanId) -> Result<()> {
        if self.plans.contains_key(plan_key(plan))? {
            Ok(())
        } else {
            Err(JournalError::NoSuchPlan(plan))
        }
    }

    /// The sled tree behind catalog tree `name`, opened once and cached.
    fn catalog_tree(&self, name: &str) -> Result<Tree> {
        let mut cache = self.catalog.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(name) {
            return Ok(t.clone());
        }
        let t = self.db.open_tree(format!("{CATALOG_PREFIX}{name}"))?;
        cache.insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// Precompute the writes of `ops`, adding their trees to `trees` (each
    /// once). Values must be codec envelopes: what would be unreadable is
    /// refused before it is written.
    fn catalog_writes(
        &self,
        ops: &[CatalogOp],
        trees: &mut Vec<Tree>,
        writes: &mut Vec<Write>,
    ) -> Result<()> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for op in ops {
            let (name, key, value) = match op {
                CatalogOp::Put { tree, key, value } => {
                    codec::verify(value).map_err(|e| {
                        JournalError::Transaction(format!(
                            "catalog value for {tree}/{} is not a journal codec envelope ({e}); refusing to write it",
                            show_key(key)
                        ))
                    })?;
                    (tree.as_str(), key, Some(IVec::from(value.as_slice())))
                }
                CatalogOp::Delete { tree, key } => (tree.as_str(), key, None),
            };
            let i = match index.get(name) {
                Some(&i) => i,
                None => {
                    trees.push(self.catalog_tree(name)?);
                    index.insert(name, trees.len() - 1);
                    trees.len() - 1
                }
            };
            writes.push(Write {
                tree: i,
                key: IVec::from(key.as_slice()),
                value,
            });
        }
        Ok(())
    }
}

fn key_plan(k: &[u8]) -> Result<PlanId> {
    match <[u8; 8]>::try_from(k) {
        Ok(k) => Ok(PlanId(u64::from_be_bytes(k))),
        Err(_) => Err(JournalError::Corrupt {
            plan: PlanId(0),
            what: "plan key".into(),
            reason: format!("key {} of the plans tree is not 8 bytes long", show_key(k)),
        }),
    }
}

fn check_catalog_value(tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
    codec::verify(value)
        .map(drop)
        .map_err(|e| JournalError::CorruptCatalog {
            tree: tree.to_string(),
            key: show_key(key),
            reason: e.to_string(),
        })
}

fn orphan_error(plan: PlanId) -> JournalError {
    JournalError::Corrupt {
        plan,
        what: "progress records".into(),
        reason: "records of a plan whose header is missing".into(),
    }
}

/// Decode a plan's header and body and the records of `records` (its
/// key-ordered records).
fn decode_plan(id: PlanId, value: &[u8], records: sled::Iter) -> Result<StoredPlan> {
    decode_plan_records(id, value, records.map(|r| r.map_err(JournalError::Db)))
}

fn decode_plan_records(
    id: PlanId,
    value: &[u8],
    records: impl Iterator<Item = Result<(IVec, IVec)>>,
) -> Result<StoredPlan> {
    let (header, PlanBody(body)): (PlanHeader, PlanBody) =
        codec::decode(value).map_err(|e| JournalError::Corrupt {
            plan: id,
            what: "plan header".into(),
            reason: e.to_string(),
        })?;
    let mut out = Vec::new();
    for kv in records {
        let (k, v) = kv?;
        let Ok(k) = <[u8; 16]>::try_from(k.as_ref()) else {
            return Err(JournalError::Corrupt {
                plan: id,
                what: "record key".into(),
                reason: format!("key {} is not 16 bytes long", show_key(&k)),
            });
        };
        let seq = u64::from_be_bytes(k[8..].try_into().expect("8 bytes"));
        let r = codec::decode(&v).map_err(|e| JournalError::Corrupt {
            plan: id,
            what: format!("record #{} (seq {seq})", out.len()),
            reason: e.to_string(),
        })?;
        out.push(r);
    }
    Ok(StoredPlan {
        id,
        header,
        body,
        records: out,
    })
}

/// A plan body as stored: exactly the bincode encoding of a `Vec<u8>`
/// (u64 length, then the bytes), but written and read as one byte string
/// rather than element by element (much faster for large bodies).
struct PlanBodyRef<'a>(&'a [u8]);

impl serde::Serialize for PlanBodyRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct PlanBody(Vec<u8>);

impl<'de> serde::Deserialize<'de> for PlanBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PlanBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a plan body (bytes)")
            }
            fn visit_bytes<E: serde::de::Error>(
                self,
                v: &[u8],
            ) -> std::result::Result<PlanBody, E> {
                Ok(PlanBody(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(
                self,
                v: Vec<u8>,
            ) -> std::result::Result<PlanBody, E> {
                Ok(PlanBody(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<PlanBody, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    v.push(b);
                }
                Ok(PlanBody(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// The stored value of a plan: codec(`(PlanHeader, body)`).
fn encode_plan(header: &PlanHeader, body: &[u8]) -> Vec<u8> {
    codec::encode(&(header, PlanBodyRef(body)))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn plan_value_is_codec_of_header_and_body() {
        let h = PlanHeader {
            op: "op".into(),
            summary: "s".into(),
            steps: 4,
            pivot: 2,
            created_unix: 9,
        };
        for body in [vec![], vec![1u8, 2, 3], vec![0xab; 70_000]] {
            let v = encode_plan(&h, &body);
            // Byte for byte the encoding of the plain tuple.
            assert_eq!(v, codec::encode(&(&h, &body)));
            let (h2, PlanBody(b2)): (PlanHeader, PlanBody) = codec::decode(&v).unwrap();
            assert_eq!((h2, b2), (h.clone(), body));
        }
    }
}
