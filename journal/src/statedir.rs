//! Which directory may be a state directory, and making one.
//!
//! A state directory holds the journal that vsnap, often as root, carries
//! out: whoever can write it (or replace it) decides what vsnap does. So,
//! as ssh refuses a private key others can touch:
//!
//! * the directory must belong to the caller (its effective uid) and not
//!   be writable by group or others; every directory above it must belong
//!   to root or the caller and not be writable by group or others, unless
//!   it has the sticky bit (`/tmp`: nobody else can rename our entry);
//! * it must be vsnap's: one vsnap made (it holds the [`MARKER`] file), an
//!   empty one (vsnap writes the marker into it), or one an earlier vsnap
//!   made before the marker existed (only `db`, `lock`, `vsnap.sock`).
//!   Anything else (`/tmp`, a VM's directory) is refused, untouched;
//! * vsnap never changes the mode of a directory it did not create; one it
//!   creates is mode 0700.
//!
//! What [`prepare`] made is recorded in [`Made`], so that a command that
//! ends without having journaled anything (a query, a dry run, a refused
//! request) can remove it again: such a command leaves nothing behind.
use crate::{JournalError, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The file that marks a directory as a vsnap state directory.
pub const MARKER: &str = "vsnap-state";
const MARKER_TEXT: &str =
    "This directory is a vsnap state directory: its journal and catalog (see `vsnap --help`).\n";
/// What an earlier vsnap, before the marker, left in a state directory.
const LEGACY: &[&str] = &["db", "lock", "vsnap.sock"];

/// What [`prepare`] created: the directories (outermost first), and
/// whether it wrote the marker.
#[derive(Debug, Default, Clone)]
pub struct Made {
    pub dirs: Vec<PathBuf>,
    pub marker: bool,
}

impl Made {
    /// Whether this call made the directory vsnap's (created it, or
    /// adopted an empty one): then nothing else can be in it yet.
    pub fn anything(&self) -> bool {
        self.marker || !self.dirs.is_empty()
    }
}

fn refused(dir: &Path, why: String) -> JournalError {
    JournalError::StateDirRefused {
        dir: dir.to_path_buf(),
        why,
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Check the owner and mode of `dir` (if it exists) and of every directory
/// above it; nothing is created or changed. The client of `vsnap serve`
/// runs this before it hands a service its terminal.
pub fn check_safe(dir: &Path) -> Result<()> {
    let me = euid();
    let io = |source: std::io::Error| JournalError::StateDir {
        dir: dir.to_path_buf(),
        source,
    };
    let abs = std::path::absolute(dir).map_err(io)?;
    // The directory itself (following a symlink: its target is checked,
    // and the link's own directory with the others below).
    match std::fs::metadata(&abs) {
        Ok(m) => {
            if !m.is_dir() {
                return Err(refused(
                    dir,
                    "it is not a directory; give a new or empty directory".into(),
                ));
            }
            if m.uid() != me {
                return Err(refused(
                    dir,
                    format!(
                        "it belongs to uid {}, not to this user (uid {me}): its owner could \
                         rewrite the journal vsnap carries out; use a directory of your own",
                        m.uid()
                    ),
                ));
            }
            if m.mode() & 0o022 != 0 {
                return Err(refused(
                    dir,
                    format!(
                        "it is writable by group or others (mode {:o}): they could rewrite the \
                         journal vsnap carries out; `chmod go-w {}` if that is not meant",
                        m.mode() & 0o7777,
                        abs.display()
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // Every directory above: the path as given (a symlink's directory
    // counts), and where it really leads.
    let mut above: Vec<PathBuf> = abs.ancestors().skip(1).map(Path::to_path_buf).collect();
    let real = nearest_existing(&abs).and_then(|p| std::fs::canonicalize(p).ok());
    if let Some(real) = real {
        let skip = usize::from(real == abs || std::fs::metadata(&abs).is_ok());
        above.extend(real.ancestors().skip(skip).map(Path::to_path_buf));
    }
    for a in above {
        let m = match std::fs::metadata(&a) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        };
        let owner_ok = m.uid() == 0 || m.uid() == me;
        let sticky = m.mode() & libc::S_ISVTX != 0;
        if !owner_ok || (m.mode() & 0o022 != 0 && !sticky) {
            return Err(refused(
                dir,
                format!(
                    "the directory above it, {}, belongs to uid {} with mode {:o}: another \
                     user could replace the state directory; use a state directory whose \
                     parents only root or you can write",
                    a.display(),
                    m.uid(),
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

fn nearest_existing(p: &Path) -> Option<&Path> {
    p.ancestors().find(|a| std::fs::symlink_metadata(a).is_ok())
}

/// Make `dir` ready to hold a journal: check it ([`check_safe`]), create
/// it (mode 0700) if missing, and make sure it is vsnap's (see the module
/// docs). Refused directories are left exactly as they were.
pub fn prepare(dir: &Path) -> Result<Made> {
    check_safe(dir)?;
    let io = |source: std::io::Error| JournalError::StateDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut made = Made::default();
    if std::fs::symlink_metadata(dir).is_err() {
        // Outermost missing directory first; each made 0700.
        let mut missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_err())
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        for d in missing {
            match std::fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => made.dirs.push(d),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        }
        // Someone may have made it between the check and here: check the
        // result again rather than trust the mkdir.
        check_safe(dir)?;
    }
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        names.push(e.map_err(io)?.file_name());
    }
    if names.iter().any(|n| n == MARKER) {
        return Ok(made);
    }
    let legacy = !names.is_empty()
        && names.iter().any(|n| n == "db")
        && names.iter().all(|n| LEGACY.iter().any(|l| n == *l));
    if !names.is_empty() && !legacy {
        let mut shown: Vec<String> = names
            .iter()
            .take(3)
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        if names.len() > 3 {
            shown.push("...".into());
        }
        return Err(refused(
            dir,
            format!(
                "it is not a vsnap state directory (it holds {} and no `{MARKER}` file), and \
                 vsnap does not fill a directory it does not own: give a new or empty directory",
                shown.join(", ")
            ),
        ));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(MARKER))
        .map_err(io)?;
    made.marker = true;
    std::io::Write::write_all(&mut f, MARKER_TEXT.as_bytes()).map_err(io)?;
    Ok(made)
}

/// Remove what [`prepare`] made in `dir`, `db` and `lock` with it (the
/// caller holds the lock and has written nothing): the marker last, then
/// the directories it created, if they are empty.
pub(crate) fn unmake(dir: &Path, made: &Made) {
    let _ = std::fs::remove_dir_all(dir.join("db"));
    let _ = std::fs::remove_file(dir.join(crate::lock::LOCK_FILE));
    let _ = std::fs::remove_file(dir.join(crate::store::RESERVE));
    if made.marker {
        let _ = std::fs::remove_file(dir.join(MARKER));
    }
    for d in made.dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn new_dir_is_0700_and_marked() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/state");
        let made = prepare(&d).unwrap();
        assert_eq!(made.dirs.len(), 3);
        assert!(made.marker);
        assert_eq!(mode(&d), 0o700);
        assert!(d.join(MARKER).exists());
        // Again: ours, nothing more made.
        assert!(!prepare(&d).unwrap().anything());
        unmake(&d, &made);
        assert!(!t.path().join("a").exists());
    }

    #[test]
    fn foreign_non_empty_dir_is_refused_untouched() {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(t.path().join("vm.qcow2"), "x").unwrap();
        let e = prepare(t.path()).unwrap_err().to_string();
        assert!(e.contains("not a vsnap state directory"), "{e}");
        assert_eq!(mode(t.path()), 0o755);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn empty_dir_is_adopted_without_chmod_and_legacy_is_accepted() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("empty");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).unwrap();
        let made = prepare(&d).unwrap();
        assert!(made.marker && made.dirs.is_empty());
        assert_eq!(mode(&d), 0o750);
        let old = t.path().join("old");
        std::fs::create_dir_all(old.join("db")).unwrap();
        std::fs::write(old.join("lock"), "").unwrap();
        assert!(prepare(&old).unwrap().marker);
    }

    #[test]
    fn group_writable_dir_or_parent_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("s");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(prepare(&d)
            .unwrap_err()
            .to_string()
            .contains("writable by group"));
        let p = t.path().join("loose");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&p.join("s")).unwrap_err().to_string();
        assert!(e.contains("directory above it"), "{e}");
        assert!(!p.join("s").exists());
    }

    #[test]
    fn dir_of_another_user_is_refused() {
        if euid() != 0 {
            return; // only root can give a directory away
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let e = prepare(&d).unwrap_err().to_string();
        assert!(e.contains("belongs to uid 65534"), "{e}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }
}
