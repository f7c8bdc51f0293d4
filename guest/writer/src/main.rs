//! vsnap test guest writer.
//!
//! Usage: `vsnap-writer [--delay-ms MS] [--progress EVERY] DIR...`
//!
//! Forever: N += 1; for each DIR in the order given, write one 512-byte
//! record for N into slot `N % SLOTS` of `DIR/seq` and `fdatasync` it before
//! moving to the next DIR. So at any instant the disks, read in that order,
//! show a non-increasing run of sequence numbers that differ by at most one.
//!
//! Record (512 bytes, ASCII, NUL padded):
//! `VSNAPSEQ seq=<20 digits> disk=<name> boot=<20 digits> t_ns=<20 digits>\n`
//! The file is `SLOTS * 512` bytes, allocated (zero-filled and fsynced)
//! before the first record. At start the writer resumes from the highest
//! sequence number found in any of the files, so numbers only grow across
//! reboots; `boot` counts the writer's starts (1 + the highest boot seen);
//! `t_ns` is nanoseconds since this start's first record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

const SLOTS: u64 = 64;
const REC: usize = 512;
const MAGIC: &[u8] = b"VSNAPSEQ seq=";

struct Disk {
    name: String,
    file: File,
}

fn parse_num(rec: &[u8], key: &[u8]) -> Option<u64> {
    let pos = rec.windows(key.len()).position(|w| w == key)?;
    let digits: Vec<u8> = rec[pos + key.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Highest (seq, boot) found in a seq file's records.
fn scan(file: &File) -> (u64, u64) {
    let mut buf = vec![0u8; SLOTS as usize * REC];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    let (mut seq, mut boot) = (0, 0);
    for rec in buf[..n].chunks(REC) {
        if rec.starts_with(MAGIC) {
            seq = seq.max(parse_num(rec, b" seq=").unwrap_or(0));
            boot = boot.max(parse_num(rec, b" boot=").unwrap_or(0));
        }
    }
    (seq, boot)
}

fn t_ns() -> u64 {
    // Nanoseconds since the writer's first record (std has no raw
    // CLOCK_MONOTONIC); enough to see write rates and gaps (a freeze).
    use std::sync::OnceLock;
    use std::time::Instant;
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn console(msg: &str) {
    // Best effort: stdout is the serial console when started by /init.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

fn open_disk(dir: &PathBuf) -> std::io::Result<Disk> {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let path = dir.join("seq");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let want = SLOTS * REC as u64;
    if file.metadata()?.len() < want {
        // Allocate every slot for real (no holes), so that a record write
        // later only overwrites data blocks in place.
        let mut buf = vec![0u8; want as usize];
        let have = file.read_at(&mut buf, 0)?;
        buf[have..].fill(0);
        file.write_all_at(&buf, 0)?;
        file.sync_all()?;
    }
    Ok(Disk { name, file })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut delay_ms: u64 = 0;
    let mut progress: u64 = 1000;
    let mut dirs: Vec<PathBuf> = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--delay-ms" => delay_ms = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--progress" => progress = args.next().and_then(|v| v.parse().ok()).unwrap_or(1000),
            _ => dirs.push(PathBuf::from(a)),
        }
    }
    if dirs.is_empty() {
        console("VSNAP-WRITER no disks: nothing to write");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let mut disks = Vec::new();
    for d in &dirs {
        match open_disk(d) {
            Ok(disk) => disks.push(disk),
            Err(e) => console(&format!("VSNAP-WRITER skip {}: {e}", d.display())),
        }
    }
    let (mut seq, mut boot) = (0u64, 0u64);
    for d in &disks {
        let (s, b) = scan(&d.file);
        seq = seq.max(s);
        boot = boot.max(b);
    }
    boot += 1;
    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    console(&format!(
        "VSNAP-WRITER start seq={} boot={boot} disks={}",
        seq + 1,
        names.join(",")
    ));
    let mut rec = [0u8; REC];
    loop {
        seq += 1;
        let slot = (seq % SLOTS) * REC as u64;
        for d in &disks {
            let line = format!(
                "VSNAPSEQ seq={seq:020} disk={} boot={boot:020} t_ns={:020}\n",
                d.name,
                t_ns()
            );
            rec.fill(0);
            let n = line.len().min(REC);
            rec[..n].copy_from_slice(&line.as_bytes()[..n]);
            // Retry until it lands: a disk error (or a paused VM with
            // werror=stop) must not reorder writes or skip a disk.
            loop {
                match d.file.write_all_at(&rec, slot).and_then(|_| d.file.sync_data()) {
                    Ok(()) => break,
                    Err(e) => {
                        console(&format!("VSNAP-WRITER error {} seq={seq}: {e}", d.name));
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        }
        if progress > 0 && seq % progress == 0 {
            console(&format!("VSNAP-WRITER seq={seq}"));
        }
        if delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(delay_ms));
        }
    }
}
