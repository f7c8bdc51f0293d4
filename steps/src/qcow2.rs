//! Native, read-only view of a qcow2 header and its internal-snapshot
//! table: what vsnap asks `qemu-img info` for on its hot paths (the
//! virtual size, the snapshot names, the backing file), without starting a
//! `qemu-img` process (7-12 ms each, most of a snapshot's cost).
//!
//! The layout is qcow2's, as QEMU's `docs/interop/qcow2.txt` gives it: a
//! big-endian header (version 2 or 3), header extensions (the backing
//! format is extension `0xE2792ACA`), and the snapshot table at
//! `snapshots_offset`, `nb_snapshots` entries each padded to 8 bytes.
//!
//! Anything this reader does not understand (an encrypted image, an
//! external data file, a header or table out of bounds) is an
//! [`Unsupported`] error; callers then ask `qemu-img` (see
//! [`crate::qemu_img::image_info`]). It never writes.
//!
//! Also here: whether a running QEMU holds the image, from QEMU's own
//! image locks ([`qemu_holds`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// What the reader found: the fields vsnap's plans use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub virtual_size: u64,
    /// The backing file name exactly as stored (relative names are
    /// relative to the image's directory).
    pub backing: Option<String>,
    /// The backing format extension, when present.
    pub backing_format: Option<String>,
    /// Internal snapshot names, in table order.
    pub snapshots: Vec<String>,
    /// Internal snapshot IDs (qcow2's `id_str`), in table order: the
    /// entry of `snapshots[i]` has ID `snapshot_ids[i]`.
    pub snapshot_ids: Vec<String>,
    /// Incompatible feature bits (0 for version 2): bit 0 dirty, bit 1
    /// corrupt.
    pub incompatible: u64,
    /// Compatible feature bits (0 for version 2): bit 0 lazy refcounts.
    pub compatible: u64,
    /// Where the metadata tables are, as the header says (sanity-checked
    /// by [`damage`], not by [`read`]).
    pub tables: Tables,
}

/// The header's pointers to the active L1 table and the refcount table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    pub cluster_bits: u32,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
}

/// The image is not one this reader handles; ask qemu-img.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

const MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts,
/// image not closed cleanly).
pub const INCOMPAT_DIRTY: u64 = 1;
/// Incompatible feature bit 1: QEMU found the metadata corrupt and marked
/// the image so (it then opens it read-only only).
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// QEMU's own limits (block/qcow2.h): beyond them QEMU refuses the image.
const MAX_SNAPSHOTS: u32 = 65_536;
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
const MAX_BACKING_NAME: u32 = 1023;
const MAX_HEADER_AREA: u64 = 2 << 20;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// `len` bytes at `off`, all of them (a short file is [`Unsupported`]).
fn read_at(f: &File, off: u64, len: u64, what: &str) -> Result<Vec<u8>, Unsupported> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off).map_err(|e| {
        Unsupported(format!(
            "cannot read the {what} ({len} bytes at {off}): {e}"
        ))
    })?;
    Ok(buf)
}

/// Read the header and snapshot table of the qcow2 image at `path`.
pub fn read(path: &Path) -> Result<Header, Unsupported> {
    let f = File::open(path).map_err(|e| Unsupported(format!("cannot open: {e}")))?;
    read_file(&f)
}

