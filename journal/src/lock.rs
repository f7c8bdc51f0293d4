//! The state-directory lock: an exclusive lock (std `File::try_lock`, which
//! is `flock(2)` on Linux) on `<state_dir>/lock`, with the holder's pid
//! written inside so that a second process can say who holds it.
//!
//! `flock` locks belong to the open file description, not to the process:
//! a second `open` of the lock file, even in the same process, conflicts
//! with the first, and the kernel drops the lock when the holder dies, even
//! by SIGKILL, so no stale lock ever needs clearing by hand.
use crate::{JournalError, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Held for the life of a [`crate::Journal`]; released on drop.
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

/// How long a lock held by this same process is waited for (see `acquire`).
const OWN_PID_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The lock file's content: the holder's pid, padded to a fixed width so
/// that one write replaces any earlier pid.
fn pid_text(pid: u32) -> String {
    format!("{pid:<19}\n")
}

impl StateLock {
    /// Take the exclusive lock of `state_dir` (which must exist), without
    /// waiting: when another holder has it, [`JournalError::Locked`] names
    /// its pid. On success our pid is written into the lock file.
    pub fn acquire(state_dir: &Path) -> Result<StateLock> {
        let path = state_dir.join(LOCK_FILE);
        let err = |source: std::io::Error| JournalError::StateDir {
            dir: state_dir.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never follow a symlink someone planted in our state dir.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(err)?;
        // A holder that is this very process gets a short grace: between
        // fork and exec, a child that another thread of ours is starting
        // (qemu-img, say) holds a copy of the descriptor, and so the lock of
        // an engine we just dropped. Another process's lock fails at once.
        let deadline = std::time::Instant::now() + OWN_PID_GRACE;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let mut pid = String::new();
                    let _ = file.seek(SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut pid);
                    let pid = pid.trim().to_string();
                    if pid == std::process::id().to_string() && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    let pid = if pid.is_empty() {
                        "unknown (it is just starting)".to_string()
                    } else {
                        pid
                    };
                    return Err(JournalError::Locked {
                        dir: state_dir.to_path_buf(),
                        lock: path,
                        pid,
                    });
                }
                Err(TryLockError::Error(e)) => return Err(err(e)),
            }
        }
        let meta = file.metadata().map_err(err)?;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(err)?;
        }
        // One fixed-width write over the whole content (no truncate: it
        // costs a metadata update). Not synced: the pid only names the
        // holder to another process, and a crash that could lose it also
        // releases the lock.
        let text = pid_text(std::process::id());
        file.write_all_at(text.as_bytes(), 0).map_err(err)?;
        if meta.len() > text.len() as u64 {
            // Longer content of some other writer: cut it.
            file.set_len(text.len() as u64).map_err(err)?;
        }
        Ok(StateLock { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn pid_written_and_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(text, pid_text(std::process::id()));
        assert_eq!(text.trim(), std::process::id().to_string());
        assert_eq!(
            std::fs::metadata(lock.path()).unwrap().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn second_open_in_same_process_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateLock::acquire(dir.path()).unwrap();
        match StateLock::acquire(dir.path()) {
            Err(JournalError::Locked { dir: d, lock, pid }) => {
                assert_eq!(d, dir.path());
                assert_eq!(lock, dir.path().join(LOCK_FILE));
                assert_eq!(pid, std::process::id().to_string());
            }
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("expected Locked, got the lock twice"),
        }
    }

    #[test]
    fn released_on_drop_and_stale_pid_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LOCK_FILE),
            "999999999 and some longer junk\n",
        )
        .unwrap();
        let lock = StateLock::acquire(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(lock.path()).unwrap(),
            pid_text(std::process::id())
        );
        drop(lock);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn looser_lock_file_mode_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let _lock = StateLock::acquire(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn symlinked_lock_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(
            StateLock::acquire(dir.path()),
            Err(JournalError::StateDir { .. })
        ));
    }

    // The cross-process case (a child holds the lock, and the reverse) is
    // in tests/lock.rs, which re-executes its own test binary.
    #[test]
    fn lock_file_is_not_truncated_before_the_lock_is_ours() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateLock::acquire(dir.path()).unwrap();
        let _ = StateLock::acquire(dir.path());
        // The loser must not have wiped the holder's pid.
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(),
            pid_text(std::process::id())
        );
    }
}
