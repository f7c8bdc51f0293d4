//! Invariant checks of one volume (DESIGN.md section 5, the parts that
//! apply to volumes): [`observe`] reads the real world, [`compare`] (pure)
//! compares it with the catalog. Used by `vsnap vol check` and the crash
//! suite.

use crate::catalog::{SnapKind, VolSnapshot};
use crate::{Engine, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use vsnap_steps::{fsops, qemu_img, Format, StepError};

/// What was seen on disk for one volume.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Observation {
    /// The image looked at.
    #[serde(with = "vsnap_steps::pathser")]
    pub image: PathBuf,
    /// Whether it exists.
    pub image_exists: bool,
    /// Internal snapshot names in the image (qcow2 only).
    pub internal_names: Vec<String>,
    /// Backing file of every file looked at (image, catalog files, chain).
    pub backing_of: BTreeMap<PathBuf, Option<PathBuf>>,
    /// Files that exist among those the catalog names.
    pub existing: BTreeSet<PathBuf>,
    /// `qemu-img check` or chain problems, one line each.
    pub damage: Vec<String>,
    /// vsnap temporary files (`.vsnap-*.tmp`) in the directories involved.
    pub temp_files: Vec<PathBuf>,
    /// Files named like vsnap's snapshot files (`<stem>.<x>.<ext>`) beside the image.
    pub look_alike: Vec<PathBuf>,
    /// Files a running process holds, so `qemu-img check` could not run.
    pub in_use: Vec<PathBuf>,
    /// Leaked clusters `qemu-img check` found, all files together.
    pub leaked_clusters: u64,
    /// What was seen that is worth saying but not wrong.
    pub notes: Vec<String>,
}

/// The result of a check: empty `violations` means consistent.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The image checked (its canonical path), or the domain's name for
    /// `domain_check`.
    #[serde(with = "vsnap_steps::pathser")]
    pub image: PathBuf,
    /// How many snapshots the catalog records for it.
    pub snapshots: usize,
    /// How many unfinished plans the journal has.
    pub unfinished_plans: usize,
    /// What disagrees with the catalog, one line each; empty: consistent.
    pub violations: Vec<String>,
    /// Not violations: leaked clusters, files in use that could not be checked.
    pub notes: Vec<String>,
    /// Leaked clusters `qemu-img check` found (also in `notes`): not a
    /// violation for `vol check`, but "`qemu-img check` clean" for the
    /// crash suites, which require it after every recovery.
    pub leaked_clusters: u64,
}

/// `qemu-img check` of one file. Corruptions are damage; leaked clusters
/// are only a note (a killed writer leaves them; they waste space, lose
/// nothing, and `qemu-img check -r leaks` frees them). Returns whether the
/// file is held by a running process and could not be checked.
fn check_image(
    f: &Path,
    fmt: Format,
    damage: &mut Vec<String>,
    notes: &mut Vec<String>,
    leaks: &mut u64,
) -> bool {
    match qemu_img::check(f, fmt) {
        Ok(r) if r.corruptions > 0 || (!r.clean && r.leaks == 0) => {
            damage.push(format!(
                "{}: qemu-img check: {} corruption(s): {}",
                f.display(),
                r.corruptions,
                r.output.trim()
            ));
            false
        }
        Ok(r) => {
            *leaks += r.leaks;
            if r.leaks > 0 {
                notes.push(format!(
                    "{}: {} leaked cluster(s) (harmless; `qemu-img check -r leaks` frees them)",
                    f.display(),
                    r.leaks
                ));
            }
            false
        }
        Err(vsnap_steps::StepError::InUse { .. }) => true,
        Err(e) => {
            damage.push(format!("{}: qemu-img check failed: {e}", f.display()));
            false
        }
    }
}

