//! The catalog records of domains and domain snapshots, and how they are
//! stored (values encoded through the journal's codec; older layouts are
//! still read).
//!
//! Trees:
//! * `domains`  — key: the domain's name — [`DomainRec`]
//! * `domsnaps` — key: domain name, NUL, snapshot name — [`DomSnapshot`]
//! * `qemuviews` — key: the domain's name — [`QemuView`] (a cache)
//!
//! This module depends on nothing else of the engine's domain layer:
//! `domain.rs` and `domsnap/` use it, never the other way.

use crate::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vsnap_journal::{codec, CatalogOp, Journal};
use vsnap_steps::launch::LaunchSpec;
use vsnap_steps::Format;

/// The catalog tree of domains (`DomainRec`, keyed by name).
pub const DOMAINS: &str = "domains";

/// `<disk snapshot='...'>` in `<domain>`: the disk's default in a snapshot
/// that does not name it (libvirt's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotDefault {
    /// Left out of snapshots unless a request names it.
    No,
    /// An internal snapshot (qcow2) unless the request says otherwise.
    Internal,
    /// An external snapshot (a new overlay) unless the request says otherwise.
    External,
    /// libvirt leaves the disk to the user mid-snapshot; vsnap cannot, so
    /// a snapshot that includes it by default is refused.
    Manual,
}

impl SnapshotDefault {
    /// The default for libvirt's word (`no`, `internal`, `external`, `manual`).
    pub fn parse(s: &str) -> Option<SnapshotDefault> {
        Some(match s {
            "no" => SnapshotDefault::No,
            "internal" => SnapshotDefault::Internal,
            "external" => SnapshotDefault::External,
            "manual" => SnapshotDefault::Manual,
            _ => return None,
        })
    }

    /// libvirt's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotDefault::No => "no",
            SnapshotDefault::Internal => "internal",
            SnapshotDefault::External => "external",
            SnapshotDefault::Manual => "manual",
        }
    }
}

/// `<disk device='...'>` of a disk vsnap records (cdroms and read-only
/// floppies are left out: read-only media).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskDevice {
    /// A disk.
    Disk,
    /// A writable floppy: snapshotted like a disk.
    Floppy,
    /// A SCSI LUN passed through: never snapshotted.
    Lun,
}

impl DiskDevice {
    /// libvirt's word: `disk`, `floppy`, `lun`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskDevice::Disk => "disk",
            DiskDevice::Floppy => "floppy",
            DiskDevice::Lun => "lun",
        }
    }
}

/// Where a disk's data is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskSource {
    /// `<disk type='file'>`: an image file.
    File(#[serde(with = "vsnap_steps::pathser")] PathBuf),
    /// `<disk type='block'>` (or `<source dev=...>`): a block device.
    Block(#[serde(with = "vsnap_steps::pathser")] PathBuf),
    /// A disk vsnap cannot snapshot (network, storage-pool volume, NVMe,
    /// vhost-user, directory, SCSI LUN): recorded so that a snapshot that
    /// includes it is refused by name, and written back as it was given.
    Unsupported {
        /// Why, for the operator (`a network disk (rbd pool/img on mon1:6789)`).
        why: String,
        /// The `<disk>` element as given (written back by `dumpxml`).
        xml: String,
    },
}

impl DiskSource {
    /// The local image (file or block device), if vsnap can snapshot it.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DiskSource::File(p) | DiskSource::Block(p) => Some(p),
            DiskSource::Unsupported { .. } => None,
        }
    }
}

/// One disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomDisk {
    /// `vda`, or the name QEMU reports (drive id, or device id with `-blockdev`).
    pub target: String,
    /// The active image now (after an external snapshot: the overlay), or
    /// why vsnap cannot snapshot this disk.
    pub source: DiskSource,
    /// The driver's format (for an unsupported disk: as given, else raw;
    /// never used).
    pub format: Format,
    /// `<readonly/>`: left out of snapshots by default.
    pub readonly: bool,
    /// `<shareable/>`: left out of snapshots by default.
    pub shareable: bool,
    /// What the guest sees (`<disk device=...>`).
    pub device: DiskDevice,
    /// `<disk snapshot=...>`: the default in a snapshot (None: vsnap's own
    /// default, see `plan_domain_snapshot`).
    pub snapshot: Option<SnapshotDefault>,
}

