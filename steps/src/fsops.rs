//! File operations with fsync discipline.
//!
//! Every helper names the path it failed on ([`StepError::Io`]); none of
//! them follows a symlink it did not create: removal and inode comparison
//! look at the link itself, creation uses `O_EXCL | O_NOFOLLOW`.

use crate::{StepError, StepResult};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The [`StepError::Io`] for `op` on `path`.
pub fn io_err(op: &'static str, path: &Path, source: io::Error) -> StepError {
    StepError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The directory that holds `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory, making the creations, renames and removals of
/// entries in it durable.
pub fn fsync_dir(dir: &Path) -> StepResult<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| io_err("open directory", dir, e))?;
    f.sync_all().map_err(|e| io_err("fsync directory", dir, e))
}

/// fsync the directory that holds `path`.
pub fn fsync_parent(path: &Path) -> StepResult<()> {
    fsync_dir(parent_dir(path))
}

/// fsync a regular file's data and metadata (opened read-only, without
/// following a symlink).
pub fn fsync_file(path: &Path) -> StepResult<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    f.sync_all().map_err(|e| io_err("fsync", path, e))
}

/// Whether `path` exists as a directory entry (a dangling symlink counts).
pub fn exists(path: &Path) -> StepResult<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("stat", path, e)),
    }
}

/// Whether `a` and `b` are the same inode (device and inode number, links
/// not followed). False when either is missing.
pub fn same_inode(a: &Path, b: &Path) -> StepResult<bool> {
    let meta = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat", p, e)),
    };
    let (Some(ma), Some(mb)) = (meta(a)?, meta(b)?) else {
        return Ok(false);
    };
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

/// Unlink `path` (a symlink itself, never its target) if it exists;
/// fsync its directory when something was removed. Returns whether it
/// removed anything.
pub fn remove_if_exists(path: &Path) -> StepResult<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            fsync_parent(path)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

/// Unlink `path` if it exists, without an fsync (the caller fsyncs the
/// directory). Returns whether it removed anything.
pub fn unlink_if_exists(path: &Path) -> StepResult<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

/// The longest file name (one path component) Linux filesystems take, in bytes.
pub const NAME_MAX: usize = 255;
/// The longest path the kernel takes, in bytes (with its NUL: 4096).
pub const PATH_MAX: usize = 4095;

/// The temporary name vsnap writes `target` under before renaming it into
/// place: same directory, file name `.vsnap-{tag}.{target file name}.tmp`.
/// When that would be longer than [`NAME_MAX`], the target's name is cut
/// and a hash of the whole of it follows (`.vsnap-{tag}.{start}~{hash}.tmp`),
/// so a temporary name always fits wherever its target does (a function
/// of its arguments only: recovery computes the same name again).
pub fn temp_path(target: &Path, tag: &str) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name = target
        .file_name()
        .map(OsStrExt::as_bytes)
        .unwrap_or_default();
    let head = format!(".vsnap-{tag}.");
    let mut out = head.clone().into_bytes();
    if head.len() + name.len() + 4 <= NAME_MAX {
        out.extend_from_slice(name);
    } else {
        // FNV-1a of the whole name: 16 hex digits.
        let hash = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut keep = NAME_MAX
            .saturating_sub(head.len() + 1 + 16 + 4)
            .min(name.len());
        if let Ok(text) = std::str::from_utf8(name) {
            while !text.is_char_boundary(keep) {
                keep -= 1;
            }
        }
        out.extend_from_slice(&name[..keep]);
        out.extend_from_slice(format!("~{hash:016x}").as_bytes());
    }
    out.extend_from_slice(b".tmp");
    target.with_file_name(std::ffi::OsString::from_vec(out))
}

/// Whether every component of `path` fits in [`NAME_MAX`] bytes and the
/// whole in [`PATH_MAX`]; `Err` says which does not.
pub fn check_path_length(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let total = path.as_os_str().as_bytes().len();
    if total > PATH_MAX {
        return Err(format!(
            "the path is {total} bytes long; the limit is {PATH_MAX}"
        ));
    }
    for c in path.components() {
        let n = c.as_os_str().as_bytes().len();
        if n > NAME_MAX {
            return Err(format!(
                "its name {:?} is {n} bytes long; a file name may have at most {NAME_MAX}",
                c.as_os_str().to_string_lossy()
            ));
        }
    }
    Ok(())
}

/// Whether a file name is one of vsnap's temporary names (see [`temp_path`]).
pub fn is_vsnap_temp(file_name: &str) -> bool {
    is_vsnap_temp_bytes(file_name.as_bytes())
}

/// [`is_vsnap_temp`] for a file name that may not be UTF-8.
pub fn is_vsnap_temp_bytes(file_name: &[u8]) -> bool {
    file_name.starts_with(b".vsnap-") && file_name.ends_with(b".tmp")
}

/// Create a new file, failing if anything (even a dangling symlink) is
/// there: `O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC`, mode 0644, opened
/// read-write.
pub fn create_excl(path: &Path) -> StepResult<File> {
    create_excl_mode(path, 0o644)
}

/// [`create_excl`] with an explicit mode (0600 for memory files).
pub fn create_excl_mode(path: &Path, mode: u32) -> StepResult<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_err("create", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        let t = temp_path(Path::new("/a/x.qcow2"), "part");
        assert_eq!(t, Path::new("/a/.vsnap-part.x.qcow2.tmp"));
        assert!(is_vsnap_temp(".vsnap-part.x.qcow2.tmp"));
        assert!(!is_vsnap_temp("x.qcow2"));
        assert!(!is_vsnap_temp(".vsnap-part.x.qcow2"));
        assert_eq!(temp_path(Path::new("x"), "t"), Path::new(".vsnap-t.x.tmp"));
    }

    #[test]
    fn long_temp_names_are_cut_to_fit() {
        let long = format!("/a/{}.qcow2", "x".repeat(240));
        let t = temp_path(Path::new(&long), "18a19a62fcbf6672");
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), NAME_MAX, "{name}");
        assert!(is_vsnap_temp(name), "{name}");
        assert!(check_path_length(&t).is_ok());
        // a temporary of a temporary fits too, and is the same each time
        let part = temp_path(&t, "part");
        assert!(part.file_name().unwrap().len() <= NAME_MAX);
        assert_eq!(part, temp_path(&t, "part"));
        // two names that differ only past the cut get different temporaries
        let other = format!("/a/{}.raw", "x".repeat(240));
        assert_ne!(t, temp_path(Path::new(&other), "18a19a62fcbf6672"));
        assert!(check_path_length(Path::new(&format!("/a/{}", "y".repeat(256)))).is_err());
        assert!(check_path_length(Path::new(&"/abc".repeat(1100))).is_err());
    }

    #[test]
    fn inode_and_remove() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let c = d.path().join("c");
        assert!(!same_inode(&a, &b).unwrap());
        create_excl(&a).unwrap();
        assert!(create_excl(&a).is_err());
        std::fs::hard_link(&a, &b).unwrap();
        std::fs::write(&c, b"x").unwrap();
        assert!(same_inode(&a, &b).unwrap());
        assert!(!same_inode(&a, &c).unwrap());
        assert!(!same_inode(&a, &d.path().join("missing")).unwrap());
        assert!(remove_if_exists(&b).unwrap());
        assert!(!remove_if_exists(&b).unwrap());
        fsync_dir(d.path()).unwrap();
        fsync_parent(&a).unwrap();
    }

    #[test]
    fn create_excl_refuses_symlink() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_excl(&link).is_err());
        assert!(!target.exists());
        // remove_if_exists removes the link, not its target
        std::fs::write(&target, b"keep").unwrap();
        assert!(remove_if_exists(&link).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn create_excl_mode_0644() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        create_excl(&p).unwrap();
        // at most 0644 (the umask may take bits away)
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777 & !0o644,
            0
        );
    }
}
