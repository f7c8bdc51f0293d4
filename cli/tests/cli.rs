//! Smoke test of the `vsnap` and `vsnap-recover` command lines: every
//! subcommand with and without `--json` (the JSON parses and says what the
//! text says), `--help` of every subcommand, the exit codes (0 ok, 1 a
//! negative answer, 2 an error).

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;

/// Every subcommand path, with the options and arguments its help must show.
const HELP: &[(&[&str], &[&str])] = &[
    (
        &[],
        &[
            "vol",
            "plan",
            "--state-dir",
            "--json",
            "Exit status",
            "--version",
        ],
    ),
    (&["vol"], &["snapshot", "check"]),
    (
        &["vol", "snapshot"],
        &[
            "create",
            "list",
            "current",
            "has-current",
            "count",
            "info",
            "dumpxml",
            "revert",
            "delete",
        ],
    ),
    (
        &["vol", "snapshot", "create"],
        &[
            "<IMAGE>",
            "[NAME]",
            "--kind <KIND>",
            "internal",
            "external",
            "reflink",
            "copy",
            "--file <PATH>",
            "--xml <FILE>",
            "--description <TEXT>",
            "--dry-run",
            "--state-dir <DIR>",
            "--json",
        ],
    ),
    (
        &["vol", "snapshot", "list"],
        &["<IMAGE>", "--kind <KIND>", "--tree", "--name", "--json"],
    ),
    (&["vol", "snapshot", "current"], &["<IMAGE>", "exit 1"]),
    (&["vol", "snapshot", "has-current"], &["<IMAGE>"]),
    (&["vol", "snapshot", "count"], &["<IMAGE>", "--kind <KIND>"]),
    (&["vol", "snapshot", "info"], &["<IMAGE>", "<NAME>"]),
    (&["vol", "snapshot", "dumpxml"], &["<IMAGE>", "<NAME>"]),
    (
        &["vol", "snapshot", "revert"],
        &["<IMAGE>", "<NAME>", "--dry-run"],
    ),
    (
        &["vol", "snapshot", "delete"],
        &["<IMAGE>", "<NAME>", "--children", "--dry-run"],
    ),
    (&["vol", "check"], &["<IMAGE>", "Exit 1"]),
    (&["plan"], &["list", "show"]),
    (&["plan", "list"], &["--json", "--state-dir <DIR>"]),
    (&["plan", "show"], &["<ID>", "--json"]),
    (
        &["serve"],
        &[
            "--state-dir <DIR>",
            "vsnap.sock",
            "VSNAP_NO_SERVICE",
            "SIGTERM",
        ],
    ),
];

fn help(path: &[&str]) -> Out {
    let mut args = path.to_vec();
    args.push("--help");
    vsnap_bare(&args)
}

#[test]
fn help_of_every_subcommand_exits_0_and_lists_its_options() {
    for (path, words) in HELP {
        let out = help(path);
        out.ok();
        assert!(
            out.stdout.starts_with(|c: char| c.is_alphabetic()),
            "vsnap {path:?} --help starts with a description:\n{}",
            out.stdout
        );
        out.stdout_has(words);
        out.stdout_has(&["Usage: vsnap"]);
    }
    // `help` as a subcommand says the same.
    vsnap_bare(&["help", "vol", "snapshot", "create"])
        .ok()
        .stdout_has(&["--kind", "--file"]);
    let out = Out::from_command(VSNAP_RECOVER, &["--help"]);
    out.ok()
        .stdout_has(&["--state-dir <DIR>", "--dry-run", "--json", "Exit status"]);
    let words = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words.contains("with nothing to do changes nothing and says so"),
        "{}",
        out.stdout
    );
}

