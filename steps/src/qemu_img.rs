//! qemu-img / qemu-io adapter.
//!
//! * The format is always explicit (`-f`, `-F`): qemu never probes it.
//! * `-U` (force share) only for read-only queries, and only when asked.
//! * No shell: arguments go to `execve` as they are. A relative path is
//!   passed as `./path`, so a file name can be neither an option (`-x`)
//!   nor a protocol or JSON spec (`nbd:...`, `json:{...}`).
//! * Every child gets `PR_SET_PDEATHSIG(SIGKILL)`: a killed vsnap does not
//!   leave a qemu-img running and holding image locks. (The signal follows
//!   the death of the *thread* that spawned the child; the functions here
//!   wait for their child on that same thread.)
//! * A lock conflict maps to [`StepError::InUse`]; any other failure to
//!   [`StepError::Command`] with qemu's trimmed stderr.

use crate::{Format, StepError, StepResult};
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const QEMU_IMG: &str = "qemu-img";
const QEMU_IO: &str = "qemu-io";

/// What `qemu-img info` says about one image (not its backing chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format qemu opened it as (`qcow2`, `raw`).
    pub format: String,
    pub virtual_size: u64,
    /// The backing file, absolute (qemu's `full-backing-filename`).
    pub backing: Option<PathBuf>,
    /// The backing format recorded in the image, when one is.
    pub backing_format: Option<Format>,
    /// Names of the internal snapshots (qcow2), in table order.
    pub snapshots: Vec<String>,
    /// Their qcow2 IDs, in the same order (`snapshots[i]` has ID
    /// `snapshot_ids[i]`).
    pub snapshot_ids: Vec<String>,
}

/// Result of `qemu-img check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    /// No corruption, no leak, no check error.
    pub clean: bool,
    pub corruptions: u64,
    pub leaks: u64,
    /// qemu-img's JSON output (or a note for raw images).
    pub output: String,
}

/// A `Command` for `program` whose child dies with the calling thread
/// (`PR_SET_PDEATHSIG(SIGKILL)`), stdin from /dev/null, locale `C`.
/// Use it for every child that may hold an image lock.
pub fn child_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).env("LC_ALL", "C");
    // SAFETY: getpid is async-signal-safe; the closure only calls prctl and
    // getppid (both async-signal-safe) between fork and exec.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before prctl took effect: do not run orphaned.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// `path` as an argument qemu reads as a plain file name.
pub fn path_arg(path: &Path) -> OsString {
    if path.is_absolute() {
        path.as_os_str().to_owned()
    } else {
        let mut s = OsString::from("./");
        s.push(path.as_os_str());
        s
    }
}

fn is_lock_conflict(stderr: &str) -> bool {
    stderr.contains("Failed to get") && stderr.contains("lock")
}

/// Run `program args...` about image `path`; Ok(output) when it exited 0
/// (or with one of `ok_codes`).
/// Started with [`crate::spawn`] (vfork-like, with the same death signal
/// and environment as [`child_command`]).
fn run(program: &str, args: &[&OsStr], path: &Path, ok_codes: &[i32]) -> StepResult<Output> {
    run_keeping(program, args, path, ok_codes, &[])
}

/// [`run`], the child inheriting the descriptors `keep` (for
/// `/proc/self/fd/N` file names).
fn run_keeping(
    program: &str,
    args: &[&OsStr],
    path: &Path,
    ok_codes: &[i32],
    keep: &[std::os::fd::RawFd],
) -> StepResult<Output> {
    let out = crate::spawn::output_keeping(program, args, &[("LC_ALL", "C")], keep).map_err(
        |source| StepError::Spawn {
            program: program.to_string(),
            source,
        },
    )?;
    let code = out.status.code();
    if out.status.success() || code.is_some_and(|c| ok_codes.contains(&c)) {
        return Ok(out);
    }
    Err(failure(program, path, &out))
}