/// Walk the backing chain of each of `files` natively
/// ([`qemu_img::backing_chain`]); a loop or a chain over the depth limit
/// goes to `damage` (once each). Whether any was found.
fn chain_trouble(files: &[(PathBuf, Format)], damage: &mut Vec<String>) -> bool {
    let mut loops: Vec<Vec<PathBuf>> = Vec::new();
    let mut found = false;
    for (f, fmt) in files {
        let e = match qemu_img::backing_chain(f, *fmt) {
            Err(e @ (StepError::BackingLoop { .. } | StepError::ChainTooDeep { .. })) => e,
            _ => continue,
        };
        found = true;
        if let StepError::BackingLoop { files } = &e {
            // one line per loop, whichever of its files it was entered from
            let mut members: Vec<PathBuf> = files.iter().map(|x| canon(x)).collect();
            members.sort();
            members.dedup();
            if loops.contains(&members) {
                continue;
            }
            loops.push(members);
        }
        let line = e.to_string();
        if !damage.contains(&line) {
            damage.push(line);
        }
    }
    found
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Read everything [`compare`] needs. Read-only: qemu-img with `-U`.
/// Formats are never probed: the image is read as `image_format`, each
/// snapshot file as the catalog says, a backing file as the header that
/// names it says (else as the catalog says, else by `image::assumed_format`).
pub fn observe(image: &Path, image_format: Format, snaps: &[VolSnapshot]) -> Observation {
    let mut o = Observation {
        image: image.to_path_buf(),
        ..Default::default()
    };
    o.image_exists = image.is_file();
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    if let Some(d) = image.parent() {
        dirs.insert(d.to_path_buf());
    }
    let mut to_inspect: Vec<(PathBuf, Format)> = Vec::new();
    if o.image_exists {
        to_inspect.push((image.to_path_buf(), image_format));
    }
    let known: BTreeMap<PathBuf, Format> = snaps
        .iter()
        .filter_map(|s| s.file.as_ref().map(|f| (canon(f), s.format)))
        .collect();
    for s in snaps {
        if let Some(f) = &s.file {
            if f.is_file() {
                o.existing.insert(f.clone());
                to_inspect.push((f.clone(), s.format));
            }
            if let Some(d) = f.parent() {
                dirs.insert(d.to_path_buf());
            }
        }
    }
    // A backing loop or an over-deep chain, found natively first: reported
    // at once, and then no qemu-img opens any of these chains (QEMU opens
    // a chain recursively: a loop kept `qemu-img check` busy for minutes).
    let bad_chain = chain_trouble(&to_inspect, &mut o.damage);
    // Walk every chain: each file readable, checked, its backing present.
    let mut seen = BTreeSet::new();
    while let Some((f, fmt)) = to_inspect.pop() {
        if !seen.insert(canon(&f)) {
            continue;
        }
        match qemu_img::image_info(&f, fmt, true) {
            Ok(info) => {
                if let Some(b) = &info.backing {
                    if !b.exists() {
                        o.damage.push(format!(
                            "{}: backing file {} is missing",
                            f.display(),
                            b.display()
                        ));
                    } else {
                        let bf = info
                            .backing_format
                            .or_else(|| known.get(&canon(b)).copied())
                            .unwrap_or_else(|| crate::image::assumed_format(b));
                        to_inspect.push((b.clone(), bf));
                    }
                }
                o.backing_of
                    .insert(canon(&f), info.backing.as_deref().map(canon));
                if canon(&f) == canon(image) && fmt == Format::Qcow2 {
                    o.internal_names = info.snapshots.clone();
                }
            }
            Err(e) => o.damage.push(format!("{}: {e}", f.display())),
        }
        if fmt == Format::Qcow2 {
            // What qemu-img check does not report: the corrupt bit QEMU
            // set (it then refuses to write the image), a dirty bit.
            match qemu_img::damage(&f) {
                Ok(d) => o
                    .damage
                    .extend(d.into_iter().map(|d| format!("{}: {d}", f.display()))),
                Err(e) => o.damage.push(format!("{}: {e}", f.display())),
            }
        }
        if !bad_chain
            && fmt == Format::Qcow2
            && check_image(&f, fmt, &mut o.damage, &mut o.notes, &mut o.leaked_clusters)
        {
            o.in_use.push(f.clone());
        }
    }
    // File names compared as bytes: a name that is not UTF-8 is a name.
    let mut stem_dot = image
        .file_stem()
        .map(|s| s.as_bytes().to_vec())
        .unwrap_or_default();
    stem_dot.push(b'.');
    let ext: Option<Vec<u8>> = image.extension().map(|s| {
        let mut x = b".".to_vec();
        x.extend_from_slice(s.as_bytes());
        x
    });
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let path = d.join(&name);
            let b = name.as_bytes();
            if crate::image::is_claim(&name) {
                // The ownership claim (vol_check looks at it).
            } else if fsops::is_vsnap_temp_bytes(b) {
                o.temp_files.push(path);
            } else if Some(d.as_path()) == image.parent()
                && b.starts_with(&stem_dot)
                && ext.as_deref().is_none_or(|x| b.ends_with(x))
                && path != image
                && b.len() > stem_dot.len() + ext.as_deref().map_or(0, <[u8]>::len)
            {
                o.look_alike.push(path);
            }
        }
    }
    o.temp_files.sort();
    o.look_alike.sort();
    o
}

