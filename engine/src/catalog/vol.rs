//! The catalog model: volumes and their snapshots, stored in the journal's
//! catalog trees (values encoded through the journal's codec).
//!
//! Trees:
//! * `volumes`  — key: canonical image path — [`VolumeRec`]
//! * `volsnaps` — key: image path, NUL, snapshot name — [`VolSnapshot`]
//! * `volformat` — key: canonical image path — the image's [`Format`] as
//!   vsnap knows it (stated with `--format` or by the name when vsnap first
//!   saw it, then kept by every plan): never read back from the image's
//!   bytes, which a guest writes (see `volume.rs`)
//! * `meta` — key `owner-id` — this state directory's random id, written
//!   in the ownership claims beside its images (`volume.rs`)

use crate::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use vsnap_journal::{codec, CatalogOp, Journal};
use vsnap_steps::Format;

/// The catalog tree of volumes (`VolumeRec`, keyed by path).
pub const VOLUMES: &str = "volumes";
/// The catalog tree of volume snapshots (`VolSnapshot`, keyed by volume and
/// name).
pub const VOLSNAPS: &str = "volsnaps";
/// The catalog tree of image formats vsnap recorded (`image.rs`).
pub const VOLFORMAT: &str = "volformat";
/// The catalog tree of this state directory's own values (its owner id).
pub const META: &str = "meta";
const OWNER_ID: &[u8] = b"owner-id";
/// The identity of each snapshot's file (see [`SnapFileId`]), keyed like
/// `volsnaps`. A tree of its own, so that [`VolSnapshot`] records written
/// before it existed read as they are (a snapshot without an identity is
/// checked for being a plain regular file only).
pub const VOLSNAPIDS: &str = "volsnapids";

/// The kind of a volume snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SnapKind {
    /// Inside the qcow2 image (`qemu-img snapshot`).
    Internal,
    /// The frozen state gets a new name; a new overlay takes the image's path.
    External,
    /// A copy-on-write clone (FICLONE) of the whole file.
    Reflink,
    /// A full copy of the whole file.
    Copy,
}

impl SnapKind {
    /// The kind's word: `internal`, `external`, `reflink`, `copy`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapKind::Internal => "internal",
            SnapKind::External => "external",
            SnapKind::Reflink => "reflink",
            SnapKind::Copy => "copy",
        }
    }
    /// The kind for its word; `None` for any other.
    pub fn parse(s: &str) -> Option<SnapKind> {
        match s {
            "internal" => Some(SnapKind::Internal),
            "external" => Some(SnapKind::External),
            "reflink" => Some(SnapKind::Reflink),
            "copy" => Some(SnapKind::Copy),
            _ => None,
        }
    }
    /// Kinds of one family may share a volume; families may not mix
    /// (an internal snapshot would end up inside a frozen external file,
    /// and a whole-file clone would carry internal snapshots along).
    pub fn family(self) -> &'static str {
        match self {
            SnapKind::Internal => "internal",
            SnapKind::External => "external",
            SnapKind::Reflink | SnapKind::Copy => "whole-file (reflink/copy)",
        }
    }
}

impl std::fmt::Display for SnapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A volume vsnap has snapshotted. Its `path` is always its active image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    /// The image's canonical path.
    #[serde(with = "vsnap_steps::pathser")]
    pub path: PathBuf,
    /// The current snapshot: the last one made or reverted to.
    pub current: Option<String>,
    /// Increases with every snapshot made; orders snapshots by creation.
    pub next_seq: u64,
}

/// One volume snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolSnapshot {
    /// The snapshot's name, unique per volume.
    pub name: String,
    /// The volume (its image's canonical path).
    #[serde(with = "vsnap_steps::pathser")]
    pub volume: PathBuf,
    /// How the snapshot is kept.
    pub kind: SnapKind,
    /// Free text given when it was made.
    pub description: Option<String>,
    /// When it was made, in seconds since the epoch.
    pub creation_time: i64,
    /// The snapshot that was current when it was made.
    pub parent: Option<String>,
    /// Its place in the order of creation (the volume's `next_seq` then).
    pub seq: u64,
    /// External: the frozen file. Reflink/copy: the clone. Internal: None.
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub file: Option<PathBuf>,
    /// Format of `file` (internal: of the volume).
    pub format: Format,
}

