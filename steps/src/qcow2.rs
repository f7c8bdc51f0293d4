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
/// Incompatible feature bit 2: guest data lives in an external file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
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
    let (header_len, incompat) = if version == 3 {
        let v3 = read_at(f, 72, 32, "version 3 header")?;
        (u64::from(be32(&v3, 28)), be64(&v3, 0))
    } else {
        (72, 0)
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

    let snapshots = read_snapshot_table(f, nb_snapshots, snapshots_off)?;
    Ok(Header {
        version,
        virtual_size,
        backing,
        backing_format,
        snapshots,
    })
}

fn read_snapshot_table(f: &File, n: u32, off: u64) -> Result<Vec<String>, Unsupported> {
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
            let name_at = at + 40 + extra + id_len;
            names.push(String::from_utf8_lossy(&t[name_at..name_at + name_len]).into_owned());
            at = end.div_ceil(8) * 8;
        }
        return Ok(names);
    }
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
