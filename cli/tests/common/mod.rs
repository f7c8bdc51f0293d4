//! Shared helpers of the CLI tests: the real `vsnap` and `vsnap-recover`
//! binaries, real `qemu-img`/`qemu-io`, real mounts, directories under
//! /var/tmp. The CLI crate has no dev-dependencies, so the few things
//! `tempfile` would give are done here with std.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

pub const VSNAP: &str = env!("CARGO_BIN_EXE_vsnap");
pub const VSNAP_RECOVER: &str = env!("CARGO_BIN_EXE_vsnap-recover");

/// A new directory under /var/tmp, removed (recursively) on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = PathBuf::from(format!(
            "/var/tmp/vsnap-cli-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a command did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Run `program args...` (stdin from /dev/null) to completion.
    pub fn from_command(program: &str, args: &[&str]) -> Out {
        Out::from(
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}")),
        )
    }

    /// The exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Out {
        assert_eq!(
            self.code, code,
            "exit code {} (want {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(&self) -> &Out {
        self.expect_code(0)
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// stderr holds every one of `words`.
    #[track_caller]
    pub fn stderr_has(&self, words: &[&str]) -> &Out {
        for w in words {
            assert!(
                self.stderr.contains(w),
                "stderr does not contain {w:?}:\n{}",
                self.stderr
            );
        }
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, words: &[&str]) -> &Out {
        for w in words {
            assert!(
                self.stdout.contains(w),
                "stdout does not contain {w:?}:\n{}",
                self.stdout
            );
        }
        self
    }
}

/// `vsnap --state-dir STATE`, stdin from /dev/null: to add arguments,
/// environment and redirections to.
pub fn vsnap_command(state: &Path) -> Command {
    let mut c = Command::new(VSNAP);
    c.arg("--state-dir").arg(state).stdin(Stdio::null());
    c
}

/// `vsnap --state-dir STATE ARGS...`, stdin from /dev/null.
pub fn vsnap(state: &Path, args: &[&str]) -> Out {
    Out::from(vsnap_command(state).args(args).output().expect("run vsnap"))
}

/// The write end of a pipe whose read end is already closed: every write
/// to it fails (EPIPE), as `vsnap ... | head` meets once head has gone.
pub fn pipe_nobody_reads() -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills fds with two new descriptors, owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    write_end
}

/// A running `vsnap serve` (killed when dropped).
pub struct Service {
    pub child: Child,
    pub socket: PathBuf,
}

impl Service {
    /// Start `vsnap serve` on `state` (with `env` added) and wait until its
    /// socket answers (bounded: a service that does not come up fails).
    pub fn start(state: &Path, env: &[(&str, &str)]) -> Service {
        let mut c = vsnap_command(state);
        c.arg("serve");
        for (k, v) in env {
            c.env(k, v);
        }
        Service::spawn(c, state)
    }

