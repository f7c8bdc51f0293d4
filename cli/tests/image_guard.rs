//! What vsnap must know of an image before it touches it (issue 8):
//! its format is never guessed from its bytes, it belongs to one state
//! directory, and it has one name. Real `vsnap`, real `qemu-img`.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `qemu-img info --backing-chain -U --output=json -f FORMAT PATH`: every
/// file of the chain QEMU would open, with its format.
fn chain(path: &Path, format: &str) -> Vec<(PathBuf, String)> {
    let out = Command::new("qemu-img")
        .args([
            "info",
            "--backing-chain",
            "-U",
            "--output=json",
            "-f",
            format,
        ])
        .arg(path)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                PathBuf::from(i["filename"].as_str().unwrap()),
                i["format"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The guest's raw disk `vm/<name>` (8 MiB) whose first bytes are a whole
/// qcow2 image (header, backing file = `secret`, backing format raw), as
/// a guest writing to sector 0 of its disk can make it.
fn hostile_raw(tmp: &TempDir, name: &str, secret: &Path) -> PathBuf {
    let hdr = tmp.join(format!("{name}.hdr"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(secret)
        .arg(&hdr)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bytes = std::fs::read(&hdr).unwrap();
    std::fs::remove_file(&hdr).unwrap();
    let disk = tmp.join("vm").join(name);
    qemu_img_create(&disk, "raw", 8 * MIB);
    qemu_io_write(&disk, "raw", 4 * MIB, 64 * 1024, 0x33);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&bytes, 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        chain(&disk, "qcow2").len(),
        2,
        "read as qcow2, the disk is a chain onto the host file"
    );
    disk
}

struct Fx {
    tmp: TempDir,
    vm: PathBuf,
    secret: PathBuf,
}

impl Fx {
    fn new(tag: &str) -> Fx {
        let tmp = TempDir::new(tag);
        let vm = tmp.join("vm");
        let host = tmp.join("host");
        std::fs::create_dir(&vm).unwrap();
        std::fs::create_dir(&host).unwrap();
        let secret = host.join("secret.raw");
        qemu_img_create(&secret, "raw", MIB);
        qemu_io_write(&secret, "raw", 0, MIB, 0x5a);
        Fx { tmp, vm, secret }
    }

    /// The image directory and the catalog (not the host file: reading
    /// it would spoil the test's watch on it).
    fn world(&self, state: &Path, images: &[&Path]) -> World {
        world(state, &[&self.vm], images)
    }

    /// `vsnap --state-dir STATE ARGS` exits 2 naming `words`, and
    /// [`Fx::world`] is unchanged.
    #[track_caller]
    fn refused(&self, state: &Path, images: &[&Path], args: &[&str], words: &[&str]) -> Out {
        refused_untouched(state, &[&self.vm], images, args, words)
    }

    /// No chain of `image` (read as vsnap's catalog says: `format`)
    /// reaches the host file.
    #[track_caller]
    fn secret_unchained(&self, image: &Path, format: &str) {
        let c = chain(image, format);
        assert!(
            c.iter().all(|(f, _)| f != &self.secret),
            "{} chains onto the host file: {c:?}",
            image.display()
        );
    }
}

/// An inotify watch for any open of one file (by anything on the host).
struct OpenWatch(i32);

impl OpenWatch {
    fn new(path: &Path) -> OpenWatch {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscalls on a descriptor this struct owns.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0);
            let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
            assert!(libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) >= 0);
            OpenWatch(fd)
        }
    }

    /// Whether the file was opened since the watch began.
    fn opened(&self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a local buffer of the given length.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        n > 0
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this struct owns.
        unsafe { libc::close(self.0) };
    }
}

