//! `vsnap serve`: one long-running process holds the state directory (its
//! lock, the open journal, sled's threads and caches), and every `vsnap`
//! command run meanwhile is carried out by it instead of opening the
//! journal itself, as `virsh` leaves the work to `libvirtd`. A command then
//! costs what the library costs a manager that embeds vsnap, plus its own
//! process start and one round trip on a Unix socket; without the service
//! a command opens the journal itself (recovering first), as always.
//!
//! The socket is `<state-dir>/vsnap.sock`, mode 0600 in the 0700 state
//! directory; the service also checks that a client runs as its own user
//! (`SO_PEERCRED`). A client sends, in one `sendmsg`, its standard input,
//! output and error and its working directory as descriptors
//! (`SCM_RIGHTS`) with the length of its argument vector, then the vector.
//! The service runs one command at a time: it puts the client's
//! descriptors in place of its own 0, 1 and 2 and moves to the client's
//! directory, so the command prints to the client's terminal or pipe and
//! relative paths mean what they meant to the client; then it flushes,
//! takes its own back and answers with one byte, the exit status. Status
//! [`NOT_MINE`] (the command names another state directory, or is
//! `serve`) tells the client to do the command itself.
//!
//! A command runs with the service's environment (its `PATH` finds
//! `qemu-img`); the client passes the state directory it resolved from
//! its own (`$VSNAP_STATE_DIR` and the defaults) as `--state-dir`.
//!
//! Crash safety is the journal's, unchanged: the service runs the same
//! plans through the same engine. If it dies during a command, the client
//! says so (exit 2) and `vsnap-recover`, or the next command, finishes or
//! undoes the plan. SIGTERM or SIGINT stops the service after the command
//! in progress; the socket goes with it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use vsnap_steps::fdpass;

/// The socket's name in the state directory.
pub const SOCKET: &str = "vsnap.sock";
/// Exit status byte meaning "not for this service: run it yourself".
pub const NOT_MINE: u8 = 255;
/// Status byte: the client runs as another user than the service.
pub const REFUSED: u8 = 254;
/// Status byte: the service was stopping; the command was not run.
pub const STOPPING: u8 = 253;
/// How long a client may take to send its request (each read).
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// The most argument bytes a request may carry.
const MAX_REQUEST: usize = 1 << 20;

/// The state directory a command line names, read without clap (the
/// point is not to pay for building the parser): `--state-dir DIR` or
/// `--state-dir=DIR` before the first `--` (true: given), else the default
/// from this process's environment (false). The service parses the command
/// properly and answers [`NOT_MINE`] when it names another directory.
fn state_dir_of(args: &[OsString]) -> (PathBuf, bool) {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let b = a.as_bytes();
        if b == b"--" {
            break;
        }
        if b == b"--state-dir" {
            if let Some(d) = it.next() {
                return (PathBuf::from(d), true);
            }
        } else if let Some(d) = b.strip_prefix(b"--state-dir=") {
            return (PathBuf::from(std::ffi::OsStr::from_bytes(d)), true);
        }
    }
    (vsnap_engine::default_state_dir(), false)
}

/// Whether the command is `serve` (never forwarded): its first word that
/// is not an option or the value of `--state-dir`.
fn is_serve(args: &[OsString]) -> bool {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let b = a.as_bytes();
        if b == b"--state-dir" {
            it.next();
        } else if !b.starts_with(b"-") {
            return b == b"serve";
        }
    }
    false
}

