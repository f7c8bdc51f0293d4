//! Reflink (FICLONE) and full copy of a whole file.
//!
//! Both create the target with `O_EXCL | O_NOFOLLOW` and leave nothing
//! behind when they fail before the data is in place.

use crate::fsops::{create_excl, fsync_parent, io_err, open_ours, parent_dir, unlink_ours};
use crate::{Progress, StepError, StepResult};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Chunk of a full copy.
const CHUNK: usize = 1 << 20;
/// A copy reports progress about this often (and once at the end).
const PROGRESS_EVERY: u64 = 64 << 20;

/// errno values by which FICLONE says "not here" rather than "failed".
fn reflink_unsupported_errno(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_src(src: &Path) -> StepResult<(File, u64)> {
    // Not through a symlink, and the inode vsnap expects there.
    let f = open_ours(src, true)?;
    let m = f.metadata().map_err(|e| io_err("stat", src, e))?;
    if !m.is_file() {
        return Err(StepError::Invalid(format!(
            "{} is not a regular file",
            src.display()
        )));
    }
    Ok((f, m.len()))
}

/// Remove a `dst` we created and are abandoning (best effort: the error
/// that made us abandon it is the one reported).
fn discard(dst: &Path) {
    let _ = unlink_ours(dst).and_then(|_| fsync_parent(dst));
}

/// Copy-on-write clone of `src` at a new file `dst` (FICLONE), then fsync
/// of the file and its directory. Where the filesystem cannot (EOPNOTSUPP,
/// EXDEV, EINVAL, ENOTTY), `dst` is removed again and the error is
/// [`StepError::ReflinkUnsupported`].
pub fn reflink(src: &Path, dst: &Path) -> StepResult<()> {
    let (sf, _) = open_src(src)?;
    let df = create_excl(dst)?;
    if let Err(e) = ficlone(&df, &sf) {
        drop(df);
        discard(dst);
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(StepError::FilesystemFull {
                path: dst.to_path_buf(),
                available: fs2::available_space(parent_dir(dst)).unwrap_or(0),
                what: "a reflink clone (it shares the data, but needs room for its metadata)",
            });
        }
        if reflink_unsupported_errno(&e) {
            return Err(StepError::ReflinkUnsupported {
                path: dst.to_path_buf(),
                reason: format!("FICLONE from {}: {e}", src.display()),
            });
        }
        return Err(io_err("reflink to", dst, e));
    }
    vsnap_journal::failpoint::hit("step.clone.before-fsync");
    df.sync_all().map_err(|e| io_err("fsync", dst, e))?;
    fsync_parent(dst)
}

