//! A small synchronous client for the QEMU guest agent (`qemu-guest-agent`
//! running *inside* the guest), over the host side of its virtio-serial
//! channel: a unix socket chardev, e.g.
//! `-chardev socket,path=PATH,server=on,wait=off,id=qga0 -device virtio-serial
//! -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`
//! (libvirt: the `<channel type='unix'>` of the domain XML).
//!
//! **Never run `qemu-guest-agent` on the host** to test this or for any
//! other reason: `guest-fsfreeze-freeze` freezes every filesystem of the
//! machine the agent runs on, and on the host that is the host itself
//! (its root filesystem, vsnap's journal, the shell that would thaw it).
//! The tests use a real agent in a real test guest, and a fake peer only for
//! the faults a real agent cannot produce on demand.
//!
//! The channel has no framing of its own and outlives the agent: commands
//! written while no agent listens wait in the channel and are answered
//! when an agent starts, and an agent restarted mid-command leaves half a
//! reply behind. So every call first synchronises:
//!
//! 1. write the byte `0xFF` (it resets the agent's JSON parser), then
//!    `{"execute":"guest-sync-delimited","arguments":{"id":RANDOM}}`;
//! 2. discard all input up to a `0xFF` byte (the agent writes one just
//!    before its sync reply);
//! 3. parse lines until `{"return": RANDOM}`, discarding stale replies
//!    (earlier syncs, earlier commands, parse errors caused by the `0xFF`);
//!
//! then sends the command and reads its reply. Every step has a deadline:
//! an agent that never answers (a guest without an agent, one not booted
//! yet, a paused guest) is [`StepError::AgentTimeout`], never a hang.
//!
//! Like a QEMU monitor, the agent's chardev serves one client at a time; a
//! second client waits (here: until its timeout) for the first to go.
//!
//! A command is written only after its sync succeeded, so an agent that
//! is not there (or a paused guest) never receives a freeze that would run
//! late, when nobody waits for it any more. But **a timed-out
//! `fsfreeze_freeze` (the sync succeeded, the reply did not come) may still
//! freeze the guest** (the agent
//! runs it whether or not anyone waits for the reply): treat it as "maybe
//! frozen" and thaw (the compensating step), which is harmless on a guest
//! that is not frozen.

use crate::qmp::wire;
use crate::{StepError, StepResult};
use serde_json::{json, Value};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// The byte that resets the agent's parser and prefixes its sync reply.
const DELIMITER: u8 = 0xFF;

/// A connection to one guest agent.
pub struct Agent {
    conn: wire::Conn,
    path: PathBuf,
    timeout: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A random sync id below 2^53 (exact as a JSON number anywhere).
pub(crate) fn random_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    // Non-zero, so that a reply of 0 can never match by accident.
    (h.finish() & ((1 << 53) - 1)).max(1)
}