impl DomDisk {
    /// The local image (file or block device); `None` for a disk vsnap
    /// cannot snapshot.
    pub fn image(&self) -> Option<&Path> {
        self.source.path()
    }

    /// Why vsnap cannot snapshot this disk, if it cannot.
    pub fn unsupported(&self) -> Option<&str> {
        match &self.source {
            DiskSource::Unsupported { why, .. } => Some(why),
            _ => None,
        }
    }
}

/// A domain as the catalog keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRec {
    /// The domain's name (`<name>`), unique in the state directory.
    pub name: String,
    /// `<uuid>`, if given.
    pub uuid: Option<String>,
    /// Its disks, in the document's order.
    pub disks: Vec<DomDisk>,
    /// The QEMU monitor socket (QMP) of the running guest, if known.
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub qmp: Option<PathBuf>,
    /// The guest agent's socket, if known.
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub agent: Option<PathBuf>,
    /// The current snapshot.
    pub current: Option<String>,
    /// Orders the domain's snapshots by creation (the next one's `seq`).
    pub next_seq: u64,
    /// `<domain type=...>` as given (`kvm`, `qemu`); written back by
    /// `dumpxml` (`kvm` when none was given). Appended: records written
    /// before it existed are read as `DomainRecV1`.
    pub virt_type: Option<String>,
    /// How to start the domain's QEMU (`domain attach` records it from the
    /// running process; `domain define --launch` takes it), if known.
    /// Appended: records written before it existed are read as
    /// `DomainRecV2`.
    pub launch: Option<LaunchSpec>,
}

/// The layout of [`DomDisk`] before `source` was typed and `device` and
/// `snapshot` were added (still read).
#[derive(Deserialize)]
struct DomDiskV1 {
    target: String,
    #[serde(with = "vsnap_steps::pathser")]
    source: PathBuf,
    format: Format,
    readonly: bool,
    shareable: bool,
}

/// The layout of [`DomainRec`] before `virt_type` (and [`DomDiskV1`]).
#[derive(Deserialize)]
struct DomainRecV1 {
    name: String,
    uuid: Option<String>,
    disks: Vec<DomDiskV1>,
    #[serde(with = "vsnap_steps::pathser::opt")]
    qmp: Option<PathBuf>,
    #[serde(with = "vsnap_steps::pathser::opt")]
    agent: Option<PathBuf>,
    current: Option<String>,
    next_seq: u64,
}

/// The layout of [`DomainRec`] before `launch` (still read).
#[derive(Deserialize)]
struct DomainRecV2 {
    name: String,
    uuid: Option<String>,
    disks: Vec<DomDisk>,
    #[serde(with = "vsnap_steps::pathser::opt")]
    qmp: Option<PathBuf>,
    #[serde(with = "vsnap_steps::pathser::opt")]
    agent: Option<PathBuf>,
    current: Option<String>,
    next_seq: u64,
    virt_type: Option<String>,
}

