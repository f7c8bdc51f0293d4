//! A full filesystem under the state directory (issue 8): real ENOSPC from
//! a small loop-mounted ext4, filled by a filler file at successive levels.
//!
//! At each level, with a fresh state directory on that filesystem and an
//! image on a normal one: one snapshot is taken (`base`), a second create
//! is killed in the middle of its plan (SIGKILL at a crash point, with the
//! `failpoints` feature: an interrupted plan), the filesystem is filled up
//! to leave exactly the level free, and creates run until they fail. Every
//! create must either succeed (exit 0: acknowledged) or be refused with
//! exit 2 having changed nothing (its snapshot is not in the image). Then
//! the filler is removed, `vsnap-recover` runs, and nothing acknowledged
//! may be lost: the catalog lists `base` and every acknowledged create, the
//! image holds exactly those snapshots, no plan is unfinished, the
//! interrupted one was recovered, and `vol check` calls the volume
//! consistent.
//!
//! Before the fix, sled left the `snap.*.generating` file of a snapshot
//! write that failed with ENOSPC at an open, and took it for its newest
//! snapshot at every later open: "Read corrupted data at file offset None",
//! the catalog and the interrupted plan lost for good.
mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

const KIB: u64 = 1024;

/// Free bytes on the filesystem of `dir` (for an unprivileged writer).
fn available(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a buffer we own.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// Fill the filesystem of `dir` with `filler` until `free` bytes are left
/// (or fewer: block granularity).
fn fill(dir: &Path, filler: &Path, free: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(filler)
        .unwrap();
    let want = available(dir).saturating_sub(free);
    if want > 0 {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate(2) on a file we opened.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, want as libc::off_t) };
        assert_eq!(
            r,
            0,
            "fallocate filler: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The internal snapshot names `qemu-img snapshot -l` lists.
fn image_snapshots(image: &Path) -> Vec<String> {
    let out = Out::from_command("qemu-img", &["snapshot", "-l", p(image)]);
    out.ok();
    let mut names: Vec<String> = out
        .stdout
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    names.sort();
    names
}

fn create(state: &Path, image: &Path, name: &str, crash_at: Option<&str>) -> Out {
    let mut c = Command::new(VSNAP);
    c.arg("--state-dir")
        .arg(state)
        .args(["vol", "snapshot", "create", p(image), name])
        // A few KiB per plan, so that each level runs out after a few
        // creates (the plan body and the catalog both carry it).
        .args(["--description", &"d".repeat(3000)])
        .env("VSNAP_NO_SERVICE", "1")
        .stdin(Stdio::null());
    if let Some(point) = crash_at {
        c.env("VSNAP_CRASH_AT", point);
    }
    Out::from(c.output().expect("run vsnap"))
}

#[test]
fn journal_survives_a_full_filesystem_at_every_level() {
    let tmp = TempDir::new("fullfs");
    let mnt = Mount::ext4(&tmp.join("fs.img"), &tmp.join("mnt"), "4M");
    let filler = mnt.mnt.join("filler");
    let crashes = cfg!(feature = "failpoints");
    // Every level from 0 to 384 KiB free, in steps of 12 KiB (the
    // filesystem's blocks are 1 KiB: each level ends in another write).
    // A plan begins only with 256 KiB of sled's log allocated ahead and as
    // much free besides: below that the first create is refused; above
    // it, creates succeed until the filesystem runs out.
    for level in (0..=384 * KIB).step_by(12 * KIB as usize) {
        let state = mnt.mnt.join(format!("state-{level}"));
        // An image of its own (an image belongs to one state directory).
        let vm = tmp.join(format!("vm-{level}"));
        std::fs::create_dir(&vm).unwrap();
        let image = vm.join("a.qcow2");
        qemu_img_create(&image, "qcow2", MIB);
        let at = |what: &str| format!("level {} KiB free: {what}", level / KIB);

        let base = create(&state, &image, "base", None);
        assert_eq!(base.code, 0, "{}: {base:?}", at("create base"));
        if crashes {
            // Killed after its step made the snapshot in the image and
            // before the pivot: recovery must roll it back.
            let killed = create(&state, &image, "killed", Some("run.applied.0"));
            assert_eq!(killed.code, -1, "{}: {killed:?}", at("create killed"));
            assert!(image_snapshots(&image).contains(&"killed".to_string()));
        }

        fill(&mnt.mnt, &filler, level);
        let mut acknowledged = vec!["base".to_string()];
        let mut failed = None;
        for i in 0..60 {
            let name = format!("s{i}");
            let out = create(&state, &image, &name, None);
            match out.code {
                0 => acknowledged.push(name),
                2 => {
                    // Refused, or failed and rolled back: nothing changed.
                    assert!(
                        !image_snapshots(&image).contains(&name),
                        "{}: create {name} exited 2 but left its snapshot in the image: {out:?}",
                        at("creates")
                    );
                    assert!(
                        !out.stderr.contains("corrupt"),
                        "{}: {out:?}",
                        at("creates")
                    );
                    failed = Some(out);
                    break;
                }
                _ => panic!("{}: create {name}: {out:?}", at("creates")),
            }
        }
        let failed = failed.unwrap_or_else(|| panic!("{}: 60 creates, none failed", at("creates")));
        eprintln!(
            "{}: {} create(s) acknowledged, then: {}",
            at("creates"),
            acknowledged.len() - 1,
            failed.stderr.trim()
        );
        std::fs::remove_file(&filler).unwrap();
        let recovered = vsnap_recover(&state, &[]);
        assert_eq!(recovered.code, 0, "{}: {recovered:?}", at("vsnap-recover"));
        let list = vsnap(&state, &["vol", "snapshot", "list", p(&image), "--name"]);
        assert_eq!(list.code, 0, "{}: {list:?}", at("list"));
        let mut listed: Vec<String> = list.stdout.lines().map(str::to_string).collect();
        listed.sort();
        acknowledged.sort();
        assert_eq!(listed, acknowledged, "{}: catalog", at("after recovery"));
        assert_eq!(
            image_snapshots(&image),
            acknowledged,
            "{}: image",
            at("after recovery")
        );
        let plans = vsnap(&state, &["--json", "plan", "list"]);
        assert_eq!(plans.code, 0, "{}: {plans:?}", at("plan list"));
        for plan in plans.json().as_array().unwrap() {
            let outcome = plan["outcome"].as_str().unwrap_or("UNFINISHED");
            assert!(
                ["Committed", "RolledBack"].contains(&outcome),
                "{}: plan {plan}",
                at("after recovery")
            );
            if crashes && plan["summary"].as_str().unwrap().contains("\"killed\"") {
                assert_eq!(
                    outcome,
                    "RolledBack",
                    "{}: the killed plan",
                    at("after recovery")
                );
            }
        }
        let check = vsnap(&state, &["vol", "check", p(&image)]);
        assert_eq!(check.code, 0, "{}: {check:?}", at("vol check"));
        // The refusal says what is wrong and where.
        assert!(
            failed.stderr.contains("is full") && failed.stderr.contains(p(&state)),
            "{}: the refusal names the full state directory: {failed:?}",
            at("creates")
        );

        std::fs::remove_dir_all(&state).unwrap();
        std::fs::remove_dir_all(&vm).unwrap();
    }
}

/// `vsnap-recover` and `vsnap` on a journal sled cannot read: exit 2, and
/// the message names the state directory, says the journal is damaged and
/// what to do (it said "Read corrupted data at file offset None backtrace
/// ()"). The damage is made by hand: the last byte of sled's snapshot file
/// flipped, so that its checksum fails.
#[test]
fn damaged_journal_names_the_state_directory_and_what_to_do() {
    let tmp = TempDir::new("damaged");
    let state = tmp.join("state");
    let image = tmp.join("a.qcow2");
    qemu_img_create(&image, "qcow2", MIB);
    vsnap(&state, &["vol", "snapshot", "create", p(&image), "s1"]).ok();
    // sled writes its snapshot file at the next open.
    vsnap(&state, &["vol", "snapshot", "list", p(&image)]).ok();
    let db = state.join("db");
    let snap = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("snap.")
        })
        .expect("sled's snapshot file");
    let mut bytes = std::fs::read(&snap).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&snap, bytes).unwrap();

    let expect = [
        format!("state directory {} is damaged", p(&state)),
        format!("mv {} {}.damaged", p(&db), p(&db)),
        "Keep a copy".to_string(),
    ];
    let words: Vec<&str> = expect.iter().map(String::as_str).collect();
    vsnap_recover(&state, &[]).expect_code(2).stderr_has(&words);
    vsnap(&state, &["vol", "snapshot", "list", p(&image)])
        .expect_code(2)
        .stderr_has(&words);
}
