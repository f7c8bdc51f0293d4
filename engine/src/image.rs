//! What vsnap must know about an image before it plans anything on it,
//! none of it read from the image's contents:
//!
//! * **its format**, never probed: a raw image's bytes are the guest's, and
//!   a guest that writes a qcow2 header (with a backing file naming any host
//!   file) into its raw disk must not make vsnap open that host file or
//!   write qcow2 metadata into the disk. The format is the one vsnap
//!   recorded (catalog tree `volformat`), else the one stated
//!   (`--format`), else the one the image's *name* states (`.qcow2`: qcow2;
//!   any other name: raw), and then only when the first bytes agree with it:
//!   a `.qcow2` without a qcow2 header, or a qcow2 header in a file not
//!   named `.qcow2`, is refused until `--format` says which it is. A raw
//!   image is always opened as raw (`-f raw`, `-F raw`), whatever its
//!   bytes say.
//! * **its owner**: an image belongs to one state directory. The claim is a
//!   symbolic link beside the image, `.vsnap-owner.<image name>`, made by
//!   one `symlink(2)` before the first plan that changes the image (it
//!   fails if the name exists: of two state directories racing for one
//!   image, exactly one makes it), whose target is the owner's canonical
//!   path and random id (catalog tree `meta`); nothing follows it.
//!   The claim is per path, not per inode: an external snapshot moves the
//!   image's inode to the frozen file, while the path stays the volume.
//! * **its links**: an image with a second hard link is refused: after an
//!   external snapshot the other name would be the frozen snapshot file,
//!   and whatever writes through it would change the snapshot.

use crate::{catalog, EngineError, Result};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use vsnap_journal::Journal;
use vsnap_steps::{fsops, Format};

/// The claim file's name prefix (`.vsnap-owner.<image name>`).
pub const CLAIM_PREFIX: &str = ".vsnap-owner.";

/// Whether a file name is an ownership claim (not a temporary, not an
/// orphan: `vol check` and the crash suites skip it).
pub fn is_claim(file_name: impl AsRef<std::ffi::OsStr>) -> bool {
    let b = file_name.as_ref().as_bytes();
    b.starts_with(CLAIM_PREFIX.as_bytes()) && b.len() > CLAIM_PREFIX.len()
}

/// The claim file of an image path.
pub fn claim_path(image: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(CLAIM_PREFIX);
    name.push(image.file_name().unwrap_or_default());
    fsops::parent_dir(image).join(name)
}

/// Whether the image's name states qcow2.
fn named_qcow2(image: &Path) -> bool {
    image
        .extension()
        .is_some_and(|e| e.as_bytes().eq_ignore_ascii_case(b"qcow2"))
}

fn has_qcow2_magic(image: &Path) -> Result<bool> {
    vsnap_steps::qemu_img::has_qcow2_magic(image).map_err(EngineError::Check)
}

/// The format vsnap uses for `image` (canonical): recorded, else stated,
/// else the name's if the first bytes agree; otherwise refused with
/// [`EngineError::FormatUnknown`]. The first bytes never choose qcow2
/// alone. A stated format that contradicts the recorded one is refused.
pub fn format_of(j: &Journal, image: &Path, stated: Option<Format>) -> Result<Format> {
    let known = catalog::known_format(j, image)?;
    match (known, stated) {
        (Some(k), Some(s)) if k != s => Err(EngineError::FormatUnknown {
            image: image.to_path_buf(),
            why: format!(
                "--format {s} was given, but vsnap recorded {} as a {k} image when it took its snapshots (an external snapshot makes a raw image a qcow2 overlay); leave --format out or say --format {k}",
                image.display()
            ),
        }),
        (Some(k), _) => Ok(k),
        (None, Some(Format::Raw)) => Ok(Format::Raw),
        (None, Some(Format::Qcow2)) => {
            if has_qcow2_magic(image)? {
                Ok(Format::Qcow2)
            } else {
                Err(EngineError::FormatUnknown {
                    image: image.to_path_buf(),
                    why: format!(
                        "--format qcow2 was given, but {} has no qcow2 header; if it is a raw image, say --format raw",
                        image.display()
                    ),
                })
            }
        }
        (None, None) => first_seen(image),
    }
}