/// A raw disk whose bytes are a qcow2 header with a backing file naming a
/// host file: without --format it is refused (nothing touched); with
/// --format raw every command treats it as raw, the host file never
/// enters a chain, and the default kind writes no qcow2 metadata into it.
/// Before the fix vsnap read it as qcow2: an internal snapshot was written
/// into the raw disk, and an external one chained the host file under it.
#[test]
fn a_raw_disk_with_a_qcow2_header_is_never_read_as_qcow2() {
    let fx = Fx::new("fmt");
    let state = fx.tmp.join("state");
    let disk = hostile_raw(&fx.tmp, "disk.img", &fx.secret);
    let d = p(&disk);
    let secret_hash = hash_file(&fx.secret);
    // From here on nothing may open the host file (the test's own qemu-img
    // calls read the chains vsnap made, which must not reach it either).
    let watch = OpenWatch::new(&fx.secret);
    let disk_hash = hash_file(&disk);

    // First seen, not stated: refused, nothing touched.
    for args in [
        &["vol", "snapshot", "create", d, "s1"][..],
        &["vol", "snapshot", "create", d, "s1", "--dry-run"],
        &["vol", "snapshot", "create", d, "s1", "--kind", "external"],
        &["vol", "snapshot", "create", d, "s1", "--kind", "internal"],
    ] {
        fx.refused(&state, &[&disk], args, &["--format raw", "qcow2 header"]);
    }
    // A check of the image reads it as raw.
    vsnap(&state, &["vol", "check", d]).ok();
    // Stated raw: no internal snapshot of a raw disk.
    vsnap(
        &state,
        &[
            "vol", "snapshot", "create", d, "s1", "--format", "raw", "--kind", "internal",
        ],
    )
    .expect_code(2)
    .stderr_has(&["internal snapshots need a qcow2 image"]);
    // Stated qcow2 would be the operator's word; vsnap takes it only with
    // --format qcow2 (covered by the engine's rule), not from the bytes.

    // The default kind for a raw disk: a whole-file clone; the disk's
    // bytes are untouched.
    vsnap(
        &state,
        &["vol", "snapshot", "create", d, "c1", "--format", "raw"],
    )
    .ok();
    assert_eq!(
        hash_file(&disk),
        disk_hash,
        "the default kind wrote into the raw disk"
    );
    let c1 = fx.vm.join("disk.c1.img");
    assert_eq!(hash_file(&c1), disk_hash);
    vsnap(&state, &["--json", "vol", "snapshot", "info", d, "c1"])
        .ok()
        .stdout_has(&["\"raw\""]);
    // The next commands need no --format: vsnap recorded it.
    vsnap(&state, &["vol", "snapshot", "create", d, "c2"]).ok();
    vsnap(&state, &["vol", "snapshot", "revert", d, "c1"]).ok();
    vsnap(&state, &["vol", "check", d]).ok();
    // A stated format that contradicts the record is refused.
    vsnap(
        &state,
        &["vol", "snapshot", "create", d, "c3", "--format", "qcow2"],
    )
    .expect_code(2)
    .stderr_has(&["recorded", "raw"]);
    vsnap(&state, &["vol", "snapshot", "delete", d, "c2"]).ok();
    vsnap(&state, &["vol", "snapshot", "delete", d, "c1"]).ok();
    assert_eq!(hash_file(&disk), disk_hash);
    fx.secret_unchained(&disk, "raw");

    // External: the raw disk is frozen as raw under a qcow2 overlay whose
    // backing format is raw; the host file is in no chain, at any step.
    vsnap(
        &state,
        &[
            "vol", "snapshot", "create", d, "e1", "--format", "raw", "--kind", "external",
        ],
    )
    .ok();
    let e1 = fx.vm.join("disk.e1.img");
    let c = chain(&disk, "qcow2");
    assert_eq!(
        c,
        vec![(disk.clone(), "qcow2".into()), (e1.clone(), "raw".into())],
        "the overlay is backed by the raw disk, read as raw"
    );
    assert_eq!(hash_file(&e1), disk_hash, "the frozen raw disk was written");
    fx.secret_unchained(&disk, "qcow2");
    assert!(qemu_io_reads(&disk, "qcow2", 4 * MIB, 64 * 1024, 0x33));
    vsnap(&state, &["vol", "snapshot", "create", d, "e2"]).ok();
    fx.secret_unchained(&disk, "qcow2");
    vsnap(&state, &["vol", "check", d]).ok();
    vsnap(&state, &["vol", "snapshot", "revert", d, "e1"]).ok();
    fx.secret_unchained(&disk, "qcow2");
    vsnap(&state, &["vol", "snapshot", "delete", d, "e2"]).ok();
    vsnap(&state, &["vol", "snapshot", "delete", d, "e1"]).ok();
    assert_eq!(chain(&disk, "qcow2"), vec![(disk.clone(), "qcow2".into())]);
    assert!(qemu_io_reads(&disk, "qcow2", 4 * MIB, 64 * 1024, 0x33));
    assert!(!watch.opened(), "the host file was opened");
    assert_eq!(hash_file(&fx.secret), secret_hash);
}