/// Client side. `Some(status)` when a running service carried out the
/// command (or when the client refused to hand it the command, exit 2,
/// said why); `None` when there is none (no socket, or nobody listening
/// on it: a service that was killed), when it answered [`NOT_MINE`], when
/// `VSNAP_NO_SERVICE` is set, or when the state directory itself is
/// refused (the command, run alone, then says why): the caller then does
/// the command itself.
///
/// Before it sends its standard input, output, error and directory, the
/// client makes sure it talks to its own user's service: the state
/// directory passes [`vsnap_engine::check_state_dir`] (owner, modes, the
/// directories above), the socket belongs to this user and is not open
/// to others, and the process listening on it runs as this user
/// (`SO_PEERCRED`).
pub fn forward(args: &[OsString]) -> Option<u8> {
    if std::env::var_os("VSNAP_NO_SERVICE").is_some() || is_serve(args) {
        return None;
    }
    // Crash points and their log are for this process, not a service's.
    if std::env::var_os("VSNAP_CRASH_AT").is_some()
        || std::env::var_os("VSNAP_FAILPOINT_LOG").is_some()
    {
        return None;
    }
    let (dir, given) = state_dir_of(args);
    let sock = dir.join(SOCKET);
    let meta = std::fs::symlink_metadata(&sock).ok()?;
    vsnap_engine::check_state_dir(&dir).ok()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let refuse = |why: String| -> Option<u8> {
        let msg = format!(
            "refusing the vsnap service socket {}: {why}; nothing was sent to it",
            sock.display()
        );
        if args.iter().skip(1).any(|a| a == "--json") {
            crate::common::print_json(&serde_json::json!({ "error": msg }));
        }
        eprintln!("vsnap: error: {msg}");
        Some(crate::common::EXIT_ERROR)
    };
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !meta.file_type().is_socket() {
            return refuse("it is not a socket".into());
        }
        if meta.uid() != me || meta.mode() & 0o077 != 0 {
            return refuse(format!(
                "it belongs to uid {} with mode {:o}, and a service of this user (uid {me})                  makes it its own, mode 600; remove it if no `vsnap serve` of yours runs",
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
    }
    let mut stream = UnixStream::connect(&sock).ok()?;
    match peer_uid(&stream) {
        Ok(uid) if uid == me => {}
        Ok(uid) => {
            return refuse(format!(
                "the process listening on it runs as uid {uid}, not as this user (uid {me}):                  it would receive your terminal and could forge the answer"
            ))
        }
        Err(e) => return refuse(format!("cannot tell who listens on it: {e}")),
    }
    // The service has its own environment: a directory this process took
    // from $VSNAP_STATE_DIR (or its defaults) is passed explicitly.
    let mut sent: Vec<&std::ffi::OsStr> = Vec::with_capacity(args.len() + 2);
    if let Some((argv0, rest)) = args.split_first() {
        sent.push(argv0);
        if !given {
            sent.push("--state-dir".as_ref());
            sent.push(dir.as_os_str());
        }
        sent.extend(rest.iter().map(|a| a.as_os_str()));
    }
    let mut payload = Vec::new();
    for a in sent {
        payload.extend_from_slice(&(a.len() as u32).to_le_bytes());
        payload.extend_from_slice(a.as_bytes());
    }
    // O_PATH: a working directory we may enter but not read is fine.
    let cwd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(".")
        .ok()?;
    let fds = [0, 1, 2, cwd.as_raw_fd()];
    // The length alone with the descriptors, then the arguments.
    let len = (payload.len() as u32).to_le_bytes();
    let sent = fdpass::send(stream.as_raw_fd(), &len, &fds).ok() == Some(len.len())
        && stream.write_all(&payload).is_ok();
    let mut status = [0u8; 1];
    let answer = stream.read_exact(&mut status);
    if !sent && (answer.is_err() || status[0] != REFUSED) {
        // Nobody there after all (a service that just stopped).
        return None;
    }
    match answer {
        Ok(()) if status[0] == NOT_MINE => None,
        Ok(()) if status[0] == REFUSED => {
            eprintln!(
                "vsnap: error: the vsnap service on {} refused the command: it serves only                  the user it runs as, and this one (uid {me}) is another; nothing was done:                  run the command as that user, or stop the service and use a state directory                  of your own",
                sock.display()
            );
            Some(crate::common::EXIT_ERROR)
        }
        Ok(()) if status[0] == STOPPING => {
            eprintln!(
                "vsnap: error: the vsnap service on {} was stopping and did not run the                  command; nothing was done: run it again",
                sock.display()
            );
            Some(crate::common::EXIT_ERROR)
        }
        Ok(()) => Some(status[0]),
        Err(_) => {
            eprintln!(
                "vsnap: error: the vsnap service on {} ended during the command; \
                 run `vsnap-recover` to finish or undo what it was doing",
                sock.display()
            );
            Some(crate::common::EXIT_ERROR)
        }
    }
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    Ok(vsnap_steps::fdpass::peer_cred(stream.as_raw_fd())?.uid)
}

/// One request's argument vector and the client's descriptors.
struct Request {
    args: Vec<OsString>,
    /// stdin, stdout, stderr, working directory.
    fds: Vec<OwnedFd>,
}

fn read_request(stream: &mut UnixStream) -> std::io::Result<Request> {
    let mut len = [0u8; 4];
    let (n, fds) = fdpass::recv(stream.as_raw_fd(), &mut len, 4)?;
    let len = u32::from_le_bytes(len) as usize;
    if n != 4 || fds.len() != 4 || len > MAX_REQUEST {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "malformed request",
        ));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    let mut args = Vec::new();
    let mut rest = &payload[..];
    while rest.len() >= 4 {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let Some(a) = rest.get(4..4 + n) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "malformed request",
            ));
        };
        args.push(OsString::from_vec(a.to_vec()));
        rest = &rest[4 + n..];
    }
    Ok(Request { args, fds })
}