/// Compare the catalog with what was seen (pure). Each violation says
/// which invariant and what.
pub fn compare(snaps: &[VolSnapshot], current: Option<&str>, o: &Observation) -> Vec<String> {
    let mut v = Vec::new();
    if !o.image_exists {
        v.push(format!("inv5: the image {} is missing", o.image.display()));
    }
    for d in &o.damage {
        v.push(format!("inv5: {d}"));
    }
    let names: BTreeSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    let by_name: BTreeMap<&str, &VolSnapshot> =
        snaps.iter().map(|s| (s.name.as_str(), s)).collect();
    if let Some(c) = current {
        if !names.contains(c) {
            v.push(format!(
                "catalog: current snapshot {c:?} is not in the catalog"
            ));
        }
    }
    for s in snaps {
        if let Some(p) = &s.parent {
            if !names.contains(p.as_str()) {
                v.push(format!(
                    "catalog: parent {p:?} of {:?} is not in the catalog",
                    s.name
                ));
            }
        }
        match s.kind {
            SnapKind::Internal => {
                if !o.internal_names.contains(&s.name) {
                    v.push(format!(
                        "inv3: internal snapshot {:?} is in the catalog but not in {}",
                        s.name,
                        o.image.display()
                    ));
                }
            }
            SnapKind::External | SnapKind::Reflink | SnapKind::Copy => match &s.file {
                None => v.push(format!(
                    "catalog: {} snapshot {:?} names no file",
                    s.kind, s.name
                )),
                Some(f) if !o.existing.contains(f) => v.push(format!(
                    "inv3: file {} of snapshot {:?} is missing",
                    f.display(),
                    s.name
                )),
                Some(f) => {
                    if s.kind == SnapKind::External {
                        // The chain mirrors the tree: a child's file is backed by its parent's.
                        if let Some(pf) = s
                            .parent
                            .as_deref()
                            .and_then(|p| by_name.get(p))
                            .and_then(|p| p.file.as_ref())
                        {
                            let b = o.backing_of.get(&canon(f)).cloned().flatten();
                            if b.as_deref() != Some(canon(pf).as_path()) {
                                v.push(format!(
                                    "inv5: {} (snapshot {:?}) is backed by {:?}, the catalog's parent file is {}",
                                    f.display(),
                                    s.name,
                                    b,
                                    pf.display()
                                ));
                            }
                        }
                    }
                }
            },
        }
    }
    for n in &o.internal_names {
        if !names.contains(n.as_str()) {
            v.push(format!(
                "inv3: internal snapshot {n:?} is in {} but not in the catalog",
                o.image.display()
            ));
        }
    }
    // What the image runs on equals what the catalog says.
    if let Some(cur) = current.and_then(|c| by_name.get(c)) {
        if cur.kind == SnapKind::External {
            let b = o.backing_of.get(&canon(&o.image)).cloned().flatten();
            let want = cur.file.as_deref().map(canon);
            if b != want {
                v.push(format!(
                    "inv5: {} is backed by {:?}; the current snapshot's file is {:?}",
                    o.image.display(),
                    b,
                    want
                ));
            }
        }
    }
    for t in &o.temp_files {
        v.push(format!(
            "inv4: temporary file {} is left behind",
            t.display()
        ));
    }
    let referenced: BTreeSet<PathBuf> = snaps.iter().filter_map(|s| s.file.clone()).collect();
    for f in &o.look_alike {
        if !referenced.contains(f) {
            v.push(format!(
                "inv4: {} looks like a snapshot file but no snapshot references it",
                f.display()
            ));
        }
    }
    v
}

