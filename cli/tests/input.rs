//! Input that is legal but unusual, or hostile, through the real `vsnap`
//! binary: file names that are not UTF-8, `<volsnapshot>` documents that
//! split or repeat their text, oversized inputs, default names taken twice
//! in one second, and names with invisible (format) characters.
//!
//! Needs root-free qemu-img and qemu-io only.

mod common;

use common::*;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `vsnap --state-dir STATE ARGS...` with arguments that need not be UTF-8.
fn vsnap_os(state: &Path, args: &[&OsStr]) -> Out {
    Out::from(
        vsnap_command(state)
            .args(args)
            .env("VSNAP_NO_SERVICE", "1")
            .output()
            .expect("run vsnap"),
    )
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// `<dir>/<prefix>\xff<suffix>`: a file name that is not UTF-8.
fn bad_name(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let mut b = prefix.as_bytes().to_vec();
    b.push(0xff);
    b.extend_from_slice(suffix.as_bytes());
    dir.join(OsString::from_vec(b))
}

/// No command may panic (exit 101), whatever the input.
#[track_caller]
fn no_panic(o: &Out) {
    assert_ne!(o.code, 101, "vsnap panicked:\n{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn non_utf8_image_names_work_or_are_refused_cleanly() {
    let tmp = TempDir::new("nonutf8");
    let state = tmp.join("state");
    let q = bad_name(&tmp.path, "a", ".qcow2");
    let r = bad_name(&tmp.path, "b", ".raw");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    qemu_io_write(&q, "qcow2", 0, 65536, 0x11);
    qemu_img_create(&r, "raw", 4 * MIB);
    qemu_io_write(&r, "raw", 0, 65536, 0x22);
    let run = |args: &[&OsStr]| {
        let o = vsnap_os(&state, args);
        no_panic(&o);
        o
    };

    // Internal snapshots: create, list, info, revert, delete, check.
    for n in ["s1", "s2"] {
        run(&[
            os("vol"),
            os("snapshot"),
            os("create"),
            q.as_os_str(),
            os(n),
        ])
        .ok();
    }
    qemu_io_write(&q, "qcow2", 0, 65536, 0x33);
    run(&[os("vol"), os("snapshot"), os("list"), q.as_os_str()])
        .ok()
        .stdout_has(&["s1", "s2"]);
    let j = run(&[
        os("--json"),
        os("vol"),
        os("snapshot"),
        os("list"),
        q.as_os_str(),
    ])
    .ok()
    .json();
    // A path that is not UTF-8 is {"lossy", "hex"} in JSON.
    let hex: String = q
        .as_os_str()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(j[0]["volume"]["hex"], hex.as_str(), "{j}");
    assert!(j[0]["volume"]["lossy"]
        .as_str()
        .unwrap()
        .contains('\u{fffd}'));
    run(&[
        os("--json"),
        os("vol"),
        os("snapshot"),
        os("info"),
        q.as_os_str(),
        os("s1"),
    ])
    .ok();
    run(&[
        os("vol"),
        os("snapshot"),
        os("revert"),
        q.as_os_str(),
        os("s1"),
    ])
    .ok();
    assert!(qemu_io_reads(&q, "qcow2", 0, 65536, 0x11));
    run(&[
        os("vol"),
        os("snapshot"),
        os("delete"),
        q.as_os_str(),
        os("s2"),
    ])
    .ok();
    run(&[os("vol"), os("check"), q.as_os_str()]).ok();
    run(&[os("--json"), os("vol"), os("check"), q.as_os_str()]).ok();
    // XML carries only UTF-8: dumpxml says so (exit 2), it does not print
    // another name.
    run(&[
        os("vol"),
        os("snapshot"),
        os("dumpxml"),
        q.as_os_str(),
        os("s1"),
    ])
    .expect_code(2)
    .stderr_has(&["not a UTF-8 path", "--json"]);

    // Copy snapshots: the file beside the image keeps the image's bytes.
    run(&[
        os("vol"),
        os("snapshot"),
        os("create"),
        r.as_os_str(),
        os("c1"),
        os("--kind"),
        os("copy"),
    ])
    .ok();
    let c1 = bad_name(&tmp.path, "b", ".c1.raw");
    assert!(c1.exists(), "no {}", c1.display());
    qemu_io_write(&r, "raw", 0, 65536, 0x44);
    run(&[
        os("vol"),
        os("snapshot"),
        os("revert"),
        r.as_os_str(),
        os("c1"),
    ])
    .ok();
    assert!(qemu_io_reads(&r, "raw", 0, 65536, 0x22));
    run(&[os("vol"), os("check"), r.as_os_str()]).ok();
    run(&[
        os("vol"),
        os("snapshot"),
        os("delete"),
        r.as_os_str(),
        os("c1"),
    ])
    .ok();
    assert!(!c1.exists());

    // External snapshots write the path into a qcow2 header that QEMU
    // reports only as UTF-8: refused before anything is touched.
    let before = tree_state(&tmp.path);
    run(&[
        os("vol"),
        os("snapshot"),
        os("create"),
        r.as_os_str(),
        os("e1"),
        os("--kind"),
        os("external"),
    ])
    .expect_code(2)
    .stderr_has(&["not a UTF-8 path", "--kind internal, copy or reflink"]);
    let mut after = tree_state(&tmp.path);
    after.retain(|p, _| !p.starts_with(&state));
    let mut before = before;
    before.retain(|p, _| !p.starts_with(&state));
    assert_eq!(before, after);
    run(&[os("plan"), os("list")]).ok();
    run(&[os("vol"), os("check"), r.as_os_str()]).ok();
}

#[test]
fn a_non_utf8_image_does_not_end_the_service() {
    let tmp = TempDir::new("nonutf8-serve");
    let state = tmp.join("state");
    let q = bad_name(&tmp.path, "a", ".qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    let mut svc = Service::start(&state, &[]);
    let through_service = |args: &[&OsStr]| {
        let o = Out::from(vsnap_command(&state).args(args).output().unwrap());
        no_panic(&o);
        o
    };
    through_service(&[
        os("vol"),
        os("snapshot"),
        os("create"),
        q.as_os_str(),
        os("s1"),
    ])
    .ok();
    through_service(&[
        os("--json"),
        os("vol"),
        os("snapshot"),
        os("list"),
        q.as_os_str(),
    ])
    .ok();
    assert!(svc.child.try_wait().unwrap().is_none(), "the service ended");
    through_service(&[os("plan"), os("list")])
        .ok()
        .stdout_has(&["Committed"]);
    drop(svc);
}

/// A `<volsnapshot>` document: a name split by a comment is read whole;
/// an empty or a repeated `<name>` is refused before anything is touched.
#[test]
fn volsnapshot_names_are_read_whole_and_never_guessed() {
    let tmp = TempDir::new("volxml");
    let state = tmp.join("state");
    let q = tmp.join("a.qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    vsnap(&state, &["vol", "snapshot", "create", p(&q), "s0"]).ok();
    let doc = |name: &str, text: &str| {
        let f = tmp.join(name);
        std::fs::write(&f, text).unwrap();
        f
    };
    let split = doc(
        "split.xml",
        "<volsnapshot><name>s<!-- -->1</name></volsnapshot>",
    );
    vsnap(
        &state,
        &["vol", "snapshot", "create", p(&q), "--xml", p(&split)],
    )
    .ok()
    .stdout_has(&["\"s1\""]);
    for (file, text, says) in [
        (
            "empty.xml",
            "<volsnapshot><name></name></volsnapshot>",
            "<name> is empty",
        ),
        (
            "selfclosed.xml",
            "<volsnapshot><name/></volsnapshot>",
            "<name> is empty",
        ),
        (
            "twice.xml",
            "<volsnapshot><name>x1</name><name>x2</name></volsnapshot>",
            "<name> appears twice",
        ),
    ] {
        let f = doc(file, text);
        let before = vsnap(&state, &["--json", "plan", "list"]).json();
        vsnap(
            &state,
            &["vol", "snapshot", "create", p(&q), "--xml", p(&f)],
        )
        .expect_code(2)
        .stderr_has(&[says]);
        assert_eq!(vsnap(&state, &["--json", "plan", "list"]).json(), before);
    }
    vsnap(&state, &["vol", "snapshot", "list", p(&q), "--name"])
        .ok()
        .stdout_has(&["s0\ns1\n"]);
}

/// `vsnap ARGS` under a 1 GiB address-space limit (`prlimit`) and a 20 s
/// deadline: a command that reads without bound fails here rather than
/// taking the machine's memory.
fn vsnap_bounded(state: &Path, args: &[&str]) -> Out {
    let mut all = vec!["--as=1073741824", VSNAP, "--state-dir", p(state)];
    all.extend_from_slice(args);
    run_with_deadline("prlimit", &all, std::time::Duration::from_secs(20)).0
}

/// XML inputs are regular files of at most 10 MiB (virsh's limit), a
/// description at most 64 KiB: anything else is refused, exit 2, before a
/// plan is begun, without reading more than the limit.
#[test]
fn inputs_are_capped_and_must_be_regular_files() {
    let tmp = TempDir::new("caps");
    let state = tmp.join("state");
    let q = tmp.join("a.qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    vsnap(&state, &["vol", "snapshot", "create", p(&q), "s0"]).ok();
    let fifo = tmp.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = tmp.join("big.xml");
    std::fs::write(
        &big,
        format!(
            "<volsnapshot><description>{}</description></volsnapshot>",
            "x".repeat(11 << 20)
        ),
    )
    .unwrap();
    let long_desc = tmp.join("desc.xml");
    std::fs::write(
        &long_desc,
        format!(
            "<volsnapshot><name>d1</name><description>{}</description></volsnapshot>",
            "x".repeat(1 << 20)
        ),
    )
    .unwrap();
    let dir = tmp.join("dir.xml");
    std::fs::create_dir(&dir).unwrap();
    let desc_arg = "y".repeat((64 << 10) + 1);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["vol", "snapshot", "create", p(&q), "--xml", "/dev/zero"],
            "is a character device",
        ),
        (
            vec!["vol", "snapshot", "create", p(&q), "--xml", p(&fifo)],
            "is a FIFO",
        ),
        (
            vec!["vol", "snapshot", "create", p(&q), "--xml", p(&dir)],
            "is a directory",
        ),
        (
            vec!["vol", "snapshot", "create", p(&q), "--xml", p(&big)],
            "larger than 10 MiB",
        ),
        (
            vec!["vol", "snapshot", "create", p(&q), "--xml", p(&long_desc)],
            "at most 64 KiB",
        ),
        (
            vec![
                "vol",
                "snapshot",
                "create",
                p(&q),
                "d2",
                "--description",
                &desc_arg,
            ],
            "at most 64 KiB",
        ),
        (
            vec!["domain", "define", "/dev/zero"],
            "is a character device",
        ),
        (
            vec!["domain", "define", "/dev/null"],
            "is a character device",
        ),
        (vec!["domain", "define", p(&dir)], "is a directory"),
        (vec!["domain", "define", p(&big)], "larger than 10 MiB"),
        (
            vec!["snapshot", "create", "nodom", "--xml", "/dev/zero"],
            "is a character device",
        ),
    ];
    let plans = || vsnap(&state, &["--json", "plan", "list"]).json();
    let before = plans();
    for (args, says) in cases {
        let o = vsnap_bounded(&state, &args);
        no_panic(&o);
        o.expect_code(2).stderr_has(&[says]);
        assert_eq!(plans(), before, "{args:?} began a plan");
    }
    vsnap(&state, &["vol", "snapshot", "list", p(&q), "--name"])
        .ok()
        .stdout_has(&["s0\n"]);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Unnamed snapshots are named by the second they are made in, as libvirt
/// names them; a second one in the same second (or a name in use another
/// way) gets `<seconds>-1`, `-2`, ...: never a name in use.
#[test]
fn default_names_never_collide() {
    let tmp = TempDir::new("defname");
    let state = tmp.join("state");
    let q = tmp.join("a.qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    // The names the next few seconds would take: in the catalog, and one
    // inside the image that vsnap did not make.
    let t = now();
    for s in t..t + 20 {
        vsnap(
            &state,
            &["vol", "snapshot", "create", p(&q), &s.to_string()],
        )
        .ok();
    }
    vsnap(
        &state,
        &["vol", "snapshot", "create", p(&q), &format!("{t}-1")],
    )
    .ok();
    qemu_img_snapshot_create(&q, &format!("{}-1", t + 1));
    let mut made = Vec::new();
    for _ in 0..3 {
        let o = vsnap(&state, &["--json", "vol", "snapshot", "create", p(&q)]);
        o.ok();
        made.push(o.json()["snapshot"]["name"].as_str().unwrap().to_string());
    }
    let names = vsnap(&state, &["vol", "snapshot", "list", p(&q), "--name"]);
    let names: Vec<&str> = names.stdout.lines().collect();
    assert_eq!(names.len(), 24, "{names:?}");
    for m in &made {
        assert_eq!(
            names.iter().filter(|n| *n == m).count(),
            1,
            "{m} twice: {names:?}"
        );
        assert!(m.contains('-'), "{m}: the default name was free?");
        assert_ne!(
            m,
            &format!("{}-1", t + 1),
            "collides with qemu-img's snapshot"
        );
    }
    // Two unnamed creates right after each other on a fresh image.
    let r = tmp.join("b.qcow2");
    qemu_img_create(&r, "qcow2", 4 * MIB);
    vsnap(&state, &["vol", "snapshot", "create", p(&r)]).ok();
    vsnap(&state, &["vol", "snapshot", "create", p(&r)]).ok();
}

/// Names that print as other names are refused: bidi overrides and
/// isolates, marks, zero-width and other format (Cf) characters, in
/// snapshot and domain names alike; and each error names the kind of name.
#[test]
fn invisible_characters_in_names_are_refused_naming_the_kind() {
    let tmp = TempDir::new("bidi");
    let state = tmp.join("state");
    let q = tmp.join("a.qcow2");
    qemu_img_create(&q, "qcow2", 4 * MIB);
    vsnap(&state, &["vol", "snapshot", "create", p(&q), "s0"]).ok();
    let plans = || vsnap(&state, &["--json", "plan", "list"]).json();
    let before = plans();
    for (c, code) in [
        ('\u{202e}', "U+202E"),
        ('\u{2066}', "U+2066"),
        ('\u{200f}', "U+200F"),
        ('\u{200b}', "U+200B"),
        ('\u{feff}', "U+FEFF"),
        ('\u{2028}', "U+2028"),
        ('\u{e0041}', "U+E0041"),
    ] {
        let name = format!("s1{c}gpj.exe");
        vsnap(&state, &["vol", "snapshot", "create", p(&q), &name])
            .expect_code(2)
            .stderr_has(&["invalid snapshot name", code, "invisible"]);
        let doc = tmp.join("s.xml");
        std::fs::write(
            &doc,
            format!("<volsnapshot><name>{name}</name></volsnapshot>"),
        )
        .unwrap();
        vsnap(
            &state,
            &["vol", "snapshot", "create", p(&q), "--xml", p(&doc)],
        )
        .expect_code(2)
        .stderr_has(&["invalid snapshot name", code]);
        // A domain name: the error says "domain", not "snapshot".
        let dom = tmp.join("d.xml");
        std::fs::write(
            &dom,
            domain_xml(&format!("vm{c}1"), &[("vda", &q, Some("qcow2"))]),
        )
        .unwrap();
        let o = vsnap(&state, &["domain", "define", p(&dom)]);
        o.expect_code(2).stderr_has(&["invalid domain name", code]);
        assert!(!o.stderr.contains("snapshot name"), "{}", o.stderr);
    }
    // A bad domain name without invisible characters says "domain" too.
    let dom = tmp.join("d2.xml");
    std::fs::write(&dom, domain_xml(".hidden", &[("vda", &q, Some("qcow2"))])).unwrap();
    vsnap(&state, &["domain", "define", p(&dom)])
        .expect_code(2)
        .stderr_has(&["invalid domain name \".hidden\""]);
    assert_eq!(plans(), before);
    vsnap(&state, &["domain", "list"]).ok();
    // Ordinary non-ASCII names stay legal.
    vsnap(
        &state,
        &[
            "vol",
            "snapshot",
            "create",
            p(&q),
            "vor-dem-Update-ü-é-日本",
        ],
    )
    .ok();
}