/// The service's own standard descriptors and directory, put back after
/// every command.
struct Home {
    std: [OwnedFd; 3],
    cwd: std::fs::File,
}

impl Home {
    fn save() -> std::io::Result<Home> {
        let dup = |fd: RawFd| -> std::io::Result<OwnedFd> {
            // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
            let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: n is a fresh descriptor.
            Ok(unsafe { OwnedFd::from_raw_fd(n) })
        };
        Ok(Home {
            std: [dup(0)?, dup(1)?, dup(2)?],
            cwd: std::fs::File::open(".")?,
        })
    }

    /// Put `fds` (stdin, stdout, stderr, directory) in place.
    fn enter(fds: &[OwnedFd]) -> std::io::Result<()> {
        for (i, fd) in fds[..3].iter().enumerate() {
            // SAFETY: dup2 onto 0-2; the sources are open descriptors.
            if unsafe { libc::dup2(fd.as_raw_fd(), i as RawFd) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: fds[3] is an open directory descriptor.
        if unsafe { libc::fchdir(fds[3].as_raw_fd()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn restore(&self) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        for (i, fd) in self.std.iter().enumerate() {
            // SAFETY: as in enter.
            unsafe { libc::dup2(fd.as_raw_fd(), i as RawFd) };
        }
        // SAFETY: cwd is an open directory.
        unsafe { libc::fchdir(self.cwd.as_raw_fd()) };
    }
}

/// Set by SIGTERM or SIGINT: stop after the command in progress.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The listening socket, for the signal handler to shut down.
static LISTENER_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_stop(_sig: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    let fd = LISTENER_FD.load(std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown is async-signal-safe; it wakes the accept.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Serve `state` until SIGTERM or SIGINT. `run` carries out one command
/// (its argument vector, in the client's directory with the client's
/// descriptors) and returns its exit status, or [`NOT_MINE`]. When `run`
/// panics, `after_panic` is called in the same place (the client's
/// descriptors still in place): it makes the engine coherent again
/// (recovers what the command left unfinished), tells the client, and
/// returns the client's exit status, or an error after which the service
/// stops (as a crash would, leaving recovery to the next open).
///
/// Requests are read each on its own thread, with a deadline on every
/// read, and queued, complete, to this thread, which runs them one at a
/// time: a client that connects and sends nothing holds up no one.
pub fn serve(
    state: &Path,
    run: &dyn Fn(Vec<OsString>) -> u8,
    after_panic: &dyn Fn() -> Result<u8, String>,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let sock = state.join(SOCKET);
    // We hold the state lock: a socket file there is a dead service's.
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot remove the stale socket {}: {e}", sock.display()),
    }
    let listener = UnixListener::bind(&sock)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", sock.display()))?;
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    LISTENER_FD.store(listener.as_raw_fd(), SeqCst);
    // SAFETY: on_stop only touches atomics and calls shutdown.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let home = Home::save()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let (tx, rx) = std::sync::mpsc::channel::<(UnixStream, Request)>();
    std::thread::Builder::new()
        .name("vsnap-accept".into())
        .spawn(move || accept_loop(listener, me, tx))?;
    eprintln!(
        "vsnap: serving {} on {} (pid {}); SIGTERM or Ctrl-C stops it",
        state.display(),
        sock.display(),
        std::process::id()
    );
    let mut broken = false;
    while !STOP.load(SeqCst) && !broken {
        let (mut stream, req) = match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(job) => job,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let status = match Home::enter(&req.fds) {
            Ok(()) => {
                use std::panic::{catch_unwind, AssertUnwindSafe};
                let s = match catch_unwind(AssertUnwindSafe(|| run(req.args))) {
                    Ok(s) => s,
                    Err(_) => match catch_unwind(AssertUnwindSafe(after_panic)) {
                        Ok(Ok(s)) => s,
                        Ok(Err(why)) => {
                            eprintln!(
                                "vsnap: error: the service could not recover after the panic                                  ({why}); it stops: run `vsnap-recover`"
                            );
                            broken = true;
                            crate::common::EXIT_NO
                        }
                        Err(_) => {
                            eprintln!(
                                "vsnap: error: the service could not recover after the panic;                                  it stops: run `vsnap-recover`"
                            );
                            broken = true;
                            crate::common::EXIT_NO
                        }
                    },
                };
                home.restore();
                s
            }
            Err(e) => {
                home.restore();
                eprintln!("vsnap: cannot take a client's descriptors: {e}");
                crate::common::EXIT_ERROR
            }
        };
        drop(req.fds);
        let _ = stream.write_all(&[status]);
    }
    // Requests that came in but were not run: the clients are told.
    let _ = std::fs::remove_file(&sock);
    while let Ok((mut stream, _)) = rx.try_recv() {
        let _ = stream.write_all(&[STOPPING]);
    }
    if broken {
        eprintln!(
            "vsnap: a command panicked and what it left could not be recovered; the service \
             stops so that vsnap-recover or the next command does it"
        );
        std::process::exit(70);
    }
    eprintln!("vsnap: service stopped");
    Ok(())
}

/// Accept clients until the service stops; each one's request is read on
/// a thread of its own and queued to the serving thread.
fn accept_loop(
    listener: UnixListener,
    me: u32,
    tx: std::sync::mpsc::Sender<(UnixStream, Request)>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) if STOP.load(SeqCst) => return,
            Err(e) => {
                // Out of descriptors, say: a moment, then on.
                eprintln!("vsnap: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name("vsnap-client".into())
            .spawn(move || receive(stream, me, tx));
        if let Err(e) = spawned {
            eprintln!("vsnap: cannot start a thread for a client: {e}");
        }
    }
}

/// Read one client's request (its uid checked first, every read with a
/// deadline) and queue it.
fn receive(mut stream: UnixStream, me: u32, tx: std::sync::mpsc::Sender<(UnixStream, Request)>) {
    match peer_uid(&stream) {
        Ok(uid) if uid == me => {}
        Ok(uid) => {
            eprintln!("vsnap: refused a client of uid {uid} (the service runs as {me})");
            let _ = stream.write_all(&[REFUSED]);
            return;
        }
        Err(e) => {
            eprintln!("vsnap: a client without credentials: {e}");
            return;
        }
    }
    let _ = stream.set_read_timeout(Some(REQUEST_DEADLINE));
    match read_request(&mut stream) {
        Ok(req) => {
            let _ = stream.set_read_timeout(None);
            let _ = tx.send((stream, req));
        }
        Err(e) => eprintln!("vsnap: a bad request: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn state_dir_and_serve_read_without_clap() {
        assert_eq!(
            state_dir_of(&args(&["vsnap", "--state-dir", "/s", "vol"])),
            (PathBuf::from("/s"), true)
        );
        assert_eq!(
            state_dir_of(&args(&["vsnap", "vol", "--state-dir=/t"])),
            (PathBuf::from("/t"), true)
        );
        assert_eq!(
            state_dir_of(&args(&["vsnap", "--", "--state-dir", "/x"])),
            (vsnap_engine::default_state_dir(), false)
        );
        assert!(is_serve(&args(&["vsnap", "--state-dir", "serve", "serve"])));
        assert!(is_serve(&args(&["vsnap", "--json", "serve"])));
        assert!(!is_serve(&args(&["vsnap", "--state-dir", "serve", "vol"])));
        assert!(!is_serve(&args(&[
            "vsnap", "vol", "snapshot", "create", "serve"
        ])));
    }
}
