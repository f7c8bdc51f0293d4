//! Crash torture of the journal (harness = false: prints its own summary).
//!
//! The binary re-executes itself as a child (`VSNAP_TORTURE_CHILD` set)
//! that opens a [`Journal`] in a state directory and writes plans as fast
//! as it can from a few threads: `begin` with growing bodies, progress
//! records, `commit_pivot` with a catalog put, `Finished`. After each write
//! is acknowledged (returned `Ok`) — and only then — it appends one line
//! naming that write to a side file (`O_APPEND`, one `write`, `fdatasync`).
//!
//! The parent SIGKILLs the child at a random instant (0..60 ms after it
//! said `ready`), reopens the journal (an open that fails is counted), and
//! checks that every write named in the side file is there and decodes to
//! exactly what was written (one that is not is counted lost): the newest
//! writes every round, every write every 100 rounds and at the end. The
//! same state directory is used across all kills, so the database grows.
//!
//! `VSNAP_TORTURE_KILLS` (default 1000) sets the number of kills;
//! `VSNAP_TORTURE_KEEP` keeps the state directory of a passing run.
//! Output ends with `kills: N, lost acknowledged records: L, open
//! failures: F` and `1 passed, 0 failed` (or `0 passed, 1 failed`, exit 1).
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vsnap_journal::*;

const CHILD_ENV: &str = "VSNAP_TORTURE_CHILD";
const SIDE_ENV: &str = "VSNAP_TORTURE_SIDE";
const ROUND_ENV: &str = "VSNAP_TORTURE_ROUND";
const KILLS_ENV: &str = "VSNAP_TORTURE_KILLS";
/// Writer threads in the child: enough to make batches, few enough for 2 cores.
const WRITERS: u64 = 4;
const DELAY_MS_MAX: u64 = 60;
/// Every this many kills (and after the last) every write is checked.
const FULL_CHECK_EVERY: u64 = 100;
/// Largest plan body written.
const BODY_LEN_MAX: usize = 16 * 1024;
const CATALOG_TREE: &str = "torture";

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    if !selected(std::env::args().skip(1).collect()) {
        return;
    }
    std::process::exit(parent());
}

/// Honour the libtest arguments `cargo test` may pass: `--list`, name
/// filters (`cargo test -p vsnap-journal round_trip` must not start a
/// three-minute run), `--exact`, `--skip NAME`, `--ignored`.
fn selected(args: Vec<String>) -> bool {
    const NAME: &str = "torture";
    const WITH_VALUE: [&str; 6] = [
        "--test-threads",
        "--skip",
        "--format",
        "--color",
        "--logfile",
        "-Z",
    ];
    let (mut filters, mut skips, mut exact) = (Vec::new(), Vec::new(), false);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--list" => {
                println!("{NAME}: test");
                return false;
            }
            "--ignored" => {
                println!("{NAME}: not ignored, not run (--ignored)");
                return false;
            }
            "--exact" => exact = true,
            "--skip" => skips.extend(it.next()),
            _ if WITH_VALUE.contains(&a.as_str()) => {
                it.next();
            }
            _ if a.starts_with("--skip=") => skips.push(a["--skip=".len()..].to_string()),
            _ if a.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    let matches = |f: &String| {
        if exact {
            f == NAME
        } else {
            NAME.contains(f.as_str())
        }
    };
    if (!filters.is_empty() && !filters.iter().any(matches)) || skips.iter().any(matches) {
        println!("{NAME}: filtered out");
        return false;
    }
    true
}

// ---------------------------------------------------------------- the writes

/// Body of a plan: its length and a pattern that depends on it.
fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ len) as u8).collect()
}

fn header(len: usize) -> PlanHeader {
    PlanHeader {
        op: "torture".into(),
        summary: format!("body of {len} bytes"),
        steps: 3,
        pivot: 1,
        created_unix: len as i64,
    }
}

fn catalog_key(id: PlanId) -> Vec<u8> {
    id.0.to_be_bytes().to_vec()
}

fn catalog_value(id: PlanId, len: usize) -> Vec<u8> {
    codec::encode(&(id.0, len as u64, format!("catalog entry of plan {id}")))
}