    /// Spawn `c` (a `vsnap ... serve` on `state`, stdout to /dev/null,
    /// stderr piped for [`Service::stop`]) and wait until its socket
    /// answers (bounded).
    pub fn spawn(mut c: Command, state: &Path) -> Service {
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vsnap serve");
        let socket = state.join("vsnap.sock");
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("vsnap serve exited at start: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vsnap serve did not listen on {} within 20 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Service { child, socket }
    }

    /// SIGTERM; the exit status and what it printed.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut said = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut said)
            .unwrap();
        (self.child.wait().unwrap(), said)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A libvirt domain document named `name` with one file disk per
/// (target, source, driver type: `None` writes no `<driver>`).
pub fn domain_xml(name: &str, disks: &[(&str, &Path, Option<&str>)]) -> String {
    let mut x = format!("<domain type='kvm'><name>{name}</name><devices>");
    for (target, source, ty) in disks {
        x.push_str("<disk type='file' device='disk'>");
        if let Some(ty) = ty {
            x.push_str(&format!("<driver name='qemu' type='{ty}'/>"));
        }
        x.push_str(&format!(
            "<source file='{}'/><target dev='{target}'/></disk>",
            source.display()
        ));
    }
    x.push_str("</devices></domain>");
    x
}

/// `vsnap --state-dir STATE ARGS...` is refused: exit 2, stderr has
/// `words`, and nothing changed: [`world`] of `state`, `dirs` and
/// `images` is the same after as before.
#[track_caller]
pub fn refused_untouched(
    state: &Path,
    dirs: &[&Path],
    images: &[&Path],
    args: &[&str],
    words: &[&str],
) -> Out {
    let before = world(state, dirs, images);
    let out = vsnap(state, args);
    out.expect_code(2).stderr_has(words);
    assert_unchanged(&before, &world(state, dirs, images));
    out
}

/// `vsnap ARGS...` without a state dir (for --help, --version).
pub fn vsnap_bare(args: &[&str]) -> Out {
    Out::from(
        Command::new(VSNAP)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vsnap"),
    )
}

pub fn vsnap_recover(state: &Path, args: &[&str]) -> Out {
    let mut c = Command::new(VSNAP_RECOVER);
    c.arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null());
    Out::from(c.output().expect("run vsnap-recover"))
}

/// Run `program args` with a deadline: a command that hangs is killed and
/// the test fails saying so.
pub fn run_with_deadline(program: &str, args: &[&str], deadline: Duration) -> (Out, Duration) {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    loop {
        if child.try_wait().unwrap().is_some() {
            let took = start.elapsed();
            return (Out::from(child.wait_with_output().unwrap()), took);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let out = Out::from(child.wait_with_output().unwrap());
            panic!("{program} {args:?} still ran after {deadline:?} (it hangs); killed it\nstderr:\n{}", out.stderr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run<A: AsRef<OsStr> + std::fmt::Debug>(program: &str, args: &[A]) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// `qemu-img create -q -f FORMAT PATH SIZE` (PATH need not be UTF-8).
pub fn qemu_img_create(path: &Path, format: &str, size: u64) {
    let size = size.to_string();
    run(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ],
    );
}

/// `qemu-img create -q -f qcow2 -b BACKING -F qcow2 PATH`: a qcow2
/// overlay whose backing file is named `backing` (as given: relative
/// names stay relative).
pub fn qemu_img_create_overlay(path: &Path, backing: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            s(path),
        ],
    );
}

/// `qemu-io -f FORMAT -c "write -P PATTERN OFFSET LEN" PATH` (PATH need
/// not be UTF-8).
pub fn qemu_io_write(path: &Path, format: &str, offset: u64, len: u64, pattern: u8) {
    let cmd = format!("write -P 0x{pattern:02x} {offset} {len}");
    run(
        "qemu-io",
        &[
            "-f".as_ref(),
            format.as_ref(),
            "-c".as_ref(),
            cmd.as_ref(),
            path.as_os_str(),
        ],
    );
}

/// Fill the filesystem of `dir` completely with a file `name`.
pub fn fill(dir: &Path, name: &str) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // Whatever is left, in small pieces.
    let small = [0x5au8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

/// Whether `LEN` bytes at `offset` hold `pattern` (`qemu-io -r`; PATH
/// need not be UTF-8).
pub fn qemu_io_reads(path: &Path, format: &str, offset: u64, len: u64, pattern: u8) -> bool {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            format,
            "-r",
            "-U",
            "-c",
            &format!("read -P 0x{pattern:02x} {offset} {len}"),
        ])
        .arg(path)
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("Pattern verification failed") {
        return false;
    }
    assert!(
        out.status.success() && text.contains("read "),
        "qemu-io read of {} failed: {text}",
        path.display()
    );
    true
}

/// `qemu-img snapshot -c NAME PATH` (behind vsnap's back).
pub fn qemu_img_snapshot_create(path: &Path, name: &str) {
    run("qemu-img", &["snapshot", "-c", name, s(path)]);
}

/// A mount, unmounted on drop (lazily if it is busy).
pub struct Mount {
    pub mnt: PathBuf,
}

impl Mount {
    /// A `size` ext4 (no reserved blocks) on a loop device, mounted at `mnt`
    /// (created); the image file is `img`.
    pub fn ext4(img: &Path, mnt: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        run("truncate", &["-s", size, s(img)]);
        run("mkfs.ext4", &["-q", "-F", "-m", "0", s(img)]);
        run("mount", &["-o", "loop", s(img), s(mnt)]);
        Mount {
            mnt: mnt.to_path_buf(),
        }
    }

