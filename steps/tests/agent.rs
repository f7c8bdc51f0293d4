//! The guest-agent client. What a real QEMU can show without a guest: its
//! agent channel with no agent behind it (a timeout, never a hang), and a
//! channel that closes when QEMU dies. Fake peers only for what a real
//! agent cannot do on demand (each test says `fake_peer` in its name):
//! staying silent after accepting, and stale junk before the sync reply.
//! Tests with the real agent run in the real test guest.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vsnap_steps::agent::Agent;
use vsnap_steps::{qemu_img, StepError};

/// A QEMU child (CPUs never started: no guest code, hence no agent) with a
/// guest-agent channel on a unix socket; killed and reaped on drop.
struct Vm {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start() -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let child = qemu_img::child_command("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-S", "-m", "64"])
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                sock.display()
            ))
            .args(["-device", "virtio-serial-pci"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (Debian package qemu-system-x86)");
        let mut vm = Vm {
            child,
            sock,
            _dir: dir,
        };
        vm.wait_listening();
        vm
    }

    /// Bounded poll until QEMU listens (from /proc/net/unix: no connection
    /// spent on it).
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let want = self.sock.to_str().unwrap().to_string();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("QEMU exited ({st}) before listening");
            }
            let table = std::fs::read_to_string("/proc/net/unix").unwrap();
            if table.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 8 && f[3] == "00010000" && f[7] == want
            }) {
                return;
            }
            assert!(Instant::now() < deadline, "QEMU does not listen on {want}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn expect_timeout(e: &StepError, path: &Path, what: &str) {
    match e {
        StepError::AgentTimeout {
            path: p, what: w, ..
        } => assert_eq!((p.as_path(), w.as_str()), (path, what)),
        other => panic!("expected AgentTimeout, got {other:?}"),
    }
}

#[test]
fn a_channel_without_an_agent_times_out() {
    let vm = Vm::start();
    let mut a = Agent::connect(&vm.sock, Duration::from_millis(500)).unwrap();
    let t0 = Instant::now();
    let e = a.ping().unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    expect_timeout(&e, &vm.sock, "guest-sync-delimited");
    assert!(
        matches!(e, StepError::AgentTimeout { timeout, .. } if timeout == Duration::from_millis(500))
    );
    assert_eq!(
        e.to_string(),
        format!(
            "the guest agent at {} did not answer guest-sync-delimited within 0.5s: \
             is qemu-guest-agent running in the guest?",
            vm.sock.display()
        )
    );
    // every command, freeze included, is bounded the same way
    for r in [
        a.fsfreeze_status().map(drop),
        a.fsfreeze_freeze().map(drop),
        a.fsfreeze_thaw().map(drop),
    ] {
        expect_timeout(&r.unwrap_err(), &vm.sock, "guest-sync-delimited");
    }
    // waiting for an agent to come up is bounded by its total
    a.set_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    let e = a.wait_ready(Duration::from_millis(700)).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(700) && t0.elapsed() < Duration::from_secs(5));
    expect_timeout(
        &e,
        &vm.sock,
        "guest-sync-delimited (waiting for the agent to start)",
    );
}

#[test]
fn qemu_killed_mid_call_closes_the_channel() {
    let mut vm = Vm::start();
    let a = Agent::connect(&vm.sock, Duration::from_secs(60)).unwrap();
    let waiter = std::thread::spawn(move || {
        let mut a = a;
        let r = a.ping();
        (a, r)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "the call waits for an answer");
    vm.kill();
    let (mut a, r) = waiter.join().unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(&e, StepError::AgentClosed { path, what } if path == &vm.sock && what == "guest-sync-delimited"),
        "{e:?}"
    );
    assert!(e.to_string().contains("did QEMU exit?"), "{e}");
    assert!(matches!(a.ping(), Err(StepError::AgentClosed { .. })));
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("qga.sock");
    let e = Agent::connect(&p, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(&e, StepError::AgentNoSocket { path } if path == &p));
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("no guest-agent socket at {}", p.display()))
            && msg.contains("org.qemu.guest_agent.0"),
        "{msg}"
    );
}

#[test]
fn silent_agent_times_out_fake_peer() {
    // Accepts, reads everything, never answers: an agent that hangs.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("qga.sock");
    let l = UnixListener::bind(&p).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // until the client hangs up
        sink
    });
    let mut a = Agent::connect(&p, Duration::from_millis(400)).unwrap();
    let t0 = Instant::now();
    let e = a.ping().unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    expect_timeout(&e, &p, "guest-sync-delimited");
    assert!(
        e.to_string()
            .ends_with("within 0.4s: is qemu-guest-agent running in the guest?"),
        "{e}"
    );
    drop(a);
    // what the agent was sent: 0xFF, then guest-sync-delimited
    let sent = peer.join().unwrap();
    assert_eq!(sent[0], 0xFF);
    let v: Value = serde_json::from_slice(&sent[1..]).unwrap();
    assert_eq!(v["execute"], "guest-sync-delimited");
    assert!(v["arguments"]["id"].as_u64().unwrap() > 0);
}

/// Reads one request line (after an optional 0xFF) from the client.
fn request(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).unwrap();
    let start = usize::from(line.first() == Some(&0xFF));
    serde_json::from_slice(&line[start..]).unwrap()
}

#[test]
fn sync_discards_stale_input_fake_peer() {
    // Before the real sync reply the channel holds junk: half a reply from
    // an agent that restarted, a stale reply, a parser error caused by the
    // 0xFF, and a stale sync reply with another id.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("qga.sock");
    let l = UnixListener::bind(&p).unwrap();
    let peer = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut commands = Vec::new();
        for reply in [r#"{}"#, r#""thawed""#] {
            let sync = request(&mut r);
            assert_eq!(sync["execute"], "guest-sync-delimited");
            let id = sync["arguments"]["id"].as_u64().unwrap();
            let stale = id ^ 1;
            let mut out = Vec::new();
            out.extend_from_slice(b"{\"return\": {\"half");
            out.extend_from_slice(b"{\"return\": 3}\n");
            out.extend_from_slice(
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"Invalid JSON syntax\"}}\n",
            );
            out.push(0xFF);
            out.extend_from_slice(format!("{{\"return\": {stale}}}\njunk\n").as_bytes());
            out.extend_from_slice(b"trailing junk ");
            out.push(0xFF);
            out.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
            w.write_all(&out).unwrap();
            let cmd = request(&mut r);
            commands.push(cmd["execute"].as_str().unwrap().to_string());
            w.write_all(format!("{{\"return\": {reply}}}\n").as_bytes())
                .unwrap();
        }
        commands
    });
    let mut a = Agent::connect(&p, Duration::from_secs(20)).unwrap();
    a.ping().unwrap();
    assert_eq!(a.fsfreeze_status().unwrap(), "thawed");
    drop(a);
    assert_eq!(
        peer.join().unwrap(),
        ["guest-ping", "guest-fsfreeze-status"]
    );
}
