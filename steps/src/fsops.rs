//! File operations with fsync discipline.
//!
//! Every helper names the path it failed on ([`StepError::Io`]); none of
//! them follows a symlink it did not create: removal and inode comparison
//! look at the link itself, creation uses `O_EXCL | O_NOFOLLOW`.

use crate::{StepError, StepResult};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// [`create_excl`] with an explicit mode (0600 for memory files). The new
/// file's identity is remembered ([`remember`]): later steps of this
/// process check that the name still holds it before they use, rename or
/// remove it.
pub fn create_excl_mode(path: &Path, mode: u32) -> StepResult<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_err("create", path, e))?;
    pin(path, &f)?;
    Ok(f)
}

// ------------------------------------------------------------- identity

/// A file's identity: device and inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "inode {} on device {:#x}", self.ino, self.dev)
    }
}

/// Files this process made or was told to expect, by path: what each name
/// must still hold when a step uses it. (A name in a directory others can
/// write may be replaced between two system calls; what is compared is
/// the inode, never the name.)
/// Each entry may hold the file open: an inode held open is never freed,
/// so its number cannot be given to a file someone else makes meanwhile
/// (a check by inode number alone could be fooled by that reuse).
static KNOWN: Mutex<Option<HashMap<PathBuf, Known>>> = Mutex::new(None);

struct Known {
    id: FileId,
    _pin: Option<std::sync::Arc<File>>,
}

fn known_map<R>(f: impl FnOnce(&mut HashMap<PathBuf, Known>) -> R) -> R {
    let mut g = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// `path` must hold `id` when a step of this process uses it next.
pub fn remember(path: &Path, id: FileId) {
    known_map(|m| m.insert(path.to_path_buf(), Known { id, _pin: None }));
}

/// `path` must hold the file open as `f` (kept open until the operation
/// ends: its inode number stays its own).
pub fn pin(path: &Path, f: &File) -> StepResult<FileId> {
    let id = FileId::of(&f.metadata().map_err(|e| io_err("stat", path, e))?);
    let pin = f.try_clone().ok().map(std::sync::Arc::new);
    known_map(|m| m.insert(path.to_path_buf(), Known { id, _pin: pin }));
    Ok(id)
}

/// What `path` must hold, if this process knows.
pub fn known(path: &Path) -> Option<FileId> {
    known_map(|m| m.get(path).map(|k| k.id))
}

/// Forget every file: each engine operation starts with what it checks
/// itself, never with what an earlier one left (a service runs many).
pub fn forget_all() {
    known_map(HashMap::clear);
}

/// Forget what `path` held (it was removed).
pub fn forget(path: &Path) {
    known_map(|m| m.remove(path));
}

/// The identity at `from` now lives at `to` (a verified rename or link).
fn moved(from: &Path, to: &Path, f: &File) {
    forget(from);
    let _ = pin(to, f);
}

/// Why `path` is not the file vsnap expects there: a symlink (never
/// followed), not a regular file, or another inode than the one vsnap made
/// or recorded. `None` when it is (or nothing is known but it is a plain
/// regular file).
fn not_ours(path: &Path, m: &std::fs::Metadata) -> Option<String> {
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Some(format!(
            "it is a symlink (to {target}), which vsnap did not make"
        ));
    }
    if !ft.is_file() {
        return Some("it is not a regular file".into());
    }
    match known(path) {
        Some(want) if want != FileId::of(m) => Some(format!(
            "it was replaced: it is {}, vsnap's file was {want}",
            FileId::of(m)
        )),
        _ => None,
    }
}

fn tampered(path: &Path, why: String) -> StepError {
    StepError::NotOurs {
        path: path.to_path_buf(),
        why,
    }
}

/// Check that `path` is still vsnap's file: a regular file (links not
/// followed), and the inode vsnap made or recorded there if this process
/// knows it. Returns its identity.
pub fn verify_ours(path: &Path) -> StepResult<FileId> {
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err("stat", path, e))?;
    match not_ours(path, &m) {
        Some(why) => Err(tampered(path, why)),
        None => Ok(FileId::of(&m)),
    }
}

