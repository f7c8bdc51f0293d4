//! A qcow2 overlay written onto a block device: the target of an external
//! snapshot given as `<disk type='block'><source dev='/dev/...'/>`, a device
//! the caller made for it (as libvirt wants it). The device's first bytes,
//! which the overlay's metadata replaces, are saved to a file in the state
//! directory before anything is written, so that the undo puts them back
//! exactly; after the plan's pivot the saved copy is removed (a
//! `RemoveFile` step).
//!
//! The device is opened without following a link and exclusively
//! (`O_EXCL` on a block device: refused while it is mounted or held by
//! another exclusive user), and must be a block device.

use crate::fsops;
use crate::{Format, Probe, StepError, StepResult};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use vsnap_journal::failpoint::hit as failpoint_hit;

/// Open `device`: a block device, never through a symlink; for writing,
/// exclusively (EBUSY while it is mounted or held).
pub fn open(device: &Path, write: bool) -> StepResult<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if write {
        o.write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_EXCL);
    }
    let f = o.open(device).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => StepError::Invalid(format!(
            "{} is a symlink; vsnap writes an overlay only onto the device itself: give its real path",
            device.display()
        )),
        Some(libc::EBUSY) => StepError::Invalid(format!(
            "{} is in use (mounted, or held by another program): vsnap writes an overlay only onto a device nothing uses",
            device.display()
        )),
        _ => fsops::io_err("open", device, e),
    })?;
    let m = f.metadata().map_err(|e| fsops::io_err("stat", device, e))?;
    if !m.file_type().is_block_device() {
        return Err(StepError::Invalid(format!(
            "{} is not a block device",
            device.display()
        )));
    }
    Ok(f)
}

/// The size of the open device.
pub fn size(f: &File, device: &Path) -> StepResult<u64> {
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|e| fsops::io_err("find the size of", device, e))
}

/// The bytes the overlay's metadata occupies at the device's start: the
/// new image's first clusters exactly as [`crate::qcow2::write_overlay`]
/// lays them out, zeros between the pieces (the device's old bytes there
/// would read as refcount or table entries).
pub fn overlay_bytes(backing: &Path, backing_format: Format) -> StepResult<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let size = crate::qemu_img::overlay_size(backing, backing_format)?;
    let (pieces, len) = crate::qcow2::overlay_layout(
        backing.as_os_str().as_bytes(),
        backing_format.as_str(),
        size,
    )
    .map_err(|e| StepError::Invalid(format!("overlay on {}: {e}", backing.display())))?;
    let mut buf = vec![0u8; len as usize];
    for (off, bytes) in pieces {
        buf[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(buf)
}

/// Applied when the device starts with exactly the overlay's metadata.
pub fn probe(device: &Path, backing: &Path, backing_format: Format) -> StepResult<Probe> {
    let want = overlay_bytes(backing, backing_format)?;
    let f = open(device, false)?;
    let mut have = vec![0u8; want.len()];
    match f.read_exact_at(&mut have, 0) {
        Ok(()) => Ok(if have == want {
            Probe::Applied
        } else {
            Probe::NotApplied
        }),
        Err(e) => Err(fsops::io_err("read", device, e)),
    }
}

/// Save the device's first bytes to `saved` (unless saved already: an
/// earlier, interrupted apply kept the original there), then write the
/// overlay's metadata over them and fsync the device.
pub fn apply(
    device: &Path,
    backing: &Path,
    backing_format: Format,
    saved: &Path,
) -> StepResult<()> {
    let want = overlay_bytes(backing, backing_format)?;
    let f = open(device, true)?;
    let have = size(&f, device)?;
    if have < want.len() as u64 {
        return Err(StepError::Invalid(format!(
            "{} holds {have} bytes; the overlay's metadata alone needs {}: give a larger device",
            device.display(),
            want.len()
        )));
    }
    if !fsops::exists(saved)? {
        let mut old = vec![0u8; want.len()];
        f.read_exact_at(&mut old, 0)
            .map_err(|e| fsops::io_err("read", device, e))?;
        let part = fsops::temp_path(saved, "part");
        fsops::unlink_ours(&part)?;
        let s = fsops::create_excl_mode(&part, 0o600)?;
        s.write_all_at(&old, 0)
            .and_then(|_| s.sync_all())
            .map_err(|e| fsops::io_err("write", &part, e))?;
        drop(s);
        fsops::rename_ours(&part, saved)?;
        fsops::fsync_parent(saved)?;
    }
    failpoint_hit("step.overlay-on-device.saved");
    f.write_all_at(&want, 0)
        .and_then(|_| f.sync_all())
        .map_err(|e| fsops::io_err("write the qcow2 overlay onto", device, e))?;
    failpoint_hit("step.overlay-on-device.written");
    Ok(())
}

/// Put the device's saved first bytes back (when they were saved: else
/// nothing was written), fsync it, then remove the saved copy.
pub fn undo(device: &Path, saved: &Path) -> StepResult<()> {
    if !fsops::exists(saved)? {
        fsops::unlink_ours(&fsops::temp_path(saved, "part"))?;
        return Ok(());
    }
    let old = std::fs::read(saved).map_err(|e| fsops::io_err("read", saved, e))?;
    let f = open(device, true)?;
    f.write_all_at(&old, 0)
        .and_then(|_| f.sync_all())
        .map_err(|e| fsops::io_err("write back the saved start of", device, e))?;
    drop(f);
    failpoint_hit("step.overlay-on-device.restored");
    fsops::unlink_if_exists(saved)?;
    fsops::fsync_parent(saved)
}