/// Reserve `len` bytes for `f` without changing its size (so the size
/// reaches the source's only when the last byte is written). Returns
/// Ok(false) where the filesystem cannot preallocate.
///
/// (`fs2::FileExt::allocate` is not used: it calls `posix_fallocate`,
/// which returns its error instead of setting errno, and then reads errno,
/// so an ENOSPC can come back as anything.)
fn preallocate(f: &File, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

/// Full byte copy of `src` to a new file `dst`: checks that `dst`'s
/// filesystem has room for it before creating anything
/// ([`StepError::NoSpace`]), creates `dst` with `O_EXCL`, preallocates it
/// (ENOSPC there: `dst` removed, `NoSpace`), copies in 1 MiB chunks
/// reporting progress about every 64 MiB and at the end, then fsyncs the
/// file and its directory. Any failure after creating `dst` removes it.
pub fn copy(src: &Path, dst: &Path, progress: &dyn Fn(&Progress)) -> StepResult<()> {
    let (sf, len) = open_src(src)?;
    let dir = parent_dir(dst);
    let available = fs2::available_space(dir).map_err(|e| io_err("statvfs", dir, e))?;
    if available < len {
        return Err(StepError::NoSpace {
            path: dst.to_path_buf(),
            needed: len,
            available,
        });
    }
    let df = create_excl(dst)?;
    match fill(&sf, len, &df, src, dst, progress) {
        Ok(()) => {
            drop(df);
            fsync_parent(dst)
        }
        Err(e) => {
            drop(df);
            discard(dst);
            Err(e)
        }
    }
}

fn fill(
    mut sf: &File,
    len: u64,
    mut df: &File,
    src: &Path,
    dst: &Path,
    progress: &dyn Fn(&Progress),
) -> StepResult<()> {
    let no_space = |available: u64| StepError::NoSpace {
        path: dst.to_path_buf(),
        needed: len,
        available,
    };
    let available_now = || fs2::available_space(parent_dir(dst)).unwrap_or(0);
    match preallocate(df, len) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Err(no_space(available_now())),
        Err(e) => return Err(io_err("preallocate", dst, e)),
    }
    let what = format!("copy {} to {}", src.display(), dst.display());
    let report = |done: u64| {
        progress(&Progress {
            what: what.clone(),
            done_bytes: done,
            total_bytes: len,
        })
    };
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut next_report = PROGRESS_EVERY;
    loop {
        let n = match sf.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", src, e)),
        };
        if let Err(e) = df.write_all(&buf[..n]) {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(no_space(available_now()));
            }
            return Err(io_err("write", dst, e));
        }
        done += n as u64;
        if done >= next_report {
            report(done);
            next_report = done + PROGRESS_EVERY;
        }
    }
    if done != len {
        return Err(StepError::Invalid(format!(
            "{} changed size during the copy ({len} bytes expected, {done} read)",
            src.display()
        )));
    }
    vsnap_journal::failpoint::hit("step.clone.before-fsync");
    df.sync_all().map_err(|e| io_err("fsync", dst, e))?;
    report(done);
    Ok(())
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn available_space(dir: &Path) -> StepResult<u64> {
    fs2::available_space(dir).map_err(|e| io_err("statvfs", dir, e))
}

/// Fail with [`StepError::NoSpace`] unless `needed` bytes are free where `target` goes.
pub fn require_space(target: &Path, needed: u64) -> StepResult<()> {
    let available = available_space(parent_dir(target))?;
    if available < needed {
        return Err(StepError::NoSpace {
            path: target.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

/// What the filesystem of a directory says about reflinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReflinkProbe {
    /// FICLONE works there.
    Supported,
    /// FICLONE is not available there (EOPNOTSUPP, EXDEV, EINVAL, ENOTTY,
    /// or the probe could not run): the reason.
    Unsupported(String),
}

impl ReflinkProbe {
    pub fn supported(&self) -> bool {
        *self == ReflinkProbe::Supported
    }
}

/// Whether the filesystem of `dir` can make reflinks: tries FICLONE
/// between two unnamed `O_TMPFILE` files in `dir`. They have no name, so
/// the probe leaves no entry in the directory, even if vsnap dies.
///
/// A full filesystem is not one without reflinks: when the probe cannot
/// write its 4 KiB (ENOSPC), it clones an empty file instead, which asks
/// the filesystem whether it can clone at all without needing room (a
/// clone shares extents; on a full btrfs it still works).
pub fn reflink_probe(dir: &Path) -> ReflinkProbe {
    let tmpfile = || -> io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(dir)
    };
    let attempt = || -> io::Result<io::Result<()>> {
        let mut fa = tmpfile()?;
        if let Err(e) = fa.write_all(&[0x5a; 4096]) {
            if e.raw_os_error() != Some(libc::ENOSPC) {
                return Err(e);
            }
            // Full: an empty source asks the same question without data.
            fa = tmpfile()?;
        }
        let fb = tmpfile()?;
        Ok(ficlone(&fb, &fa))
    };
    match attempt() {
        Ok(Ok(())) => ReflinkProbe::Supported,
        // FICLONE said "no room" (metadata): it can, but not now; the
        // clone itself reports the full filesystem.
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOSPC) => ReflinkProbe::Supported,
        Ok(Err(e)) => ReflinkProbe::Unsupported(format!("FICLONE: {e}")),
        Err(e) => ReflinkProbe::Unsupported(format!("probe in {}: {e}", dir.display())),
    }
}

/// [`reflink_probe`] as a yes or no.
pub fn reflink_supported(dir: &Path) -> bool {
    reflink_probe(dir).supported()
}