/// [`read`] on an open file.
pub fn read_file(f: &File) -> Result<Header, Unsupported> {
    let h = read_at(f, 0, 72, "header")?;
    if &h[0..4] != MAGIC {
        return Err(Unsupported("not a qcow2 image (no QFI\\xfb magic)".into()));
    }
    let version = be32(&h, 4);
    let backing_off = be64(&h, 8);
    let backing_len = be32(&h, 16);
    let cluster_bits = be32(&h, 20);
    let virtual_size = be64(&h, 24);
    let crypt = be32(&h, 32);
    let nb_snapshots = be32(&h, 60);
    let snapshots_off = be64(&h, 64);
    if !(2..=3).contains(&version) {
        return Err(Unsupported(format!("qcow2 version {version}")));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(Unsupported(format!("cluster_bits {cluster_bits}")));
    }
    if crypt != 0 {
        return Err(Unsupported("encrypted image".into()));
    }
    let (header_len, incompat, compat, refcount_order) = if version == 3 {
        let v3 = read_at(f, 72, 32, "version 3 header")?;
        (
            u64::from(be32(&v3, 28)),
            be64(&v3, 0),
            be64(&v3, 8),
            be32(&v3, 24),
        )
    } else {
        (72, 0, 0, 4)
    };
    let tables = Tables {
        cluster_bits,
        l1_size: be32(&h, 36),
        l1_offset: be64(&h, 40),
        refcount_table_offset: be64(&h, 48),
        refcount_table_clusters: be32(&h, 56),
        refcount_order,
    };
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(Unsupported("external data file".into()));
    }
    let cluster = 1u64 << cluster_bits;
    if header_len < 72 || !header_len.is_multiple_of(8) || header_len > cluster {
        return Err(Unsupported(format!("header length {header_len}")));
    }

    // Header extensions: from the end of the header to the end of the
    // first cluster, until the end marker.
    let mut backing_format = None;
    let area = cluster.min(MAX_HEADER_AREA);
    let ext = read_at(f, header_len, area - header_len, "header extensions")?;
    let mut at = 0usize;
    loop {
        if at + 8 > ext.len() {
            return Err(Unsupported(
                "header extensions run past the first cluster".into(),
            ));
        }
        let kind = be32(&ext, at);
        let len = be32(&ext, at + 4) as usize;
        at += 8;
        if kind == EXT_END {
            break;
        }
        if at + len > ext.len() {
            return Err(Unsupported(format!(
                "header extension {kind:#x} out of bounds"
            )));
        }
        if kind == EXT_BACKING_FORMAT {
            backing_format = Some(String::from_utf8_lossy(&ext[at..at + len]).into_owned());
        }
        at += len.div_ceil(8) * 8;
    }

    let backing = if backing_off == 0 || backing_len == 0 {
        None
    } else {
        if backing_len > MAX_BACKING_NAME {
            return Err(Unsupported(format!(
                "backing file name of {backing_len} bytes"
            )));
        }
        let b = read_at(f, backing_off, u64::from(backing_len), "backing file name")?;
        Some(String::from_utf8_lossy(&b).into_owned())
    };

    let (snapshot_ids, snapshots) = read_snapshot_table(f, nb_snapshots, snapshots_off)?
        .into_iter()
        .unzip();
    Ok(Header {
        version,
        virtual_size,
        backing,
        backing_format,
        snapshots,
        snapshot_ids,
        incompatible: incompat,
        compatible: compat,
        tables,
    })
}

/// `(id, name)` of every snapshot table entry, in table order.
fn read_snapshot_table(f: &File, n: u32, off: u64) -> Result<Vec<(String, String)>, Unsupported> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_SNAPSHOTS {
        return Err(Unsupported(format!("{n} internal snapshots")));
    }
    if !off.is_multiple_of(8) {
        return Err(Unsupported(format!(
            "snapshot table offset {off} not aligned"
        )));
    }
    // Read the table in one go: entries are at least 40 bytes; grow the
    // read when one runs past what was read (large extra data or names).
    let mut want = (u64::from(n) * 64).min(MAX_SNAPSHOT_TABLE);
    'again: loop {
        let len = file_len(f)?;
        let avail = len.saturating_sub(off).min(want);
        let t = read_at(f, off, avail, "snapshot table")?;
        let mut names = Vec::with_capacity(n as usize);
        let mut at = 0usize;
        for i in 0..n {
            if at + 40 > t.len() {
                if (t.len() as u64) < want || want >= MAX_SNAPSHOT_TABLE {
                    return Err(Unsupported(format!("snapshot entry {i} out of bounds")));
                }
                want = (want * 2).min(MAX_SNAPSHOT_TABLE);
                continue 'again;
            }
            let id_len = be16(&t, at + 12) as usize;
            let name_len = be16(&t, at + 14) as usize;
            let extra = be32(&t, at + 36) as usize;
            let end = at + 40 + extra + id_len + name_len;
            if end > t.len() {
                if (t.len() as u64) < want || want >= MAX_SNAPSHOT_TABLE {
                    return Err(Unsupported(format!("snapshot entry {i} out of bounds")));
                }
                want = (want * 2).min(MAX_SNAPSHOT_TABLE);
                continue 'again;
            }
            let id_at = at + 40 + extra;
            let name_at = id_at + id_len;
            names.push((
                String::from_utf8_lossy(&t[id_at..name_at]).into_owned(),
                String::from_utf8_lossy(&t[name_at..name_at + name_len]).into_owned(),
            ));
            at = end.div_ceil(8) * 8;
        }
        return Ok(names);
    }
}

