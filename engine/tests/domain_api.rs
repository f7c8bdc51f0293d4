//! The libvirt-style domain snapshot calls of `Engine` against an offline
//! domain defined from `<domain>` XML with two qcow2 disks (real
//! `qemu-img`, no QEMU): `domain_snapshot_create_xml`, `_num`,
//! `_list_names`, `_lookup_by_name`, `_current`,
//! `domain_has_current_snapshot` and `_get_xml_desc`.

use std::path::PathBuf;
use vsnap_engine::xml::parse_domainsnapshot;
use vsnap_engine::{DiskChoice, DiskMode, DomSnapFlags, Engine, EngineError, Format, MemoryChoice};
use vsnap_steps::qemu_img;

struct Fx {
    engine: Engine,
    vm: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Fx {
    /// Domain `d`: vda `a.qcow2`, vdb `b.qcow2`, shut off (no QMP socket).
    fn new() -> Fx {
        let tmp = tempfile::Builder::new()
            .prefix("vsnap-domain-api")
            .tempdir_in("/var/tmp")
            .unwrap();
        let vm = std::fs::canonicalize(tmp.path()).unwrap().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let mut x = String::from("<domain type='kvm'><name>d</name><devices>");
        for (t, f) in [("vda", "a.qcow2"), ("vdb", "b.qcow2")] {
            qemu_img::create(&vm.join(f), Format::Qcow2, 1 << 20).expect("qemu-img create");
            x.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{t}'/></disk>",
                vm.join(f).display()
            ));
        }
        x.push_str("</devices></domain>");
        let (engine, _) = Engine::open(&tmp.path().join("state")).unwrap();
        engine.domain_define(&x, None).unwrap();
        Fx {
            engine,
            vm,
            _tmp: tmp,
        }
    }

    fn internal_names(&self, f: &str) -> Vec<String> {
        qemu_img::snapshot_names(&self.vm.join(f), true).unwrap()
    }
}

fn invalid(r: Result<impl std::fmt::Debug, EngineError>, says: &str) {
    match r {
        Err(EngineError::Refused { message: m, .. }) => assert!(m.contains(says), "{m}"),
        other => panic!("expected Refused({says:?}), got {other:?}"),
    }
}

#[test]
fn queries_on_a_domain_without_snapshots() {
    let fx = Fx::new();
    let e = &fx.engine;
    assert_eq!(e.domain_snapshot_num("d").unwrap(), 0);
    assert!(e.domain_snapshot_list_names("d").unwrap().is_empty());
    assert!(!e.domain_has_current_snapshot("d").unwrap());
    assert_eq!(e.domain_snapshot_current("d").unwrap(), None);
    invalid(
        e.domain_snapshot_lookup_by_name("d", "s1"),
        "no snapshot named",
    );
    invalid(
        e.domain_snapshot_get_xml_desc("d", "s1"),
        "no snapshot named",
    );
    // An unknown domain is an error for every call.
    invalid(e.domain_snapshot_num("nope"), "no domain named");
    invalid(e.domain_snapshot_list_names("nope"), "no domain named");
    invalid(e.domain_has_current_snapshot("nope"), "no domain named");
    invalid(e.domain_snapshot_current("nope"), "no domain named");
    invalid(
        e.domain_snapshot_lookup_by_name("nope", "s1"),
        "no domain named",
    );
    invalid(
        e.domain_snapshot_create_xml("nope", None, DomSnapFlags::default(), true),
        "no domain named",
    );
}