/// Option and argument lines of a help text that carry no description.
fn undocumented(help: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut in_list = false;
    let lines: Vec<&str> = help.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let line = *line;
        if line == "Arguments:" || line == "Options:" {
            in_list = true;
            continue;
        }
        if line.is_empty() || !line.starts_with(' ') {
            in_list = line.is_empty() && in_list;
            continue;
        }
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if !in_list
            || indent > 6
            || !(t.starts_with('-') || t.starts_with('<') || t.starts_with('['))
        {
            continue;
        }
        // The description is on the same line, or (long help) on the next,
        // indented further.
        let same_line = t.find("  ").is_some_and(|i| !t[i..].trim().is_empty());
        let next_line = lines.get(n + 1).is_some_and(|l| {
            let lt = l.trim_start();
            let li = l.len() - lt.len();
            !lt.is_empty() && li >= 8 && li > indent && !lt.starts_with(['-', '<', '['])
        });
        let described = same_line || next_line;
        if !described {
            bad.push(t.trim().to_string());
        }
    }
    bad
}

/// DESIGN: the CLI documents its options: every option and argument of
/// every subcommand has a description in `--help`.
#[test]
fn help_documents_every_option_and_argument() {
    let mut missing = Vec::new();
    for (path, _) in HELP {
        let out = help(path);
        out.ok();
        for item in undocumented(&out.stdout) {
            missing.push(format!("vsnap {} --help: {item}", path.join(" ")));
        }
    }
    let out = Out::from_command(VSNAP_RECOVER, &["--help"]);
    for item in undocumented(&out.stdout) {
        missing.push(format!("vsnap-recover --help: {item}"));
    }
    assert!(
        missing.is_empty(),
        "options or arguments without a description:\n{}",
        missing.join("\n")
    );
}

#[test]
fn version_is_printed() {
    vsnap_bare(&["--version"]).ok().stdout_has(&["vsnap "]);
    Out::from_command(VSNAP_RECOVER, &["--version"])
        .ok()
        .stdout_has(&["vsnap-recover "]);
}

#[test]
fn usage_errors_exit_2() {
    vsnap_bare(&[]).expect_code(2);
    vsnap_bare(&["vol", "snapshot", "frobnicate"])
        .expect_code(2)
        .stderr_has(&["frobnicate"]);
    vsnap_bare(&["vol", "snapshot", "create"])
        .expect_code(2)
        .stderr_has(&["<IMAGE>"]);
    vsnap_bare(&["vol", "snapshot", "create", "x.qcow2", "--kind", "weird"])
        .expect_code(2)
        .stderr_has(&["weird", "internal"]);
}

struct Fx {
    state: PathBuf,
    img: PathBuf,
    _tmp: TempDir,
}

impl Fx {
    fn new(tag: &str) -> Fx {
        let tmp = TempDir::new(tag);
        let img = tmp.join("a.qcow2");
        qemu_img_create(&img, "qcow2", 4 * MIB);
        Fx {
            state: tmp.join("state"),
            img,
            _tmp: tmp,
        }
    }
    fn run(&self, args: &[&str]) -> Out {
        vsnap(&self.state, args)
    }
    /// `vsnap vol snapshot <sub> IMG rest...`
    fn snap(&self, json: bool, sub: &str, rest: &[&str]) -> Out {
        let mut a = vec![];
        if json {
            a.push("--json");
        }
        a.extend(["vol", "snapshot", sub, p(&self.img)]);
        a.extend_from_slice(rest);
        self.run(&a)
    }
    fn img(&self) -> String {
        std::fs::canonicalize(&self.img)
            .unwrap()
            .display()
            .to_string()
    }
}

#[test]
fn no_current_snapshot_exits_1_with_a_message() {
    let fx = Fx::new("nocurrent");
    let out = fx.snap(false, "current", &[]);
    out.expect_code(1).stderr_has(&["has no current snapshot"]);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let out = fx.snap(true, "current", &[]);
    out.expect_code(1).stderr_has(&["has no current snapshot"]);
    assert_eq!(out.json(), Value::Null);
    let out = fx.snap(false, "has-current", &[]);
    out.expect_code(1);
    assert_eq!(out.stdout.trim(), "no");
    let out = fx.snap(true, "has-current", &[]);
    out.expect_code(1);
    assert_eq!(out.json(), Value::Bool(false));
}

