//! What an embedder matches on: every refusal has a `RefusalKind`
//! (`EngineError::kind`), one representative refusal of each kind that a
//! test can provoke without QEMU (real `qemu-img` images under /var/tmp),
//! and the message is still the text `vsnap` prints.

use std::path::{Path, PathBuf};
use vsnap_engine::{
    CreateRequest, DiskChoice, DomSnapFlags, Engine, EngineError, Format, MemoryChoice,
    RefusalKind, RevertRequest, SnapKind,
};
use vsnap_steps::qemu_img;

struct Fx {
    engine: Engine,
    vm: PathBuf,
    tmp: tempfile::TempDir,
}

impl Fx {
    /// An engine on a fresh state directory, and an empty `vm/`.
    fn new() -> Fx {
        let tmp = tempfile::Builder::new()
            .prefix("vsnap-refusal-kinds")
            .tempdir_in("/var/tmp")
            .unwrap();
        let vm = std::fs::canonicalize(tmp.path()).unwrap().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let (engine, _) = Engine::open(&tmp.path().join("state")).unwrap();
        Fx { engine, vm, tmp }
    }

    fn image(&self, name: &str, format: Format) -> PathBuf {
        let p = self.vm.join(name);
        qemu_img::create(&p, format, 1 << 20).expect("qemu-img create");
        p
    }

    /// Domain `d` (shut off): vda `a.qcow2`, vdb `b.qcow2`.
    fn domain(&self) -> String {
        let mut x = String::from("<domain type='kvm'><name>d</name><devices>");
        for (t, f) in [("vda", "a.qcow2"), ("vdb", "b.qcow2")] {
            let p = self.image(f, Format::Qcow2);
            x.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{t}'/></disk>",
                p.display()
            ));
        }
        x.push_str("</devices></domain>");
        self.engine.domain_define(&x, None).unwrap();
        x
    }

    fn create(&self, image: &Path, name: &str, kind: SnapKind) -> Result<(), EngineError> {
        self.engine
            .vol_snapshot_create(&req(image, name, kind), false)
            .map(drop)
    }

    fn dom(&self, flags: DomSnapFlags) -> Result<(), EngineError> {
        self.engine
            .domain_snapshot_create_xml("d", None, flags, false)
            .map(drop)
    }
}

fn req(image: &Path, name: &str, kind: SnapKind) -> CreateRequest {
    CreateRequest {
        image: image.to_path_buf(),
        name: Some(name.into()),
        kind: Some(kind),
        ..Default::default()
    }
}

/// `r` is refused with `kind`, and its message says `says`.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, EngineError>, kind: RefusalKind, says: &str) {
    let e = r.expect_err("a refusal");
    assert_eq!(e.kind(), Some(kind), "{e:?}");
    assert!(!e.needs_attention(), "{e}");
    let m = e.to_string();
    assert!(m.contains(says), "{m:?} does not say {says:?}");
    if let EngineError::Refused { message, .. } = &e {
        assert_eq!(&m, message, "Display is the message, word for word");
    }
}

#[test]
fn volume_refusals() {
    let fx = Fx::new();
    let e = &fx.engine;
    let a = fx.image("a.qcow2", Format::Qcow2);
    fx.create(&a, "s1", SnapKind::Internal).unwrap();

    // NameTaken: a snapshot of that name exists.
    refused(
        fx.create(&a, "s1", SnapKind::Internal),
        RefusalKind::NameTaken,
        "already has a snapshot named",
    );
    // NotFound: no snapshot of that name; no such image.
    refused(
        e.vol_snapshot_lookup_by_name(&a, "nope"),
        RefusalKind::NotFound,
        "has no snapshot named",
    );
    refused(
        e.vol_snapshot_list_names(&fx.vm.join("none.qcow2"), None),
        RefusalKind::NotFound,
        "does not exist",
    );
    // BadName.
    refused(
        fx.create(&a, "x/y", SnapKind::Internal),
        RefusalKind::BadName,
        "contains '/'",
    );
    // NotSupported: mixing families on one volume; internal of raw;
    // something that is not an image file.
    refused(
        fx.create(&a, "s2", SnapKind::External),
        RefusalKind::NotSupported,
        "does not mix",
    );
    let raw = fx.image("r.img", Format::Raw);
    refused(
        fx.create(&raw, "s1", SnapKind::Internal),
        RefusalKind::NotSupported,
        "internal snapshots need a qcow2 image",
    );
    refused(
        e.vol_snapshot_list_names(&fx.vm, None),
        RefusalKind::NotSupported,
        "is not a regular file",
    );
    // BadRequest: --file for an internal snapshot.
    let b = fx.image("b.qcow2", Format::Qcow2);
    refused(
        e.vol_snapshot_create(
            &CreateRequest {
                file: Some(fx.vm.join("b-s1.qcow2")),
                ..req(&b, "s1", SnapKind::Internal)
            },
            false,
        ),
        RefusalKind::BadRequest,
        "--file does not apply to internal snapshots",
    );
    // Exists: --file names a file vsnap did not make.
    let taken = fx.vm.join("taken.qcow2");
    std::fs::write(&taken, b"mine").unwrap();
    refused(
        e.vol_snapshot_create(
            &CreateRequest {
                file: Some(taken.clone()),
                ..req(&b, "s1", SnapKind::External)
            },
            false,
        ),
        RefusalKind::Exists,
        "already exists",
    );
}