/// Progress records as side-file words.
fn record_word(r: &Record) -> String {
    match r {
        Record::Started(i) => format!("S{i}"),
        Record::Done(i) => format!("D{i}"),
        Record::RollingBack => "RB".into(),
        Record::Undone(i) => format!("U{i}"),
        Record::Finished(Outcome::Committed) => "FC".into(),
        Record::Finished(Outcome::RolledBack) => "FR".into(),
        Record::Finished(Outcome::NeedsAttention(_)) => "FN".into(),
    }
}

fn parse_record(w: &str) -> Option<Record> {
    let n = |s: &str| s.parse::<u32>().ok();
    Some(match w {
        "RB" => Record::RollingBack,
        "FC" => Record::Finished(Outcome::Committed),
        "FR" => Record::Finished(Outcome::RolledBack),
        "FN" => Record::Finished(Outcome::NeedsAttention("torture".into())),
        _ if w.starts_with('S') => Record::Started(n(&w[1..])?),
        _ if w.starts_with('D') => Record::Done(n(&w[1..])?),
        _ if w.starts_with('U') => Record::Undone(n(&w[1..])?),
        _ => return None,
    })
}

// ---------------------------------------------------------------- the child

struct Side(File);

impl Side {
    /// One acknowledged write: one line, one `write`, then `fdatasync`.
    fn ack(&self, line: String) {
        let line = format!("{line}\n");
        let mut f = &self.0;
        f.write_all(line.as_bytes()).expect("side file write");
        self.0.sync_data().expect("side file fdatasync");
    }
}

fn child(dir: &Path) {
    let side_path = std::env::var_os(SIDE_ENV).expect("side file");
    let round: usize = std::env::var(ROUND_ENV)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let j = match Journal::open(dir) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("torture child: open failed: {e}");
            std::process::exit(3);
        }
    };
    let side = Side(
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(side_path)
            .expect("side file"),
    );
    println!("ready");
    std::io::stdout().flush().unwrap();
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let (j, side) = (&j, &side);
            s.spawn(move || {
                if let Err(e) = writer(j, side, t, round) {
                    eprintln!("torture child: writer {t}: {e}");
                    std::process::exit(4);
                }
            });
        }
    });
}

