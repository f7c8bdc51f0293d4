//! The state directory: vsnap uses only a directory it made (or an empty
//! one), never changes one it did not create, refuses one another user
//! owns or could write (as ssh refuses a loose key), and a command that
//! journals nothing (a query, a dry run, a refused request) leaves no
//! state directory behind. Also: output into a closed pipe, and usage
//! errors with `--json`.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_directory_vsnap_did_not_make_is_refused_untouched() {
    let d = TempDir::new("sd-foreign");
    let vmdir = d.join("vms");
    std::fs::create_dir(&vmdir).unwrap();
    std::fs::set_permissions(&vmdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = vmdir.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 * MIB);
    let before = tree_state(&vmdir);
    for args in [
        &["plan", "list"][..],
        &["vol", "snapshot", "list", p(&img)],
        &["vol", "snapshot", "create", p(&img), "s1", "--dry-run"],
        &["vol", "snapshot", "create", p(&img), "s1"],
    ] {
        vsnap(&vmdir, args).expect_code(2).stderr_has(&[
            "refusing state directory",
            "not a vsnap state directory",
            "give a new or empty directory",
        ]);
    }
    vsnap_recover(&vmdir, &[])
        .expect_code(2)
        .stderr_has(&["not a vsnap state directory"]);
    assert_eq!(mode(&vmdir), 0o755, "the directory's mode was changed");
    assert_eq!(tree_state(&vmdir), before, "the directory was changed");
    // /tmp: refused (others may write it), and left as it is.
    let tmp_mode = mode(Path::new("/tmp"));
    vsnap(Path::new("/tmp"), &["plan", "list"])
        .expect_code(2)
        .stderr_has(&[
            "refusing state directory /tmp",
            "writable by group or others",
        ]);
    assert_eq!(mode(Path::new("/tmp")), tmp_mode);
    assert!(!Path::new("/tmp/vsnap-state").exists());
}

#[test]
fn commands_that_journal_nothing_leave_no_state_directory() {
    let d = TempDir::new("sd-none");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 * MIB);
    let state = d.join("new/state");
    let i = p(&img);
    let missing = d.join("missing.qcow2");
    for (args, code) in [
        (&["plan", "list"][..], 0),
        (&["vol", "snapshot", "list", i], 0),
        (&["vol", "snapshot", "count", i], 0),
        (&["vol", "snapshot", "has-current", i], 1),
        (&["vol", "check", i], 0),
        (&["vol", "snapshot", "create", i, "s1", "--dry-run"], 0),
        // Refused for bad input.
        (&["vol", "snapshot", "create", p(&missing), "s1"], 2),
        (&["vol", "snapshot", "create", i, "../x"], 2),
        (&["vol", "snapshot", "info", i, "nope"], 2),
    ] {
        vsnap(&state, args).expect_code(code);
        assert!(
            !d.join("new").exists(),
            "`vsnap {args:?}` left {} behind",
            d.join("new").display()
        );
    }
    vsnap_recover(&state, &[])
        .ok()
        .stdout_has(&["nothing to recover"]);
    assert!(!d.join("new").exists(), "vsnap-recover left a state dir");
    // An empty directory given: used as it is, and left empty.
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o750)).unwrap();
    vsnap(&empty, &["vol", "snapshot", "list", i]).ok();
    vsnap(&empty, &["vol", "snapshot", "create", i, "s1", "--dry-run"]).ok();
    assert!(names(&empty).is_empty(), "{:?}", names(&empty));
    // A command that changes something makes it: 0700, marked as vsnap's.
    vsnap(&state, &["vol", "snapshot", "create", i, "s1"]).ok();
    assert_eq!(mode(&state), 0o700);
    assert!(state.join("vsnap-state").is_file());
    // (Another image: an image belongs to one state directory.)
    let img2 = d.join("b.qcow2");
    qemu_img_create(&img2, "qcow2", 16 * MIB);
    vsnap(&empty, &["vol", "snapshot", "create", p(&img2), "s2"]).ok();
    assert_eq!(
        mode(&empty),
        0o750,
        "vsnap changed a directory it did not create"
    );
    assert!(empty.join("vsnap-state").is_file());
    // And its queries and refusals leave it as it is.
    vsnap(&state, &["vol", "snapshot", "count", i])
        .ok()
        .stdout_has(&["1"]);
    vsnap(&state, &["plan", "list"])
        .ok()
        .stdout_has(&["Committed"]);
}