/// What a snapshot's file was when vsnap made it: a file replaced since
/// (by a symlink, or another file under the same name) is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapFileId {
    /// The file's device number.
    pub dev: u64,
    /// The file's inode number.
    pub ino: u64,
    /// Whole-file snapshots (reflink/copy), whose content never changes:
    /// the size and a fingerprint of the first 64 KiB
    /// ([`vsnap_steps::fsops::fingerprint`]). External frozen files are
    /// rebased when a snapshot below them is deleted: inode only.
    pub content: Option<(u64, u64)>,
    /// The inode's birth time (seconds, nanoseconds; `statx`), where the
    /// filesystem records one: an inode number is reused at once after a
    /// file is deleted (ext4 hands the next new file the number just
    /// freed), so the number alone would take a new file under the old
    /// name for vsnap's; the birth time tells them apart. `None` in
    /// records written before it was kept, and where there is none.
    pub born: Option<(i64, u32)>,
}

/// The layout of [`SnapFileId`] before `born` (still read).
#[derive(Deserialize)]
struct SnapFileIdV1 {
    dev: u64,
    ino: u64,
    content: Option<(u64, u64)>,
}

/// A stored identity, in either layout.
pub(crate) fn decode_snapshot_id(v: &[u8]) -> std::result::Result<SnapFileId, codec::CodecError> {
    codec::decode::<SnapFileId>(v).or_else(|e| {
        let o: SnapFileIdV1 = codec::decode(v).map_err(|_| e)?;
        Ok(SnapFileId {
            dev: o.dev,
            ino: o.ino,
            content: o.content,
            born: None,
        })
    })
}

/// A file's birth time, where the filesystem keeps one.
fn born_of(m: &std::fs::Metadata) -> Option<(i64, u32)> {
    let t = m.created().ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some((d.as_secs() as i64, d.subsec_nanos()))
}

impl SnapFileId {
    /// The device and inode, as `fsops` compares them.
    pub fn file_id(&self) -> vsnap_steps::fsops::FileId {
        vsnap_steps::fsops::FileId {
            dev: self.dev,
            ino: self.ino,
        }
    }

    /// The identity of the file open as `f`, with its content for a
    /// whole-file snapshot.
    pub fn of(f: &std::fs::File, whole_file: bool) -> std::io::Result<SnapFileId> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        Ok(SnapFileId {
            dev: m.dev(),
            ino: m.ino(),
            content: if whole_file {
                Some((m.len(), vsnap_steps::fsops::fingerprint(f)?))
            } else {
                None
            },
            born: born_of(&m),
        })
    }

    /// Why the file at `path` is not this one (`None`: it is). Links are
    /// not followed.
    pub fn mismatch(&self, path: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let m = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => return Some(format!("cannot stat it: {e}")),
        };
        if m.file_type().is_symlink() {
            let t = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            return Some(format!("it is a symlink (to {t}), not the file vsnap made"));
        }
        if !m.is_file() {
            return Some("it is not a regular file".into());
        }
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Some(format!(
                "it was replaced: inode {} on device {:#x}, vsnap made inode {} on device {:#x}",
                m.ino(),
                m.dev(),
                self.ino,
                self.dev
            ));
        }
        if let (Some(was), Some(now)) = (self.born, born_of(&m)) {
            if was != now {
                return Some(format!(
                    "it was replaced: inode {} was reused by a file made later ({}.{:09} s, vsnap's was made at {}.{:09} s)",
                    m.ino(),
                    now.0,
                    now.1,
                    was.0,
                    was.1
                ));
            }
        }
        if let Some((size, fp)) = self.content {
            if m.len() != size {
                return Some(format!(
                    "its size changed: {} bytes, vsnap made {size}",
                    m.len()
                ));
            }
            let f = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
            {
                Ok(f) => f,
                Err(e) => return Some(format!("cannot open it: {e}")),
            };
            match vsnap_steps::fsops::fingerprint(&f) {
                Ok(x) if x == fp => {}
                Ok(_) => return Some("its content changed since vsnap made it".into()),
                Err(e) => return Some(format!("cannot read it: {e}")),
            }
        }
        None
    }
}

