//! The journal on a filesystem that runs out of space (issue 8): a real
//! small ext4 on a loop device (needs root), filled by a filler file.
//!
//! At each level of free space in a range: open a journal, begin a plan
//! (the journal allocates its log ahead), fill the filesystem to leave the
//! level, then write catalog entries and records (large enough that sled
//! writes tree nodes to blob files, which cannot be allocated ahead) until
//! a write fails. The failure must come back, as a "full" error, within a
//! deadline: sled 0.34.7 hung forever in its next flush when a blob write
//! failed (VSNAP-PATCH 8). Then the filler goes, the journal reopens, and
//! every acknowledged write is there.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use vsnap_journal::*;

fn run(program: &str, args: &[&str]) {
    let st = Command::new(program).args(args).status().unwrap();
    assert!(st.success(), "{program} {args:?}: {st}");
}

struct Fs {
    dir: PathBuf,
    mnt: PathBuf,
}

impl Fs {
    fn new() -> Fs {
        let dir = PathBuf::from(format!(
            "/var/tmp/vsnap-journal-enospc-{}",
            std::process::id()
        ));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let img = dir.join("fs.img");
        let img = img.to_str().unwrap();
        run("truncate", &["-s", "4M", img]);
        run("mkfs.ext4", &["-q", "-F", "-m", "0", img]);
        run("mount", &["-o", "loop", img, mnt.to_str().unwrap()]);
        Fs { dir, mnt }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a hung writer still holds its files): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn available(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a buffer we own.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

fn fill(dir: &Path, filler: &Path, free: u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(filler).unwrap();
    let want = available(dir).saturating_sub(free);
    if want > 0 {
        // SAFETY: fallocate(2) on a file we opened.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, want as libc::off_t) };
        assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    }
}

fn value(i: usize) -> Vec<u8> {
    codec::encode(&format!("{i:05}{}", "v".repeat(3000)))
}

#[test]
fn journal_writes_fail_cleanly_on_a_full_filesystem_and_keep_what_was_acknowledged() {
    let fs = Fs::new();
    let filler = fs.mnt.join("filler");
    for level in (0..=96 * 1024u64).step_by(8 * 1024) {
        let state = fs.mnt.join(format!("state-{level}"));
        let j = Journal::open(&state).unwrap();
        let header = PlanHeader {
            op: "test".into(),
            summary: format!("level {level}"),
            steps: 1,
            pivot: 0,
            created_unix: 0,
        };
        let plan = j.begin(header, vec![7; 100]).unwrap();
        fill(&fs.mnt, &filler, level);

        // Write until a write fails, in a thread: a hang fails the test.
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            let mut acked = 0usize;
            let err = loop {
                if acked == 2000 {
                    break None;
                }
                let put = CatalogOp::Put {
                    tree: "t".into(),
                    key: format!("k{acked:05}").into_bytes(),
                    value: value(acked),
                };
                if let Err(e) = j.catalog_apply(&[put]) {
                    break Some(e);
                }
                if let Err(e) = j.append(plan, Record::Started(0)) {
                    // The catalog entry is acknowledged; the record not.
                    acked += 1;
                    break Some(e);
                }
                acked += 1;
            };
            drop(j);
            let _ = tx.send((acked, err.map(|e| e.to_string())));
        });
        let (acked, err) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!("level {level}: a journal write on a full filesystem hangs")
            });
        writer.join().unwrap();
        let err = err.unwrap_or_else(|| panic!("level {level}: 2000 writes, none failed"));
        assert!(
            err.contains("is full") && err.contains(state.to_str().unwrap()),
            "level {level}: {err}"
        );

        std::fs::remove_file(&filler).unwrap();
        let j = Journal::open(&state).unwrap_or_else(|e| panic!("level {level}: reopen: {e}"));
        let scan = j.catalog_scan("t", b"").unwrap();
        assert!(
            scan.len() >= acked,
            "level {level}: {} of {acked} acknowledged entries",
            scan.len()
        );
        for (i, (k, v)) in scan.iter().enumerate().take(acked) {
            assert_eq!(k, format!("k{i:05}").as_bytes(), "level {level}");
            assert_eq!(v, &value(i), "level {level}");
        }
        let records = j.plan(plan).unwrap().records.len();
        assert!(
            records + 1 >= acked,
            "level {level}: {records} records, {acked} acknowledged"
        );
        drop(j);
        std::fs::remove_dir_all(&state).unwrap();
    }
}
