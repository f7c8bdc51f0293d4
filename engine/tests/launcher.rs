//! An embedding manager's `Launcher` (`Engine::set_launcher`): the engine
//! hands it the catalog's active images (after an offline external
//! snapshot: the overlays) and the start mode, and calls its `stop` for
//! `domain_destroy`; the manager's errors come back as they are. No
//! QEMU: the launcher here is the manager's own, recording what it is
//! asked (real `qemu-img` images, a real state directory).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vsnap_engine::{
    DiskChoice, DomSnapFlags, DomainRec, Engine, EngineError, Format, LaunchRequest, Launched,
    Launcher, RefusalKind, StartMode, Stopped,
};
use vsnap_steps::qemu_img;

#[derive(Default)]
struct Asked {
    starts: Vec<(String, LaunchRequest)>,
    stops: Vec<String>,
}

struct Manager(Arc<Mutex<Asked>>);

impl Launcher for Manager {
    fn start(&self, domain: &DomainRec, req: &LaunchRequest) -> Result<Launched, EngineError> {
        self.0
            .lock()
            .unwrap()
            .starts
            .push((domain.name.clone(), req.clone()));
        Ok(Launched {
            pid: Some(4242),
            argv: None,
            plan: None,
        })
    }

    fn stop(&self, domain: &DomainRec) -> Result<Stopped, EngineError> {
        self.0.lock().unwrap().stops.push(domain.name.clone());
        Err(EngineError::Refused {
            kind: RefusalKind::WrongState,
            message: format!("the manager says {} is not running", domain.name),
        })
    }
}

#[test]
fn an_embedders_launcher_gets_the_catalogs_images() {
    let tmp = tempfile::Builder::new()
        .prefix("vsnap-launcher")
        .tempdir_in("/var/tmp")
        .unwrap();
    let vm = std::fs::canonicalize(tmp.path()).unwrap().join("vm");
    std::fs::create_dir(&vm).unwrap();
    let a = vm.join("a.qcow2");
    let b = vm.join("b.raw");
    qemu_img::create(&a, Format::Qcow2, 1 << 20).unwrap();
    qemu_img::create(&b, Format::Raw, 1 << 20).unwrap();
    let x = format!(
        "<domain type='kvm'><name>d</name><devices>\
         <disk type='file'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda'/></disk>\
         <disk type='file'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb'/></disk>\
         </devices></domain>",
        a.display(),
        b.display()
    );
    let (mut engine, _) = Engine::open(&tmp.path().join("state")).unwrap();
    let asked = Arc::new(Mutex::new(Asked::default()));
    engine.set_launcher(Box::new(Manager(asked.clone())));
    // Defined without a launch spec: the manager's launcher needs none.
    engine.domain_define(&x, None).unwrap();
    let flags = DomSnapFlags {
        name: Some("s1".into()),
        disk_only: true,
        disks: vec![
            ("vda".into(), DiskChoice::External(None)),
            ("vdb".into(), DiskChoice::External(None)),
        ],
        ..DomSnapFlags::default()
    };
    engine
        .domain_snapshot_create_xml("d", None, flags, false)
        .unwrap();
    let d = engine.domain("d").unwrap();
    let now: Vec<PathBuf> = d
        .disks
        .iter()
        .map(|x| x.image().unwrap().to_path_buf())
        .collect();
    assert_ne!(now, [a.clone(), b.clone()], "the snapshot made overlays");

    let paused = StartMode {
        paused: true,
        incoming: false,
    };
    let l = engine.domain_start("d", paused).unwrap();
    assert_eq!(l.pid, Some(4242));
    {
        let asked = asked.lock().unwrap();
        let (name, req) = &asked.starts[0];
        assert_eq!(name, "d");
        assert_eq!(req.mode, paused);
        let got: Vec<(&str, PathBuf, Format)> = req
            .disks
            .iter()
            .map(|x| (x.target.as_str(), x.image.clone(), x.format))
            .collect();
        assert_eq!(
            got,
            [
                ("vda", now[0].clone(), Format::Qcow2),
                // the raw disk's overlay is qcow2
                ("vdb", now[1].clone(), Format::Qcow2),
            ]
        );
    }
    // destroy is the manager's stop; its refusal comes back as it is.
    let e = engine.domain_destroy("d").unwrap_err();
    assert_eq!(e.kind(), Some(RefusalKind::WrongState));
    assert!(e.to_string().contains("the manager says"), "{e}");
    assert_eq!(asked.lock().unwrap().stops, ["d"]);
    // vsnap's own planner still names what is missing for its own start.
    let e = engine.domain_start_plan("d", paused).unwrap_err();
    assert!(matches!(e, EngineError::NoLaunchSpec { .. }), "{e}");
    assert_eq!(e.kind(), Some(RefusalKind::WrongState));
}