/// A catalog record of a domain, in today's layout or an older one.
pub fn decode_domain(v: &[u8]) -> std::result::Result<DomainRec, codec::CodecError> {
    codec::decode::<DomainRec>(v).or_else(|e| {
        if let Ok(o) = codec::decode::<DomainRecV2>(v) {
            return Ok(DomainRec {
                name: o.name,
                uuid: o.uuid,
                disks: o.disks,
                qmp: o.qmp,
                agent: o.agent,
                current: o.current,
                next_seq: o.next_seq,
                virt_type: o.virt_type,
                launch: None,
            });
        }
        let o: DomainRecV1 = codec::decode(v).map_err(|_| e)?;
        Ok(DomainRec {
            name: o.name,
            uuid: o.uuid,
            disks: o
                .disks
                .into_iter()
                .map(|x| {
                    // The old layout did not say; its dumpxml asked the
                    // file system, and so does this.
                    use std::os::unix::fs::FileTypeExt;
                    let block =
                        std::fs::metadata(&x.source).is_ok_and(|m| m.file_type().is_block_device());
                    DomDisk {
                        target: x.target,
                        source: if block {
                            DiskSource::Block(x.source)
                        } else {
                            DiskSource::File(x.source)
                        },
                        format: x.format,
                        readonly: x.readonly,
                        shareable: x.shareable,
                        device: DiskDevice::Disk,
                        snapshot: None,
                    }
                })
                .collect(),
            qmp: o.qmp,
            agent: o.agent,
            current: o.current,
            next_seq: o.next_seq,
            virt_type: None,
            launch: None,
        })
    })
}

impl DomainRec {
    /// The disk named by its target (`vda`) or its image's path.
    pub fn disk(&self, target_or_path: &str) -> Option<&DomDisk> {
        self.disks
            .iter()
            .find(|d| d.target == target_or_path || d.image() == Some(Path::new(target_or_path)))
    }
}

/// The catalog change that writes a domain's record.
pub fn put_domain(d: &DomainRec) -> CatalogOp {
    CatalogOp::Put {
        tree: DOMAINS.into(),
        key: d.name.as_bytes().to_vec(),
        value: codec::encode(d),
    }
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Journal(vsnap_journal::JournalError::CorruptCatalog {
        tree: DOMAINS.into(),
        key: key.into(),
        reason: e.to_string(),
    })
}

/// The catalog change that removes a domain's record.
pub fn delete_domain_op(name: &str) -> CatalogOp {
    CatalogOp::Delete {
        tree: DOMAINS.into(),
        key: name.as_bytes().to_vec(),
    }
}

/// The domain named `name`, if the catalog has it.
pub fn domain(j: &Journal, name: &str) -> Result<Option<DomainRec>> {
    match j.catalog_get(DOMAINS, name.as_bytes())? {
        None => Ok(None),
        Some(b) => decode_domain(&b).map(Some).map_err(|e| corrupt(name, e)),
    }
}

/// Every domain in the catalog, by name.
pub fn domains(j: &Journal) -> Result<Vec<DomainRec>> {
    let mut out = Vec::new();
    for (k, v) in j.catalog_scan(DOMAINS, b"")? {
        out.push(decode_domain(&v).map_err(|e| corrupt(&String::from_utf8_lossy(&k), e))?);
    }
    Ok(out)
}

/// The catalog tree of `<domain>` documents as `domain define` was given
/// them (keyed by domain name): what vsnap does not act on (`<address>`,
/// `<boot>`, `<iotune>`, other devices, metadata) is kept here and written
/// back by `dumpxml` with each disk's source brought up to date. A domain
/// attached to a running QEMU has none.
pub const DOMDOCS: &str = "domdocs";

/// The catalog change that keeps a domain's document as given.
pub fn put_domain_doc(name: &str, xml: &str) -> CatalogOp {
    CatalogOp::Put {
        tree: DOMDOCS.into(),
        key: name.as_bytes().to_vec(),
        value: codec::encode(&xml.to_string()),
    }
}

/// The catalog change that forgets a domain's document.
pub fn delete_domain_doc_op(name: &str) -> CatalogOp {
    CatalogOp::Delete {
        tree: DOMDOCS.into(),
        key: name.as_bytes().to_vec(),
    }
}

/// A domain's document as `domain define` was given it, if it was defined
/// from XML.
pub fn domain_doc(j: &Journal, name: &str) -> Result<Option<String>> {
    match j.catalog_get(DOMDOCS, name.as_bytes())? {
        None => Ok(None),
        Some(b) => codec::decode::<String>(&b).map(Some).map_err(|e| {
            EngineError::Journal(vsnap_journal::JournalError::CorruptCatalog {
                tree: DOMDOCS.into(),
                key: name.into(),
                reason: e.to_string(),
            })
        }),
    }
}