fn failure(program: &str, path: &Path, out: &Output) -> StepError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stderr.contains("creates an infinite loop") {
        // QEMU's own loop detection (`info --backing-chain`); not a lock.
        return StepError::BackingLoop {
            files: vec![path.to_path_buf()],
        };
    }
    if is_lock_conflict(&stderr) || is_lock_conflict(&stdout) {
        return StepError::InUse {
            path: path.to_path_buf(),
        };
    }
    let mut message = stderr.trim().to_string();
    if message.is_empty() {
        message = stdout.trim().to_string();
    }
    if message.is_empty() {
        message = format!("{}", out.status);
    }
    StepError::Command {
        program: program.to_string(),
        path: path.to_path_buf(),
        message,
    }
}

fn bad_output(program: &str, path: &Path, what: impl std::fmt::Display) -> StepError {
    StepError::Command {
        program: program.to_string(),
        path: path.to_path_buf(),
        message: format!("unexpected output: {what}"),
    }
}

/// `qemu-img info --output=json -f FMT [-U] PATH`.
pub fn info(path: &Path, format: Format, force_share: bool) -> StepResult<ImageInfo> {
    let p = path_arg(path);
    let mut args: Vec<&OsStr> = vec![
        "info".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
    ];
    if force_share {
        args.push("-U".as_ref());
    }
    args.push(&p);
    let out = run(QEMU_IMG, &args, path, &[])?;
    parse_info(path, &out.stdout)
}

fn parse_info(path: &Path, stdout: &[u8]) -> StepResult<ImageInfo> {
    let v: Value = serde_json::from_slice(stdout).map_err(|e| bad_output(QEMU_IMG, path, e))?;
    let format = v
        .get("format")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_output(QEMU_IMG, path, "no \"format\""))?
        .to_string();
    let virtual_size = v
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad_output(QEMU_IMG, path, "no \"virtual-size\""))?;
    let backing = v
        .get("full-backing-filename")
        .or_else(|| v.get("backing-filename"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let b = PathBuf::from(s);
            if b.is_absolute() {
                b
            } else {
                crate::fsops::parent_dir(path).join(b)
            }
        });
    let backing_format = v
        .get("backing-filename-format")
        .and_then(Value::as_str)
        .and_then(Format::parse);
    let field = |s: &Value, k: &str| s.get(k).and_then(Value::as_str).map(String::from);
    let (snapshot_ids, snapshots) = v
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| Some((field(s, "id")?, field(s, "name")?)))
                .unzip()
        })
        .unwrap_or_default();
    Ok(ImageInfo {
        format,
        virtual_size,
        backing,
        backing_format,
        snapshots,
        snapshot_ids,
    })
}

/// The format from the first 4 bytes: `QFI\xfb` is qcow2, anything else
/// (including a file shorter than 4 bytes) raw. For tests and diagnostics
/// only: vsnap never decides an image's format from its bytes, which a
/// guest writes into a raw disk (`vsnap-engine`'s `image.rs` says where
/// the format comes from).
pub fn detect_format(path: &Path) -> StepResult<Format> {
    Ok(if has_qcow2_magic(path)? {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Whether the file at `path` starts with the qcow2 magic `QFI\xfb` (a
/// file shorter than 4 bytes does not). A check, never a choice: see
/// [`detect_format`].
pub fn has_qcow2_magic(path: &Path) -> StepResult<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| crate::fsops::io_err("open", path, e))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(crate::fsops::io_err("read", path, e)),
        }
    }
    Ok(n == 4 && &magic == b"QFI\xfb")
}

/// `qemu-img create -q -f FMT PATH SIZE` (tests and the demo).
pub fn create(path: &Path, format: Format, size: u64) -> StepResult<()> {
    let p = path_arg(path);
    let size = size.to_string();
    let args: [&OsStr; 6] = [
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        &p,
        size.as_ref(),
    ];
    run(QEMU_IMG, &args, path, &[]).map(drop)
}