/// Unsafe: a snapshot file swapped for a symbolic link; an image with a
/// second name.
#[test]
fn unsafe_refusals() {
    let fx = Fx::new();
    let a = fx.image("a.qcow2", Format::Qcow2);
    fx.create(&a, "s1", SnapKind::Copy).unwrap();
    let s1 = fx.engine.vol_snapshot_lookup_by_name(&a, "s1").unwrap();
    let f = s1.file.clone().expect("a copy has a file");
    let moved = fx.vm.join("moved.qcow2");
    std::fs::rename(&f, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &f).unwrap();
    refused(
        fx.engine.vol_snapshot_revert(
            &RevertRequest {
                image: a.clone(),
                name: "s1".into(),
            },
            false,
        ),
        RefusalKind::Unsafe,
        "is not the file vsnap made",
    );

    let b = fx.image("b.qcow2", Format::Qcow2);
    std::fs::hard_link(&b, fx.vm.join("b2.qcow2")).unwrap();
    refused(
        fx.create(&b, "s1", SnapKind::Internal),
        RefusalKind::Unsafe,
        "hard links",
    );
}

/// InUse: an image another state directory manages.
#[test]
fn image_of_another_state_directory_is_in_use() {
    let fx = Fx::new();
    let a = fx.image("a.qcow2", Format::Qcow2);
    fx.create(&a, "s1", SnapKind::Internal).unwrap();
    let (other, _) = Engine::open(&fx.tmp.path().join("other-state")).unwrap();
    refused(
        other.vol_snapshot_create(&req(&a, "s2", SnapKind::Internal), false),
        RefusalKind::InUse,
        "is managed by another vsnap state directory",
    );
}

#[test]
fn domain_refusals() {
    let fx = Fx::new();
    let x = fx.domain();
    let e = &fx.engine;
    let named = |n: &str| DomSnapFlags {
        name: Some(n.into()),
        ..Default::default()
    };
    fx.dom(named("s1")).unwrap();

    // NotFound: no such domain, snapshot, disk.
    refused(
        e.domain_snapshot_num("nope"),
        RefusalKind::NotFound,
        "no domain named",
    );
    refused(
        e.domain_snapshot_lookup_by_name("d", "nope"),
        RefusalKind::NotFound,
        "no snapshot named",
    );
    refused(
        fx.dom(DomSnapFlags {
            disks: vec![("vdz".into(), DiskChoice::No)],
            ..named("s2")
        }),
        RefusalKind::NotFound,
        "has no disk",
    );
    // NameTaken: a snapshot name in use; a domain defined already.
    refused(
        fx.dom(named("s1")),
        RefusalKind::NameTaken,
        "already has a snapshot named",
    );
    refused(
        e.domain_define(&x, None),
        RefusalKind::NameTaken,
        "is already defined",
    );
    // BadRequest: contradictory flags; a disk named twice (by target
    // and by path).
    refused(
        fx.dom(DomSnapFlags {
            disk_only: true,
            memory: Some(MemoryChoice::Internal),
            ..named("s2")
        }),
        RefusalKind::BadRequest,
        "contradict each other",
    );
    refused(
        fx.dom(DomSnapFlags {
            disks: vec![
                ("vda".into(), DiskChoice::No),
                (fx.vm.join("a.qcow2").display().to_string(), DiskChoice::No),
            ],
            ..named("s2")
        }),
        RefusalKind::BadRequest,
        "is named twice",
    );
    // WrongState: a memory snapshot of a shut-off guest.
    refused(
        fx.dom(DomSnapFlags {
            memory: Some(MemoryChoice::Internal),
            ..named("s2")
        }),
        RefusalKind::WrongState,
        "needs a running guest",
    );
    assert_eq!(e.domain_snapshot_list_names("d").unwrap(), ["s1"]);
}

/// What is not a refusal has no kind.
#[test]
fn failures_have_no_kind() {
    let e = EngineError::NeedsAttention {
        plan: 1,
        reason: "r".into(),
    };
    assert_eq!(e.kind(), None);
}

/// Paths a request names: missing is `NotFound`, the wrong kind of file
/// or an oversized description `BadRequest`.
#[test]
fn named_paths_and_text() {
    let fx = Fx::new();
    refused(
        vsnap_engine::read_xml_file(&fx.vm.join("none.xml")),
        RefusalKind::NotFound,
        "cannot read",
    );
    refused(
        vsnap_engine::read_xml_file(&fx.vm),
        RefusalKind::BadRequest,
        "give the path of an XML file",
    );
    let long = "x".repeat(vsnap_engine::MAX_DESCRIPTION_BYTES + 1);
    refused(
        vsnap_engine::validate_description(Some(&long)),
        RefusalKind::BadRequest,
        "a description may have at most",
    );
    let a = fx.image("a.qcow2", Format::Qcow2);
    refused(
        fx.engine.vol_snapshot_create(
            &CreateRequest {
                file: Some(fx.vm.join("no-dir/s1.qcow2")),
                ..req(&a, "s1", SnapKind::External)
            },
            false,
        ),
        RefusalKind::NotFound,
        "is not usable",
    );
}

/// A `<disk type='block'>` target refused before anything: a symlink to a
/// device is Unsafe, a regular file a BadRequest (not a block device).
#[test]
fn block_device_target_refusals() {
    let fx = Fx::new();
    fx.domain();
    let file = fx.vm.join("plain.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let link = fx.vm.join("dev-link");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let xml = |dev: &Path| {
        format!(
            "<domainsnapshot><name>b1</name><disks><disk name='vda' type='block'><source dev='{}'/></disk>\
             <disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
            dev.display()
        )
    };
    let create = |dev: &Path| {
        fx.engine
            .domain_snapshot_create_xml("d", Some(&xml(dev)), DomSnapFlags::default(), false)
            .map(drop)
    };
    refused(create(&link), RefusalKind::Unsafe, "is a symlink");
    refused(create(&file), RefusalKind::BadRequest, "not a block device");
}
