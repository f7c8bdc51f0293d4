//! The sled-backed journal and catalog.
//!
//! Layout of the database at `<state_dir>/db`:
//!
//! | tree       | key                                   | value                                  |
//! |------------|---------------------------------------|----------------------------------------|
//! | `plans`    | plan id, u64 BE                       | codec(`(PlanHeader, body)`)            |
//! | `records`  | plan id u64 BE ++ record seq u64 BE   | codec(`Record`)                        |
//! | `finished` | plan id, u64 BE                       | empty: the plan has a `Finished` record |
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
//! returns once the `db.flush()` that covers it has returned.
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
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const PLANS: &str = "plans";
const RECORDS: &str = "records";
const FINISHED: &str = "finished";
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
    catalog: Mutex<HashMap<String, Tree>>,
    next_plan: AtomicU64,
    db: sled::Db,
    dir: PathBuf,
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

pub(crate) struct SledSink {
    db: sled::Db,
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
        self.db.flush().map(drop)
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

fn committed(r: Result<(), CommitError<sled::Error>>) -> Result<()> {
    r.map_err(|e| match e {
        CommitError::Closed => JournalError::Closed,
        CommitError::Sink(e) => JournalError::Db(e),
        CommitError::Abandoned => JournalError::Transaction(
            "the journal's flusher stopped before confirming this write; it may or may not be durable, \
             and the journal takes no more writes: reopen it"
                .into(),
        ),
    })
}

/// Create the state directory 0700 if missing; tighten a looser mode.
fn prepare_state_dir(dir: &Path) -> Result<()> {
    let err = |source: std::io::Error| JournalError::StateDir {
        dir: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    let meta = std::fs::metadata(dir).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

impl Journal {
    /// Create the state directory (mode 0700) if missing, take its lock
    /// (`lock` file, holder pid written inside), open sled at `db/`.
    pub fn open(state_dir: &Path) -> Result<Journal> {
        prepare_state_dir(state_dir)?;
        let lock = StateLock::acquire(state_dir)?;
        let db = sled::Config::new()
            .path(state_dir.join("db"))
            // We flush ourselves, once per batch; a timer flush on top
            // would only compete with ours for the disk.
            .flush_every_ms(None)
            .open()?;
        let plans = db.open_tree(PLANS)?;
        let records = db.open_tree(RECORDS)?;
        let finished = db.open_tree(FINISHED)?;
        let next_plan = match plans.last()? {
            Some((k, _)) => key_plan(&k)?.0 + 1,
            None => 1,
        };
        let commit = GroupCommit::start(SledSink { db: db.clone() });
        failpoint::hit("journal.opened");
        Ok(Journal {
            commit,
            plans,
            records,
            finished,
            catalog: Mutex::new(HashMap::new()),
            next_plan: AtomicU64::new(next_plan),
            db,
            dir: state_dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Stop taking writes: every writer already waiting is answered (its
    /// record flushed), later writes get [`JournalError::Closed`]. Reads
    /// still work. Dropping the journal does this too.
    pub fn close(&self) {
        self.commit.close();
    }

    /// Append a new plan (state `Planned`); durable on return.
    pub fn begin(&self, header: PlanHeader, body: Vec<u8>) -> Result<PlanId> {
        let id = PlanId(self.next_plan.fetch_add(1, Ordering::SeqCst));
        let value = codec::encode(&(&header, &body));
        committed(self.commit.submit(Op::Insert {
            tree: self.plans.clone(),
            key: IVec::from(&plan_key(id)),
            value: IVec::from(value),
            point: "journal.begin.inserted",
        }))?;
        Ok(id)
    }

    /// Append one progress record; durable on return.
    pub fn append(&self, plan: PlanId, record: Record) -> Result<()> {
        self.must_exist(plan)?;
        let key = IVec::from(&record_key(plan, self.db.generate_id()?));
        let value = IVec::from(codec::encode(&record));
        let op = if matches!(record, Record::Finished(_)) {
            // The marker lets `unfinished` skip finished plans; it is
            // written atomically with the record it stands for.
            Op::Txn {
                trees: vec![self.records.clone(), self.finished.clone()],
                writes: vec![
                    Write {
                        tree: 0,
                        key,
                        value: Some(value),
                    },
                    Write {
                        tree: 1,
                        key: IVec::from(&plan_key(plan)),
                        value: Some(IVec::default()),
                    },
                ],
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
        committed(self.commit.submit(op))
    }

    /// `Done(pivot)` and `ops` in one sled transaction; durable on return.
    pub fn commit_pivot(&self, plan: PlanId, pivot: u32, ops: &[CatalogOp]) -> Result<()> {
        self.must_exist(plan)?;
        let key = IVec::from(&record_key(plan, self.db.generate_id()?));
        let value = IVec::from(codec::encode(&Record::Done(pivot)));
        let (mut trees, mut writes) = (
            vec![self.records.clone()],
            vec![Write {
                tree: 0,
                key,
                value: Some(value),
            }],
        );
        self.catalog_writes(ops, &mut trees, &mut writes)?;
        committed(self.commit.submit(Op::Txn {
            trees,
            writes,
            point: "journal.pivot.committed",
        }))
    }

    /// Catalog changes outside any plan, one transaction; durable on return.
    pub fn catalog_apply(&self, ops: &[CatalogOp]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let (mut trees, mut writes) = (Vec::new(), Vec::new());
        self.catalog_writes(ops, &mut trees, &mut writes)?;
        committed(self.commit.submit(Op::Txn {
            trees,
            writes,
            point: "journal.catalog.committed",
        }))
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
            Some(v) => self.load(id, &v),
        }
    }

    /// Every plan, oldest first.
    pub fn plans(&self) -> Result<Vec<StoredPlan>> {
        let mut out = Vec::new();
        for kv in self.plans.iter() {
            let (k, v) = kv?;
            out.push(self.load(key_plan(&k)?, &v)?);
        }
        Ok(out)
    }

    /// Plans with no `Finished` record, oldest first.
    pub fn unfinished(&self) -> Result<Vec<StoredPlan>> {
        let mut out = Vec::new();
        for kv in self.plans.iter() {
            let (k, v) = kv?;
            if self.finished.contains_key(&k)? {
                continue;
            }
            let plan = self.load(key_plan(&k)?, &v)?;
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

    /// Decode a plan's header and body and all its records.
    fn load(&self, id: PlanId, value: &[u8]) -> Result<StoredPlan> {
        let (header, body): (PlanHeader, Vec<u8>) =
            codec::decode(value).map_err(|e| JournalError::Corrupt {
                plan: id,
                what: "plan header".into(),
                reason: e.to_string(),
            })?;
        let mut records = Vec::new();
        for kv in self.records.scan_prefix(plan_key(id)) {
            let (k, v) = kv?;
            let seq = match <[u8; 16]>::try_from(k.as_ref()) {
                Ok(k) => u64::from_be_bytes(k[8..].try_into().expect("8 bytes")),
                Err(_) => {
                    return Err(JournalError::Corrupt {
                        plan: id,
                        what: "record key".into(),
                        reason: format!("key {} is not 16 bytes long", show_key(&k)),
                    })
                }
            };
            let r = codec::decode(&v).map_err(|e| JournalError::Corrupt {
                plan: id,
                what: format!("record #{} (seq {seq})", records.len()),
                reason: e.to_string(),
            })?;
            records.push(r);
        }
        Ok(StoredPlan {
            id,
            header,
            body,
            records,
        })
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
