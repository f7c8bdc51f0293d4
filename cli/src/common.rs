//! What both binaries share: state-dir resolution, exit codes, output.
// Each binary includes this module and uses a different part of it.
#![allow(dead_code)]

use std::path::PathBuf;

// `println!`, `print!`, `eprintln!` and `eprint!` for both binaries
// (`#[macro_use] mod common;` comes first in each, so these stand in for
// std's everywhere in them): std's panic when the write fails, which a
// closed pipe makes it do (`vsnap vol snapshot list IMG | head -1`), and
// under `vsnap serve` a client's closed pipe would then end the service.
// These write straight to descriptor 1 or 2, unbuffered (under the
// service, bytes std had buffered for one client would otherwise go to
// the next), and drop what cannot be written, as other Unix tools do: the
// command goes on and exits with its own status.
macro_rules! println {
    () => { $crate::common::write_fd(1, ::std::format_args!("\n")) };
    ($($t:tt)*) => { $crate::common::write_fd(1, ::std::format_args!("{}\n", ::std::format_args!($($t)*))) };
}
#[allow(unused_macros)]
macro_rules! print {
    ($($t:tt)*) => { $crate::common::write_fd(1, ::std::format_args!($($t)*)) };
}
macro_rules! eprintln {
    () => { $crate::common::write_fd(2, ::std::format_args!("\n")) };
    ($($t:tt)*) => { $crate::common::write_fd(2, ::std::format_args!("{}\n", ::std::format_args!($($t)*))) };
}
#[allow(unused_macros)]
macro_rules! eprint {
    ($($t:tt)*) => { $crate::common::write_fd(2, ::std::format_args!($($t)*)) };
}

/// Write `args` to descriptor `fd` in as few `write`s as it takes;
/// errors (a closed pipe: EPIPE, SIGPIPE being ignored) are dropped.
pub fn write_fd(fd: i32, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let text = match args.as_str() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(args.to_string()),
    };
    // SAFETY: fd 1 or 2, borrowed for this write and never closed here.
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let _ = f.write_all(text.as_bytes());
}

/// Exit codes (documented in `--help` and the README).
pub const EXIT_OK: u8 = 0;
/// A negative answer: no current snapshot, a check found violations, a plan needs attention.
pub const EXIT_NO: u8 = 1;
/// An error: bad input, a failed operation (rolled back), a locked state directory.
pub const EXIT_ERROR: u8 = 2;

pub fn state_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(vsnap_engine::default_state_dir)
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a Unix time.
pub fn utc(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A path in JSON output: a string when it is UTF-8, else
/// `{"lossy": ..., "hex": ...}` (see `vsnap_steps::pathser`).
pub fn path_json(p: &std::path::Path) -> serde_json::Value {
    vsnap_steps::pathser::json(p)
}

/// An optional path in JSON output (`null` when absent).
pub fn opt_path_json(p: Option<&PathBuf>) -> serde_json::Value {
    p.map_or(serde_json::Value::Null, |p| path_json(p))
}

pub fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialize")
    );
}

/// Print the error chain on stderr, `vsnap: error: ...`.
pub fn report_error(prog: &str, e: &anyhow::Error) {
    eprintln!("{prog}: error: {e}");
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !e.to_string().contains(&c) {
            eprintln!("  caused by: {c}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_764_167_632), "2025-11-26 14:33:52 UTC");
    }
}