/// Open vsnap's file at `path` without following a link (`O_NOFOLLOW`),
/// read-write unless `read_only`, and check the descriptor itself: a
/// regular file, the inode vsnap made or recorded there. Whatever the name
/// holds later, the descriptor is that file.
pub fn open_ours(path: &Path, read_only: bool) -> StepResult<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                tampered(
                    path,
                    "it is a symlink, which vsnap did not make and does not follow".into(),
                )
            } else {
                io_err("open", path, e)
            }
        })?;
    let m = f.metadata().map_err(|e| io_err("stat", path, e))?;
    if let Some(why) = not_ours(path, &m) {
        return Err(tampered(path, why));
    }
    // O_NONBLOCK only kept a FIFO planted there from blocking the open.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    Ok(f)
}

/// `/proc/self/fd/N` for an open file: the name by which a child that
/// inherits descriptor N opens exactly that file, whatever its path holds.
pub fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Hard-link the file open as `f` (the inode itself, via `/proc/self/fd`)
/// as `dst`, which must not exist; a `dst` that already is that inode is
/// fine (idempotence), anything else there is an error (never clobbered).
pub fn link_fd(f: &File, src: &Path, dst: &Path) -> StepResult<()> {
    use std::os::unix::ffi::OsStrExt;
    let id = FileId::of(&f.metadata().map_err(|e| io_err("stat", src, e))?);
    let from = std::ffi::CString::new(fd_path(f).as_os_str().as_bytes()).expect("no NUL");
    let to = std::ffi::CString::new(dst.as_os_str().as_bytes())
        .map_err(|_| StepError::Invalid(format!("path {} contains NUL", dst.display())))?;
    // SAFETY: two valid C strings; AT_SYMLINK_FOLLOW resolves the magic
    // /proc link to the open file (not to a path that could be replaced).
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::AlreadyExists {
            let m = std::fs::symlink_metadata(dst).map_err(|e| io_err("stat", dst, e))?;
            if m.file_type().is_file() && FileId::of(&m) == id {
                pin(dst, f)?;
                return Ok(());
            }
            return Err(StepError::Invalid(format!(
                "{} already exists and is not {}; refusing to replace it",
                dst.display(),
                src.display()
            )));
        }
        return Err(io_err("link", dst, e));
    }
    pin(dst, f)?;
    Ok(())
}

/// Remove vsnap's file at `path` (undo, cleanup): only when it is still
/// vsnap's (a regular file; the inode vsnap made, if this process knows
/// it). Something else there (a symlink, another file put in its place)
/// is left alone. No fsync. Returns whether it removed anything.
pub fn unlink_ours(path: &Path) -> StepResult<bool> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("stat", path, e)),
    };
    if not_ours(path, &m).is_some() {
        forget(path);
        return Ok(false);
    }
    let removed = unlink_if_exists(path)?;
    forget(path);
    Ok(removed)
}