    /// A `size` btrfs on a loop device, mounted at `mnt` (created); the
    /// image file is `img`. btrfs can reflink (FICLONE).
    pub fn btrfs(img: &Path, mnt: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        run("truncate", &["-s", size, s(img)]);
        run("mkfs.btrfs", &["-q", "-f", s(img)]);
        run("mount", &["-o", "loop", s(img), s(mnt)]);
        Mount {
            mnt: mnt.to_path_buf(),
        }
    }

    /// `mount --bind src mnt` (mnt created).
    pub fn bind(src: &Path, mnt: &Path) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        run("mount", &["--bind", s(src), s(mnt)]);
        Mount {
            mnt: mnt.to_path_buf(),
        }
    }

    /// Make a bind mount read-only.
    pub fn remount_ro_bind(&self) {
        run("mount", &["-o", "remount,ro,bind", s(&self.mnt)]);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A running `qemu-system-x86_64` with one qcow2 drive (CPUs stopped: `-S`;
/// the drive is open, and locked, all the same); killed on drop.
pub struct Qemu {
    child: Child,
}

impl Qemu {
    pub fn start(image: &Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-machine",
                "accel=tcg",
                "-S",
                "-drive",
            ])
            .arg(format!("file={},format=qcow2,if=virtio", s(image)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start qemu-system-x86_64 (Debian package qemu-system-x86)");
        let mut q = Qemu { child };
        // Wait until it holds the image's lock: `qemu-img info` (without -U) fails.
        let start = Instant::now();
        loop {
            if let Some(st) = q.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = q.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("qemu-system-x86_64 exited early ({st}): {err}");
            }
            let out = Command::new("qemu-img")
                .args(["info", "-f", "qcow2", s(image)])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && text.contains("lock") {
                return q;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "QEMU did not lock {} within 60 s",
                image.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Name, size, mtime and content hash of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileState {
    pub size: u64,
    pub mtime_ns: i128,
    pub hash: u64,
    pub mode: u32,
}

pub fn hash_file(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .hash(&mut h);
    h.finish()
}

/// `dir` itself and every entry under it, recursively (hidden ones included; symlinks
/// not followed, recorded with their target's name hashed).
pub fn tree_state(dir: &Path) -> BTreeMap<PathBuf, FileState> {
    let mut out = BTreeMap::new();
    let m = std::fs::metadata(dir).unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()));
    let mtime_ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
    out.insert(
        dir.to_path_buf(),
        FileState {
            size: 0,
            mtime_ns,
            hash: 0,
            mode: m.mode(),
        },
    );
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mtime_ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            let hash = if m.is_file() {
                hash_file(&p)
            } else if m.file_type().is_symlink() {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::fs::read_link(&p).unwrap().hash(&mut h);
                h.finish()
            } else {
                0
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.insert(
                p,
                FileState {
                    size: if m.is_dir() { 0 } else { m.len() },
                    mtime_ns,
                    hash,
                    mode: m.mode(),
                },
            );
        }
    }
    out
}

/// What a failed command must leave as it was: the files under some
/// directories, the catalog of some images (`vol snapshot list --json`),
/// and the journal's plans (`plan list --json`).
#[derive(Debug, PartialEq)]
pub struct World {
    pub files: Vec<BTreeMap<PathBuf, FileState>>,
    pub catalogs: Vec<(PathBuf, Value)>,
    pub plans: Value,
}

pub fn world(state: &Path, dirs: &[&Path], images: &[&Path]) -> World {
    World {
        files: dirs.iter().map(|d| tree_state(d)).collect(),
        catalogs: images
            .iter()
            .map(|i| {
                let o = vsnap(state, &["--json", "vol", "snapshot", "list", s(i)]);
                let o = o.ok();
                (i.to_path_buf(), o.json())
            })
            .collect(),
        plans: vsnap(state, &["--json", "plan", "list"]).ok().json(),
    }
}

/// `after` equals `before`: nothing changed, no plan was even begun.
/// Directories' own mtimes are not compared (see
/// [`assert_unchanged_with_dir_mtimes`]).
#[track_caller]
pub fn assert_unchanged(before: &World, after: &World) {
    assert_same_files(
        &without_dir_mtimes(&before.files),
        &without_dir_mtimes(&after.files),
    );
    assert_eq!(before.catalogs, after.catalogs, "the catalog changed");
    assert_eq!(before.plans, after.plans, "the journal has a new plan");
}

/// Equal file states, or a panic that lists only what differs.
#[track_caller]
pub fn assert_same_files(
    before: &[BTreeMap<PathBuf, FileState>],
    after: &[BTreeMap<PathBuf, FileState>],
) {
    let mut diff = Vec::new();
    for (b, a) in before.iter().zip(after) {
        for (k, v) in b {
            match a.get(k) {
                None => diff.push(format!("removed: {}", k.display())),
                Some(w) if w != v => diff.push(format!("changed: {}: {v:?} -> {w:?}", k.display())),
                Some(_) => {}
            }
        }
        for k in a.keys().filter(|k| !b.contains_key(*k)) {
            diff.push(format!("new: {}", k.display()));
        }
    }
    assert!(diff.is_empty(), "files changed:\n{}", diff.join("\n"));
}

/// [`assert_unchanged`], and no entry was even made and removed again in
/// any directory (their mtimes are unchanged too).
#[track_caller]
pub fn assert_unchanged_with_dir_mtimes(before: &World, after: &World) {
    assert_unchanged(before, after);
    assert_same_files(&before.files, &after.files);
}

/// Files and catalog unchanged; the journal may have new plans, but only
/// rolled-back ones (for failures that only a step can detect).
#[track_caller]
pub fn assert_unchanged_but_rolled_back_plans(before: &World, after: &World) -> usize {
    // Entries made and removed again by the rolled-back steps change the
    // directories' mtimes, nothing else.
    assert_same_files(
        &without_dir_mtimes(&before.files),
        &without_dir_mtimes(&after.files),
    );
    assert_eq!(before.catalogs, after.catalogs, "the catalog changed");
    let b = before.plans.as_array().unwrap();
    let a = after.plans.as_array().unwrap();
    assert_eq!(&a[..b.len()], &b[..], "earlier plans changed");
    for p in &a[b.len()..] {
        assert_eq!(
            p["outcome"], "RolledBack",
            "a new plan that is not rolled back: {p}"
        );
    }
    a.len() - b.len()
}

fn without_dir_mtimes(files: &[BTreeMap<PathBuf, FileState>]) -> Vec<BTreeMap<PathBuf, FileState>> {
    files
        .iter()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let is_dir = v.mode & libc_s_ifmt() == 0o040000;
                    (
                        k.clone(),
                        FileState {
                            mtime_ns: if is_dir { 0 } else { v.mtime_ns },
                            ..*v
                        },
                    )
                })
                .collect()
        })
        .collect()
}