/// Bits of an L1 entry that hold the L2 table's offset.
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero (1-8, 56-62).
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01fe;
/// Bits of a refcount table entry that hold the block's offset.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// QEMU's limit on the L1 table (block/qcow2.h: QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Tables larger than this are checked for bounds but their entries are
/// not read (the check stays cheap on any image).
const MAX_TABLE_READ: u64 = 8 << 20;

/// What is wrong with the image's metadata, as far as the header, the L1
/// table and the refcount table tell without walking every L2 table or
/// refcount block (that is `qemu-img check`): the corrupt bit QEMU sets
/// when it finds inconsistent metadata, the dirty bit of an image with
/// lazy refcounts that was not closed cleanly, tables that are misaligned
/// or lie outside the file, table entries that do. Empty: nothing found.
/// One pread per table; no process started.
pub fn damage(f: &File, h: &Header) -> Vec<String> {
    let mut out = Vec::new();
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        out.push("QEMU marked it corrupt (the corrupt bit of its header is set): its metadata is inconsistent".to_string());
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 {
        out.push("it was not closed cleanly (the dirty bit is set, lazy refcounts): its refcounts are stale".to_string());
    }
    let len = match file_len(f) {
        Ok(l) => l,
        Err(e) => {
            out.push(e.0);
            return out;
        }
    };
    let t = &h.tables;
    let cluster = 1u64 << t.cluster_bits;
    let aligned = |off: u64| off & (cluster - 1) == 0;
    // The active L1 table.
    let l1_bytes = u64::from(t.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        out.push(format!(
            "its L1 table has {} entries, more than QEMU allows",
            t.l1_size
        ));
    } else if t.l1_size > 0 {
        if !aligned(t.l1_offset) || t.l1_offset == 0 {
            out.push(format!(
                "its L1 table offset {:#x} is not a cluster boundary",
                t.l1_offset
            ));
        } else if t.l1_offset.saturating_add(l1_bytes) > len {
            out.push(format!(
                "its L1 table ({} bytes at {:#x}) runs past the end of the file ({len} bytes)",
                l1_bytes, t.l1_offset
            ));
        } else if l1_bytes <= MAX_TABLE_READ {
            match read_at(f, t.l1_offset, l1_bytes, "L1 table") {
                Err(e) => out.push(e.0),
                Ok(l1) => {
                    for i in 0..t.l1_size as usize {
                        let e = be64(&l1, i * 8);
                        let off = e & L1E_OFFSET_MASK;
                        if e & L1E_RESERVED_MASK != 0 {
                            out.push(format!("L1 entry {i} ({e:#018x}) has reserved bits set"));
                        } else if off != 0 && (!aligned(off) || off >= len) {
                            out.push(format!(
                                "L1 entry {i} points at {off:#x}, {}",
                                if aligned(off) {
                                    "past the end of the file"
                                } else {
                                    "not a cluster boundary"
                                }
                            ));
                        }
                        if out.len() > 8 {
                            return out;
                        }
                    }
                }
            }
        }
    }
    // The refcount table.
    let rt_bytes = u64::from(t.refcount_table_clusters) * cluster;
    if t.refcount_table_clusters == 0
        || t.refcount_table_offset == 0
        || !aligned(t.refcount_table_offset)
    {
        out.push(format!(
            "its refcount table ({} cluster(s) at {:#x}) is missing or not on a cluster boundary",
            t.refcount_table_clusters, t.refcount_table_offset
        ));
    } else if t.refcount_table_offset.saturating_add(rt_bytes) > len {
        out.push(format!(
            "its refcount table ({rt_bytes} bytes at {:#x}) runs past the end of the file ({len} bytes)",
            t.refcount_table_offset
        ));
    } else if rt_bytes <= MAX_TABLE_READ {
        match read_at(f, t.refcount_table_offset, rt_bytes, "refcount table") {
            Err(e) => out.push(e.0),
            Ok(rt) => {
                let mut first = true;
                for i in 0..(rt_bytes / 8) as usize {
                    let e = be64(&rt, i * 8);
                    let off = e & REFT_OFFSET_MASK;
                    if first && off == 0 {
                        // The first block counts the header's own cluster.
                        out.push("its refcount table has no first refcount block".to_string());
                    } else if first
                        && aligned(off)
                        && off < len
                        && (3..=6).contains(&t.refcount_order)
                    {
                        // The header's cluster is in use: its refcount
                        // (the block's first entry) cannot be 0.
                        let width = 1u64 << (t.refcount_order - 3);
                        match read_at(f, off, width, "first refcount block") {
                            Err(e) => out.push(e.0),
                            Ok(b) if b.iter().all(|&x| x == 0) => out.push(format!(
                                "its first refcount block (at {off:#x}) gives the header's own cluster a refcount of 0"
                            )),
                            Ok(_) => {}
                        }
                    } else if e & !REFT_OFFSET_MASK != 0
                        || (off != 0 && (!aligned(off) || off >= len))
                    {
                        out.push(format!(
                            "refcount table entry {i} ({e:#018x}) is misaligned or points past the end of the file"
                        ));
                    }
                    first = false;
                    if out.len() > 8 {
                        return out;
                    }
                }
            }
        }
    }
    out
}