impl Engine {
    /// The image path and every snapshot file must be what vsnap made: a
    /// regular file (a symlink is never followed), and where the catalog
    /// recorded the file's identity, that inode (and, for whole-file
    /// snapshots, that size and content fingerprint).
    fn identity_violations(&self, image: &Path, snaps: &[VolSnapshot]) -> Result<Vec<String>> {
        use crate::catalog::{plain_file_mismatch, snapshot_ids};
        let mut v = Vec::new();
        if std::fs::symlink_metadata(image).is_ok() {
            if let Some(why) = plain_file_mismatch(image) {
                v.push(format!(
                    "inv5: the image path {} is not the image vsnap made: {why}",
                    image.display()
                ));
            }
        }
        let ids = snapshot_ids(self.journal(), image)?;
        for s in snaps {
            let Some(f) = &s.file else { continue };
            if std::fs::symlink_metadata(f).is_err() {
                continue; // reported as missing
            }
            let why = match ids.get(&s.name) {
                Some(id) => id.mismatch(f),
                None => plain_file_mismatch(f),
            };
            if let Some(why) = why {
                v.push(format!(
                    "inv3: the file {} of snapshot {:?} is not the file vsnap made: {why}",
                    f.display(),
                    s.name
                ));
            }
        }
        Ok(v)
    }

    /// Check one volume against the catalog and the journal.
    pub fn vol_check(&self, image: &Path) -> Result<CheckReport> {
        let _g = self.lock_ops();
        // The catalog's path as it is (a volume's path replaced by a
        // symlink is reported, not followed to whatever it names).
        let canon_image = self.catalog_path(image)?.unwrap_or_else(|| canon(image));
        let snaps = crate::catalog::snapshots(self.journal(), &canon_image)?;
        let current = crate::catalog::volume(self.journal(), &canon_image)?.and_then(|r| r.current);
        let format = crate::catalog::known_format(self.journal(), &canon_image)?
            .unwrap_or_else(|| crate::image::assumed_format(&canon_image));
        let obs = observe(&canon_image, format, &snaps);
        let mut violations = compare(&snaps, current.as_deref(), &obs);
        if obs.image_exists {
            match crate::image::read_claim(self.journal(), &canon_image)? {
                crate::image::Claim::Ours => {}
                crate::image::Claim::Absent if snaps.is_empty() => {}
                crate::image::Claim::Absent => violations.push(format!(
                    "owner: the ownership claim {} is missing (the next vsnap command that changes the volume makes it again, unless another state directory took the image meanwhile)",
                    crate::image::claim_path(&canon_image).display()
                )),
                crate::image::Claim::Foreign { owner } => violations.push(format!(
                    "owner: {} is claimed by another state directory: {owner}",
                    canon_image.display()
                )),
            }
        }
        violations.extend(self.identity_violations(&canon_image, &snaps)?);
        let unfinished = self.journal().unfinished()?.len();
        if unfinished > 0 {
            violations.push(format!(
                "inv7: {unfinished} unfinished plan(s) in the journal; run vsnap-recover"
            ));
        }
        let mut notes = obs.notes.clone();
        notes.extend(
            obs.in_use
                .iter()
                .map(|f| format!("{}: in use by a running process, not checked", f.display())),
        );
        Ok(CheckReport {
            image: canon_image,
            snapshots: snaps.len(),
            unfinished_plans: unfinished,
            violations,
            notes,
            leaked_clusters: obs.leaked_clusters,
        })
    }
}

/// What was seen of one domain: QEMU's view, the agent's, and the files.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DomainObservation {
    /// `running`, `paused` or `shutoff`.
    pub state: String,
    /// The image each device runs on now (QEMU's `query-block`), by file.
    pub qemu_tops: Vec<PathBuf>,
    /// Every file in the devices' chains, as QEMU sees them.
    pub qemu_chain_files: BTreeSet<PathBuf>,
    /// vsnap's block nodes (`vsnap-*`) with the file each opens.
    pub vsnap_nodes: Vec<(String, PathBuf)>,
    /// The agent's freeze status (`thawed`, `frozen`), if it answered.
    pub freeze: Option<String>,
    /// Internal snapshot names per image.
    pub internal: BTreeMap<PathBuf, Vec<String>>,
    /// Files that exist among those the catalog names.
    pub existing: BTreeSet<PathBuf>,
    /// `qemu-img check` or chain problems, one line each.
    pub damage: Vec<String>,
    /// Leaked clusters `qemu-img check` found (shut-off domains).
    pub leaked_clusters: u64,
    /// What was seen that is worth saying but not wrong.
    pub notes: Vec<String>,
    /// vsnap temporary files (`.vsnap-*.tmp`) beside the disks' images.
    pub temp_files: Vec<PathBuf>,
    /// `<stem>.<x>.qcow2` files beside the disks' images.
    pub look_alike: Vec<PathBuf>,
}