/// The catalog tree of domain snapshots (`DomSnapshot`, keyed by domain and
/// name).
pub const DOMSNAPS: &str = "domsnaps";

/// What a snapshot did with one disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskMode {
    /// Left out of the snapshot.
    No,
    /// An internal snapshot inside the qcow2 image.
    Internal,
    /// A new overlay took the disk's place; the old image holds the state.
    External,
    /// A whole-file copy-on-write clone (FICLONE) of a raw image, taken
    /// outside QEMU while the guest is paused; the image stays the active
    /// disk. (Appended: the catalog stores this enum with bincode.)
    Reflink,
}

impl DiskMode {
    /// libvirt's word (`no`, `internal`, `external`), or `reflink`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::No => "no",
            DiskMode::Internal => "internal",
            DiskMode::External => "external",
            DiskMode::Reflink => "reflink",
        }
    }
}

/// One disk of a domain snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomSnapDisk {
    /// The disk's target (`vda`).
    pub target: String,
    /// What the snapshot did with it.
    pub mode: DiskMode,
    /// Internal: the image holding the snapshot. External: the frozen image
    /// (the disk's source before the snapshot), which holds its state.
    /// Reflink: the clone.
    #[serde(with = "vsnap_steps::pathser")]
    pub state_file: PathBuf,
    /// External: the overlay that became the disk's active image.
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub overlay: Option<PathBuf>,
}

/// A domain snapshot as the catalog keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomSnapshot {
    /// The snapshot's name, unique per domain.
    pub name: String,
    /// The domain's name.
    pub domain: String,
    /// Free text given when it was made.
    pub description: Option<String>,
    /// When it was made, in seconds since the epoch.
    pub creation_time: i64,
    /// The snapshot that was current when it was made.
    pub parent: Option<String>,
    /// Its place in the order of creation.
    pub seq: u64,
    /// libvirt's: `running`, `paused`, `shutoff`, `disk-snapshot`.
    /// (Records written while this was a string are read as
    /// `DomSnapshotV2`.)
    pub state: DomSnapState,
    /// Guest memory kept inside the disks (`snapshot-save`).
    pub memory_internal: bool,
    /// The guest's filesystems were frozen through its agent around the switch.
    pub quiesced: bool,
    /// Every disk of the domain, and what the snapshot did with it.
    pub disks: Vec<DomSnapDisk>,
    /// The domain as it was when the snapshot was taken.
    pub domain_xml: String,
    /// `--memory external:PATH`: the file holding the guest's memory state
    /// (QEMU's migration stream). Appended: records written before it
    /// existed are read as `DomSnapshotV1`.
    #[serde(with = "vsnap_steps::pathser::opt")]
    pub memory_file: Option<PathBuf>,
}

/// The state a domain snapshot records (libvirt's `<state>`): the
/// guest's when its memory was kept, else `disk-snapshot`. Written as
/// libvirt writes it (`running`, `paused`, `shutoff`, `disk-snapshot`) in
/// XML, JSON and `Display` alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomSnapState {
    /// The guest ran; its memory was kept.
    Running,
    /// The guest was paused; its memory was kept.
    Paused,
    /// The guest was shut off (an offline snapshot).
    Shutoff,
    /// A running or paused guest's disks only, no memory.
    DiskSnapshot,
}