#[test]
fn recover_with_nothing_to_do_says_so() {
    let fx = Fx::new("recover");
    let out = vsnap_recover(&fx.state, &[]);
    out.ok().stdout_has(&["nothing to recover"]);
    fx.snap(false, "create", &["s1"]).ok();
    let out = vsnap_recover(&fx.state, &[]);
    out.ok().stdout_has(&[
        "nothing to recover",
        "1 plan(s) in the journal, all finished",
    ]);
    vsnap_recover(&fx.state, &["--dry-run"])
        .ok()
        .stdout_has(&["nothing to recover"]);
    let j = vsnap_recover(&fx.state, &["--json"]).ok().json();
    assert_eq!(j["consistent"], Value::Bool(true), "{j}");
    assert_eq!(j["plans"], serde_json::json!([]), "{j}");
    assert_eq!(j["dry_run"], Value::Bool(false));
    let j = vsnap_recover(&fx.state, &["--json", "--dry-run"])
        .ok()
        .json();
    assert_eq!(j["dry_run"], Value::Bool(true));
    // Running it again changes nothing.
    let plans = fx.run(&["--json", "plan", "list"]).ok().json();
    vsnap_recover(&fx.state, &[]).ok();
    assert_eq!(fx.run(&["--json", "plan", "list"]).ok().json(), plans);
}