/// Why a snapshot file without a recorded identity (made before vsnap
/// recorded them) is not usable: a symlink or not a regular file.
pub fn plain_file_mismatch(path: &Path) -> Option<String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            let t = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            Some(format!("it is a symlink (to {t}), not the file vsnap made"))
        }
        Ok(m) if !m.is_file() => Some("it is not a regular file".into()),
        Ok(_) => None,
        Err(e) => Some(format!("cannot stat it: {e}")),
    }
}

/// The catalog change that records a snapshot file's identity.
pub fn put_snapshot_id(volume: &Path, name: &str, id: &SnapFileId) -> CatalogOp {
    CatalogOp::Put {
        tree: VOLSNAPIDS.into(),
        key: snap_key(volume, name),
        value: codec::encode(id),
    }
}

/// The recorded identity of every snapshot file of the volume, by name.
pub fn snapshot_ids(
    j: &Journal,
    volume: &Path,
) -> Result<std::collections::BTreeMap<String, SnapFileId>> {
    let prefix = snap_prefix(volume);
    let mut out = std::collections::BTreeMap::new();
    for (key, bytes) in j.catalog_scan(VOLSNAPIDS, &prefix)? {
        let id = decode_snapshot_id(&bytes).map_err(|e| corrupt(VOLSNAPIDS, &key, e))?;
        out.insert(
            String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
            id,
        );
    }
    Ok(out)
}

fn path_key(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}

fn snap_prefix(volume: &Path) -> Vec<u8> {
    let mut k = path_key(volume);
    k.push(0);
    k
}

fn snap_key(volume: &Path, name: &str) -> Vec<u8> {
    let mut k = snap_prefix(volume);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The catalog change that writes a volume's record.
pub fn put_volume(v: &VolumeRec) -> CatalogOp {
    CatalogOp::Put {
        tree: VOLUMES.into(),
        key: path_key(&v.path),
        value: codec::encode(v),
    }
}

/// The catalog change that writes a snapshot's record.
pub fn put_snapshot(s: &VolSnapshot) -> CatalogOp {
    CatalogOp::Put {
        tree: VOLSNAPS.into(),
        key: snap_key(&s.volume, &s.name),
        value: codec::encode(s),
    }
}

/// The catalog change that removes a snapshot's record.
pub fn delete_snapshot(volume: &Path, name: &str) -> CatalogOp {
    CatalogOp::Delete {
        tree: VOLSNAPS.into(),
        key: snap_key(volume, name),
    }
}

/// Record the format the image at `path` has once the plan is done.
pub fn put_volformat(path: &Path, format: Format) -> CatalogOp {
    CatalogOp::Put {
        tree: VOLFORMAT.into(),
        key: path_key(path),
        value: codec::encode(&format),
    }
}

/// Forget the image's format (vsnap no longer manages the image).
pub fn delete_volformat(path: &Path) -> CatalogOp {
    CatalogOp::Delete {
        tree: VOLFORMAT.into(),
        key: path_key(path),
    }
}

/// The identity record goes with its snapshot.
pub fn delete_snapshot_id(volume: &Path, name: &str) -> CatalogOp {
    CatalogOp::Delete {
        tree: VOLSNAPIDS.into(),
        key: snap_key(volume, name),
    }
}

fn corrupt(tree: &str, key: &[u8], e: impl std::fmt::Display) -> EngineError {
    EngineError::Journal(vsnap_journal::JournalError::CorruptCatalog {
        tree: tree.into(),
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        reason: e.to_string(),
    })
}

/// The record at `key` in `tree`, decoded; a record that does not decode
/// is a corrupt catalog.
fn get<T: serde::de::DeserializeOwned>(j: &Journal, tree: &str, key: &[u8]) -> Result<Option<T>> {
    match j.catalog_get(tree, key)? {
        None => Ok(None),
        Some(bytes) => codec::decode(&bytes)
            .map(Some)
            .map_err(|e| corrupt(tree, key, e)),
    }
}

/// Every record in `tree` whose key starts with `prefix`, with its key,
/// decoded; a record that does not decode is a corrupt catalog.
fn scan<T: serde::de::DeserializeOwned>(
    j: &Journal,
    tree: &str,
    prefix: &[u8],
) -> Result<Vec<(Vec<u8>, T)>> {
    let mut out = Vec::new();
    for (key, bytes) in j.catalog_scan(tree, prefix)? {
        let v = codec::decode(&bytes).map_err(|e| corrupt(tree, &key, e))?;
        out.push((key, v));
    }
    Ok(out)
}

/// The record of the volume at `path` (a canonical path), if vsnap has one.
pub fn volume(j: &Journal, path: &Path) -> Result<Option<VolumeRec>> {
    get(j, VOLUMES, &path_key(path))
}

/// Every snapshot of the volume, oldest first.
pub fn snapshots(j: &Journal, volume: &Path) -> Result<Vec<VolSnapshot>> {
    let mut out: Vec<VolSnapshot> = scan(j, VOLSNAPS, &snap_prefix(volume))?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    out.sort_by_key(|s| s.seq);
    Ok(out)
}

/// The image's format as recorded by vsnap, if it was.
pub fn volformat(j: &Journal, path: &Path) -> Result<Option<Format>> {
    get(j, VOLFORMAT, &path_key(path))
}

/// The format of the active image as the catalog knows it: recorded, or
/// (a catalog written before formats were recorded) implied by the
/// volume's snapshots: internal and external snapshots leave a qcow2
/// image, whole-file ones keep the format their files have.
pub fn known_format(j: &Journal, path: &Path) -> Result<Option<Format>> {
    if let Some(f) = volformat(j, path)? {
        return Ok(Some(f));
    }
    Ok(snapshots(j, path)?.first().map(|s| match s.kind {
        SnapKind::Internal | SnapKind::External => Format::Qcow2,
        SnapKind::Reflink | SnapKind::Copy => s.format,
    }))
}

/// This state directory's random id (made and stored the first time it
/// is asked for).
pub fn owner_id(j: &Journal) -> Result<String> {
    if let Some(id) = owner_id_if_any(j)? {
        return Ok(id);
    }
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| {
            EngineError::io(format!(
                "cannot read /dev/urandom for the state directory's id: {e}"
            ))
        })?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    j.catalog_apply(&[CatalogOp::Put {
        tree: META.into(),
        key: OWNER_ID.to_vec(),
        value: codec::encode(&id),
    }])?;
    Ok(id)
}