impl DomSnapState {
    /// libvirt's word: `running`, `paused`, `shutoff`, `disk-snapshot`.
    pub fn as_str(self) -> &'static str {
        match self {
            DomSnapState::Running => "running",
            DomSnapState::Paused => "paused",
            DomSnapState::Shutoff => "shutoff",
            DomSnapState::DiskSnapshot => "disk-snapshot",
        }
    }

    /// The state for libvirt's word; `None` for any other.
    pub fn parse(s: &str) -> Option<DomSnapState> {
        [
            DomSnapState::Running,
            DomSnapState::Paused,
            DomSnapState::Shutoff,
            DomSnapState::DiskSnapshot,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for DomSnapState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The layout of [`DomSnapshot`] while `state` was a string (still read).
#[derive(Deserialize)]
struct DomSnapshotV2 {
    name: String,
    domain: String,
    description: Option<String>,
    creation_time: i64,
    parent: Option<String>,
    seq: u64,
    state: String,
    memory_internal: bool,
    quiesced: bool,
    disks: Vec<DomSnapDisk>,
    domain_xml: String,
    #[serde(with = "vsnap_steps::pathser::opt")]
    memory_file: Option<PathBuf>,
}

/// The layout of [`DomSnapshot`] before `memory_file` (still read).
#[derive(Deserialize)]
struct DomSnapshotV1 {
    name: String,
    domain: String,
    description: Option<String>,
    creation_time: i64,
    parent: Option<String>,
    seq: u64,
    state: String,
    memory_internal: bool,
    quiesced: bool,
    disks: Vec<DomSnapDisk>,
    domain_xml: String,
}

pub(crate) fn decode_snapshot(v: &[u8]) -> std::result::Result<DomSnapshot, codec::CodecError> {
    // The layouts cannot be mistaken for one another: where the current
    // one has the state's variant index (0-3), the older ones have the
    // length of a word of at least 6 bytes.
    let state = |s: String| {
        DomSnapState::parse(&s)
            .ok_or_else(|| codec::CodecError::Payload(format!("unknown snapshot state {s:?}")))
    };
    codec::decode::<DomSnapshot>(v).or_else(|e| {
        if let Ok(o) = codec::decode::<DomSnapshotV2>(v) {
            return Ok(DomSnapshot {
                name: o.name,
                domain: o.domain,
                description: o.description,
                creation_time: o.creation_time,
                parent: o.parent,
                seq: o.seq,
                state: state(o.state)?,
                memory_internal: o.memory_internal,
                quiesced: o.quiesced,
                disks: o.disks,
                domain_xml: o.domain_xml,
                memory_file: o.memory_file,
            });
        }
        let o: DomSnapshotV1 = codec::decode(v).map_err(|_| e)?;
        Ok(DomSnapshot {
            name: o.name,
            domain: o.domain,
            description: o.description,
            creation_time: o.creation_time,
            parent: o.parent,
            seq: o.seq,
            state: state(o.state)?,
            memory_internal: o.memory_internal,
            quiesced: o.quiesced,
            disks: o.disks,
            domain_xml: o.domain_xml,
            memory_file: None,
        })
    })
}

fn key(domain: &str, name: &str) -> Vec<u8> {
    let mut k = domain.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The catalog change that writes a domain snapshot's record.
pub fn put_snapshot_op(s: &DomSnapshot) -> CatalogOp {
    CatalogOp::Put {
        tree: DOMSNAPS.into(),
        key: key(&s.domain, &s.name),
        value: codec::encode(s),
    }
}

/// The catalog change that removes a domain snapshot's record.
pub fn delete_snapshot_op(domain: &str, name: &str) -> CatalogOp {
    CatalogOp::Delete {
        tree: DOMSNAPS.into(),
        key: key(domain, name),
    }
}

/// Every snapshot of a domain, oldest first.
pub fn snapshots(j: &Journal, domain: &str) -> Result<Vec<DomSnapshot>> {
    let mut prefix = domain.as_bytes().to_vec();
    prefix.push(0);
    let mut out: Vec<DomSnapshot> = Vec::new();
    for (k, v) in j.catalog_scan(DOMSNAPS, &prefix)? {
        out.push(decode_snapshot(&v).map_err(|e| {
            EngineError::Journal(vsnap_journal::JournalError::CorruptCatalog {
                tree: DOMSNAPS.into(),
                key: String::from_utf8_lossy(&k).replace('\0', "/"),
                reason: e.to_string(),
            })
        })?);
    }
    out.sort_by_key(|s| s.seq);
    Ok(out)
}

/// The catalog tree of what vsnap last saw of each running domain's QEMU
/// ([`QemuView`], keyed by domain name): a cache, never the truth.
pub const QEMU_VIEWS: &str = "qemuviews";

/// What vsnap last saw of a domain's QEMU: which process
/// ([`vsnap_steps::qmp::QemuInstance`]), and for each
/// disk image, the guest device and the node that run it. Written by
/// `domain attach` (from its `query-block`) and by every live snapshot
/// (its new top nodes, in the same catalog write as its records).
///
/// A plan trusts it only where QEMU confirms it: the same process
/// (peer pid and start time, vCPU thread) and, per disk, the device's node now (`qom-get
/// drive`, one small answer per disk) the node recorded. A node's name
/// names one node, on one file, for as long as it exists in that
/// process; anything else and the plan asks `query-block`, as before.
/// Wrong or missing, it costs a query, never a wrong answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QemuView {
    /// The monitor peer's process id (QEMU's).
    pub pid: u32,
    /// Its start time (clock ticks since boot): a reused pid is another.
    pub start: u64,
    /// QEMU's first vCPU thread (a QEMU started anew has another).
    pub vcpu_thread: u64,
    /// The disks it ran, as seen.
    pub disks: Vec<QemuViewDisk>,
}

/// One disk in a [`QemuView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QemuViewDisk {
    /// The top image's real path (links resolved).
    #[serde(with = "vsnap_steps::pathser")]
    pub file: PathBuf,
    /// The device's `query-block` key (`device`, else `qdev`).
    pub key: String,
    /// The guest device's QOM path (`qdev`), asked for its node.
    pub qdev: String,
    /// The device's top node.
    pub node: String,
    /// The number of images in its chain, the top included.
    pub depth: usize,
}

impl QemuView {
    /// Whether this view was taken of QEMU process `inst`.
    pub(crate) fn of(&self, inst: &vsnap_steps::qmp::QemuInstance) -> bool {
        (self.pid, self.start, self.vcpu_thread) == (inst.pid, inst.start, inst.vcpu_thread)
    }

    /// The view of QEMU process `inst` from its `query-block` answer:
    /// every device with a medium whose top image is a plain file path.
    pub(crate) fn from_blocks(
        inst: vsnap_steps::qmp::QemuInstance,
        blocks: &[vsnap_steps::qmp::BlockDevice],
    ) -> QemuView {
        let disks = blocks
            .iter()
            .filter_map(|b| {
                let ins = b.inserted.as_ref()?;
                let file = Path::new(&ins.file);
                if !file.is_absolute() {
                    return None; // `json:...`, a protocol: never matched
                }
                Some(QemuViewDisk {
                    file: std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()),
                    key: b.key.clone(),
                    qdev: b.qdev.clone(),
                    node: ins.node_name.clone(),
                    depth: ins.chain.len(),
                })
            })
            .collect();
        QemuView {
            pid: inst.pid,
            start: inst.start,
            vcpu_thread: inst.vcpu_thread,
            disks,
        }
    }
}