#[test]
fn plan_list_and_show() {
    let fx = Fx::new("plans");
    fx.run(&["plan", "list"])
        .ok()
        .stdout_has(&["the journal holds no plan"]);
    assert_eq!(
        fx.run(&["--json", "plan", "list"]).ok().json(),
        serde_json::json!([])
    );
    fx.snap(false, "create", &["s1"]).ok();
    fx.snap(false, "create", &["s2", "--dry-run"]).ok();
    fx.snap(false, "create", &["s1"]).expect_code(2);
    let out = fx.run(&["plan", "list"]);
    out.ok()
        .stdout_has(&["vol.snapshot.create", "Committed", "\"s1\""]);
    assert_eq!(
        out.stdout.lines().count(),
        1,
        "one plan: the dry run and the refused create begin none\n{}",
        out.stdout
    );
    let j = fx.run(&["--json", "plan", "list"]).ok().json();
    let a = j.as_array().unwrap();
    assert_eq!(a.len(), 1, "{j}");
    assert_eq!(a[0]["id"], 1);
    assert_eq!(a[0]["op"], "vol.snapshot.create");
    assert_eq!(a[0]["outcome"], "Committed");
    assert!(a[0]["summary"].as_str().unwrap().contains("s1"));
    assert!(a[0]["created"].as_i64().unwrap() > 1_600_000_000);

    let out = fx.run(&["plan", "show", "1"]);
    out.ok().stdout_has(&[
        "plan: internal snapshot \"s1\"",
        "PIVOT",
        "records:",
        "Started(0)",
        "Finished(Committed)",
    ]);
    let j = fx.run(&["--json", "plan", "show", "1"]).ok().json();
    assert_eq!(j["id"], 1);
    assert_eq!(j["op"], "vol.snapshot.create");
    assert!(j["pivot"].as_u64().unwrap() < j["steps"].as_array().unwrap().len() as u64);
    assert!(
        j["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "Finished(Committed)"),
        "{j}"
    );

    fx.run(&["plan", "show", "999"])
        .expect_code(2)
        .stderr_has(&["no plan 999"]);
    let out = fx.run(&["--json", "plan", "show", "999"]);
    out.expect_code(2);
    assert!(out.json()["error"]
        .as_str()
        .unwrap()
        .contains("no plan 999"));
}

/// Every subcommand, in text and in JSON, through one life of a volume.
#[test]
fn every_subcommand_with_and_without_json() {
    let fx = Fx::new("smoke");
    let img = fx.img();

    // Empty volume.
    fx.snap(false, "count", &[]).ok().stdout_has(&["0"]);
    assert_eq!(fx.snap(true, "count", &[]).ok().json(), 0);
    fx.snap(false, "list", &[])
        .ok()
        .stdout_has(&["name", "kind", "parent"]);
    assert_eq!(
        fx.snap(true, "list", &[]).ok().json(),
        serde_json::json!([])
    );

    // create: text, JSON, dry run, XML.
    fx.snap(false, "create", &["s1", "--description", "first"])
        .ok()
        .stdout_has(&["created internal snapshot \"s1\"", &img, "[plan 1]"]);
    let j = fx.snap(true, "create", &["s2"]).ok().json();
    assert_eq!(j["plan"], 2, "{j}");
    assert_eq!(j["dry_run"], false);
    assert_eq!(j["snapshot"]["name"], "s2");
    assert_eq!(j["snapshot"]["kind"], "internal");
    assert_eq!(j["snapshot"]["parent"], "s1");
    assert!(!j["steps"].as_array().unwrap().is_empty());
    fx.snap(false, "create", &["s3", "--dry-run"])
        .ok()
        .stdout_has(&["PIVOT", "dry run: nothing was changed"]);
    let j = fx.snap(true, "create", &["s3", "--dry-run"]).ok().json();
    assert_eq!(
        (j["plan"].clone(), j["dry_run"].clone()),
        (Value::Null, Value::Bool(true)),
        "{j}"
    );
    let doc = fx._tmp.join("s3.xml");
    std::fs::write(&doc, "<volsnapshot><name>s3</name><description>from xml</description><kind>internal</kind></volsnapshot>").unwrap();
    fx.snap(false, "create", &["--xml", p(&doc)])
        .ok()
        .stdout_has(&["\"s3\""]);

    // Queries.
    let out = fx.snap(false, "list", &[]);
    out.ok()
        .stdout_has(&["s1", "s2", "s3", "internal", "(inside the image)", "*"]);
    let out = fx.snap(false, "list", &["--name"]);
    assert_eq!(out.ok().stdout, "s1\ns2\ns3\n");
    fx.snap(false, "list", &["--tree"]).ok().stdout_has(&[
        "s1 [internal]",
        "└─ s2 [internal]",
        "s3 [internal]  (current)",
    ]);
    assert_eq!(
        fx.snap(false, "list", &["--name", "--kind", "internal"])
            .ok()
            .stdout,
        "s1\ns2\ns3\n"
    );
    assert_eq!(
        fx.snap(false, "list", &["--name", "--kind", "external"])
            .ok()
            .stdout,
        ""
    );
    let j = fx.snap(true, "list", &[]).ok().json();
    let a = j.as_array().unwrap();
    assert_eq!(
        a.iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["s1", "s2", "s3"]
    );
    assert_eq!(
        a.iter()
            .map(|s| s["current"].as_bool().unwrap())
            .collect::<Vec<_>>(),
        [false, false, true]
    );
    assert_eq!(a[0]["description"], "first");
    assert_eq!(a[2]["description"], "from xml");
    assert_eq!(a[1]["volume"], img.as_str());
    assert_eq!(a[1]["format"], "qcow2");
    assert_eq!(a[0]["file"], Value::Null);
    assert_eq!(
        fx.snap(true, "list", &["--kind", "copy"]).ok().json(),
        serde_json::json!([])
    );

    assert_eq!(fx.snap(false, "current", &[]).ok().stdout, "s3\n");
    let j = fx.snap(true, "current", &[]).ok().json();
    assert_eq!(
        (j["name"].as_str(), j["current"].as_bool()),
        (Some("s3"), Some(true))
    );
    assert_eq!(fx.snap(false, "has-current", &[]).ok().stdout, "yes\n");
    assert_eq!(fx.snap(true, "has-current", &[]).ok().json(), true);
    assert_eq!(fx.snap(false, "count", &[]).ok().stdout, "3\n");
    assert_eq!(
        fx.snap(false, "count", &["--kind", "internal"]).ok().stdout,
        "3\n"
    );
    assert_eq!(
        fx.snap(false, "count", &["--kind", "reflink"]).ok().stdout,
        "0\n"
    );
    assert_eq!(
        fx.snap(true, "count", &["--kind", "internal"]).ok().json(),
        3
    );

    fx.snap(false, "info", &["s1"]).ok().stdout_has(&[
        "Name:          s1",
        "Kind:          internal",
        "Description:   first",
        "Children:      s2",
        "Current:       no",
    ]);
    let j = fx.snap(true, "info", &["s1"]).ok().json();
    assert_eq!(j["children"], serde_json::json!(["s2"]));
    assert_eq!(j["name"], "s1");
    let out = fx.snap(false, "dumpxml", &["s2"]);
    out.ok().stdout_has(&[
        "<volsnapshot>",
        "<name>s2</name>",
        "<kind>internal</kind>",
        "<parent>",
        "</volsnapshot>",
    ]);
    let spec = vsnap_engine::xml::parse_volsnapshot(&out.stdout)
        .expect("dumpxml output parses as <volsnapshot>");
    assert_eq!(spec.name.as_deref(), Some("s2"));
    let j = fx.snap(true, "dumpxml", &["s2"]).ok().json();
    assert_eq!(j["xml"].as_str(), Some(out.stdout.as_str()));

    // revert, delete: text, JSON, dry run.
    fx.snap(false, "revert", &["s1", "--dry-run"])
        .ok()
        .stdout_has(&["dry run: nothing was changed"]);
    assert_eq!(
        fx.snap(false, "current", &[]).ok().stdout,
        "s3\n",
        "a dry-run revert changes nothing"
    );
    fx.snap(false, "revert", &["s1"])
        .ok()
        .stdout_has(&["reverted to internal snapshot \"s1\""]);
    assert_eq!(fx.snap(false, "current", &[]).ok().stdout, "s1\n");
    let j = fx.snap(true, "revert", &["s2"]).ok().json();
    assert_eq!(j["snapshot"]["name"], "s2");
    assert!(j["plan"].is_u64());
    let j = fx.snap(true, "delete", &["s1", "--dry-run"]).ok().json();
    assert_eq!(j["dry_run"], true);
    assert_eq!(
        fx.snap(false, "count", &[]).ok().stdout,
        "3\n",
        "a dry-run delete changes nothing"
    );
    fx.snap(false, "delete", &["s3"])
        .ok()
        .stdout_has(&["deleted internal snapshot \"s3\""]);
    fx.snap(false, "create", &["s4"]).ok();
    let j = fx.snap(true, "delete", &["s1", "--children"]).ok().json();
    assert_eq!(j["snapshot"]["name"], "s1");
    let mut gone: Vec<String> = j["deleted_with_it"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    gone.sort();
    assert_eq!(gone, ["s2", "s4"]);
    assert_eq!(fx.snap(false, "count", &[]).ok().stdout, "0\n");
    fx.snap(false, "create", &["s5"]).ok();
    fx.snap(false, "delete", &["s5", "--children"])
        .ok()
        .stdout_has(&["deleted internal snapshot \"s5\""]);

    // check: text and JSON.
    fx.run(&["vol", "check", p(&fx.img)])
        .ok()
        .stdout_has(&["consistent"]);
    let j = fx.run(&["--json", "vol", "check", p(&fx.img)]).ok().json();
    assert_eq!(j["violations"], serde_json::json!([]));
    assert_eq!(j["unfinished_plans"], 0);
    assert_eq!(j["image"], img.as_str());

    // check finds a problem: exit 1. An internal snapshot made behind
    // vsnap's back is not in the catalog.
    qemu_img_snapshot_create(&fx.img, "stray");
    let out = fx.run(&["vol", "check", p(&fx.img)]);
    out.expect_code(1).stdout_has(&["1 problem(s)", "stray"]);
    let out = fx.run(&["--json", "vol", "check", p(&fx.img)]);
    out.expect_code(1);
    assert_eq!(out.json()["violations"].as_array().unwrap().len(), 1);

    // Errors in JSON mode: a JSON document on stdout too, exit 2.
    let out = fx.snap(true, "revert", &["nope"]);
    out.expect_code(2)
        .stderr_has(&["no snapshot named \"nope\""]);
    assert!(out.json()["error"].as_str().unwrap().contains("nope"));
}

/// The state directory comes from --state-dir, else $VSNAP_STATE_DIR.
#[test]
fn state_dir_from_the_environment() {
    let fx = Fx::new("envstate");
    let env_state = fx._tmp.join("from-env");
    let out = std::process::Command::new(VSNAP)
        .env("VSNAP_STATE_DIR", &env_state)
        .args(["vol", "snapshot", "create", p(&fx.img), "s1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env_state.join("lock").exists(),
        "the journal is in $VSNAP_STATE_DIR"
    );
    assert!(!fx.state.exists());
}