/// `qemu-img create -q -f qcow2 -b BACKING -F FMT PATH`: a qcow2 overlay,
/// sized from its backing. `backing` must be absolute (qemu would read a
/// relative one against the overlay's directory).
pub fn create_overlay(path: &Path, backing: &Path, backing_format: Format) -> StepResult<()> {
    create_overlay_run(&path_arg(path), path, backing, backing_format, &[])
}

/// [`create_overlay`] into the file open as `f` (new, empty, made by
/// vsnap with `O_EXCL`; `path` is its name, for messages), written
/// natively ([`crate::qcow2::write_overlay`]: the very bytes `qemu-img
/// create -u` writes, tested equal): no process, no backing file opened,
/// nothing written through a name. The caller fsyncs it. The size is the
/// backing image's virtual size, read natively.
pub fn create_overlay_fd(
    f: &std::fs::File,
    path: &Path,
    backing: &Path,
    backing_format: Format,
) -> StepResult<()> {
    use std::os::unix::ffi::OsStrExt;
    if !backing.is_absolute() {
        return Err(StepError::Invalid(format!(
            "backing file {} of overlay {} must be an absolute path",
            backing.display(),
            path.display()
        )));
    }
    let size = overlay_size(backing, backing_format)?;
    crate::qcow2::write_overlay(
        f,
        backing.as_os_str().as_bytes(),
        backing_format.as_str(),
        size,
    )
    .map_err(|e| crate::fsops::io_err("write the qcow2 overlay", path, e))
}

/// An overlay's virtual size: its backing image's, read natively (one
/// header, or a stat), as QEMU sees it (a raw file's length rounded up to
/// whole 512-byte sectors). Given to qemu-img with -u, it opens no backing
/// file; without, it opens the whole chain to learn a size (about 1 ms per
/// file: 20 ms at depth 20, per disk).
pub(crate) fn overlay_size(backing: &Path, backing_format: Format) -> StepResult<u64> {
    Ok(image_info(backing, backing_format, true)?
        .virtual_size
        .div_ceil(512)
        * 512)
}

/// `qemu-img create -q -f qcow2 -u -b BACKING -F FMT IMAGE SIZE`, the child
/// inheriting `keep` ([`create_overlay`]). `path` names the overlay in
/// messages; the backing path must be absolute.
fn create_overlay_run(
    image: &OsStr,
    path: &Path,
    backing: &Path,
    backing_format: Format,
    keep: &[std::os::fd::RawFd],
) -> StepResult<()> {
    if !backing.is_absolute() {
        return Err(StepError::Invalid(format!(
            "backing file {} of overlay {} must be an absolute path",
            backing.display(),
            path.display()
        )));
    }
    let size = overlay_size(backing, backing_format)?.to_string();
    let args: [&OsStr; 11] = [
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-u".as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        "-F".as_ref(),
        backing_format.as_str().as_ref(),
        image,
        size.as_ref(),
    ];
    run_keeping(QEMU_IMG, &args, path, &[], keep).map(drop)
}

/// Internal snapshot names of a qcow2 image, read natively
/// ([`crate::qcow2`]; `qemu-img info` only for an image that reader does
/// not handle). Without `force_share`, an image a running QEMU holds is
/// [`StepError::InUse`], as `qemu-img info` without `-U` would say.
pub fn snapshot_names(path: &Path, force_share: bool) -> StepResult<Vec<String>> {
    Ok(image_info(path, Format::Qcow2, force_share)?.snapshots)
}