#[test]
fn create_xml_then_every_query() {
    let fx = Fx::new();
    let e = &fx.engine;
    // A dry run compiles the plan and changes nothing.
    let doc = "<domainsnapshot><name>from-xml</name><description>d1</description>\
               <disks><disk name='vdb' snapshot='no'/></disks></domainsnapshot>";
    let flags = DomSnapFlags {
        name: Some("s1".into()),
        ..Default::default()
    };
    let d = e
        .domain_snapshot_create_xml("d", Some(doc), flags.clone(), true)
        .unwrap();
    assert!(d.dry_run && d.plan.is_none());
    assert_eq!(d.snapshot.name, "s1", "the flags' name wins");
    assert_eq!(e.domain_snapshot_num("d").unwrap(), 0);
    assert!(fx.internal_names("a.qcow2").is_empty());

    // For real: vda internal, vdb left out (the document's choice).
    let d = e
        .domain_snapshot_create_xml("d", Some(doc), flags, false)
        .unwrap();
    assert!(!d.dry_run && d.plan.is_some());
    assert_eq!(fx.internal_names("a.qcow2"), ["s1"]);
    assert!(fx.internal_names("b.qcow2").is_empty());
    let s1 = e.domain_snapshot_lookup_by_name("d", "s1").unwrap();
    assert_eq!(s1, d.snapshot);
    assert_eq!(s1.description.as_deref(), Some("d1"));
    assert_eq!(s1.state.to_string(), "shutoff");
    let modes: Vec<_> = s1
        .disks
        .iter()
        .map(|x| (x.target.as_str(), x.mode))
        .collect();
    assert_eq!(modes, [("vda", DiskMode::Internal), ("vdb", DiskMode::No)]);

    // No document: the flags alone; --disk replaces the default.
    e.domain_snapshot_create_xml(
        "d",
        None,
        DomSnapFlags {
            name: Some("s2".into()),
            disks: vec![("vda".into(), DiskChoice::No)],
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert_eq!(fx.internal_names("a.qcow2"), ["s1"]);
    assert_eq!(fx.internal_names("b.qcow2"), ["s2"]);

    assert_eq!(e.domain_snapshot_num("d").unwrap(), 2);
    assert_eq!(e.domain_snapshot_list_names("d").unwrap(), ["s1", "s2"]);
    assert!(e.domain_has_current_snapshot("d").unwrap());
    let cur = e.domain_snapshot_current("d").unwrap().unwrap();
    assert_eq!(cur.name, "s2");
    assert_eq!(cur.parent.as_deref(), Some("s1"));

    // get_xml_desc reads back; <active> marks the current one.
    for (name, active) in [("s1", 0), ("s2", 1)] {
        let x = e.domain_snapshot_get_xml_desc("d", name).unwrap();
        assert!(x.contains(&format!("<active>{active}</active>")), "{x}");
        assert!(x.contains("<state>shutoff</state>"), "{x}");
        let r = parse_domainsnapshot(&x).unwrap_or_else(|e| panic!("{e}\n{x}"));
        assert_eq!(r.name.as_deref(), Some(name));
    }

    // A refused document changes nothing.
    let before = e.domain_snapshot_list_names("d").unwrap();
    let err = e
        .domain_snapshot_create_xml(
            "d",
            Some("<domainsnapshot><colour/></domainsnapshot>"),
            DomSnapFlags::default(),
            false,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Xml(_)), "{err}");
    // A name in use is refused before any plan.
    let err = e
        .domain_snapshot_create_xml(
            "d",
            None,
            DomSnapFlags {
                name: Some("s1".into()),
                ..Default::default()
            },
            false,
        )
        .unwrap_err();
    assert!(!err.needs_attention(), "{err}");
    // --memory internal on a shut-off guest is refused (nothing to save).
    let err = e
        .domain_snapshot_create_xml(
            "d",
            None,
            DomSnapFlags {
                name: Some("s3".into()),
                live: true,
                memory: Some(MemoryChoice::Internal),
                ..Default::default()
            },
            false,
        )
        .unwrap_err();
    assert!(!err.needs_attention(), "{err}");
    assert_eq!(e.domain_snapshot_list_names("d").unwrap(), before);
    assert_eq!(fx.internal_names("a.qcow2"), ["s1"]);
    assert_eq!(fx.internal_names("b.qcow2"), ["s2"]);
}
