//! The sled-backed journal and catalog; TODO(helper): implement every method.
use crate::*;
use std::path::Path;

pub struct Journal {
    _private: (),
}

impl Journal {
    /// Create the state directory (mode 0700) if missing, take its lock
    /// (`lock` file, holder pid written inside), open sled at `db/`.
    pub fn open(state_dir: &Path) -> Result<Journal> { let _ = state_dir; todo!() }
    pub fn state_dir(&self) -> &Path { todo!() }
    /// Append a new plan (state `Planned`); durable on return.
    pub fn begin(&self, header: PlanHeader, body: Vec<u8>) -> Result<PlanId> { let _ = (header, body); todo!() }
    /// Append one progress record; durable on return.
    pub fn append(&self, plan: PlanId, record: Record) -> Result<()> { let _ = (plan, record); todo!() }
    /// `Done(pivot)` and `ops` in one sled transaction; durable on return.
    pub fn commit_pivot(&self, plan: PlanId, pivot: u32, ops: &[CatalogOp]) -> Result<()> { let _ = (plan, pivot, ops); todo!() }
    /// Catalog changes outside any plan, one transaction; durable on return.
    pub fn catalog_apply(&self, ops: &[CatalogOp]) -> Result<()> { let _ = ops; todo!() }
    pub fn catalog_get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> { let _ = (tree, key); todo!() }
    /// All (key, value) pairs of `tree` whose key starts with `prefix`, in key order.
    pub fn catalog_scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> { let _ = (tree, prefix); todo!() }
    pub fn plan(&self, id: PlanId) -> Result<StoredPlan> { let _ = id; todo!() }
    /// Every plan, oldest first.
    pub fn plans(&self) -> Result<Vec<StoredPlan>> { todo!() }
    /// Plans with no `Finished` record, oldest first.
    pub fn unfinished(&self) -> Result<Vec<StoredPlan>> { todo!() }
}
