//! Shared helpers of the steps integration tests: real qemu-img, real
//! files in temporary directories, real loop-mounted filesystems.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use vsnap_steps::{qemu_img, Cx, Format, Probe, Step};

pub const MIB: u64 = 1 << 20;

pub fn cx() -> Cx<'static> {
    Cx::quiet()
}

pub fn probe(step: &Step) -> Probe {
    step.probe(&cx())
        .unwrap_or_else(|e| panic!("probe of {}: {e}", step.describe()))
}

pub fn apply(step: &Step) {
    step.apply(&cx())
        .unwrap_or_else(|e| panic!("apply of {}: {e}", step.describe()))
}

pub fn undo(step: &Step) {
    step.undo(&cx())
        .unwrap_or_else(|e| panic!("undo of {}: {e}", step.describe()))
}

/// A qcow2 image of `size` bytes.
pub fn qcow2(path: &Path, size: u64) {
    qemu_img::create(path, Format::Qcow2, size).unwrap();
}

/// File names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A filesystem image loop-mounted in a temporary directory; unmounted on
/// drop. Fails the test loudly when it cannot be made (these tests need
/// root and loop devices).
pub struct LoopMount {
    pub mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopMount {
    /// `kind`: "ext4" or "btrfs"; `size`: for `truncate -s`.
    pub fn new(kind: &str, size: &str) -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join(format!("{kind}.img"));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let img_s = img.to_str().unwrap();
        run("truncate", &["-s", size, img_s]);
        match kind {
            "ext4" => run("mkfs.ext4", &["-q", img_s]),
            "btrfs" => run("mkfs.btrfs", &["-q", "-f", img_s]),
            _ => panic!("unknown filesystem {kind}"),
        }
        run("mount", &["-o", "loop", img_s, mnt.to_str().unwrap()]);
        LoopMount { mnt, _dir: dir }
    }
}

impl Drop for LoopMount {
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

/// A loop block device over a file of `size` bytes filled with `byte`;
/// detached on drop. Fails the test loudly when it cannot be made (needs
/// root and loop devices).
pub struct LoopDev {
    pub dev: PathBuf,
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    pub fn new(size: usize, byte: u8) -> LoopDev {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dev.img");
        std::fs::write(&file, vec![byte; size]).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDev {
            dev,
            file,
            _dir: dir,
        }
    }

    /// The device's first `len` bytes.
    pub fn head(&self, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.dev).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