/// What [`info`] says, read natively where it can be: the qcow2 header
/// and snapshot table by [`crate::qcow2`], a raw file's size by `stat`;
/// `qemu-img info -U` for images that reader does not handle. Without
/// `force_share` the image must not be held by a running QEMU (its image
/// locks, [`crate::qcow2::qemu_holds`]): [`StepError::InUse`] otherwise.
///
/// Same answer as [`info`] (tested against it), without the 7-12 ms of a
/// `qemu-img` process.
pub fn image_info(path: &Path, format: Format, force_share: bool) -> StepResult<ImageInfo> {
    let f = std::fs::File::open(path).map_err(|e| crate::fsops::io_err("open", path, e))?;
    if !force_share
        && crate::qcow2::qemu_holds_file(&f)
            .map_err(|e| crate::fsops::io_err("test the image locks of", path, e))?
    {
        return Err(StepError::InUse {
            path: path.to_path_buf(),
        });
    }
    match format {
        Format::Raw => {
            // A block device's length is where a seek to its end lands
            // (its stat size is 0); a file's, the same as its stat size.
            let len = {
                use std::io::Seek;
                (&f).seek(std::io::SeekFrom::End(0))
                    .map_err(|e| crate::fsops::io_err("find the size of", path, e))?
            };
            Ok(ImageInfo {
                format: "raw".into(),
                // QEMU rounds a raw file's size up to whole sectors.
                virtual_size: len.div_ceil(512) * 512,
                backing: None,
                backing_format: None,
                snapshots: Vec::new(),
                snapshot_ids: Vec::new(),
            })
        }
        Format::Qcow2 => match crate::qcow2::read_file(&f) {
            Ok(h) if !h.backing.as_deref().is_some_and(|b| b.contains(':')) => Ok(ImageInfo {
                format: "qcow2".into(),
                virtual_size: h.virtual_size,
                backing: h.backing.map(|b| {
                    let b = PathBuf::from(b);
                    if b.is_absolute() {
                        b
                    } else {
                        crate::fsops::parent_dir(path).join(b)
                    }
                }),
                backing_format: h.backing_format.as_deref().and_then(Format::parse),
                snapshots: h.snapshots,
                snapshot_ids: h.snapshot_ids,
            }),
            // A backing name with a protocol prefix (`json:`, `nbd:`) or
            // an image the reader does not handle: qemu-img knows.
            _ => info(path, format, true),
        },
    }
}

/// The most files a backing chain may have (the image itself included).
/// A chain is walked natively before any `qemu-img` opens it: QEMU opens a
/// whole chain recursively and has no limit of its own, so a loop
/// (`a -> b -> a`) kept `qemu-img check` busy for minutes and a very deep
/// chain costs a process per file in `vol check`. 256 is far more than a
/// snapshot tree needs (every external snapshot adds one file).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// The backing chain of `path` (opened as `format`), top first, each file
/// with its format, read natively ([`image_info`], force-shared, no
/// `qemu-img` for plain qcow2 files). A loop (a file met again, by device
/// and inode) is [`StepError::BackingLoop`] naming its files; a chain of
/// more than [`MAX_CHAIN_DEPTH`] files is [`StepError::ChainTooDeep`].
/// The walk stops at a missing backing file (the callers report it).
pub fn backing_chain(path: &Path, format: Format) -> StepResult<Vec<(PathBuf, Format)>> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<(PathBuf, Format)> = Vec::new();
    let mut ids: Vec<(u64, u64)> = Vec::new();
    let (mut cur, mut fmt) = (path.to_path_buf(), format);
    loop {
        let meta = match std::fs::metadata(&cur) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !out.is_empty() => {
                return Ok(out)
            }
            Err(e) => return Err(crate::fsops::io_err("stat", &cur, e)),
        };
        let id = (meta.dev(), meta.ino());
        if let Some(k) = ids.iter().position(|x| *x == id) {
            let mut files: Vec<PathBuf> = out[k..].iter().map(|(p, _)| p.clone()).collect();
            files.push(cur);
            return Err(StepError::BackingLoop { files });
        }
        if out.len() >= MAX_CHAIN_DEPTH {
            return Err(StepError::ChainTooDeep {
                path: path.to_path_buf(),
                limit: MAX_CHAIN_DEPTH,
            });
        }
        ids.push(id);
        let info = image_info(&cur, fmt, true)?;
        out.push((cur, fmt));
        let Some(b) = info.backing else {
            return Ok(out);
        };
        fmt = match info.backing_format {
            Some(f) => f,
            None => match detect_format(&b) {
                Ok(f) => f,
                Err(_) => return Ok(out),
            },
        };
        cur = b;
    }
}