/// Read everything [`compare_domain`] needs (read-only).
pub fn observe_domain(
    d: &crate::domain::DomainRec,
    snaps: &[crate::domsnap::DomSnapshot],
    state: crate::domain::DomState,
) -> DomainObservation {
    use crate::domain::DomState;
    let mut o = DomainObservation {
        state: state.as_str().into(),
        ..Default::default()
    };
    let live = state != DomState::Shutoff;
    if let (true, Some(qmp)) = (live, &d.qmp) {
        match vsnap_steps::live::qmp(qmp)
            .and_then(|mut q| Ok((q.query_block_typed()?, q.query_named_block_nodes_typed()?)))
        {
            Ok((blocks, nodes)) => {
                for ins in blocks.iter().filter_map(|b| b.inserted.as_ref()) {
                    if !ins.file.is_empty() {
                        o.qemu_tops.push(canon(Path::new(&ins.file)));
                    }
                    o.qemu_chain_files
                        .extend(ins.chain.iter().map(|f| canon(Path::new(f))));
                }
                for n in nodes {
                    if n.node_name.starts_with("vsnap-") {
                        o.vsnap_nodes
                            .push((n.node_name.clone(), canon(Path::new(&n.file))));
                    }
                    if n.drv == "qcow2" {
                        o.internal
                            .entry(canon(Path::new(&n.file)))
                            .or_default()
                            .extend(n.snapshots);
                    }
                }
            }
            Err(e) => o.damage.push(format!("QEMU's monitor did not answer: {e}")),
        }
        if let (DomState::Running, Some(agent)) = (state, &d.agent) {
            match vsnap_steps::live::agent(agent).and_then(|mut a| a.fsfreeze_status()) {
                Ok(s) => o.freeze = Some(s),
                Err(e) => o
                    .damage
                    .push(format!("the guest agent did not answer: {e}")),
            }
        }
    }
    // Disks vsnap cannot snapshot (network, ...) have no local image.
    let mut files: BTreeSet<PathBuf> = d
        .disks
        .iter()
        .filter_map(|x| x.image().map(Path::to_path_buf))
        .collect();
    // Never probed: the disks' formats as defined, overlays are qcow2
    // (vsnap made them), anything else by `image::assumed_format`.
    let mut formats: BTreeMap<PathBuf, Format> = d
        .disks
        .iter()
        .filter_map(|x| Some((x.image()?.to_path_buf(), x.format)))
        .collect();
    let mut dirs = BTreeSet::new();
    let mut memory_files = BTreeSet::new();
    for s in snaps {
        if let Some(m) = &s.memory_file {
            memory_files.insert(m.clone());
            if let Some(p) = m.parent() {
                dirs.insert(p.to_path_buf());
            }
            if m.is_file() {
                o.existing.insert(m.clone());
            }
        }
        for sd in &s.disks {
            files.insert(sd.state_file.clone());
            if let Some(ov) = &sd.overlay {
                files.insert(ov.clone());
                formats.entry(ov.clone()).or_insert(Format::Qcow2);
            }
        }
    }
    // An image is a regular file, or a block device (`<disk type='block'>`).
    let is_image = |f: &Path| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(f).is_ok_and(|m| m.is_file() || m.file_type().is_block_device())
    };
    let listed: Vec<(PathBuf, Format)> = files
        .iter()
        .filter(|f| is_image(f))
        .map(|f| {
            let fmt = formats
                .get(f)
                .copied()
                .unwrap_or_else(|| crate::image::assumed_format(f));
            (f.clone(), fmt)
        })
        .collect();
    let bad_chain = chain_trouble(&listed, &mut o.damage);
    for f in &files {
        if !is_image(f) {
            if let Some(p) = f.parent() {
                dirs.insert(p.to_path_buf());
            }
            continue;
        }
        o.existing.insert(f.clone());
        // (a block device's directory, /dev, holds no file of vsnap's)
        if let (true, Some(p)) = (f.is_file(), f.parent()) {
            dirs.insert(p.to_path_buf());
        }
        let fmt = formats
            .get(f)
            .copied()
            .unwrap_or_else(|| crate::image::assumed_format(f));
        match qemu_img::image_info(f, fmt, true) {
            Ok(info) => {
                if let Some(b) = &info.backing {
                    if !b.exists() {
                        o.damage.push(format!(
                            "{}: backing file {} is missing",
                            f.display(),
                            b.display()
                        ));
                    }
                }
                if !live && fmt == Format::Qcow2 {
                    o.internal
                        .entry(canon(f))
                        .or_default()
                        .extend(info.snapshots.clone());
                }
                if live && fmt == Format::Qcow2 && !o.internal.contains_key(&canon(f)) {
                    // Not open in QEMU (a frozen state file deeper than QEMU shows): read it directly.
                    o.internal.insert(canon(f), info.snapshots.clone());
                }
            }
            Err(e) => o.damage.push(format!("{}: {e}", f.display())),
        }
        if !live && !bad_chain && fmt == Format::Qcow2 {
            check_image(f, fmt, &mut o.damage, &mut o.notes, &mut o.leaked_clusters);
        }
    }
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = dir.join(e.file_name());
            if crate::image::is_claim(e.file_name()) {
                // A volume's ownership claim: neither temporary nor orphan.
            } else if fsops::is_vsnap_temp(&name) {
                o.temp_files.push(path);
            } else if name.matches('.').count() >= 2 && !files.contains(&path) {
                // `<stem>.<snapshot>.qcow2` (an overlay) or
                // `<stem>.<snapshot>.<ext>` (a reflink clone) beside a
                // disk: vsnap's naming.
                let stem = name.split('.').next().unwrap_or("");
                let ext = name.rsplit('.').next().unwrap_or("");
                if d.disks.iter().filter_map(|x| x.image()).any(|x| {
                    x.file_stem()
                        .is_some_and(|s| s.to_string_lossy().split('.').next() == Some(stem))
                        && (ext == "qcow2"
                            || x.extension().is_some_and(|e| e.to_string_lossy() == ext))
                }) {
                    o.look_alike.push(path);
                }
            }
        }
    }
    o
}

