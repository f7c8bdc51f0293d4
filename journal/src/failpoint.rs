//! Named crash points, compiled in only with the `failpoints` feature.
//!
//! `hit("name")` marks a place where a crash changes the outcome. With the
//! feature on, two environment variables drive it:
//!
//! * `VSNAP_FAILPOINT_LOG=FILE` — every hit appends one line `name` to FILE
//!   (opened in append mode, written with one `write` call), so a harness
//!   can list the points an operation passes, in order.
//! * `VSNAP_CRASH_AT=name` or `name#N` — at the N-th hit (counted from 1,
//!   default 1) of that name in this process, the process kills itself with
//!   SIGKILL: no destructor, no flush, no unwinding, like a power cut of
//!   the process. The name `*` matches every point: `*#N` kills at the
//!   N-th crash point of any name (how the crash suite explores a run it
//!   cannot list in advance, such as `vsnap-recover`'s).
//!
//! * `VSNAP_PANIC_AT=name` or `name#N` — the same count, but the thread
//!   panics instead: a fault injected for tests (of `vsnap serve`, which
//!   must survive a panicking command), not one the real code has.
//!
//! Without the feature `hit` is an empty inline function.

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::Mutex;

    static COUNTS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    static PANIC_COUNTS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

    /// Whether this hit of `name` is the one `spec` (`name` or `name#N`)
    /// asks for, counting in `counts`.
    fn nth(spec: &str, name: &str, counts: &Mutex<Option<HashMap<String, u64>>>) -> bool {
        let (target, nth) = match spec.rsplit_once('#') {
            Some((t, n)) => (t.to_string(), n.parse::<u64>().unwrap_or(1)),
            None => (spec.to_string(), 1),
        };
        if target != name && target != "*" {
            return false;
        }
        let mut guard = counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = guard
            .get_or_insert_with(HashMap::new)
            .entry(target)
            .or_insert(0);
        *c += 1;
        *c == nth
    }

    pub fn hit(name: &str) {
        if let Some(log) = std::env::var_os("VSNAP_FAILPOINT_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = f.write_all(format!("{name}\n").as_bytes());
            }
        }
        if let Ok(spec) = std::env::var("VSNAP_PANIC_AT") {
            if nth(&spec, name, &PANIC_COUNTS) {
                panic!("VSNAP_PANIC_AT={spec}: a panic injected for tests at crash point {name}");
            }
        }
        let Ok(spec) = std::env::var("VSNAP_CRASH_AT") else {
            return;
        };
        if nth(&spec, name, &COUNTS) {
            // SAFETY: kill(2) on our own pid with a valid signal number.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // SIGKILL cannot be caught; this point is never reached.
            std::process::abort();
        }
    }
}

#[cfg(feature = "failpoints")]
pub use imp::hit;

/// Crash point (compiled out: the `failpoints` feature is off).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// True when the crate was built with crash points.
pub const ENABLED: bool = cfg!(feature = "failpoints");