/// `S_IFMT` (the CLI crate does not depend on libc).
const fn libc_s_ifmt() -> u32 {
    0o170000
}

pub fn p(path: &Path) -> &str {
    s(path)
}

/// A state directory and a work directory `vm/` under a new temporary
/// directory; the tests' fixture (each test file adds its own methods).
pub struct Work {
    pub state: PathBuf,
    pub work: PathBuf,
    _tmp: TempDir,
}

impl Work {
    pub fn new(tag: &str) -> Work {
        let tmp = TempDir::new(tag);
        let state = tmp.join("state");
        let work = tmp.join("vm");
        std::fs::create_dir(&work).unwrap();
        // the state directory exists before the first `world()`
        vsnap(&state, &["plan", "list"]).ok();
        Work {
            state,
            work,
            _tmp: tmp,
        }
    }

    pub fn vsnap(&self, args: &[&str]) -> Out {
        vsnap(&self.state, args)
    }

    pub fn world(&self, images: &[&Path]) -> World {
        world(&self.state, &[&self.work], images)
    }

    /// `args` exit 2 naming `words`, and nothing changed at all.
    #[track_caller]
    pub fn refused(&self, images: &[&Path], args: &[&str], words: &[&str]) -> Out {
        refused_untouched(&self.state, &[&self.work], images, args, words)
    }
}

/// A loop block device over a file, detached on drop.
pub struct LoopDev(pub String);

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let o = Out::from_command("losetup", &["-f", "--show", p(file)]);
        o.ok();
        LoopDev(o.stdout.trim().to_string())
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}