/// `domain define` with a disk that has no `<driver type>` reads it as
/// raw (libvirt's default without probing), never from the image's bytes.
/// Before the fix the disk above was defined as qcow2.
#[test]
fn domain_define_without_driver_type_is_raw() {
    let fx = Fx::new("domfmt");
    let state = fx.tmp.join("state");
    let disk = hostile_raw(&fx.tmp, "vda.img", &fx.secret);
    let xml = fx.tmp.join("vm.xml");
    std::fs::write(&xml, domain_xml("vm", &[("vda", &disk, None)])).unwrap();
    vsnap(&state, &["domain", "define", p(&xml)]).ok();
    let info = vsnap(&state, &["--json", "domain", "info", "vm"])
        .ok()
        .json();
    assert_eq!(info["disks"][0]["format"], "raw", "{info}");
}

/// Two state directories on one image: A takes an external snapshot; B
/// is refused (exit 2, naming A), for every command that would change the
/// image, and nothing changes; A's delete then leaves a whole image. A's
/// claim goes with its last snapshot, and B may then take the image.
/// Before the fix B's snapshot succeeded and A's delete removed the file
/// at the bottom of the active chain.
#[test]
fn a_second_state_directory_is_refused() {
    let fx = Fx::new("owner");
    let a = fx.tmp.join("state-a");
    let b = fx.tmp.join("state-b");
    let img = fx.vm.join("a.qcow2");
    let i = p(&img);
    qemu_img_create(&img, "qcow2", 4 * MIB);
    qemu_io_write(&img, "qcow2", 0, 64 * 1024, 0x11);
    vsnap(
        &a,
        &["vol", "snapshot", "create", i, "e1", "--kind", "external"],
    )
    .ok();
    qemu_io_write(&img, "qcow2", 64 * 1024, 64 * 1024, 0x22);
    let a_canon = std::fs::canonicalize(&a).unwrap();
    let a_name = a_canon.to_str().unwrap();

    for args in [
        &["vol", "snapshot", "create", i, "e2", "--kind", "external"][..],
        &[
            "vol",
            "snapshot",
            "create",
            i,
            "e2",
            "--kind",
            "external",
            "--dry-run",
        ],
        &["vol", "snapshot", "create", i, "i2"],
    ] {
        let before_a = fx.world(&a, &[&img]);
        let before_b = fx.world(&b, &[&img]);
        vsnap(&b, args)
            .expect_code(2)
            .stderr_has(&["managed by another vsnap state directory", a_name]);
        assert_unchanged(&before_b, &fx.world(&b, &[&img]));
        assert_unchanged(&before_a, &fx.world(&a, &[&img]));
    }
    // B's check says whose it is.
    vsnap(&b, &["vol", "check", i])
        .expect_code(1)
        .stdout_has(&["claimed by another state directory", a_name]);
    vsnap(&a, &["vol", "check", i]).ok();

    // A's delete: the image stays whole, with both writes.
    vsnap(&a, &["vol", "snapshot", "delete", i, "e1"]).ok();
    assert_eq!(chain(&img, "qcow2").len(), 1);
    assert!(qemu_io_reads(&img, "qcow2", 0, 64 * 1024, 0x11));
    assert!(qemu_io_reads(&img, "qcow2", 64 * 1024, 64 * 1024, 0x22));
    // A no longer has snapshots of it: the claim is gone, B may take it.
    assert!(std::fs::symlink_metadata(fx.vm.join(".vsnap-owner.a.qcow2")).is_err());
    vsnap(&b, &["vol", "snapshot", "create", i, "b1"]).ok();
    vsnap(&a, &["vol", "snapshot", "create", i, "a2"])
        .expect_code(2)
        .stderr_has(&["managed by another vsnap state directory"]);
    vsnap(&b, &["vol", "check", i]).ok();
    // A lost claim is reported by the owner's check (and the claim file
    // is neither a temporary nor an orphan to it).
    std::fs::remove_file(fx.vm.join(".vsnap-owner.a.qcow2")).unwrap();
    vsnap(&b, &["vol", "check", i])
        .expect_code(1)
        .stdout_has(&["claim", "missing"]);
    vsnap(&b, &["vol", "snapshot", "create", i, "b2"]).ok();
    vsnap(&b, &["vol", "check", i]).ok();
}

