//! Steps never act through a symlink they did not make: a name that
//! someone replaced with a link to another file (outside the directory)
//! makes the step fail, and the link's target keeps every byte. Real
//! qemu-img.

use std::path::{Path, PathBuf};
use vsnap_steps::{qemu_img, Cx, Format, Step, StepError};

fn hash(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A directory with `victim.qcow2` (backed by `vbase.qcow2`) outside the
/// image directory `vm/`, and a chain `vm/base.qcow2` <- `vm/top.qcow2`.
struct Fx {
    _d: tempfile::TempDir,
    vm: PathBuf,
    victim: PathBuf,
}

fn fx() -> Fx {
    let d = tempfile::tempdir().unwrap();
    let vm = d.path().join("vm");
    let other = d.path().join("other");
    std::fs::create_dir(&vm).unwrap();
    std::fs::create_dir(&other).unwrap();
    let vbase = other.join("vbase.qcow2");
    qemu_img::create(&vbase, Format::Qcow2, 1 << 20).unwrap();
    let victim = other.join("victim.qcow2");
    qemu_img::create_overlay(&victim, &vbase, Format::Qcow2).unwrap();
    qemu_img::io_write_pattern(&victim, Format::Qcow2, 0, 65536, 0x7a).unwrap();
    Fx { _d: d, vm, victim }
}

#[track_caller]
fn refused(r: Result<(), StepError>) {
    match r {
        Err(e @ StepError::NotOurs { .. }) => assert!(e.to_string().contains("symlink"), "{e}"),
        other => panic!("expected NotOurs, got {other:?}"),
    }
}

#[test]
fn rebase_internal_snapshot_and_rename_refuse_a_symlink() {
    let f = fx();
    let cx = Cx::quiet();
    let before = hash(&f.victim);
    let link = f.vm.join("top.qcow2");
    std::os::unix::fs::symlink(&f.victim, &link).unwrap();

    // a safe rebase onto no backing file would pull the data up into the victim
    refused(
        Step::Rebase {
            image: link.clone(),
            format: Format::Qcow2,
            new_backing: None,
            old_backing: None,
            unsafe_: false,
        }
        .apply(&cx),
    );
    refused(
        Step::InternalCreate {
            image: link.clone(),
            name: "s1".into(),
        }
        .apply(&cx),
    );
    // a rename would put the link where the image is
    let image = f.vm.join("image.qcow2");
    qemu_img::create(&image, Format::Qcow2, 1 << 20).unwrap();
    let image_before = hash(&image);
    refused(
        Step::Rename {
            from: link.clone(),
            to: image.clone(),
            replace: true,
        }
        .apply(&cx),
    );
    assert_eq!(hash(&image), image_before);
    assert!(!std::fs::symlink_metadata(&image)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(hash(&f.victim), before, "the link's target is untouched");
}