#[test]
fn a_state_directory_another_user_owns_or_may_write_is_refused() {
    let d = TempDir::new("sd-owner");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 * MIB);
    let i = p(&img);
    // Another user's (uid 65534, nobody): its owner could rewrite the
    // journal root carries out.
    let theirs = d.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    for args in [
        &["vol", "snapshot", "create", i, "s1"][..],
        &["plan", "list"],
    ] {
        vsnap(&theirs, args).expect_code(2).stderr_has(&[
            "refusing state directory",
            "belongs to uid 65534, not to this user (uid 0)",
        ]);
    }
    assert!(names(&theirs).is_empty(), "{:?}", names(&theirs));
    // Its own state directory made by an earlier vsnap and then given
    // away is refused the same way.
    let mine = d.join("mine");
    vsnap(&mine, &["vol", "snapshot", "create", i, "s1"]).ok();
    std::os::unix::fs::chown(&mine, Some(65534), None).unwrap();
    vsnap(&mine, &["vol", "snapshot", "list", i])
        .expect_code(2)
        .stderr_has(&["belongs to uid 65534"]);
    std::os::unix::fs::chown(&mine, Some(0), None).unwrap();
    // Writable by group: refused, mode left.
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o770)).unwrap();
    vsnap(&mine, &["vol", "snapshot", "list", i])
        .expect_code(2)
        .stderr_has(&["writable by group or others (mode 770)", "chmod go-w"]);
    assert_eq!(mode(&mine), 0o770);
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();
    vsnap(&mine, &["vol", "snapshot", "list", i])
        .ok()
        .stdout_has(&["s1"]);
    // Under a directory others may write (no sticky bit): they could
    // replace the state directory itself.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    vsnap(&open.join("state"), &["vol", "snapshot", "create", i, "s9"])
        .expect_code(2)
        .stderr_has(&["the directory above it", "mode 777"]);
    assert!(names(&open).is_empty());
    // With --json the refusal is JSON too.
    let o = vsnap(&theirs, &["--json", "plan", "list"]);
    o.expect_code(2);
    assert!(o.json()["error"]
        .as_str()
        .unwrap()
        .contains("belongs to uid 65534"));
}

/// `--json` with a usage error: `{"error": ...}` on stdout, exit 2, as for
/// every other error.
#[test]
fn usage_errors_with_json_are_json() {
    let d = TempDir::new("sd-json");
    let state = d.join("state");
    for args in [
        &["--json", "vol", "snapshot", "frob"][..],
        &["vol", "snapshot", "create", "--json"],
        &["--json", "vol", "snapshot", "list", "x", "--kind", "nope"],
        &["--json", "vol"],
    ] {
        let o = vsnap(&state, args);
        o.expect_code(2);
        let v = o.json();
        let e = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: {v}"));
        assert!(!e.is_empty() && !e.starts_with("error:"), "{args:?}: {e}");
    }
    assert!(!state.exists(), "usage errors make no state directory");
    // A refusal carries its kind as well.
    let img = d.join("k.qcow2");
    qemu_img_create(&img, "qcow2", MIB);
    for (args, kind) in [
        (
            &["--json", "vol", "snapshot", "revert", p(&img), "nosuch"][..],
            "not-found",
        ),
        (
            &["--json", "vol", "snapshot", "create", p(&img), "a/b"][..],
            "bad-name",
        ),
    ] {
        let v = vsnap(&state, args).expect_code(2).json();
        assert_eq!(v["kind"], kind, "{args:?}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // Help is still help.
    let o = vsnap_bare(&["--json", "--help"]);
    o.ok().stdout_has(&["Usage"]);
}

/// `vsnap ... | head`: the reader went away; vsnap exits with its own
/// status, without a panic.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let d = TempDir::new("sd-pipe");
    let state = d.join("state");
    let img = d.join("a.qcow2");
    qemu_img_create(&img, "qcow2", 16 * MIB);
    vsnap(&state, &["vol", "snapshot", "create", p(&img), "s1"]).ok();
    for args in [
        &["vol", "snapshot", "list", p(&img)][..],
        &["--json", "vol", "snapshot", "list", p(&img)],
        &["plan", "list"],
    ] {
        let out = vsnap_command(&state)
            .args(args)
            .env("VSNAP_NO_SERVICE", "1")
            .stdout(pipe_nobody_reads())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}: {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