impl Agent {
    /// Connects to the agent's socket at `path`. Nothing is exchanged yet
    /// (a silent agent is found by the first call, see [`Agent::ping`]).
    /// `timeout` bounds the connection and then each phase of every call
    /// (the sync, and the command); [`Agent::set_timeout`] changes it.
    pub fn connect(path: &Path, timeout: Duration) -> StepResult<Agent> {
        let deadline = Instant::now() + timeout;
        let stream = match wire::connect(path, deadline) {
            Ok(s) => s,
            Err(wire::ConnectFail::Missing) => {
                return Err(StepError::AgentNoSocket {
                    path: path.to_path_buf(),
                })
            }
            Err(wire::ConnectFail::Timeout) => {
                return Err(StepError::AgentTimeout {
                    path: path.to_path_buf(),
                    what: "the connection (its socket serves one client at a time: is another \
                           client connected?)"
                        .to_string(),
                    timeout,
                })
            }
            Err(wire::ConnectFail::Io(source)) => {
                return Err(StepError::AgentConnect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Agent {
            conn: wire::Conn::new(stream),
            path: path.to_path_buf(),
            timeout,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The timeout of each phase of later calls (a freeze that has much
    /// dirty data to write may need more than a ping).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn fail(&self, f: wire::Fail, what: &str) -> StepError {
        match f {
            wire::Fail::Timeout => StepError::AgentTimeout {
                path: self.path.clone(),
                what: what.to_string(),
                timeout: self.timeout,
            },
            wire::Fail::Closed => StepError::AgentClosed {
                path: self.path.clone(),
                what: what.to_string(),
            },
            wire::Fail::Protocol(message) => StepError::AgentProtocol {
                path: self.path.clone(),
                message: format!("during {what}: {message}"),
            },
            wire::Fail::Io(source) => StepError::AgentConnect {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// The sync handshake (`0xFF`, `guest-sync-delimited`, discard until
    /// the matching reply). Every command runs it first.
    pub fn sync(&mut self) -> StepResult<()> {
        const WHAT: &str = "guest-sync-delimited";
        let deadline = Instant::now() + self.timeout;
        let id = random_id();
        let mut msg = vec![DELIMITER];
        serde_json::to_writer(&mut msg, &json!({"execute": WHAT, "arguments": {"id": id}}))
            .expect("JSON of a JSON value");
        msg.push(b'\n');
        self.conn
            .send(&msg, deadline)
            .map_err(|f| self.fail(f, WHAT))?;
        self.conn
            .discard_until(DELIMITER, deadline)
            .map_err(|f| self.fail(f, WHAT))?;
        loop {
            let line = self
                .conn
                .read_line(deadline)
                .map_err(|f| self.fail(f, WHAT))?;
            // A line may carry another delimiter (a stale sync reply after
            // junk): what counts is after the last one.
            let start = line
                .iter()
                .rposition(|&b| b == DELIMITER)
                .map_or(0, |i| i + 1);
            let Ok(v) = serde_json::from_slice::<Value>(&line[start..]) else {
                continue; // junk, or half a reply from before
            };
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
            // a stale reply: discard
        }
    }

    /// Syncs, then runs `cmd` with `args` (an object, or `Value::Null` for
    /// none) and returns its `return` value; the agent's error reply is
    /// [`StepError::Agent`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> StepResult<Value> {
        self.sync()?;
        let deadline = Instant::now() + self.timeout;
        let mut msg = match args {
            Value::Null => json!({ "execute": cmd }),
            Value::Object(_) => json!({"execute": cmd, "arguments": args}),
            other => {
                return Err(StepError::Invalid(format!(
                    "guest-agent {cmd}: arguments must be a JSON object, not {other}"
                )))
            }
        }
        .to_string()
        .into_bytes();
        msg.push(b'\n');
        self.conn
            .send(&msg, deadline)
            .map_err(|f| self.fail(f, cmd))?;
        loop {
            let line = self
                .conn
                .read_line(deadline)
                .map_err(|f| self.fail(f, cmd))?;
            let text = line.strip_prefix(&[DELIMITER]).unwrap_or(&line);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(text).map_err(|e| StepError::AgentProtocol {
                path: self.path.clone(),
                message: format!(
                    "the reply to {cmd} is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(text)
                ),
            })?;
            if let Some(err) = v.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(StepError::Agent {
                    command: cmd.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(StepError::AgentProtocol {
                path: self.path.clone(),
                message: format!("unexpected reply to {cmd}: {v}"),
            });
        }
    }

    /// Syncs, then sends `cmd` with `args` and does not wait for a reply:
    /// for `guest-shutdown`, which the agent does not answer on success
    /// (the guest goes down).
    pub fn send_no_reply(&mut self, cmd: &str, args: Value) -> StepResult<()> {
        self.sync()?;
        let deadline = Instant::now() + self.timeout;
        let mut msg = match args {
            Value::Null => json!({ "execute": cmd }),
            other => json!({"execute": cmd, "arguments": other}),
        }
        .to_string()
        .into_bytes();
        msg.push(b'\n');
        self.conn
            .send(&msg, deadline)
            .map_err(|f| self.fail(f, cmd))
    }

    /// Syncs again and again (each try bounded by the connection's
    /// timeout) until the agent answers or `total` has passed: for a guest
    /// that is still booting. Fails with the last try's error
    /// ([`StepError::AgentTimeout`] for an agent that never came up).
    pub fn wait_ready(&mut self, total: Duration) -> StepResult<()> {
        let deadline = Instant::now() + total;
        let per_try = self.timeout;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.timeout = per_try.min(left).max(Duration::from_millis(1));
            match self.sync() {
                Ok(()) => break Ok(()),
                Err(StepError::AgentTimeout { .. }) if Instant::now() < deadline => continue,
                Err(StepError::AgentTimeout { path, .. }) => {
                    break Err(StepError::AgentTimeout {
                        path,
                        what: "guest-sync-delimited (waiting for the agent to start)".into(),
                        timeout: total,
                    })
                }
                Err(e) => break Err(e),
            }
        };
        self.timeout = per_try;
        result
    }

    /// `guest-ping`: the agent is there and answering.
    pub fn ping(&mut self) -> StepResult<()> {
        self.execute("guest-ping", Value::Null).map(drop)
    }

    /// `guest-info`: the agent's version and its commands (with `enabled`).
    pub fn info(&mut self) -> StepResult<Value> {
        self.execute("guest-info", Value::Null)
    }

    /// `guest-fsfreeze-freeze`: freezes every freezable filesystem of the
    /// guest; returns how many it froze. See the module doc about timeouts.
    /// On a guest that is frozen already, qemu-ga 7.2 refuses with
    /// [`StepError::Agent`] (class `CommandNotFound`, "has been disabled:
    /// the agent is in frozen state"): check [`Agent::fsfreeze_status`]
    /// first where that can happen.
    pub fn fsfreeze_freeze(&mut self) -> StepResult<u64> {
        self.count("guest-fsfreeze-freeze", Value::Null)
    }

    /// `guest-fsfreeze-freeze-list`: freezes only the filesystems mounted
    /// at `mountpoints` (guest paths); returns how many it froze. qemu-ga
    /// 7.2 skips a path that is not a mount point without an error (it
    /// returns 0 for `["/nonexistent"]`): compare the count.
    pub fn fsfreeze_freeze_list(&mut self, mountpoints: &[&str]) -> StepResult<u64> {
        self.count(
            "guest-fsfreeze-freeze-list",
            json!({ "mountpoints": mountpoints }),
        )
    }

    /// `guest-fsfreeze-thaw`: thaws every frozen filesystem; returns how
    /// many it thawed (0 when none was frozen: thawing is idempotent).
    pub fn fsfreeze_thaw(&mut self) -> StepResult<u64> {
        self.count("guest-fsfreeze-thaw", Value::Null)
    }

    /// `guest-fsfreeze-status`: "frozen" or "thawed".
    pub fn fsfreeze_status(&mut self) -> StepResult<String> {
        let cmd = "guest-fsfreeze-status";
        let r = self.execute(cmd, Value::Null)?;
        r.as_str()
            .map(str::to_string)
            .ok_or_else(|| StepError::AgentProtocol {
                path: self.path.clone(),
                message: format!("{cmd} returned {r}"),
            })
    }

    fn count(&mut self, cmd: &str, args: Value) -> StepResult<u64> {
        let r = self.execute(cmd, args)?;
        r.as_u64().ok_or_else(|| StepError::AgentProtocol {
            path: self.path.clone(),
            message: format!("{cmd} returned {r}, not a count"),
        })
    }
}