/// Write plans until killed.
fn writer(j: &Journal, side: &Side, t: u64, round: usize) -> Result<()> {
    let rec = |id: PlanId, r: Record| -> Result<()> {
        let w = record_word(&r);
        j.append(id, r)?;
        side.ack(format!("R {id} {w}"));
        Ok(())
    };
    for i in 0usize.. {
        // Growing bodies: a child's life is short, so it starts where the
        // previous one's left off.
        let len = ((round * 40 + i) * 97 + t as usize * 11) % BODY_LEN_MAX;
        let id = j.begin(header(len), body(len))?;
        side.ack(format!("B {id} {len}"));
        rec(id, Record::Started(0))?;
        rec(id, Record::Done(0))?;
        if (i + t as usize) % 3 == 2 {
            rec(id, Record::RollingBack)?;
            rec(id, Record::Undone(0))?;
            rec(id, Record::Finished(Outcome::RolledBack))?;
            continue;
        }
        rec(id, Record::Started(1))?;
        let ops = [
            CatalogOp::Put {
                tree: CATALOG_TREE.into(),
                key: catalog_key(id),
                value: catalog_value(id, len),
            },
            CatalogOp::Put {
                tree: format!("{CATALOG_TREE}-last"),
                key: t.to_be_bytes().to_vec(),
                value: catalog_value(id, len),
            },
        ];
        j.commit_pivot(id, 1, &ops)?;
        side.ack(format!("P {id} 1"));
        rec(id, Record::Started(2))?;
        rec(id, Record::Done(2))?;
        rec(id, Record::Finished(Outcome::Committed))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- the parent

/// What the side file says was acknowledged, per plan.
#[derive(Default)]
struct Acked {
    body_len: Option<usize>,
    /// Acknowledged records in order (a pivot is `Done(1)`).
    records: Vec<Record>,
}

struct XorShift(u64);

impl XorShift {
    fn seeded() -> XorShift {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        XorShift((t ^ (std::process::id() as u64) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

struct Parent {
    dir: PathBuf,
    side: PathBuf,
    /// Bytes of the side file already parsed.
    side_done: u64,
    acked: BTreeMap<u64, Acked>,
    acked_count: u64,
    lost: u64,
    open_failures: u64,
    /// Plans with writes acknowledged since the last check.
    fresh: Vec<u64>,
}

fn parent() -> i32 {
    let kills: u64 = match std::env::var(KILLS_ENV) {
        Ok(k) => k
            .parse()
            .unwrap_or_else(|_| panic!("{KILLS_ENV}={k}: not a number")),
        Err(_) => 1000,
    };
    let base = tempfile::Builder::new()
        .prefix("vsnap-torture-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let mut p = Parent {
        dir: base.path().join("state"),
        side: base.path().join("acked"),
        side_done: 0,
        acked: BTreeMap::new(),
        acked_count: 0,
        lost: 0,
        open_failures: 0,
        fresh: Vec::new(),
    };
    File::create(&p.side).unwrap();
    println!(
        "journal torture: {kills} kills, state dir {}",
        p.dir.display()
    );
    let mut rng = XorShift::seeded();
    let t0 = Instant::now();
    let mut done = 0;
    let mut child_failures = 0;
    let (mut spawn_time, mut check_time) = (Duration::ZERO, Duration::ZERO);
    while done < kills {
        let t = Instant::now();
        let spawned = p.spawn(done);
        spawn_time += t.elapsed();
        let mut child = match spawned {
            Ok(c) => c,
            Err(why) => {
                eprintln!("torture: round {done}: {why}");
                p.open_failures += 1;
                child_failures += 1;
                if child_failures >= 3 {
                    eprintln!("torture: the journal cannot be opened any more; stopping");
                    break;
                }
                continue;
            }
        };
        child_failures = 0;
        std::thread::sleep(Duration::from_micros(rng.next() % (DELAY_MS_MAX * 1000)));
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!(
                "torture: round {done}: the child ended by itself ({status}) before the kill"
            );
            p.open_failures += 1;
        }
        // SIGKILL: no destructor, no flush.
        let _ = child.kill();
        let _ = child.wait();
        done += 1;
        p.read_side();
        let full = done % FULL_CHECK_EVERY == 0 || done == kills;
        let t = Instant::now();
        p.check(full);
        check_time += t.elapsed();
        if done % 100 == 0 {
            println!(
                "  {done} kills, {} acknowledged writes in {} plans, {} lost, {} open failures, \
                 {:.1?} (child start {:.1?}, reopen and check {:.1?})",
                p.acked_count,
                p.acked.len(),
                p.lost,
                p.open_failures,
                t0.elapsed(),
                spawn_time,
                check_time,
            );
        }
    }
    println!(
        "kills: {done}, lost acknowledged records: {}, open failures: {}",
        p.lost, p.open_failures
    );
    if p.lost == 0 && p.open_failures == 0 && done == kills {
        if std::env::var_os("VSNAP_TORTURE_KEEP").is_some() {
            println!("state kept in {}", base.keep().display());
        }
        println!("1 passed, 0 failed");
        0
    } else {
        let kept = base.keep();
        eprintln!("torture: state kept in {} for inspection", kept.display());
        println!("0 passed, 1 failed");
        1
    }
}

impl Parent {
    /// Start a child and wait until it has the journal open.
    fn spawn(&self, round: u64) -> Result<Child, String> {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, &self.dir)
            .env(SIDE_ENV, &self.side)
            .env(ROUND_ENV, round.to_string())
            .env_remove("VSNAP_CRASH_AT")
            .env_remove("VSNAP_FAILPOINT_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the child: {e}"))?;
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(format!("the child did not open the journal ({status})"));
        }
        Ok(child)
    }

    /// Parse the side file's new complete lines; cut a torn last line
    /// (the kill hit its `write`) so the next child starts a clean line.
    fn read_side(&mut self) {
        let data = std::fs::read(&self.side).unwrap();
        let new = &data[self.side_done as usize..];
        let complete = new.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < new.len() {
            OpenOptions::new()
                .write(true)
                .open(&self.side)
                .unwrap()
                .set_len(self.side_done + complete as u64)
                .unwrap();
        }
        let text = std::str::from_utf8(&new[..complete]).expect("side file is text");
        for line in text.lines() {
            let w: Vec<&str> = line.split(' ').collect();
            let id: u64 = w[1]
                .parse()
                .unwrap_or_else(|_| panic!("side line {line:?}"));
            let a = self.acked.entry(id).or_default();
            match w[0] {
                "B" => a.body_len = Some(w[2].parse().unwrap()),
                "R" => a
                    .records
                    .push(parse_record(w[2]).unwrap_or_else(|| panic!("side line {line:?}"))),
                "P" => a.records.push(Record::Done(w[2].parse().unwrap())),
                _ => panic!("side line {line:?}"),
            }
            self.acked_count += 1;
            self.fresh.push(id);
        }
        self.side_done += complete as u64;
    }

    /// Reopen the journal and check acknowledged writes: the fresh ones,
    /// or all of them.
    fn check(&mut self, full: bool) {
        let j = match Journal::open(&self.dir) {
            Ok(j) => j,
            Err(e) => {
                eprintln!("torture: reopen after a kill failed: {e}");
                self.open_failures += 1;
                return;
            }
        };
        let mut ids: Vec<u64> = if full {
            self.acked.keys().copied().collect()
        } else {
            std::mem::take(&mut self.fresh)
        };
        ids.sort_unstable();
        ids.dedup();
        self.fresh.clear();
        if full {
            // One pass over everything: no plan of the journal is unreadable.
            if let Err(e) = j.plans() {
                eprintln!("torture: listing every plan failed: {e}");
                self.lost += 1;
            }
        }
        for id in ids {
            let lost = check_plan(&j, PlanId(id), &self.acked[&id]);
            if lost > 0 {
                self.lost += lost;
            }
        }
    }
}

/// The number of acknowledged writes of plan `id` that are missing or wrong.
fn check_plan(j: &Journal, id: PlanId, a: &Acked) -> u64 {
    let all = a.records.len() as u64 + u64::from(a.body_len.is_some());
    let stored = match j.plan(id) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("torture: plan {id}: {e}");
            return all;
        }
    };
    let mut lost = 0;
    if let Some(len) = a.body_len {
        if stored.header != header(len) || stored.body != body(len) {
            eprintln!("torture: plan {id}: header or body differs from what was written");
            lost += 1;
        }
    }
    // The acknowledged records, in order, then at most one more (written
    // and flushed, but the kill came before the child could note it).
    let n = a.records.len();
    let prefix_ok = stored.records.len() >= n && stored.records[..n] == a.records[..];
    if !prefix_ok || stored.records.len() > n + 1 {
        eprintln!(
            "torture: plan {id}: acknowledged records {:?}, stored {:?}",
            a.records, stored.records
        );
        lost += (0..n)
            .filter(|&i| stored.records.get(i) != Some(&a.records[i]))
            .count()
            .max(1) as u64;
    }
    // The pivot's record and its catalog entry are all or nothing.
    let pivot_done = stored.records.contains(&Record::Done(1));
    let entry = j.catalog_get(CATALOG_TREE, &catalog_key(id));
    match (&entry, pivot_done) {
        (Ok(Some(v)), true) => {
            if a.body_len.is_some_and(|len| *v != catalog_value(id, len)) {
                eprintln!("torture: plan {id}: catalog entry differs from what was written");
                lost += 1;
            }
        }
        (Ok(None), false) => {}
        (Ok(_), _) => {
            eprintln!(
                "torture: plan {id}: pivot record present: {pivot_done}, catalog entry present: {}",
                !pivot_done
            );
            lost += 1;
        }
        (Err(e), _) => {
            eprintln!("torture: plan {id}: catalog: {e}");
            lost += 1;
        }
    }
    lost
}