/// This state directory's id if it has one yet (read-only).
pub fn owner_id_if_any(j: &Journal) -> Result<Option<String>> {
    get(j, META, OWNER_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file deleted and another made under its name: ext4 gives the new
    /// file the inode number just freed, and only the birth time tells the
    /// two apart. (Seen as a flaky test: a restored file was taken for
    /// vsnap's.)
    #[test]
    fn a_reused_inode_number_is_not_the_file_vsnap_made() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let a = d.path().join("a.qcow2");
        std::fs::write(&a, b"vsnap's").unwrap();
        let id = SnapFileId::of(&std::fs::File::open(&a).unwrap(), false).unwrap();
        assert!(
            id.born.is_some(),
            "/var/tmp's filesystem records birth times"
        );
        assert_eq!(id.mismatch(&a), None);
        std::fs::remove_file(&a).unwrap();
        // Make files until one gets the freed inode number (ext4: the
        // first one).
        let mut reused = false;
        for i in 0..64 {
            let tmp = d.path().join(format!("new{i}"));
            std::fs::write(&tmp, b"someone else's").unwrap();
            use std::os::unix::fs::MetadataExt;
            if std::fs::metadata(&tmp).unwrap().ino() == id.ino {
                std::fs::rename(&tmp, &a).unwrap();
                reused = true;
                break;
            }
        }
        assert!(
            reused,
            "the filesystem under /var/tmp did not reuse the inode number"
        );
        let why = id
            .mismatch(&a)
            .expect("a new file under the old inode number is refused");
        assert!(why.contains("reused"), "{why}");
    }

    /// Identities recorded before the birth time was kept still decode
    /// (without one: compared by device and inode as before).
    #[test]
    fn identities_recorded_without_a_birth_time_still_read() {
        #[derive(Serialize)]
        struct V1 {
            dev: u64,
            ino: u64,
            content: Option<(u64, u64)>,
        }
        let old = codec::encode(&V1 {
            dev: 7,
            ino: 9,
            content: Some((1, 2)),
        });
        let id = decode_snapshot_id(&old).unwrap();
        assert_eq!(
            (id.dev, id.ino, id.content, id.born),
            (7, 9, Some((1, 2)), None)
        );
        let new = SnapFileId {
            born: Some((5, 6)),
            ..id
        };
        assert_eq!(decode_snapshot_id(&codec::encode(&new)).unwrap(), new);
    }
}