/// Compare a domain's catalog with what was seen (pure).
pub fn compare_domain(
    d: &crate::domain::DomainRec,
    snaps: &[crate::domsnap::DomSnapshot],
    o: &DomainObservation,
) -> Vec<String> {
    use crate::domsnap::DiskMode;
    let mut v: Vec<String> = o.damage.iter().map(|x| format!("inv5: {x}")).collect();
    if o.freeze.as_deref() == Some("frozen") {
        v.push("inv2: the guest's filesystems are frozen".into());
    }
    if o.state != "shutoff" {
        for disk in &d.disks {
            let Some(image) = disk.image() else {
                continue; // not a local image: vsnap never switches it
            };
            if !o.qemu_tops.contains(&canon(image)) {
                v.push(format!(
                    "inv5: the catalog says disk {} is {}, but QEMU runs on {:?}",
                    disk.target,
                    image.display(),
                    o.qemu_tops
                ));
            }
        }
        for (node, file) in &o.vsnap_nodes {
            if !o.qemu_chain_files.contains(file) {
                v.push(format!(
                    "inv4: QEMU holds block node {node} ({}) that no device uses",
                    file.display()
                ));
            }
        }
    }
    let names: BTreeSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    if let Some(c) = &d.current {
        if !names.contains(c.as_str()) {
            v.push(format!(
                "catalog: current snapshot {c:?} is not in the catalog"
            ));
        }
    }
    let mut internal_expected: BTreeMap<PathBuf, BTreeSet<&str>> = BTreeMap::new();
    for s in snaps {
        if let Some(m) = &s.memory_file {
            if !o.existing.contains(m) {
                v.push(format!(
                    "inv3: memory file {} of snapshot {:?} is missing",
                    m.display(),
                    s.name
                ));
            }
        }
        for sd in &s.disks {
            match sd.mode {
                DiskMode::No => {}
                DiskMode::Internal => {
                    internal_expected
                        .entry(canon(&sd.state_file))
                        .or_default()
                        .insert(&s.name);
                    let have = o
                        .internal
                        .get(&canon(&sd.state_file))
                        .is_some_and(|n| n.contains(&s.name));
                    if !have {
                        v.push(format!(
                            "inv3: snapshot {:?} is not inside {} (disk {})",
                            s.name,
                            sd.state_file.display(),
                            sd.target
                        ));
                    }
                }
                DiskMode::Reflink => {
                    if !o.existing.contains(&sd.state_file) {
                        v.push(format!(
                            "inv3: {} (reflink clone of disk {} in snapshot {:?}) is missing",
                            sd.state_file.display(),
                            sd.target,
                            s.name
                        ));
                    }
                }
                DiskMode::External => {
                    if !o.existing.contains(&sd.state_file) {
                        v.push(format!(
                            "inv3: {} (state of disk {} in snapshot {:?}) is missing",
                            sd.state_file.display(),
                            sd.target,
                            s.name
                        ));
                    }
                    if let Some(ov) = &sd.overlay {
                        if !o.existing.contains(ov) {
                            v.push(format!(
                                "inv3: overlay {} of snapshot {:?} is missing",
                                ov.display(),
                                s.name
                            ));
                        }
                    }
                }
            }
        }
    }
    for (file, names) in &o.internal {
        for n in names {
            if !internal_expected
                .get(file)
                .is_some_and(|e| e.contains(n.as_str()))
            {
                v.push(format!(
                    "inv3: {} holds internal snapshot {n:?} that the catalog does not know",
                    file.display()
                ));
            }
        }
    }
    for t in &o.temp_files {
        v.push(format!(
            "inv4: temporary file {} is left behind",
            t.display()
        ));
    }
    for f in &o.look_alike {
        v.push(format!(
            "inv4: {} looks like a vsnap overlay but nothing references it",
            f.display()
        ));
    }
    v
}