/// What is wrong with the qcow2 image at `path`, read natively
/// ([`crate::qcow2::damage`]: the corrupt and dirty bits, the L1 and
/// refcount tables' bounds and entries); empty when nothing is, or when
/// the reader does not handle the image (qemu-img then judges it).
pub fn damage(path: &Path) -> StepResult<Vec<String>> {
    let f = std::fs::File::open(path).map_err(|e| crate::fsops::io_err("open", path, e))?;
    Ok(match crate::qcow2::read_file(&f) {
        Ok(h) => crate::qcow2::damage(&f, &h),
        Err(_) => Vec::new(),
    })
}

/// [`StepError::Damaged`] when [`damage`] finds anything.
pub fn refuse_damaged(path: &Path) -> StepResult<()> {
    let problems = damage(path)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StepError::Damaged {
            path: path.to_path_buf(),
            problems: problems.join("; "),
        })
    }
}

/// `qemu-img check -r leaks|all -f qcow2 PATH` (repair), then a
/// [`check`] of the result.
pub fn repair(path: &Path, all: bool) -> StepResult<CheckReport> {
    let p = path_arg(path);
    let args: [&OsStr; 7] = [
        "check".as_ref(),
        "-q".as_ref(),
        "-r".as_ref(),
        if all { "all" } else { "leaks" }.as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        &p,
    ];
    // 2 and 3: corruptions or leaks remain (the check below says which).
    run(QEMU_IMG, &args, path, &[2, 3])?;
    check(path, Format::Qcow2)
}

/// What `qemu-img snapshot` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOp {
    /// `-c`
    Create,
    /// `-a`
    Apply,
    /// `-d`
    Delete,
}

/// `--image-opts` spec of a plain file in `format`: the format and the
/// protocol are both explicit, and the file name is taken literally
/// (commas escaped as `,,`).
pub fn image_opts(path: &Path, format: Format) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut spec =
        format!("driver={},file.driver=file,file.filename=", format.as_str()).into_bytes();
    for &b in path.as_os_str().as_bytes() {
        spec.push(b);
        if b == b',' {
            spec.push(b',');
        }
    }
    OsString::from_vec(spec)
}

/// The qcow2 ID of the one internal snapshot named `name` in the qcow2
/// image at `path` (read natively; `qemu-img info -U` for an image the
/// reader does not handle); `None` when no snapshot has that name. More
/// than one snapshot named `name`, or an ID that is empty or shared by
/// several snapshots, is an error: qemu-img could take another one.
pub fn snapshot_id(path: &Path, name: &str) -> StepResult<Option<String>> {
    let info = image_info(path, Format::Qcow2, true)?;
    let ambiguous = |why: String| StepError::Command {
        program: QEMU_IMG.to_string(),
        path: path.to_path_buf(),
        message: format!(
            "{why}; vsnap cannot tell which snapshot qemu-img would take and does not touch it: \
             inspect the image with `qemu-img snapshot -l`"
        ),
    };
    let mut found = info
        .snapshots
        .iter()
        .zip(&info.snapshot_ids)
        .filter(|(n, _)| *n == name)
        .map(|(_, id)| id);
    let Some(id) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(ambiguous(format!(
            "the image holds more than one internal snapshot named {name:?}"
        )));
    }
    let same_id = info.snapshot_ids.iter().filter(|i| *i == id).count();
    if id.is_empty() || same_id > 1 {
        return Err(ambiguous(format!(
            "internal snapshot {name:?} has the ID {id:?}, which is empty or not unique"
        )));
    }
    Ok(Some(id.clone()))
}

