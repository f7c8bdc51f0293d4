//! The state-directory lock across processes: this test binary re-executes
//! itself (`child` test, selected with `--exact`) as the other process.
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use vsnap_journal::{Journal, JournalError};

const CHILD_DIR: &str = "VSNAP_LOCK_TEST_CHILD_DIR";
const CHILD_MODE: &str = "VSNAP_LOCK_TEST_CHILD_MODE";

/// The child's side. Without the environment variables (a normal test run)
/// it does nothing.
#[test]
fn child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let mode = std::env::var(CHILD_MODE).unwrap();
    let mut out = std::io::stdout();
    match mode.as_str() {
        // Hold the journal until the parent closes our stdin.
        "hold" => {
            let _j = Journal::open(dir.as_ref()).unwrap();
            writeln!(out, "CHILD: holding").unwrap();
            out.flush().unwrap();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        // Try once and say what happened.
        "try" => {
            let line = match Journal::open(dir.as_ref()) {
                Err(JournalError::Locked { pid, .. }) => format!("CHILD: locked by {pid}"),
                Err(e) => format!("CHILD: error {e}"),
                Ok(_) => "CHILD: opened".to_string(),
            };
            writeln!(out, "{line}").unwrap();
        }
        _ => panic!("unknown mode {mode}"),
    }
}

fn spawn_child(dir: &std::path::Path, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The first line the child prints with our prefix.
fn child_says(child: &mut std::process::Child) -> String {
    let out = child.stdout.as_mut().unwrap();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        // libtest may have printed `test child ... ` on the same line.
        if let Some(at) = line.find("CHILD: ") {
            return line[at + "CHILD: ".len()..].to_string();
        }
    }
    panic!("the child said nothing");
}

#[test]
fn child_holds_parent_is_locked_out_with_child_pid() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(dir.path(), "hold");
    assert_eq!(child_says(&mut child), "holding");
    match Journal::open(dir.path()) {
        Err(JournalError::Locked { pid, .. }) => assert_eq!(pid, child.id().to_string()),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("expected Locked, got the journal"),
    }
    // Killed (no destructor runs): the kernel drops the lock with it.
    child.kill().unwrap();
    child.wait().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    drop(j);
}

#[test]
fn parent_holds_child_is_locked_out_with_parent_pid() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let mut child = spawn_child(dir.path(), "try");
    assert_eq!(
        child_says(&mut child),
        format!("locked by {}", std::process::id())
    );
    assert!(child.wait().unwrap().success());
    drop(j);
    let mut child = spawn_child(dir.path(), "try");
    assert_eq!(child_says(&mut child), "opened");
    assert!(child.wait().unwrap().success());
}
