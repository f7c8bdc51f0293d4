//! Run a program to completion and capture its output, the way
//! `posix_spawn` starts it (`clone(CLONE_VM | CLONE_VFORK)`: no copy of
//! our page tables), with what `posix_spawn` cannot do: the child gets
//! `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the thread that started it.
//!
//! Why not `std::process::Command` with a `pre_exec` hook (which
//! [`crate::qemu_img::child_command`] still uses for long-lived children):
//! a `pre_exec` hook makes std `fork()`, which copies the page tables of a
//! process that has sled's buffers and threads mapped: 1.3-3 ms measured
//! per `qemu-img` here, against about 0.3 ms for this. Every snapshot
//! operation runs at least one `qemu-img`.
//!
//! Everything the child needs (program path, argv, envp, pipes) is made
//! before the clone; the child, which shares our memory until it execs,
//! only makes system calls: `prctl`, `getppid`, `dup2`, `sigprocmask`,
//! `execve`, `write`, `_exit`. All signals are blocked around the clone so
//! that no handler of ours runs on the child's stack; the child restores
//! the caller's mask just before `execve`.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Output};

/// The child's stack: it runs a handful of system call wrappers.
const CHILD_STACK: usize = 64 * 1024;

/// What the child reads; raw pointers into memory the parent keeps alive
/// (the parent is suspended until the child execs or exits).
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// Close-on-exec: the child writes its errno here if it cannot exec.
    report: RawFd,
    parent: libc::pid_t,
    mask: libc::sigset_t,
    /// Descriptors the program inherits (their close-on-exec flag is
    /// cleared in the child only): `/proc/self/fd/N` names for qemu-img.
    keep: *const RawFd,
    nkeep: usize,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent keeps alive while suspended.
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: only async-signal-safe system calls on valid arguments.
    unsafe {
        let fail = |err: libc::c_int| -> ! {
            let bytes = err.to_ne_bytes();
            libc::write(a.report, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(*libc::__errno_location());
        }
        // The parent died before prctl took effect: do not run orphaned.
        if libc::getppid() != a.parent {
            fail(libc::ESRCH);
        }
        for (from, to) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            if libc::dup2(from, to) < 0 {
                fail(*libc::__errno_location());
            }
        }
        for i in 0..a.nkeep {
            let fd = *a.keep.add(i);
            // The child has its own descriptor table (no CLONE_FILES):
            // this changes the flag for the program only.
            if fd > 2 && libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                fail(*libc::__errno_location());
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut());
        libc::execve(a.path, a.argv, a.envp);
        fail(*libc::__errno_location())
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("argument {s:?} contains a NUL byte"),
        )
    })
}

/// `program` as `execvp` would find it.
fn resolve(program: &str) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if let Ok(c) = cstring(p.as_os_str()) {
            // SAFETY: access(2) on a valid C string.
            if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
                return Ok(p);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{program} not found in PATH"),
    ))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A started child: its pid and the read ends of its stdout and stderr.
pub struct Child {
    pub pid: libc::pid_t,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// Start `program args...` (found in PATH), stdin from /dev/null, stdout
/// and stderr piped, environment ours plus `env`. Returns once the child
/// has exec'd (or with the error that kept it from doing so).
pub fn spawn(program: &str, args: &[&OsStr], env: &[(&str, &str)]) -> io::Result<Child> {
    spawn_keeping(program, args, env, &[])
}

/// [`spawn`], and the program inherits the descriptors `keep` (under the
/// same numbers).
pub fn spawn_keeping(
    program: &str,
    args: &[&OsStr],
    env: &[(&str, &str)],
    keep: &[RawFd],
) -> io::Result<Child> {
    let path = cstring(resolve(program)?.as_os_str())?;
    let mut argv_c = vec![cstring(OsStr::new(program))?];
    for a in args {
        argv_c.push(cstring(a)?);
    }
    let mut envp_c = Vec::new();
    for (k, v) in std::env::vars_os() {
        if env.iter().any(|(n, _)| OsStr::new(n) == k) {
            continue;
        }
        let mut kv = OsString::from(&k);
        kv.push("=");
        kv.push(&v);
        envp_c.push(cstring(&kv)?);
    }
    for (k, v) in env {
        envp_c.push(cstring(OsStr::new(&format!("{k}={v}")))?);
    }
    let argv: Vec<*const libc::c_char> = argv_c
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = envp_c
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let devnull = std::fs::File::open("/dev/null")?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (rep_r, rep_w) = pipe()?;
    let mut stack = vec![0u8; CHILD_STACK];

    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask fill it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdin: devnull.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        report: rep_w.as_raw_fd(),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        mask: old,
        keep: keep.as_ptr(),
        nkeep: keep.len(),
    };
    // SAFETY: the stack is ours and outlives the child's use of it (with
    // CLONE_VFORK we are suspended until it execs or exits); it grows
    // down, so the child starts at its top, 16-byte aligned.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK);
        let top = top.sub(top as usize % 16);
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_err);
    }
    drop((out_w, err_w, rep_w, devnull));
    let mut report = [0u8; 4];
    let n = read_full(rep_r.as_raw_fd(), &mut report)?;
    if n == report.len() {
        // Exec failed: reap the child, return its errno.
        let _ = wait(pid);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(report)));
    }
    Ok(Child {
        pid,
        stdout: out_r,
        stderr: err_r,
    })
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: reads into the unfilled part of `buf`.
        let r = unsafe { libc::read(fd, buf[n..].as_mut_ptr().cast(), buf.len() - n) };
        match r {
            0 => break,
            r if r > 0 => n += r as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(n)
}