/// `qemu-img snapshot -c|-a|-d` on a qcow2 image. The format is given
/// through `--image-opts` (older qemu-img snapshot has no `-f`, and a
/// probed format is what we never allow).
///
/// **Snapshots are addressed so that no name can be read as an ID.**
/// qemu-img 7.2 looks its argument up two ways: `-a X` (like QEMU's
/// `loadvm`) takes the snapshot whose *ID* is `X` first and reads `X` as a
/// name only when no ID matches, so `-a 1` on an image holding snapshots
/// named `2` (ID 1) and `1` (ID 2) applies the one named `2`; `-d X` looks
/// `X` up as a name only (`bdrv_snapshot_find`). So:
/// * apply looks `name` up natively ([`snapshot_id`]) and hands qemu-img
///   that snapshot's own ID, which the ID-first lookup finds exactly (IDs
///   are checked unique);
/// * delete hands qemu-img the name (checked unique), and checks after it
///   that exactly that snapshot went: a qemu-img that read the name as an
///   ID would be caught, not believed;
/// * create takes `name` as the new snapshot's name, never a lookup.
pub fn snapshot(path: &Path, op: SnapshotOp, name: &str) -> StepResult<()> {
    snapshot_at(path, None, op, name)
}

fn snapshot_at(
    path: &Path,
    fd: Option<&std::fs::File>,
    op: SnapshotOp,
    name: &str,
) -> StepResult<()> {
    use std::os::fd::AsRawFd;
    // Everything is read and written through the descriptor when there is one.
    let at = fd.map_or_else(|| path.to_path_buf(), crate::fsops::fd_path);
    let keep: Vec<std::os::fd::RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let missing = || StepError::Command {
        program: QEMU_IMG.to_string(),
        path: path.to_path_buf(),
        message: format!("no internal snapshot named {name:?} in the image"),
    };
    let (flag, arg, gone) = match op {
        SnapshotOp::Create => ("-c", name.to_string(), None),
        SnapshotOp::Apply => ("-a", snapshot_id(&at, name)?.ok_or_else(missing)?, None),
        SnapshotOp::Delete => {
            let id = snapshot_id(&at, name)?.ok_or_else(missing)?;
            let before = image_info(&at, Format::Qcow2, true)?.snapshot_ids;
            ("-d", name.to_string(), Some((id, before)))
        }
    };
    let spec = image_opts(&at, Format::Qcow2);
    let args: [&OsStr; 6] = [
        "snapshot".as_ref(),
        "-q".as_ref(),
        "--image-opts".as_ref(),
        flag.as_ref(),
        arg.as_ref(),
        &spec,
    ];
    run_keeping(QEMU_IMG, &args, path, &[], &keep)?;
    if let Some((id, before)) = gone {
        let after = image_info(&at, Format::Qcow2, true)?.snapshot_ids;
        let want: Vec<&String> = before.iter().filter(|i| **i != id).collect();
        if after.iter().collect::<Vec<_>>() != want {
            return Err(StepError::Command {
                program: QEMU_IMG.to_string(),
                path: path.to_path_buf(),
                message: format!(
                    "`qemu-img snapshot -d {name}` was to delete the snapshot of ID {id}; \
                     the image held snapshot IDs {before:?} before and holds {after:?} now"
                ),
            });
        }
    }
    Ok(())
}

/// [`snapshot`] on the qcow2 file open as `f` (opened by vsnap without
/// following a link; `path` is its name, for messages): qemu-img opens
/// `/proc/self/fd/N`, that very file, and the IDs are read from it too.
/// (`snapshot` opens no backing file, so the name's directory does not
/// matter.)
pub fn snapshot_fd(f: &std::fs::File, path: &Path, op: SnapshotOp, name: &str) -> StepResult<()> {
    snapshot_at(path, Some(f), op, name)
}

