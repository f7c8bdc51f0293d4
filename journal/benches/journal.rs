//! Journal benchmark (harness = false): `cargo bench -p vsnap-journal`.
//!
//! (a) floor: what the disk gives — a bare 4 KiB `write` + `fdatasync`
//!     loop on a file in the directory the journal uses (appending, as a
//!     log does, and overwriting in place);
//! (b) one writer: latency of one durable `append`;
//! (c) 32 concurrent writers: records per second (group commit).
//!
//! Targets: (b) p50 <= 2 x the floor's p50; (c) >= 10 x the rate of (b).
//! `VSNAP_BENCH_OPS` sets the operations per measurement (default 1000).
//! The directory is under the crate's target dir (`CARGO_TARGET_TMPDIR`),
//! never tmpfs; the filesystem type is printed.
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vsnap_journal::*;

const WRITERS: usize = 32;
const ROUNDS: usize = 5;

struct Stats {
    p50: Duration,
    p99: Duration,
    ops_per_s: f64,
}

/// Latencies and busy time of one measurement, gathered over rounds.
#[derive(Default)]
struct Samples {
    lat: Vec<Duration>,
    busy: Duration,
}

impl Samples {
    fn add(&mut self, (lat, busy): (Vec<Duration>, Duration)) {
        self.lat.extend(lat);
        self.busy += busy;
    }
    fn stats(mut self) -> Stats {
        self.lat.sort_unstable();
        let at = |q: f64| self.lat[((self.lat.len() as f64 * q) as usize).min(self.lat.len() - 1)];
        Stats {
            p50: at(0.50),
            p99: at(0.99),
            ops_per_s: self.lat.len() as f64 / self.busy.as_secs_f64(),
        }
    }
}

fn fs_type(dir: &Path) -> String {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs (NOT a disk: figures meaningless)".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        t => format!("type 0x{t:x}"),
    }
}

/// (a) 4 KiB write + fdatasync, `n` times; `append` grows the file (as a
/// log does), otherwise the same 4 KiB are overwritten.
fn floor(dir: &Path, n: usize, append: bool) -> (Vec<Duration>, Duration) {
    let path = dir.join(if append {
        "floor-append"
    } else {
        "floor-overwrite"
    });
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let buf = vec![0x5au8; 4096];
    f.write_all_at(&buf, 0).unwrap();
    f.sync_all().unwrap();
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let off = if append { 4096 * (i as u64 + 1) } else { 0 };
        f.write_all_at(&buf, off).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    let busy = t0.elapsed();
    std::fs::remove_file(path).unwrap();
    (lat, busy)
}

fn header() -> PlanHeader {
    PlanHeader {
        op: "bench".into(),
        summary: "bench".into(),
        steps: u32::MAX,
        pivot: 0,
        created_unix: 0,
    }
}

/// (b) one writer, `n` appends, each timed.
fn one_writer(j: &Journal, n: usize) -> (Vec<Duration>, Duration) {
    let id = j.begin(header(), vec![0; 512]).unwrap();
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        j.append(id, Record::Started(i as u32)).unwrap();
        lat.push(t.elapsed());
    }
    (lat, t0.elapsed())
}

/// (c) 32 writers, `n` appends each.
fn many_writers(j: &Arc<Journal>, n: usize) -> (Vec<Duration>, Duration) {
    let barrier = Arc::new(Barrier::new(WRITERS + 1));
    let threads: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (j, barrier) = (j.clone(), barrier.clone());
            std::thread::spawn(move || {
                let id = j.begin(header(), vec![0; 512]).unwrap();
                barrier.wait();
                let mut lat = Vec::with_capacity(n);
                for i in 0..n {
                    let t = Instant::now();
                    j.append(id, Record::Done(i as u32)).unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let lat: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    (lat, t0.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // cargo passes `--bench`; a filter that does not name us skips the run.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !args.is_empty() && !args.iter().any(|a| "journal".contains(a.as_str())) {
        return;
    }
    let n: usize = std::env::var("VSNAP_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base = tempfile::Builder::new()
        .prefix("vsnap-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let dir = base.path();
    println!(
        "journal bench: {n} ops per measurement in {ROUNDS} interleaved rounds, in {} ({}), load average {}",
        dir.display(),
        fs_type(dir),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );

    let j = Arc::new(Journal::open(&dir.join("state")).unwrap());
    // Warm up: the first writes create sled's files.
    one_writer(&j, 50);
    // The measurements take turns, ROUNDS times, so that each sees the
    // same disk and the same neighbours (the machine may be shared).
    let per_round = (n / ROUNDS).max(10);
    let per_writer = (per_round / 4).max(5);
    let (mut fa, mut fo, mut one, mut many) = Default::default();
    for _ in 0..ROUNDS {
        Samples::add(&mut fa, floor(dir, per_round, true));
        Samples::add(&mut fo, floor(dir, per_round, false));
        Samples::add(&mut one, one_writer(&j, per_round));
        Samples::add(&mut many, many_writers(&j, per_writer));
    }
    let (floor_append, floor_overwrite, one, many): (Stats, Stats, Stats, Stats) = (
        Samples::stats(fa),
        Samples::stats(fo),
        Samples::stats(one),
        Samples::stats(many),
    );

    println!();
    println!("| measurement                              |       p50 |       p99 |      ops/s |");
    println!("|------------------------------------------|-----------|-----------|------------|");
    let row = |name: &str, s: &Stats| {
        println!(
            "| {name:<40} | {:>9} | {:>9} | {:>10.0} |",
            ms(s.p50),
            ms(s.p99),
            s.ops_per_s
        )
    };
    row("floor: 4 KiB append + fdatasync", &floor_append);
    row("floor: 4 KiB overwrite + fdatasync", &floor_overwrite);
    row("journal append, 1 writer", &one);
    row(
        &format!("journal append, {WRITERS} writers ({per_writer} each)"),
        &many,
    );
    println!();
    let lat_ratio = one.p50.as_secs_f64() / floor_append.p50.as_secs_f64();
    let lat_ratio_ow = one.p50.as_secs_f64() / floor_overwrite.p50.as_secs_f64();
    let rate_ratio = many.ops_per_s / one.ops_per_s;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "1-writer p50 / floor p50: {lat_ratio:.2}x vs append floor, {lat_ratio_ow:.2}x vs overwrite floor (target <= 2x): {}",
        verdict(lat_ratio <= 2.0)
    );
    println!(
        "{WRITERS}-writer rate / 1-writer rate: {rate_ratio:.1}x (target >= 10x): {}",
        verdict(rate_ratio >= 10.0)
    );
    std::io::stdout().flush().unwrap();
}