fn wait(pid: libc::pid_t) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Child {
    /// Read stdout and stderr to their end, then reap the child.
    pub fn wait_with_output(self) -> io::Result<Output> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut open = [true, true];
        let mut buf = [0u8; 8192];
        while open[0] || open[1] {
            let mut fds = [
                libc::pollfd {
                    fd: if open[0] { self.stdout.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if open[1] { self.stderr.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: polls two descriptors we own (or -1, ignored).
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for (i, out) in [&mut stdout, &mut stderr].into_iter().enumerate() {
                if open[i] && fds[i].revents != 0 {
                    // SAFETY: reads into our buffer from a descriptor we own.
                    let r = unsafe { libc::read(fds[i].fd, buf.as_mut_ptr().cast(), buf.len()) };
                    match r {
                        0 => open[i] = false,
                        r if r > 0 => out.extend_from_slice(&buf[..r as usize]),
                        _ => {
                            let e = io::Error::last_os_error();
                            if e.kind() != io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                        }
                    }
                }
            }
        }
        Ok(Output {
            status: wait(self.pid)?,
            stdout,
            stderr,
        })
    }
}

/// [`spawn`] then [`Child::wait_with_output`].
pub fn output(program: &str, args: &[&OsStr], env: &[(&str, &str)]) -> io::Result<Output> {
    spawn(program, args, env)?.wait_with_output()
}

/// [`output`], the program inheriting the descriptors `keep`.
pub fn output_keeping(
    program: &str,
    args: &[&OsStr],
    env: &[(&str, &str)],
    keep: &[RawFd],
) -> io::Result<Output> {
    spawn_keeping(program, args, env, keep)?.wait_with_output()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_status_and_environment() {
        let o = output(
            "sh",
            &[
                OsStr::new("-c"),
                OsStr::new("echo out; echo err >&2; echo $LC_ALL; read x; echo \"[$x]\"; exit 3"),
            ],
            &[("LC_ALL", "C")],
        )
        .unwrap();
        assert_eq!(o.stdout, b"out\nC\n[]\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.status.code(), Some(3));
    }

    #[test]
    fn large_output_on_both_pipes_does_not_deadlock() {
        let o = output(
            "sh",
            &[
                OsStr::new("-c"),
                OsStr::new("head -c 300000 /dev/zero; head -c 300000 /dev/zero >&2"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!((o.stdout.len(), o.stderr.len()), (300_000, 300_000));
        assert!(o.status.success());
    }

    #[test]
    fn missing_program_and_nul_bytes_are_errors() {
        let e = output("no-such-program-vsnap", &[], &[])
            .map(drop)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = output("/nonexistent/prog", &[], &[]).map(drop).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let e = output("sh", &[OsStr::new("a\0b")], &[])
            .map(drop)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn child_dies_with_the_spawning_thread() {
        let t = std::thread::spawn(|| spawn("sleep", &[OsStr::new("30")], &[]).unwrap().pid);
        let pid = t.join().unwrap();
        let start = std::time::Instant::now();
        let status = wait(pid).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
}