/// The rule for an image vsnap has no record of and no `--format` for.
pub fn first_seen(image: &Path) -> Result<Format> {
    match (named_qcow2(image), has_qcow2_magic(image)?) {
        (true, true) => Ok(Format::Qcow2),
        (false, false) => Ok(Format::Raw),
        (true, false) => Err(EngineError::FormatUnknown {
            image: image.to_path_buf(),
            why: format!(
                "{} is named .qcow2 but has no qcow2 header; say which it is with --format raw or --format qcow2",
                image.display()
            ),
        }),
        (false, true) => Err(EngineError::FormatUnknown {
            image: image.to_path_buf(),
            why: format!(
                "{} starts with a qcow2 header but is not named .qcow2, and vsnap does not guess a format from an image's bytes (a guest can write such a header into a raw disk, naming any host file as its backing file); say --format qcow2 if it is a qcow2 image, --format raw if it is a raw disk",
                image.display()
            ),
        }),
    }
}

/// Refuse an image with more than one hard link.
pub fn check_links(image: &Path) -> Result<()> {
    let m =
        std::fs::symlink_metadata(image).map_err(|_| EngineError::NoImage(image.to_path_buf()))?;
    if m.nlink() > 1 {
        return Err(EngineError::HardLinked {
            image: image.to_path_buf(),
            links: m.nlink(),
        });
    }
    Ok(())
}

/// What the claim file beside an image says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No claim file.
    Absent,
    /// This state directory's claim.
    Ours,
    /// Another state directory's (or one that cannot be read).
    Foreign {
        /// The owner the claim names (its state directory), or why it
        /// cannot be read.
        owner: String,
    },
}

fn this_state_dir(j: &Journal) -> PathBuf {
    std::fs::canonicalize(j.state_dir()).unwrap_or_else(|_| j.state_dir().to_path_buf())
}

/// The claim is a symbolic link whose target is the claim's text,
/// `vsnap-owner:1:<id>:<state dir>` (as Emacs's `.#file` locks are): it is
/// made whole by one `symlink(2)`, which fails if the name exists, and it
/// needs no data block (btrfs and ext4 keep a short target in metadata or
/// the inode), so a full filesystem that can still take a reflink can
/// take the claim. Nothing ever follows it.
fn claim_text(dir: &Path, id: &str) -> PathBuf {
    let mut t = format!("{CLAIM_TEXT}{id}:").into_bytes();
    t.extend_from_slice(dir.as_os_str().as_bytes());
    PathBuf::from(std::ffi::OsString::from_vec(t))
}

const CLAIM_TEXT: &str = "vsnap-owner:1:";

/// Parse a claim's text: (state dir, id).
fn parse_claim(bytes: &[u8]) -> Option<(PathBuf, String)> {
    let rest = bytes.strip_prefix(CLAIM_TEXT.as_bytes())?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let (id, dir) = (&rest[..colon], &rest[colon + 1..]);
    if id.is_empty() || dir.is_empty() {
        return None;
    }
    Some((
        PathBuf::from(std::ffi::OsStr::from_bytes(dir)),
        String::from_utf8(id.to_vec()).ok()?,
    ))
}

/// Read the claim beside `image` (`readlink`: nothing is followed).
pub fn read_claim(j: &Journal, image: &Path) -> Result<Claim> {
    let path = claim_path(image);
    let target = match std::fs::read_link(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Claim::Absent),
        Err(e) => {
            return Ok(Claim::Foreign {
                owner: format!("unknown ({} is not a vsnap claim: {e})", path.display()),
            })
        }
    };
    let Some((dir, id)) = parse_claim(target.as_os_str().as_bytes()) else {
        return Ok(Claim::Foreign {
            owner: format!("unknown ({} is not a vsnap claim)", path.display()),
        });
    };
    let ours_dir = this_state_dir(j);
    let ours_id = catalog::owner_id_if_any(j)?;
    if dir == ours_dir && ours_id.as_deref() == Some(id.as_str()) {
        return Ok(Claim::Ours);
    }
    let owner = if dir == ours_dir {
        format!(
            "{} (id {id}), a state directory that was at this path before this one (this one's id is {})",
            dir.display(),
            ours_id.as_deref().unwrap_or("not yet made")
        )
    } else {
        format!("{} (id {id})", dir.display())
    };
    Ok(Claim::Foreign { owner })
}

/// Refuse (plan time, read-only) an image another state directory claims.
pub fn check_claim(j: &Journal, image: &Path) -> Result<()> {
    match read_claim(j, image)? {
        Claim::Absent | Claim::Ours => Ok(()),
        Claim::Foreign { owner } => Err(EngineError::Owned {
            image: image.to_path_buf(),
            owner,
            claim: claim_path(image),
        }),
    }
}