/// An image with a second hard link is refused before anything is
/// touched, for every kind; without the link the same command works.
/// Before the fix the external snapshot succeeded and the other name was
/// left as the frozen snapshot file, writable behind vsnap's back.
#[test]
fn an_image_with_a_second_hard_link_is_refused() {
    let fx = Fx::new("links");
    let state = fx.tmp.join("state");
    let img = fx.vm.join("a.qcow2");
    let i = p(&img);
    qemu_img_create(&img, "qcow2", 4 * MIB);
    let other = fx.vm.join("other-name.qcow2");
    std::fs::hard_link(&img, &other).unwrap();
    for kind in ["external", "internal", "copy"] {
        fx.refused(
            &state,
            &[&img],
            &["vol", "snapshot", "create", i, "e1", "--kind", kind],
            &["2 hard links", "remove the other link"],
        );
    }
    std::fs::remove_file(&other).unwrap();
    vsnap(
        &state,
        &["vol", "snapshot", "create", i, "e1", "--kind", "external"],
    )
    .ok();
    vsnap(
        &state,
        &["vol", "snapshot", "create", i, "e2", "--kind", "external"],
    )
    .ok();
    vsnap(&state, &["vol", "check", i]).ok();
    // A link made after the snapshots: revert and delete refuse too.
    std::fs::hard_link(&img, &other).unwrap();
    vsnap(&state, &["vol", "snapshot", "revert", i, "e1"])
        .expect_code(2)
        .stderr_has(&["hard links"]);
    vsnap(&state, &["vol", "snapshot", "delete", i, "e2"])
        .expect_code(2)
        .stderr_has(&["hard links"]);
}

/// A shut-off domain's disks follow the volume rules: a disk image that
/// another state directory manages, or that has a second hard link, is
/// refused (exit 2, nothing touched), external and internal alike; the
/// same domain snapshots once both are cleared. Before the fix the domain
/// snapshot went through both.
#[test]
fn domain_disks_another_state_directory_manages_or_with_two_links_are_refused() {
    let fx = Fx::new("domguard");
    let a = fx.tmp.join("state-a");
    let b = fx.tmp.join("state-b");
    let disk = fx.vm.join("vda.qcow2");
    qemu_img_create(&disk, "qcow2", 4 * MIB);
    let xml = fx.tmp.join("vm.xml");
    std::fs::write(&xml, domain_xml("vm", &[("vda", &disk, Some("qcow2"))])).unwrap();
    vsnap(&b, &["domain", "define", p(&xml)]).ok();
    // A manages the image (one internal snapshot, so the chain stays put).
    vsnap(&a, &["vol", "snapshot", "create", p(&disk), "a1"]).ok();
    let a_canon = std::fs::canonicalize(&a).unwrap();
    for extra in [
        &["--disk", "vda=internal"][..],
        &["--disk", "vda=external"][..],
    ] {
        let mut args = vec!["snapshot", "create", "vm", "s1"];
        args.extend_from_slice(extra);
        fx.refused(
            &b,
            &[&disk],
            &args,
            &[
                "managed by another vsnap state directory",
                a_canon.to_str().unwrap(),
            ],
        );
    }
    vsnap(&a, &["vol", "snapshot", "delete", p(&disk), "a1"]).ok();
    // A second name: refused the same way.
    let other = fx.vm.join("other.qcow2");
    std::fs::hard_link(&disk, &other).unwrap();
    fx.refused(
        &b,
        &[&disk],
        &["snapshot", "create", "vm", "s1", "--disk", "vda=external"],
        &["2 hard links", "remove the other link"],
    );
    std::fs::remove_file(&other).unwrap();
    vsnap(
        &b,
        &["snapshot", "create", "vm", "s1", "--disk", "vda=external"],
    )
    .ok();
    vsnap(&b, &["domain", "check", "vm"]).ok();
}