/// `qemu-img rebase -f FMT [-u] -b NEW -F NEWFMT PATH` (`-b ""` for no
/// backing file). A new backing path must be absolute.
pub fn rebase(
    path: &Path,
    format: Format,
    new_backing: Option<(&Path, Format)>,
    unsafe_: bool,
) -> StepResult<()> {
    let p = path_arg(path);
    let head: [&OsStr; 3] = ["rebase".as_ref(), "-f".as_ref(), format.as_str().as_ref()];
    rebase_run(&head, &p, path, new_backing, unsafe_, &[])
}

/// [`rebase`] of the image open as `f` (opened by vsnap without following
/// a link; `path` is its name, for messages), through `--image-opts` on
/// `/proc/self/fd/N`: qemu-img writes to that very file. Only for an image
/// whose backing name is absolute (or none): qemu would read a relative
/// one against `/proc/self/fd`.
pub fn rebase_fd(
    f: &std::fs::File,
    path: &Path,
    format: Format,
    new_backing: Option<(&Path, Format)>,
    unsafe_: bool,
) -> StepResult<()> {
    use std::os::fd::AsRawFd;
    let spec = image_opts(&crate::fsops::fd_path(f), format);
    let head: [&OsStr; 2] = ["rebase".as_ref(), "--image-opts".as_ref()];
    rebase_run(&head, &spec, path, new_backing, unsafe_, &[f.as_raw_fd()])
}

/// `qemu-img HEAD... [-u] -b NEW -F NEWFMT IMAGE` (`-b ""` for no backing
/// file), the child inheriting `keep`: what [`rebase`] and [`rebase_fd`]
/// share. A new backing path must be absolute.
fn rebase_run(
    head: &[&OsStr],
    image: &OsStr,
    path: &Path,
    new_backing: Option<(&Path, Format)>,
    unsafe_: bool,
    keep: &[std::os::fd::RawFd],
) -> StepResult<()> {
    let mut args: Vec<&OsStr> = head.to_vec();
    if unsafe_ {
        args.push("-u".as_ref());
    }
    match new_backing {
        Some((b, bf)) => {
            if !b.is_absolute() {
                return Err(StepError::Invalid(format!(
                    "new backing file {} of {} must be an absolute path",
                    b.display(),
                    path.display()
                )));
            }
            args.extend([
                OsStr::new("-b"),
                b.as_os_str(),
                OsStr::new("-F"),
                OsStr::new(bf.as_str()),
            ]);
        }
        None => args.extend([OsStr::new("-b"), OsStr::new("")]),
    }
    args.push(image);
    run_keeping(QEMU_IMG, &args, path, &[], keep).map(drop)
}

/// `qemu-img commit -f FMT PATH`: write the image's data into its backing file.
pub fn commit(path: &Path, format: Format) -> StepResult<()> {
    let p = path_arg(path);
    let args: [&OsStr; 5] = [
        "commit".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        &p,
    ];
    run(QEMU_IMG, &args, path, &[]).map(drop)
}

/// `qemu-img check --output=json -f qcow2 PATH`. Exit codes 2 (corruptions)
/// and 3 (leaks) still carry the report. Raw images have nothing qemu can
/// check: reported clean without running anything.
pub fn check(path: &Path, format: Format) -> StepResult<CheckReport> {
    if format == Format::Raw {
        return Ok(CheckReport {
            clean: true,
            corruptions: 0,
            leaks: 0,
            output: "raw image: no metadata to check".to_string(),
        });
    }
    let p = path_arg(path);
    let args: [&OsStr; 5] = [
        "check".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_str().as_ref(),
        &p,
    ];
    let out = run(QEMU_IMG, &args, path, &[2, 3])?;
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&output).map_err(|e| {
        // exit 2/3 without JSON: report what qemu said
        if out.status.success() {
            bad_output(QEMU_IMG, path, e)
        } else {
            failure(QEMU_IMG, path, &out)
        }
    })?;
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let corruptions = n("corruptions");
    let leaks = n("leaks");
    let check_errors = n("check-errors");
    let clean = corruptions == 0 && leaks == 0 && check_errors == 0 && out.status.success();
    Ok(CheckReport {
        clean,
        corruptions,
        leaks,
        output,
    })
}