/// Claim the image for this state directory before a plan changes it:
/// one `symlink(2)` (see `claim_text`), then an fsync of the directory.
/// Of two state directories racing for the image exactly one makes it; the
/// other is refused. Returns whether this call made the claim (so that a
/// plan that rolls back can take it back).
pub fn claim(j: &Journal, image: &Path) -> Result<bool> {
    let path = claim_path(image);
    let id = catalog::owner_id(j)?;
    let text = claim_text(&this_state_dir(j), &id);
    match std::os::unix::fs::symlink(&text, &path) {
        Ok(()) => {
            fsops::fsync_parent(&path).map_err(EngineError::Check)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            check_claim(j, image)?;
            Ok(false)
        }
        Err(e) => {
            let full = e.raw_os_error() == Some(libc::ENOSPC);
            let kind = if full {
                crate::RefusalKind::NoSpace
            } else {
                crate::RefusalKind::Io
            };
            Err(EngineError::refused(
                kind,
                format!(
                    "cannot make the ownership claim {} of {}: {e}{}; nothing was changed",
                    path.display(),
                    image.display(),
                    if full {
                        " (the filesystem is full: free space and retry)"
                    } else {
                        ""
                    }
                ),
            ))
        }
    }
}

/// Remove this state directory's claim (the volume has no snapshot left,
/// or the plan that made the claim rolled back). Best effort: a claim left
/// behind only keeps other state directories away.
pub fn release(j: &Journal, image: &Path) {
    if read_claim(j, image).ok() == Some(Claim::Ours) {
        let path = claim_path(image);
        if std::fs::remove_file(&path).is_ok() {
            let _ = fsops::fsync_parent(&path);
        }
    }
}

/// The format to read a file vsnap has no record of as, for checks only:
/// the first-seen rule where name and bytes agree, else raw (reading as
/// raw follows nothing).
pub fn assumed_format(path: &Path) -> Format {
    first_seen(path).unwrap_or(Format::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn first_seen_needs_name_and_bytes_to_agree() {
        let d = tempfile::tempdir().unwrap();
        let hdr = b"QFI\xfb\0\0\0\x03rest of a header";
        assert_eq!(
            first_seen(&file(d.path(), "a.qcow2", hdr)).unwrap(),
            Format::Qcow2
        );
        assert_eq!(
            first_seen(&file(d.path(), "a.QCOW2", hdr)).unwrap(),
            Format::Qcow2
        );
        assert_eq!(
            first_seen(&file(d.path(), "r.img", b"\0\0\0\0guest data")).unwrap(),
            Format::Raw
        );
        assert_eq!(
            first_seen(&file(d.path(), "short", b"QF")).unwrap(),
            Format::Raw
        );
        // The bytes alone never make qcow2; a name alone does not either.
        assert!(matches!(
            first_seen(&file(d.path(), "r.img", hdr)),
            Err(EngineError::FormatUnknown { .. })
        ));
        assert!(matches!(
            first_seen(&file(d.path(), "b.qcow2", b"\0\0\0\0")),
            Err(EngineError::FormatUnknown { .. })
        ));
        // Checks read an unknown file as raw where the rule cannot say.
        assert_eq!(assumed_format(&d.path().join("r.img")), Format::Raw);
    }

    #[test]
    fn claim_text_round_trips_and_rejects_others() {
        let dir = Path::new("/var/lib/vsnap:odd name");
        let t = claim_text(dir, "00ff");
        assert_eq!(
            parse_claim(t.as_os_str().as_bytes()),
            Some((dir.to_path_buf(), "00ff".to_string()))
        );
        for bad in [
            &b""[..],
            b"vsnap-owner:1:",
            b"vsnap-owner:1:id",
            b"vsnap-owner:2:a:/x",
            b"/etc/passwd",
        ] {
            assert_eq!(parse_claim(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(is_claim(".vsnap-owner.a.qcow2"));
        assert!(!is_claim(".vsnap-owner."));
        assert!(!is_claim(".vsnap-1234.a.qcow2.tmp"));
        assert_eq!(
            claim_path(Path::new("/vm/a.qcow2")),
            Path::new("/vm/.vsnap-owner.a.qcow2")
        );
    }

    #[test]
    fn a_second_link_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a.img", b"x");
        check_links(&a).unwrap();
        std::fs::hard_link(&a, d.path().join("b.img")).unwrap();
        assert!(matches!(
            check_links(&a),
            Err(EngineError::HardLinked { links: 2, .. })
        ));
    }
}