/// Incompatible feature bit 4: extended L2 entries (16 bytes, with
/// subcluster allocation and zero bitmaps).
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Whether the active L1/L2 tables of the qcow2 image `f` (header `h`)
/// map any guest cluster: an L2 entry that is not all zero (an allocated
/// or compressed cluster, or one with the zero flag, which hides the
/// backing file's data just as much; with extended L2 entries, any
/// subcluster bit too). An L2 table QEMU allocated but never filled in
/// counts as nothing: only a written entry says a guest write reached
/// the image (and a guest flush writes the entries). Only the metadata
/// is read (the L1 table, then each L2 table it points at, one pread
/// each), never a data cluster and never a backing file.
///
/// What decides a host crash between a live `transaction` and its
/// journal record (DESIGN.md 10.1): an overlay with data proves the
/// guest ran on it. Tables out of bounds, reserved bits, an L1 table
/// larger than QEMU allows: [`Unsupported`] (the caller cannot decide).
pub fn has_data(f: &File, h: &Header) -> Result<bool, Unsupported> {
    use std::io::{Seek, SeekFrom};
    let t = &h.tables;
    let cluster = 1u64 << t.cluster_bits;
    // A block device's metadata length is 0: its end is where seek says.
    let len = (&*f)
        .seek(SeekFrom::End(0))
        .map_err(|e| Unsupported(format!("cannot find the end of the file: {e}")))?;
    let l1_bytes = u64::from(t.l1_size) * 8;
    if l1_bytes == 0 {
        return Ok(false);
    }
    if l1_bytes > MAX_L1_BYTES {
        return Err(Unsupported(format!(
            "its L1 table has {} entries, more than QEMU allows",
            t.l1_size
        )));
    }
    if t.l1_offset == 0 || t.l1_offset & (cluster - 1) != 0 || t.l1_offset + l1_bytes > len {
        return Err(Unsupported(format!(
            "its L1 table ({l1_bytes} bytes at {:#x}) is misaligned or runs past the end of the file ({len} bytes)",
            t.l1_offset
        )));
    }
    let l1 = read_at(f, t.l1_offset, l1_bytes, "L1 table")?;
    let entry = if h.incompatible & INCOMPAT_EXTL2 != 0 {
        16
    } else {
        8
    };
    for i in 0..t.l1_size as usize {
        let e = be64(&l1, i * 8);
        if e & L1E_RESERVED_MASK != 0 {
            return Err(Unsupported(format!(
                "L1 entry {i} ({e:#018x}) has reserved bits set"
            )));
        }
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off & (cluster - 1) != 0 || off + cluster > len {
            return Err(Unsupported(format!(
                "L1 entry {i} points at {off:#x}, which is not a cluster of the file ({len} bytes)"
            )));
        }
        let l2 = read_at(f, off, cluster, "L2 table")?;
        if l2.chunks(entry).any(|x| x.iter().any(|&b| b != 0)) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn file_len(f: &File) -> Result<u64, Unsupported> {
    f.metadata()
        .map(|m| m.len())
        .map_err(|e| Unsupported(format!("cannot stat: {e}")))
}

/// QEMU's image locking (block/file-posix.c): a process that has an image
/// open takes shared open-file-description locks on byte `100 + bit` for
/// each permission it holds (bit 1 is "write") and on `200 + bit` for each
/// permission it does not share with others. This asks the kernel
/// (`F_OFD_GETLK`) whether any process holds any of those bytes: true
/// while a QEMU (or a `qemu-img` without `-U`) has the image open.
///
/// Our own process takes no such lock, so the answer is about others.
pub fn qemu_holds(path: &Path) -> std::io::Result<bool> {
    let f = File::open(path)?;
    qemu_holds_file(&f)
}

/// [`qemu_holds`] on an open file.
pub fn qemu_holds_file(f: &File) -> std::io::Result<bool> {
    // SAFETY: a zeroed flock is a valid value; every field used is set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 100;
    fl.l_len = 200;
    // SAFETY: fcntl with F_OFD_GETLK reads and writes the flock we own.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

// --- writing a new, empty overlay ----------------------------------------

/// Cluster size of the overlays vsnap writes (QEMU's default).
const OVERLAY_CLUSTER: u64 = 64 << 10;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// QEMU 7.2's feature name table, as `qemu-img create` writes it: (type,
/// bit, name); type 0 incompatible, 1 compatible, 2 autoclear.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// What [`overlay_layout`] returns: (offset, bytes) pieces, the file's
/// length.
pub type OverlayLayout = (Vec<(u64, Vec<u8>)>, u64);

/// The metadata of a new, empty qcow2 image of `size` bytes (a multiple
/// of 512) backed by `backing` in `backing_format`: what `qemu-img create
/// -f qcow2 -u -b BACKING -F FMT IMAGE SIZE` (QEMU 7.2, default options:
/// version 3, 64 KiB clusters, 16-bit refcounts, zlib) writes, byte for
/// byte: the header with its backing-format and feature-name extensions
/// and the backing name in cluster 0, the refcount table in cluster 1,
/// its one refcount block in cluster 2, the (zero) L1 table from cluster
/// 3. Returned as (offset, bytes) pieces and the file's length; the rest
/// reads as zeros.
pub fn overlay_layout(
    backing: &[u8],
    backing_format: &str,
    size: u64,
) -> std::io::Result<OverlayLayout> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    if !size.is_multiple_of(512) {
        return Err(invalid(format!(
            "overlay size {size} is not a multiple of 512"
        )));
    }
    if backing.is_empty() || backing.len() > MAX_BACKING_NAME as usize {
        return Err(invalid(format!(
            "backing file name of {} bytes (1 to {MAX_BACKING_NAME} allowed)",
            backing.len()
        )));
    }
    let c = OVERLAY_CLUSTER;
    // One L2 table maps c/8 clusters; the L1 table has one entry per L2.
    let l1_size = size.div_ceil(c * (c / 8));
    let l1_bytes = l1_size * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(invalid(format!(
            "overlay size {size} is too large for qcow2"
        )));
    }
    let l1_clusters = l1_bytes.div_ceil(c);
    let l1_offset = if l1_size == 0 { 0 } else { 3 * c };

    let mut h = Vec::with_capacity(0x300 + backing.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, set below
    h.extend_from_slice(&(backing.len() as u32).to_be_bytes());
    h.extend_from_slice(&16u32.to_be_bytes()); // cluster_bits
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&l1_offset.to_be_bytes());
    h.extend_from_slice(&c.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount_order: 16 bits
    h.extend_from_slice(&112u32.to_be_bytes()); // header_length
    h.push(0); // compression_type: zlib
    h.resize(112, 0);
    let ext = |h: &mut Vec<u8>, kind: u32, data: &[u8]| {
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&(data.len() as u32).to_be_bytes());
        h.extend_from_slice(data);
        h.resize(h.len().next_multiple_of(8), 0);
    };
    ext(&mut h, EXT_BACKING_FORMAT, backing_format.as_bytes());
    let mut table = Vec::with_capacity(48 * FEATURE_NAMES.len());
    for (kind, bit, name) in FEATURE_NAMES {
        let start = table.len();
        table.push(kind);
        table.push(bit);
        table.extend_from_slice(name.as_bytes());
        table.resize(start + 48, 0);
    }
    ext(&mut h, EXT_FEATURE_TABLE, &table);
    ext(&mut h, EXT_END, &[]);
    let backing_offset = h.len() as u64;
    h[8..16].copy_from_slice(&backing_offset.to_be_bytes());
    h.extend_from_slice(backing);

    // Refcounts: header, refcount table, refcount block, the L1 clusters.
    let used = 3 + l1_clusters;
    let mut refblock = Vec::with_capacity(used as usize * 2);
    for _ in 0..used {
        refblock.extend_from_slice(&1u16.to_be_bytes());
    }
    let pieces = vec![
        (0, h),
        (c, (2 * c).to_be_bytes().to_vec()),
        (2 * c, refblock),
    ];
    let len = if l1_size == 0 {
        3 * c
    } else {
        l1_offset + l1_bytes
    };
    Ok((pieces, len))
}

/// Write a new, empty qcow2 overlay (see [`overlay_layout`]) into `f`,
/// a new empty file; the caller fsyncs it.
pub fn write_overlay(
    f: &File,
    backing: &[u8],
    backing_format: &str,
    size: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (pieces, len) = overlay_layout(backing, backing_format, size)?;
    for (off, bytes) in pieces {
        f.write_all_at(&bytes, off)?;
    }
    f.set_len(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header with the given snapshot table, built by hand.
    fn image(names: &[&str], extra: u32) -> Vec<u8> {
        let mut img = vec![0u8; 65536 * 2];
        img[0..4].copy_from_slice(MAGIC);
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[20..24].copy_from_slice(&16u32.to_be_bytes());
        img[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        img[60..64].copy_from_slice(&(names.len() as u32).to_be_bytes());
        img[64..72].copy_from_slice(&65536u64.to_be_bytes());
        img[100..104].copy_from_slice(&104u32.to_be_bytes());
        let mut at = 65536;
        for (i, n) in names.iter().enumerate() {
            let id = (i + 1).to_string();
            img[at + 12..at + 14].copy_from_slice(&(id.len() as u16).to_be_bytes());
            img[at + 14..at + 16].copy_from_slice(&(n.len() as u16).to_be_bytes());
            img[at + 36..at + 40].copy_from_slice(&extra.to_be_bytes());
            let mut p = at + 40 + extra as usize;
            img[p..p + id.len()].copy_from_slice(id.as_bytes());
            p += id.len();
            img[p..p + n.len()].copy_from_slice(n.as_bytes());
            p += n.len();
            at = p.div_ceil(8) * 8;
        }
        img
    }

    fn parse(bytes: &[u8]) -> Result<Header, Unsupported> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("i.qcow2");
        std::fs::write(&p, bytes).unwrap();
        read(&p)
    }

    #[test]
    fn reads_names_sizes_and_padding() {
        let h = parse(&image(&["a", "snapshot-two", "ü"], 24)).unwrap();
        assert_eq!(h.snapshots, ["a", "snapshot-two", "ü"]);
        assert_eq!(h.snapshot_ids, ["1", "2", "3"]);
        assert_eq!(h.virtual_size, 1 << 30);
        assert_eq!(h.version, 3);
        assert_eq!(h.backing, None);
    }

    #[test]
    fn large_entries_grow_the_read() {
        let long = "n".repeat(1000);
        let names: Vec<&str> = (0..5).map(|_| long.as_str()).collect();
        assert_eq!(parse(&image(&names, 0)).unwrap().snapshots.len(), 5);
    }

    #[test]
    fn truncated_table_and_bad_magic_are_unsupported() {
        let mut img = image(&["a", "b"], 0);
        img.truncate(65536 + 50);
        assert!(parse(&img).unwrap_err().0.contains("out of bounds"));
        let mut img = image(&[], 0);
        img[0] = b'X';
        assert!(parse(&img).unwrap_err().0.contains("magic"));
        let mut img = image(&[], 0);
        img[72 + 7] |= 4; // incompatible: external data file
        assert!(parse(&img).unwrap_err().0.contains("external data file"));
    }

    #[test]
    fn no_lock_on_a_plain_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        assert!(!qemu_holds(&p).unwrap());
    }
}