fn qemu_io(path: &Path, format: Format, read_only: bool, command: &str) -> StepResult<Output> {
    let p = path_arg(path);
    let mut args: Vec<&OsStr> = vec!["-f".as_ref(), format.as_str().as_ref()];
    if read_only {
        args.push("-r".as_ref());
    }
    args.extend([OsStr::new("-c"), OsStr::new(command), p.as_os_str()]);
    let mut cmd = child_command(QEMU_IO);
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.output().map_err(|source| StepError::Spawn {
        program: QEMU_IO.to_string(),
        source,
    })
}

/// `qemu-io -f FMT -c "write -P 0xNN OFFSET LEN" PATH`.
pub fn io_write_pattern(
    path: &Path,
    format: Format,
    offset: u64,
    len: u64,
    pattern: u8,
) -> StepResult<()> {
    let out = qemu_io(
        path,
        format,
        false,
        &format!("write -P 0x{pattern:02x} {offset} {len}"),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("wrote ") {
        Ok(())
    } else {
        Err(failure(QEMU_IO, path, &out))
    }
}

/// `qemu-io -f FMT -r -c "read -P 0xNN OFFSET LEN" PATH`: Ok(true) when all
/// LEN bytes at OFFSET are the pattern, Ok(false) when they are not.
pub fn io_read_pattern(
    path: &Path,
    format: Format,
    offset: u64,
    len: u64,
    pattern: u8,
) -> StepResult<bool> {
    let out = qemu_io(
        path,
        format,
        true,
        &format!("read -P 0x{pattern:02x} {offset} {len}"),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("Pattern verification failed")
        || stderr.contains("Pattern verification failed")
    {
        return Ok(false);
    }
    if out.status.success() && stdout.contains("read ") {
        Ok(true)
    } else {
        Err(failure(QEMU_IO, path, &out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_not_options_or_protocols() {
        assert_eq!(path_arg(Path::new("/a/b")), OsString::from("/a/b"));
        assert_eq!(path_arg(Path::new("-x")), OsString::from("./-x"));
        assert_eq!(path_arg(Path::new("json:{}")), OsString::from("./json:{}"));
    }

    #[test]
    fn image_opts_escape_commas() {
        assert_eq!(
            image_opts(Path::new("/a,b=c/x.qcow2"), Format::Qcow2),
            OsString::from("driver=qcow2,file.driver=file,file.filename=/a,,b=c/x.qcow2")
        );
    }

    #[test]
    fn parses_info_json() {
        let j = br#"{"format":"qcow2","virtual-size":1048576,
            "full-backing-filename":"/tmp/q/base.qcow2","backing-filename":"base.qcow2",
            "backing-filename-format":"qcow2",
            "snapshots":[{"name":"s1","id":"1"},{"name":"s2","id":"2"}]}"#;
        let i = parse_info(Path::new("/tmp/q/top.qcow2"), j).unwrap();
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 1048576);
        assert_eq!(i.backing.as_deref(), Some(Path::new("/tmp/q/base.qcow2")));
        assert_eq!(i.backing_format, Some(Format::Qcow2));
        assert_eq!(i.snapshots, vec!["s1", "s2"]);
        assert_eq!(i.snapshot_ids, vec!["1", "2"]);
        let i = parse_info(
            Path::new("/x/r.img"),
            br#"{"format":"raw","virtual-size":5}"#,
        )
        .unwrap();
        assert_eq!(i.backing, None);
        assert!(i.snapshots.is_empty());
    }

    #[test]
    fn lock_message() {
        assert!(is_lock_conflict(
            "qemu-img: Could not open 'b.qcow2': Failed to get shared \"write\" lock\nIs another process using the image [b.qcow2]?"
        ));
        assert!(!is_lock_conflict("Could not open: No such file"));
    }
}