impl Engine {
    /// Check one domain against the catalog, QEMU, its agent and the journal.
    pub fn domain_check(&self, name: &str) -> Result<CheckReport> {
        let _g = self.lock_ops();
        let d = self.domain(name)?;
        let snaps = crate::domsnap::snapshots(self.journal(), &d.name)?;
        let state = self.domain_state(&d)?;
        let obs = observe_domain(&d, &snaps, state);
        let mut violations = compare_domain(&d, &snaps, &obs);
        let unfinished = self.journal().unfinished()?.len();
        if unfinished > 0 {
            violations.push(format!(
                "inv7: {unfinished} unfinished plan(s) in the journal; run vsnap-recover"
            ));
        }
        Ok(CheckReport {
            image: PathBuf::from(name),
            snapshots: snaps.len(),
            unfinished_plans: unfinished,
            violations,
            notes: obs.notes,
            leaked_clusters: obs.leaked_clusters,
        })
    }
}

/// One snapshot file [`Engine::vol_adopt_files`] recorded anew.
#[derive(Clone, Debug, Serialize)]
pub struct AdoptedFile {
    /// The snapshot whose file was recorded anew.
    pub snapshot: String,
    /// The file.
    #[serde(with = "vsnap_steps::pathser")]
    pub file: PathBuf,
    /// Why it needed adopting (what the old record said).
    pub was: String,
}

/// What [`Engine::vol_adopt_files`] did.
#[derive(Clone, Debug, Serialize)]
pub struct AdoptReport {
    /// The volume (its canonical path).
    #[serde(with = "vsnap_steps::pathser")]
    pub image: PathBuf,
    /// The files recorded anew.
    pub adopted: Vec<AdoptedFile>,
    /// Snapshot files already recorded as they are.
    pub unchanged: usize,
}