/// `rename(from, to)` of vsnap's file `from` (replacing `to`), checked on
/// both sides: before it, `from` must be vsnap's (see [`verify_ours`]);
/// after it, `to` must be the inode that was checked. A name swapped in
/// the instant between the two (someone who can write the directory) is
/// found by the second check; vsnap then puts its own file back at `to`
/// (a link of the inode it holds open, renamed over `to`, checked again)
/// or fails with [`StepError::NotOurs`]: it never reports a rename of a
/// file it did not make as done.
pub fn rename_ours(from: &Path, to: &Path) -> StepResult<()> {
    let f = open_ours(from, true)?;
    let id = FileId::of(&f.metadata().map_err(|e| io_err("stat", from, e))?);
    std::fs::rename(from, to).map_err(|e| io_err("rename", from, e))?;
    let now = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .map(|m| (m.file_type().is_file(), FileId::of(&m)))
    };
    if now(to) == Some((true, id)) {
        moved(from, to, &f);
        return Ok(());
    }
    // Someone swapped `from` between the check and the rename: what they
    // put there is now at `to`, and vsnap's file (open as `f`) may have no
    // name left. Put it back, by a rename no one else can interfere with:
    // from a directory of vsnap's own (mode 0700).
    let mut last = String::new();
    for attempt in 0..4 {
        match put_back(&f, to, attempt) {
            Ok(placed) => {
                forget(from);
                pin(to, &placed)?;
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
    }
    forget(from);
    // What is at `to` is not vsnap's: probes must not call this done.
    remember(to, id);
    Err(tampered(
        to,
        format!(
            "{} was replaced while vsnap renamed it there, and vsnap could not put its own file back ({last}); \
             what is at {} now is not vsnap's file",
            from.display(),
            to.display()
        ),
    ))
}

/// Put the file open as `f` at `to` from a private directory
/// (`.vsnap-fix<attempt>-<pid>.<name>.tmp`, made mode 0700 beside `to`,
/// opened without following a link and checked: our uid, no access for
/// others): the file is linked into it by descriptor, or, when it has no
/// name left (it was renamed over), cloned or copied into a new file
/// there; then `renameat` over `to`, `to` checked, the directory removed.
/// Returns the identity now at `to`.
fn put_back(f: &File, to: &Path, attempt: u32) -> StepResult<File> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_path(to, &format!("fix{attempt}-{}", std::process::id()));
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| StepError::Invalid(format!("path {} contains NUL", p.display())))
    };
    let cdir = c(&dir)?;
    // SAFETY: valid C string.
    if unsafe { libc::mkdir(cdir.as_ptr(), 0o700) } != 0 {
        return Err(io_err("mkdir", &dir, io::Error::last_os_error()));
    }
    let result = (|| {
        let d = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dir)
            .map_err(|e| io_err("open directory", &dir, e))?;
        let m = d.metadata().map_err(|e| io_err("stat", &dir, e))?;
        // SAFETY: geteuid has no preconditions.
        if !m.is_dir() || m.uid() != unsafe { libc::geteuid() } || m.mode() & 0o077 != 0 {
            return Err(tampered(
                &dir,
                "it is not the private directory vsnap made".into(),
            ));
        }
        let name = c(Path::new("f"))?;
        let from = c(&fd_path(f))?;
        // SAFETY: valid descriptors and C strings.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                d.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        } == 0;
        let placed = if linked {
            f.try_clone().map_err(|e| io_err("dup", to, e))?
        } else {
            // No name left (ENOENT): a new file with the same bytes.
            let src_meta = f.metadata().map_err(|e| io_err("stat", to, e))?;
            // SAFETY: valid descriptor and C string.
            let fd = unsafe {
                libc::openat(
                    d.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_RDWR
                        | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            };
            if fd < 0 {
                return Err(io_err("create in", &dir, io::Error::last_os_error()));
            }
            // SAFETY: a new descriptor we own.
            let nf = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            copy_fd(f, &nf).map_err(|e| io_err("copy into", &dir, e))?;
            nf.set_permissions(std::fs::Permissions::from_mode(src_meta.mode() & 0o7777))
                .map_err(|e| io_err("chmod", &dir, e))?;
            nf.sync_all().map_err(|e| io_err("fsync", &dir, e))?;
            nf
        };
        let placed_id = FileId::of(&placed.metadata().map_err(|e| io_err("stat", to, e))?);
        let cto = c(to)?;
        // SAFETY: as above.
        let r =
            unsafe { libc::renameat(d.as_raw_fd(), name.as_ptr(), libc::AT_FDCWD, cto.as_ptr()) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: as above.
            unsafe { libc::unlinkat(d.as_raw_fd(), name.as_ptr(), 0) };
            return Err(io_err("rename over", to, e));
        }
        let m = std::fs::symlink_metadata(to).map_err(|e| io_err("stat", to, e))?;
        if m.file_type().is_file() && FileId::of(&m) == placed_id {
            Ok(placed)
        } else {
            Err(tampered(to, "replaced again".into()))
        }
    })();
    // SAFETY: valid C string; removes the directory only if it is empty.
    unsafe { libc::rmdir(cdir.as_ptr()) };
    result
}

/// The whole content of `src` into the empty `dst`: FICLONE where the
/// filesystem can, else a byte copy.
fn copy_fd(src: &File, dst: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    // SAFETY: FICLONE on two open descriptors.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = src.read_at(&mut buf, off)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
}

/// Whether `path` holds vsnap's file as far as can be told (see
/// [`verify_ours`]): used by probes, which must not call a replaced file
/// a done step.
pub fn is_ours(path: &Path) -> bool {
    verify_ours(path).is_ok()
}

/// A cheap fingerprint of a file's first 64 KiB (FNV-1a, 64 bit; stable
/// across builds): a qcow2 file's header, its L1 table's start, a raw
/// file's first sectors.
pub fn fingerprint(f: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &buf[..n] {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(h)
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
