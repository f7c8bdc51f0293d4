//! What the qcow2 image itself holds, beyond the catalog: internal
//! snapshots addressed so that no name is read as an ID, damaged images
//! refused before anything is touched, internal snapshots vsnap did not
//! make counted in "families don't mix". Real `qemu-img`/`qemu-io`
//! images under /var/tmp; damage is made with byte writes into the file.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use vsnap_engine::{
    CreateRequest, DeleteRequest, Engine, EngineError, Format, RevertRequest, SnapKind,
};
use vsnap_steps::{qemu_img, StepError};

const SIZE: u64 = 4 << 20;
const LEN: u64 = 64 * 1024;

struct Fx {
    engine: Engine,
    work: PathBuf,
    image: PathBuf,
    _tmp: tempfile::TempDir,
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Fx {
    fn new() -> Fx {
        Fx::with_options(&[])
    }

    /// A fresh qcow2 image `disk.qcow2` (`qemu-img create -o OPTS`).
    fn with_options(opts: &[&str]) -> Fx {
        let tmp = tempfile::Builder::new()
            .prefix("vsnap-qcow2-images-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let work = std::fs::canonicalize(tmp.path()).unwrap().join("vm");
        std::fs::create_dir(&work).unwrap();
        let image = work.join("disk.qcow2");
        let img = image.to_str().unwrap().to_string();
        let size = SIZE.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        for o in opts {
            args.extend(["-o", o]);
        }
        args.extend([img.as_str(), size.as_str()]);
        sh("qemu-img", &args);
        let (engine, _) = Engine::open(&tmp.path().join("state")).unwrap();
        Fx {
            engine,
            work,
            image,
            _tmp: tmp,
        }
    }

    fn write(&self, pattern: u8) {
        qemu_img::io_write_pattern(&self.image, Format::Qcow2, 0, LEN, pattern).unwrap();
    }

    fn reads(&self, pattern: u8) -> bool {
        qemu_img::io_read_pattern(&self.image, Format::Qcow2, 0, LEN, pattern).unwrap()
    }

    fn req(&self, name: &str, kind: SnapKind) -> CreateRequest {
        CreateRequest {
            image: self.image.clone(),
            name: Some(name.into()),
            kind: Some(kind),
            ..Default::default()
        }
    }

    fn create(&self, name: &str) {
        self.engine
            .vol_snapshot_create(&self.req(name, SnapKind::Internal), false)
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    fn revert(&self, name: &str) {
        self.engine
            .vol_snapshot_revert(
                &RevertRequest {
                    image: self.image.clone(),
                    name: name.into(),
                },
                false,
            )
            .unwrap_or_else(|e| panic!("revert {name}: {e}"));
    }

    fn delete(&self, name: &str) {
        self.engine
            .vol_snapshot_delete(
                &DeleteRequest {
                    image: self.image.clone(),
                    name: name.into(),
                    children: false,
                },
                false,
            )
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// `(id, name)` of every internal snapshot, as `qemu-img info` says.
    fn table(&self) -> Vec<(String, String)> {
        let i = qemu_img::info(&self.image, Format::Qcow2, true).unwrap();
        i.snapshot_ids.into_iter().zip(i.snapshots).collect()
    }

    fn check(&self) {
        let r = self.engine.vol_check(&self.image).unwrap();
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
    }

    /// Everything a refused command must leave as it was: the files in
    /// the image's directory (names and bytes) and the journal's plans.
    fn world(&self) -> (Vec<(PathBuf, Vec<u8>)>, usize) {
        let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&self.work)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        files.sort();
        (files, self.engine.plans().unwrap().len())
    }

    fn u64_at(&self, off: u64) -> u64 {
        let f = std::fs::File::open(&self.image).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    }

    fn poke(&self, off: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.image)
            .unwrap();
        f.write_all_at(bytes, off).unwrap();
        f.sync_all().unwrap();
    }
}

/// Snapshots named `2` (qcow2 ID 1) and `1` (ID 2): `qemu-img snapshot -a 1`
/// would apply ID 1, the one named `2`. Each name must reach its own
/// snapshot, for revert and for delete.
#[test]
fn names_that_look_like_ids_reach_their_own_snapshot() {
    let fx = Fx::new();
    fx.write(0xa1);
    fx.create("2");
    fx.write(0xb2);
    fx.create("1");
    fx.write(0xc3);
    assert_eq!(
        fx.table(),
        [("1".into(), "2".into()), ("2".into(), "1".into())],
        "the fixture: name 2 has ID 1, name 1 has ID 2"
    );
    fx.revert("1");
    assert!(
        fx.reads(0xb2),
        "revert to \"1\" must give the data of snapshot \"1\" (ID 2)"
    );
    fx.revert("2");
    assert!(
        fx.reads(0xa1),
        "revert to \"2\" must give the data of snapshot \"2\" (ID 1)"
    );
    fx.check();
    fx.delete("1");
    assert_eq!(
        fx.table(),
        [("1".into(), "2".into())],
        "delete \"1\" deletes ID 2 only"
    );
    fx.check();
    fx.write(0xd4);
    fx.revert("2");
    assert!(fx.reads(0xa1));
    fx.delete("2");
    assert!(fx.table().is_empty());
    fx.check();
}

/// A name equal to the ID of a snapshot vsnap did not make (taken with
/// qemu-img directly): reverting to vsnap's snapshot must not apply the
/// foreign one.
#[test]
fn a_name_equal_to_a_foreign_snapshots_id_reaches_vsnaps_snapshot() {
    let fx = Fx::new();
    fx.write(0x11);
    sh(
        "qemu-img",
        &["snapshot", "-c", "foreign", fx.image.to_str().unwrap()],
    );
    fx.write(0x22);
    fx.create("1"); // ID 2; ID 1 is "foreign"
    fx.write(0x33);
    fx.revert("1");
    assert!(
        fx.reads(0x22),
        "revert to \"1\" applied the foreign snapshot of ID 1"
    );
    fx.delete("1");
    assert_eq!(fx.table(), [("1".into(), "foreign".into())]);
}

fn assert_refused_as_damaged(fx: &Fx, what: &str) {
    let before = fx.world();
    for kind in [SnapKind::Internal, SnapKind::External, SnapKind::Copy] {
        let e = fx
            .engine
            .vol_snapshot_create(&fx.req("s1", kind), false)
            .expect_err("a damaged image must be refused");
        assert!(
            matches!(e, EngineError::Check(StepError::Damaged { .. })),
            "{what}, {kind}: {e}"
        );
        let m = e.to_string();
        assert!(
            m.contains("damaged")
                && m.contains("qemu-img check -r all")
                && m.contains("back it up"),
            "{m}"
        );
        assert_eq!(
            fx.world(),
            before,
            "{what}, {kind}: a refused create changed something"
        );
    }
}

/// The corrupt bit (incompatible feature bit 1) set with a byte write.
#[test]
fn an_image_marked_corrupt_is_refused_before_anything_is_touched() {
    let fx = Fx::new();
    fx.write(0x11);
    let incompat = fx.u64_at(72);
    fx.poke(72, &(incompat | 2).to_be_bytes());
    assert_refused_as_damaged(&fx, "corrupt bit");
    let r = fx.engine.vol_check(&fx.image).unwrap();
    assert!(
        r.violations.iter().any(|v| v.contains("corrupt")),
        "vol check must see the corrupt bit: {:#?}",
        r.violations
    );
}

/// A genuinely broken L1 table: its first entry points at an offset that
/// is not a cluster boundary. qemu-img snapshot -c on it writes, finds the
/// inconsistency, marks the image corrupt and fails.
#[test]
fn a_broken_l1_table_is_refused_before_qemu_img_marks_the_image_corrupt() {
    let fx = Fx::new();
    fx.write(0x11);
    let l1 = fx.u64_at(40);
    let entry = fx.u64_at(l1);
    assert_ne!(entry, 0, "the write allocated an L2 table");
    fx.poke(l1, &(entry + 512).to_be_bytes());
    assert_refused_as_damaged(&fx, "unaligned L1 entry");
    assert_eq!(fx.u64_at(72) & 2, 0, "nothing marked the image corrupt");
}

/// The dirty bit of an image with lazy refcounts (left by a QEMU that was
/// killed): its refcounts are stale.
#[test]
fn a_dirty_image_with_lazy_refcounts_is_refused() {
    let fx = Fx::with_options(&["lazy_refcounts=on"]);
    fx.write(0x11);
    let incompat = fx.u64_at(72);
    fx.poke(72, &(incompat | 1).to_be_bytes());
    assert_refused_as_damaged(&fx, "dirty bit");
}

/// An internal snapshot vsnap did not make is counted: an external or
/// whole-file snapshot of that image is refused (it would freeze or copy
/// the foreign snapshot along, unlisted), and nothing changes.
#[test]
fn foreign_internal_snapshots_count_in_families_do_not_mix() {
    let fx = Fx::new();
    fx.write(0x11);
    sh(
        "qemu-img",
        &["snapshot", "-c", "theirs", fx.image.to_str().unwrap()],
    );
    let before = fx.world();
    for kind in [SnapKind::External, SnapKind::Copy] {
        let e = fx
            .engine
            .vol_snapshot_create(&fx.req("s1", kind), false)
            .expect_err("mixing with a foreign internal snapshot must be refused");
        let m = e.to_string();
        assert!(
            m.contains("did not make") && m.contains("\"theirs\"") && m.contains("--kind internal"),
            "{m}"
        );
        assert_eq!(
            fx.world(),
            before,
            "{kind}: a refused create changed something"
        );
    }
}

/// A zeroed refcount block: every cluster, the header's too, counts 0
/// references (qemu-img would allocate over metadata in use).
#[test]
fn a_zeroed_refcount_block_is_refused() {
    let fx = Fx::new();
    fx.write(0x11);
    let rt = fx.u64_at(48);
    let block = fx.u64_at(rt);
    fx.poke(block, &[0u8; 65536]);
    assert_refused_as_damaged(&fx, "zeroed refcount block");
}

/// Damage the native check does not see (an L2 entry pointing at an
/// unaligned offset: only `qemu-img check` walks the L2 tables).
/// qemu-img finds it half-way, marks the image corrupt and fails: vsnap
/// must not say "rolled back, nothing changed" but that the image is now
/// marked corrupt, and leave the plan needing attention; `vol check`
/// sees the corrupt image.
#[test]
fn damage_found_by_qemu_img_half_way_is_reported_not_hidden() {
    let fx = Fx::new();
    fx.write(0x11);
    let l1 = fx.u64_at(40);
    let l2 = fx.u64_at(l1) & 0x00ff_ffff_ffff_fe00;
    let entry = fx.u64_at(l2);
    assert_ne!(entry, 0);
    fx.poke(l2, &(entry + 512).to_be_bytes());
    assert!(
        qemu_img::damage(&fx.image).unwrap().is_empty(),
        "the native check cannot see it"
    );
    let e = fx
        .engine
        .vol_snapshot_create(&fx.req("s1", SnapKind::Internal), false)
        .expect_err("qemu-img must fail on the damaged image");
    let m = e.to_string();
    assert!(
        matches!(e, EngineError::NeedsAttention { .. }) && m.contains("marked it corrupt"),
        "{m}"
    );
    assert!(!m.contains("nothing changed"), "{m}");
    let r = fx.engine.vol_check(&fx.image).unwrap();
    assert!(
        r.violations.iter().any(|v| v.contains("corrupt")),
        "{:#?}",
        r.violations
    );
}