/// The catalog change that writes domain `domain`'s [`QemuView`].
pub(crate) fn put_qemu_view(domain: &str, v: &QemuView) -> CatalogOp {
    CatalogOp::Put {
        tree: QEMU_VIEWS.into(),
        key: domain.as_bytes().to_vec(),
        value: codec::encode(v),
    }
}

/// The catalog change that forgets domain `domain`'s [`QemuView`].
pub(crate) fn delete_qemu_view(domain: &str) -> CatalogOp {
    CatalogOp::Delete {
        tree: QEMU_VIEWS.into(),
        key: domain.as_bytes().to_vec(),
    }
}

/// Domain `domain`'s [`QemuView`]; `None` when there is none or it does
/// not decode (a cache: the plan then asks QEMU).
pub(crate) fn qemu_view(j: &Journal, domain: &str) -> Result<Option<QemuView>> {
    Ok(j.catalog_get(QEMU_VIEWS, domain.as_bytes())?
        .and_then(|b| codec::decode(&b).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_domains_written_before_typed_disks() {
        #[derive(Serialize)]
        struct OldDisk {
            target: String,
            source: String,
            format: Format,
            readonly: bool,
            shareable: bool,
        }
        #[derive(Serialize)]
        struct Old {
            name: String,
            uuid: Option<String>,
            disks: Vec<OldDisk>,
            qmp: Option<String>,
            agent: Option<String>,
            current: Option<String>,
            next_seq: u64,
        }
        let old = Old {
            name: "vm1".into(),
            uuid: Some("u".into()),
            disks: vec![OldDisk {
                target: "vda".into(),
                source: "/vm/a.qcow2".into(),
                format: Format::Qcow2,
                readonly: false,
                shareable: true,
            }],
            qmp: Some("/run/q".into()),
            agent: None,
            current: Some("s1".into()),
            next_seq: 3,
        };
        let d = decode_domain(&codec::encode(&old)).unwrap();
        assert_eq!(
            d,
            DomainRec {
                name: "vm1".into(),
                uuid: Some("u".into()),
                disks: vec![DomDisk {
                    target: "vda".into(),
                    source: DiskSource::File("/vm/a.qcow2".into()),
                    format: Format::Qcow2,
                    readonly: false,
                    shareable: true,
                    device: DiskDevice::Disk,
                    snapshot: None,
                }],
                qmp: Some("/run/q".into()),
                agent: None,
                current: Some("s1".into()),
                next_seq: 3,
                virt_type: None,
                launch: None,
            }
        );
        // And today's layout reads as itself.
        assert_eq!(decode_domain(&codec::encode(&d)).unwrap(), d);
    }

    /// A record written before `launch` (today's layout less the last
    /// field) reads with no launch spec; today's reads as itself.
    #[test]
    fn reads_domains_written_before_the_launch_spec() {
        #[derive(Serialize)]
        struct V2 {
            name: String,
            uuid: Option<String>,
            disks: Vec<DomDisk>,
            #[serde(with = "vsnap_steps::pathser::opt")]
            qmp: Option<PathBuf>,
            #[serde(with = "vsnap_steps::pathser::opt")]
            agent: Option<PathBuf>,
            current: Option<String>,
            next_seq: u64,
            virt_type: Option<String>,
        }
        let disk = DomDisk {
            target: "vda".into(),
            source: DiskSource::Block("/dev/vg/a".into()),
            format: Format::Raw,
            readonly: false,
            shareable: false,
            device: DiskDevice::Disk,
            snapshot: Some(SnapshotDefault::External),
        };
        let old = V2 {
            name: "vm1".into(),
            uuid: None,
            disks: vec![disk.clone()],
            qmp: Some("/run/q".into()),
            agent: Some("/run/a".into()),
            current: Some("s2".into()),
            next_seq: 4,
            virt_type: Some("qemu".into()),
        };
        let d = decode_domain(&codec::encode(&old)).unwrap();
        assert_eq!(
            d,
            DomainRec {
                name: "vm1".into(),
                uuid: None,
                disks: vec![disk],
                qmp: Some("/run/q".into()),
                agent: Some("/run/a".into()),
                current: Some("s2".into()),
                next_seq: 4,
                virt_type: Some("qemu".into()),
                launch: None,
            }
        );
        let mut new = d.clone();
        new.launch = Some(LaunchSpec {
            argv: vec![
                "qemu-system-x86_64".into(),
                "-drive".into(),
                "file=/dev/vg/a".into(),
            ],
            cwd: "/".into(),
            disks: vec![vsnap_steps::launch::BoundDisk {
                target: "vda".into(),
                path: "/dev/vg/a".into(),
            }],
        });
        assert_eq!(decode_domain(&codec::encode(&new)).unwrap(), new);
        assert_eq!(decode_domain(&codec::encode(&d)).unwrap(), d);
    }

    #[test]
    fn reads_snapshots_written_before_memory_file() {
        #[derive(Serialize)]
        struct Old {
            name: String,
            domain: String,
            description: Option<String>,
            creation_time: i64,
            parent: Option<String>,
            seq: u64,
            state: String,
            memory_internal: bool,
            quiesced: bool,
            disks: Vec<DomSnapDisk>,
            domain_xml: String,
        }
        let old = Old {
            name: "s1".into(),
            domain: "d".into(),
            description: None,
            creation_time: 7,
            parent: None,
            seq: 3,
            state: "disk-snapshot".into(),
            memory_internal: false,
            quiesced: true,
            disks: vec![],
            domain_xml: "<domain/>".into(),
        };
        let s = decode_snapshot(&codec::encode(&old)).unwrap();
        assert_eq!((s.name.as_str(), s.seq, s.quiesced), ("s1", 3, true));
        assert_eq!(s.memory_file, None);
        assert_eq!(s.state, DomSnapState::DiskSnapshot);
        let mut new = s.clone();
        new.memory_file = Some("/vm/m.mem".into());
        assert_eq!(decode_snapshot(&codec::encode(&new)).unwrap(), new);
    }

    /// Records written while `state` was a string (`DomSnapshotV2`) read
    /// with each of libvirt's words; an unknown word is an error, not a
    /// default; a current record is not mistaken for an old one.
    #[test]
    fn reads_snapshots_written_with_a_string_state() {
        #[derive(Serialize)]
        struct V2 {
            name: String,
            domain: String,
            description: Option<String>,
            creation_time: i64,
            parent: Option<String>,
            seq: u64,
            state: String,
            memory_internal: bool,
            quiesced: bool,
            disks: Vec<DomSnapDisk>,
            domain_xml: String,
            #[serde(with = "vsnap_steps::pathser::opt")]
            memory_file: Option<PathBuf>,
        }
        let old = |state: &str| V2 {
            name: "s1".into(),
            domain: "d".into(),
            description: Some("x".into()),
            creation_time: 7,
            parent: Some("s0".into()),
            seq: 3,
            state: state.into(),
            memory_internal: true,
            quiesced: false,
            disks: vec![DomSnapDisk {
                target: "vda".into(),
                mode: DiskMode::External,
                state_file: "/vm/a.qcow2".into(),
                overlay: Some("/vm/a.s1.qcow2".into()),
            }],
            domain_xml: "<domain/>".into(),
            memory_file: Some("/vm/m.mem".into()),
        };
        for (word, state) in [
            ("running", DomSnapState::Running),
            ("paused", DomSnapState::Paused),
            ("shutoff", DomSnapState::Shutoff),
            ("disk-snapshot", DomSnapState::DiskSnapshot),
        ] {
            let s = decode_snapshot(&codec::encode(&old(word))).unwrap();
            assert_eq!(s.state, state);
            assert_eq!(s.state.to_string(), word);
            assert_eq!(serde_json::to_value(s.state).unwrap(), word);
            assert_eq!(DomSnapState::parse(word), Some(state));
            assert_eq!(
                (
                    s.name.as_str(),
                    s.parent.as_deref(),
                    s.seq,
                    s.memory_internal
                ),
                ("s1", Some("s0"), 3, true)
            );
            assert_eq!(s.memory_file.as_deref(), Some(Path::new("/vm/m.mem")));
            assert_eq!(
                s.disks[0].overlay.as_deref(),
                Some(Path::new("/vm/a.s1.qcow2"))
            );
            // Written again, it is the current layout, and reads back equal.
            assert_eq!(decode_snapshot(&codec::encode(&s)).unwrap(), s);
        }
        let e = decode_snapshot(&codec::encode(&old("frozen"))).unwrap_err();
        assert!(e.to_string().contains("frozen"), "{e}");
    }
}