impl Engine {
    /// Record the snapshot files of `image` as vsnap's own again, after
    /// an operator restored them from a backup or moved them to another
    /// filesystem (new inodes: every later command would refuse them as
    /// replaced).
    ///
    /// Needs: the volume in this state directory's catalog, no
    /// unfinished plan, the image claimed by no other state directory, and
    /// `vol check` clean but for the files' identities: every snapshot
    /// file present, a regular file with one name (not a symlink), chains
    /// and `qemu-img check` sound. A whole-file snapshot (reflink, copy)
    /// must also have the size and content fingerprint vsnap recorded: a
    /// different file under its name is refused, not adopted.
    ///
    /// Changes: only the catalog's identity records, all in one write.
    /// On refusal ([`crate::EngineError::Refused`] of kind
    /// [`crate::RefusalKind::Unsafe`] listing every problem), or any
    /// other error, nothing is changed.
    pub fn vol_adopt_files(&self, image: &Path) -> Result<AdoptReport> {
        use crate::catalog::{self, SnapFileId};
        use crate::EngineError;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let _g = self.lock_ops();
        let j = self.journal();
        let image = self.catalog_path(image)?.unwrap_or_else(|| canon(image));
        let snaps = catalog::snapshots(j, &image)?;
        if snaps.is_empty() && catalog::volume(j, &image)?.is_none() {
            return Err(EngineError::not_found(format!(
                "{} is not a volume of this state directory (no snapshot of it in the catalog); \
                 check --state-dir",
                image.display()
            )));
        }
        let unfinished = j.unfinished()?.len();
        if unfinished > 0 {
            return Err(EngineError::in_use(format!(
                "{unfinished} unfinished plan(s) in the journal: run `vsnap-recover` first, then adopt"
            )));
        }
        if let crate::image::Claim::Foreign { owner } = crate::image::read_claim(j, &image)? {
            return Err(EngineError::in_use(format!(
                "{} is claimed by another state directory ({owner}): adopt its files there",
                image.display()
            )));
        }
        let mut problems = Vec::new();
        if let Some(why) = catalog::plain_file_mismatch(&image) {
            problems.push(format!("the image path {}: {why}", image.display()));
        }
        let current = catalog::volume(j, &image)?.and_then(|r| r.current);
        let format = catalog::known_format(j, &image)?
            .unwrap_or_else(|| crate::image::assumed_format(&image));
        let obs = observe(&image, format, &snaps);
        problems.extend(compare(&snaps, current.as_deref(), &obs));
        let ids = catalog::snapshot_ids(j, &image)?;
        let mut adopted = Vec::new();
        let mut ops = Vec::new();
        let mut unchanged = 0;
        for s in &snaps {
            let Some(f) = &s.file else { continue };
            let old = ids.get(&s.name);
            let was = match old {
                Some(id) => match id.mismatch(f) {
                    None => {
                        unchanged += 1;
                        continue;
                    }
                    Some(why) => why,
                },
                None => "no identity recorded".to_string(),
            };
            let m = match std::fs::symlink_metadata(f) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{}: cannot stat it: {e}", f.display()));
                    continue;
                }
            };
            if !m.is_file() {
                problems.push(format!(
                    "{}: {}",
                    f.display(),
                    catalog::plain_file_mismatch(f).unwrap_or_else(|| "not a regular file".into())
                ));
                continue;
            }
            if m.nlink() != 1 {
                problems.push(format!(
                    "{}: it has {} names (hard links); vsnap adopts a file only with one",
                    f.display(),
                    m.nlink()
                ));
                continue;
            }
            let whole = matches!(s.kind, SnapKind::Reflink | SnapKind::Copy);
            let fh = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(f)
            {
                Ok(fh) => fh,
                Err(e) => {
                    problems.push(format!("{}: cannot open it: {e}", f.display()));
                    continue;
                }
            };
            let new = match SnapFileId::of(&fh, whole) {
                Ok(id) => id,
                Err(e) => {
                    problems.push(format!("{}: cannot read it: {e}", f.display()));
                    continue;
                }
            };
            if (new.dev, new.ino) != (m.dev(), m.ino()) {
                problems.push(format!("{}: it changed while vsnap read it", f.display()));
                continue;
            }
            if let (Some(old), Some(now)) = (old.and_then(|o| o.content), new.content) {
                if old != now {
                    problems.push(format!(
                        "{} is not snapshot {:?}'s file: its size or content differs from what vsnap made ({} bytes now, {} made)",
                        f.display(),
                        s.name,
                        now.0,
                        old.0
                    ));
                    continue;
                }
            }
            ops.push(catalog::put_snapshot_id(&image, &s.name, &new));
            adopted.push(AdoptedFile {
                snapshot: s.name.clone(),
                file: f.clone(),
                was,
            });
        }
        if !problems.is_empty() {
            return Err(EngineError::unsafe_(format!(
                "nothing adopted: {}; fix these (`vsnap vol check {}` lists them), then adopt again",
                problems.join("; "),
                image.display()
            )));
        }
        if !ops.is_empty() {
            j.catalog_apply(&ops)?;
        }
        Ok(AdoptReport {
            image,
            adopted,
            unchanged,
        })
    }
}
