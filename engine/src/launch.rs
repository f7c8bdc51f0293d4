//! Starting and stopping a domain's QEMU (DESIGN 10.2): `domain start`,
//! `domain shutdown`, `domain destroy`, and the [`Launcher`] an embedding
//! manager passes instead of vsnap's own.
//!
//! vsnap's own launcher ([`QemuLauncher`]) starts the domain's recorded
//! command line ([`crate::LaunchSpec`], kept in the domain's catalog record) with
//! each disk's path rewritten to the catalog's active image
//! ([`vsnap_steps::launch::plan_argv`]: anything it cannot rewrite is
//! refused before anything is touched), in a session of its own, stdio
//! appended to `<state-dir>/run/<domain>.log`, its pid in
//! `<state-dir>/run/<domain>.pid`, so that QEMU outlives vsnap. QEMU always
//! starts with `-S`; once its monitor answers, `query-block` must show the
//! planned images (else QEMU is quit), and only then is the guest resumed
//! (unless paused, or waiting for an incoming migration).
//!
//! `domain start` is a journaled plan (`domain.start`):
//! `qemu-launch` ([`vsnap_steps::Step::QemuLaunch`]: probe = the monitor
//! answers and `query-block` shows the planned images; undo = the QEMU it
//! started quits, else is killed), the pivot (`catalog`, no change), then
//! `qmp-cont` unless paused. vsnap killed in the middle of the launch:
//! recovery rolls it back (the QEMU it spawned is ended); after the
//! pivot it resumes the guest. A revert plan takes the same step
//! ([`QemuLauncher::launch`] builds it). With an embedder's [`Launcher`],
//! the start is the embedder's call, not journaled.

use crate::catalog::dom::DomainRec;
use crate::plan::Plan;
use crate::{Engine, EngineError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vsnap_steps::agent::Agent;
use vsnap_steps::launch::{self as proc, DiskImage, LaunchError, Pidfd, PlannedArgv, StartMode};
use vsnap_steps::qmp::Qmp;
use vsnap_steps::Step;

/// What to start a domain on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchRequest {
    /// Every disk vsnap manages, on the image it is to start on.
    pub disks: Vec<DiskImage>,
    /// Paused or running; with or without an incoming migration.
    pub mode: StartMode,
}

/// A started domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launched {
    /// QEMU's pid, if the launcher knows it.
    pub pid: Option<u32>,
    /// The command line it was started with, if the launcher says.
    pub argv: Option<Vec<String>>,
    /// The journal's plan that started it (vsnap's own launcher).
    pub plan: Option<u64>,
}

/// How an embedding manager starts and stops its domains' QEMU, given to
/// [`Engine::set_launcher`]; without one, vsnap's own [`QemuLauncher`]
/// starts the command line recorded in the domain's launch spec ([`crate::LaunchSpec`]).
pub trait Launcher: Send + Sync {
    /// Start QEMU for `domain` on `req.disks` (each disk's image and
    /// format), with the domain's monitor at `domain.qmp`. Return once the
    /// monitor answers. `req.mode.paused`: leave the guest paused;
    /// `req.mode.incoming`: start with `-incoming defer` and leave the
    /// guest paused (the caller runs `migrate-incoming` on a descriptor
    /// and resumes it). On error nothing may be left running.
    fn start(&self, domain: &DomainRec, req: &LaunchRequest) -> Result<Launched>;

    /// End `domain`'s QEMU (no guest cooperation: `quit`, then kill).
    /// Refuse ([`crate::RefusalKind::WrongState`]) when it does not run.
    fn stop(&self, domain: &DomainRec) -> Result<Stopped>;
}

/// How `destroy` ended a QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stopped {
    /// QEMU quit when asked (QMP `quit`).
    Quit {
        /// Its pid.
        pid: u32,
    },
    /// QEMU did not quit (or its monitor did not answer): killed (SIGKILL).
    Killed {
        /// Its pid.
        pid: u32,
    },
}

/// How `shutdown` asked the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownVia {
    /// The guest agent's `guest-shutdown` (mode powerdown).
    Agent,
    /// ACPI power button (QMP `system_powerdown`): no agent socket, or
    /// the agent did not answer.
    Acpi,
}

/// How long the agent may take to answer its sync before ACPI is used.
const AGENT_WAIT: Duration = Duration::from_secs(2);

/// The launch file of `domain define --launch`: a JSON array of strings
/// (the argv, program first; no shell, no quoting), or an object
/// `{"argv": [...], "cwd": "/dir"}`. Relative paths in the argv are
/// resolved against `cwd`, which defaults to the file's own directory
/// (`dir`).
pub fn parse_launch_file(text: &str, dir: &Path) -> Result<(Vec<String>, PathBuf)> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum File {
        Argv(Vec<String>),
        Obj {
            argv: Vec<String>,
            cwd: Option<PathBuf>,
        },
    }
    let f: File = serde_json::from_str(text).map_err(|e| {
        EngineError::bad_request(format!(
            "the launch file is not a JSON array of strings (the QEMU command line, program first) nor {{\"argv\": [...], \"cwd\": \"/dir\"}}: {e}"
        ))
    })?;
    let (argv, cwd) = match f {
        File::Argv(a) => (a, None),
        File::Obj { argv, cwd } => (argv, cwd),
    };
    if argv.is_empty() || argv[0].is_empty() {
        return Err(EngineError::bad_request(
            "the launch file's command line is empty; give the QEMU program first".into(),
        ));
    }
    let cwd = match cwd {
        Some(c) => dir.join(c),
        None => dir.to_path_buf(),
    };
    let cwd = std::path::absolute(&cwd)
        .map_err(|e| EngineError::io(format!("cannot make {} absolute: {e}", cwd.display())))?;
    Ok((argv, cwd))
}

/// vsnap's own launcher: the domain's recorded command line, rewritten
/// (module docs).
#[derive(Clone, Debug)]
pub struct QemuLauncher {
    run_dir: PathBuf,
}

impl QemuLauncher {
    /// A launcher that keeps pidfiles and logs in `<state_dir>/run`.
    pub fn new(state_dir: &Path) -> QemuLauncher {
        // Absolute: the paths are journaled, and recovery may run from
        // another directory.
        let run_dir = state_dir.join("run");
        QemuLauncher {
            run_dir: std::path::absolute(&run_dir).unwrap_or(run_dir),
        }
    }

    /// The log QEMU's stdout and stderr go to.
    pub fn log_path(&self, domain: &str) -> PathBuf {
        self.run_dir.join(format!("{domain}.log"))
    }

    /// The pidfile (`PID START-TIME`, the start time from
    /// `/proc/PID/stat`, so that a reused pid is not taken for QEMU).
    pub fn pid_path(&self, domain: &str) -> PathBuf {
        self.run_dir.join(format!("{domain}.pid"))
    }

    /// The launch `start` would run, every name and path fixed (nothing
    /// is touched): what the journaled step [`vsnap_steps::Step::QemuLaunch`]
    /// carries.
    pub fn launch(&self, domain: &DomainRec, req: &LaunchRequest) -> Result<proc::Launch> {
        let planned = self.plan(domain, req)?;
        let qmp = domain.qmp.as_deref().expect("plan checked it");
        Ok(proc::Launch::new(
            planned,
            qmp,
            &self.run_dir,
            &domain.name,
            &req.disks,
        ))
    }

    /// The argv `start` would run (nothing is touched).
    pub fn plan(&self, domain: &DomainRec, req: &LaunchRequest) -> Result<PlannedArgv> {
        let spec = domain
            .launch
            .as_ref()
            .ok_or_else(|| EngineError::NoLaunchSpec {
                domain: domain.name.clone(),
            })?;
        let qmp = domain.qmp.as_deref().ok_or_else(|| {
            EngineError::wrong_state(format!(
                "domain {} has no QMP socket; vsnap starts a domain and then talks to it through its monitor: define it with --qmp",
                domain.name
            ))
        })?;
        proc::plan_argv(spec, &req.disks, qmp, req.mode).map_err(|source| {
            EngineError::LaunchOption {
                domain: domain.name.clone(),
                source,
            }
        })
    }

    fn launch_err(domain: &DomainRec, source: LaunchError) -> EngineError {
        EngineError::Launch {
            domain: domain.name.clone(),
            source,
        }
    }
}

impl Launcher for QemuLauncher {
    fn start(&self, domain: &DomainRec, req: &LaunchRequest) -> Result<Launched> {
        let launch = self.launch(domain, req)?;
        let pid = launch.start().map_err(|e| Self::launch_err(domain, e))?;
        if !req.mode.paused && !req.mode.incoming {
            let cont = Qmp::connect(&launch.qmp, Duration::from_secs(5)).and_then(|mut q| q.cont());
            if let Err(e) = cont {
                let _ = launch.undo();
                return Err(Self::launch_err(domain, LaunchError::Monitor(e)));
            }
        }
        Ok(Launched {
            pid: Some(pid),
            argv: Some(launch.argv),
            plan: None,
        })
    }

    fn stop(&self, domain: &DomainRec) -> Result<Stopped> {
        let qmp = domain.qmp.as_deref();
        let by_monitor = qmp.and_then(|q| proc::peer_pid(q).ok());
        let Some(pid) = by_monitor.or_else(|| proc::pid_from_file(&self.pid_path(&domain.name)))
        else {
            return Err(EngineError::wrong_state(format!(
                "domain {} is not running (no QEMU answers on its monitor, and no process vsnap started is alive); nothing to destroy",
                domain.name
            )));
        };
        let ended = proc::end_process(qmp, pid)
            .map_err(|e| EngineError::io(format!("cannot stop QEMU (pid {pid}): {e}")))?;
        let _ = std::fs::remove_file(self.pid_path(&domain.name));
        Ok(match ended {
            proc::Ended::Quit => Stopped::Quit { pid },
            proc::Ended::Killed => Stopped::Killed { pid },
        })
    }
}

impl Engine {
    /// Use `launcher` to start and stop domains instead of vsnap's own
    /// ([`QemuLauncher`], which starts the recorded command line).
    pub fn set_launcher(&mut self, launcher: Box<dyn Launcher>) {
        self.launcher = Some(launcher);
    }

    /// Refuse, before anything is touched, a domain that could not be
    /// started on the images of `d` (a record about to be written): no
    /// embedder's launcher and no launch spec, or an option of the spec
    /// that cannot be rewritten to them.
    pub(crate) fn check_startable(&self, d: &DomainRec) -> Result<()> {
        if self.launcher.is_some() {
            return Ok(());
        }
        let mode = StartMode {
            paused: true,
            incoming: false,
        };
        self.qemu_launcher()
            .plan(d, &self.domain_launch_request(d, mode))
            .map(drop)
    }

    fn qemu_launcher(&self) -> QemuLauncher {
        QemuLauncher::new(self.journal().state_dir())
    }

    /// What [`Engine::domain_start`] would start `name` on: every disk vsnap
    /// manages on the catalog's active image.
    pub fn domain_launch_request(&self, d: &DomainRec, mode: StartMode) -> LaunchRequest {
        LaunchRequest {
            disks: d
                .disks
                .iter()
                .filter_map(|x| {
                    Some(DiskImage {
                        target: x.target.clone(),
                        image: x.image()?.to_path_buf(),
                        format: x.format,
                    })
                })
                .collect(),
            mode,
        }
    }

    /// The command line `domain start` would run for `name` (vsnap's own
    /// launcher; nothing is touched). Errors: as [`Engine::domain_start`]
    /// before it spawns anything.
    pub fn domain_start_plan(&self, name: &str, mode: StartMode) -> Result<PlannedArgv> {
        let d = self.domain(name)?;
        self.qemu_launcher()
            .plan(&d, &self.domain_launch_request(&d, mode))
    }

    /// Start a shut-off domain on the catalog's active images (the
    /// embedder's [`Launcher`], else the recorded command line).
    /// Prerequisites: no QEMU answers on the domain's monitor.
    /// Effects on success: QEMU runs the guest (paused with
    /// `mode.paused`), on the catalog's images, outliving this process.
    /// On failure: nothing runs (a QEMU started on other images than
    /// planned is quit). Errors: `Refused` `NotFound` (no such domain),
    /// `WrongState` (already running, no QMP socket),
    /// [`EngineError::NoLaunchSpec`], [`EngineError::LaunchOption`] (an
    /// option vsnap cannot rewrite; refused before anything is touched),
    /// [`EngineError::Launch`] (QEMU failed to start).
    pub fn domain_start(&self, name: &str, mode: StartMode) -> Result<Launched> {
        self.start_inner(name, mode, None)
    }

    /// Start a shut-off domain on the catalog's active images and load
    /// the memory state in `memory` (QEMU's migration stream, as `snapshot
    /// create --memory external:FILE` writes it): QEMU starts with
    /// `-incoming defer`, loads it (`migrate-incoming` on a descriptor),
    /// and the guest resumes where it was (stays paused with `paused`).
    /// The disks must hold the state the memory was saved with (the
    /// caller's duty: a revert or a restore plan, or a snapshot taken
    /// with `--halt`); vsnap cannot tell, and a guest resumed on other
    /// disk contents corrupts its filesystems. A journaled plan:
    /// `qemu-launch`, `qmp-migrate-from-file`, the pivot, `qmp-cont`.
    /// Errors: as [`Engine::domain_start`], and `Refused` `NotFound` /
    /// `BadRequest` for a file that is missing or not a memory state.
    pub fn domain_start_with_memory(
        &self,
        name: &str,
        memory: &Path,
        paused: bool,
    ) -> Result<Launched> {
        self.start_inner(
            name,
            StartMode {
                paused,
                incoming: true,
            },
            Some(memory),
        )
    }

    pub(crate) fn start_inner(
        &self,
        name: &str,
        mode: StartMode,
        memory: Option<&Path>,
    ) -> Result<Launched> {
        let _g = self.lock_ops();
        let d = self.domain(name)?;
        if self.domain_state(&d)? != crate::DomState::Shutoff {
            return Err(EngineError::wrong_state(format!(
                "domain {name} is already running (its monitor {} answers); `vsnap domain destroy {name}` or `vsnap domain shutdown {name}` stops it",
                d.qmp.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
            )));
        }
        let memory = match memory {
            None => None,
            Some(m) => {
                let m = std::path::absolute(m).map_err(|e| {
                    EngineError::io(format!("cannot make {} absolute: {e}", m.display()))
                })?;
                match proc::is_memory_file(&m) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(EngineError::bad_request(format!(
                            "{} is not a memory state file (a regular file starting with QEMU's migration magic QEVM)",
                            m.display()
                        )))
                    }
                    Err(e) => {
                        return Err(EngineError::refused(
                            crate::RefusalKind::of_io(&e),
                            format!("cannot read the memory state {}: {e}", m.display()),
                        ))
                    }
                }
                Some(m)
            }
        };
        let req = self.domain_launch_request(&d, mode);
        let resume = !mode.paused && (!mode.incoming || memory.is_some());
        if let Some(l) = &self.launcher {
            let launched = l.start(&d, &req)?;
            if let (Some(m), Some(qmp)) = (&memory, &d.qmp) {
                proc::migrate_incoming(qmp, "vsnap-incoming", m).map_err(EngineError::Check)?;
                if resume {
                    vsnap_steps::live::cont(qmp).map_err(EngineError::Check)?;
                }
            }
            return Ok(launched);
        }
        // vsnap's own: a journaled plan. The launch (undo: quit) and the
        // memory load before the pivot, so that a crash in the middle
        // rolls them back; `cont` after it, retried.
        let launch = self.qemu_launcher().launch(&d, &req)?;
        let qmp = launch.qmp.clone();
        let argv = launch.argv.clone();
        let pidfile = launch.pidfile.clone();
        let mut steps = vec![Step::QemuLaunch { launch }];
        if let Some(m) = &memory {
            steps.push(Step::QmpMigrateFromFile {
                qmp: qmp.clone(),
                fdname: "vsnap-incoming".into(),
                path: m.clone(),
            });
        }
        steps.push(Step::Catalog);
        let pivot = (steps.len() - 1) as u32;
        if resume {
            steps.push(Step::QmpCont { qmp });
        }
        let plan = Plan {
            op: "domain.start".into(),
            summary: format!(
                "start domain {name}{}{} on {}",
                if mode.paused { " paused" } else { "" },
                memory
                    .as_ref()
                    .map(|m| format!(" with the memory state {}", m.display()))
                    .unwrap_or_default(),
                req.disks
                    .iter()
                    .map(|x| format!("{}={}", x.target, x.image.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            steps,
            pivot,
            catalog: Vec::new(),
        };
        let id = crate::plan::run(self.journal(), &plan, &self.cx())?;
        Ok(Launched {
            pid: proc::pid_from_file(&pidfile),
            argv: Some(argv),
            plan: Some(id.0),
        })
    }

    /// End a domain's QEMU without the guest's cooperation (virsh
    /// `destroy`): QMP `quit`, then SIGKILL if it does not exit within 10
    /// s (or at once when its monitor does not answer and the process
    /// vsnap started is alive). Errors: `Refused` `NotFound`,
    /// `WrongState` (not running).
    pub fn domain_destroy(&self, name: &str) -> Result<Stopped> {
        let _g = self.lock_ops();
        let d = self.domain(name)?;
        match &self.launcher {
            Some(l) => l.stop(&d),
            None => self.qemu_launcher().stop(&d),
        }
    }

    /// Ask the guest to power off (virsh `shutdown`): through its agent
    /// (`guest-shutdown`) when the domain has an agent socket and the
    /// agent answers within 2 s, else ACPI (`system_powerdown`). Without
    /// `wait`, returns once asked (the guest may ignore it). With `wait`,
    /// waits that long for QEMU to exit and fails with
    /// [`EngineError::ShutdownTimeout`] if it still runs (nothing more is
    /// done: `destroy` ends it). Errors: `Refused` `NotFound`,
    /// `WrongState` (not running), `Check` (the monitor failed).
    pub fn domain_shutdown(&self, name: &str, wait: Option<Duration>) -> Result<ShutdownVia> {
        let _g = self.lock_ops();
        let d = self.domain(name)?;
        let not_running = || {
            EngineError::wrong_state(format!(
                "domain {name} is not running (no QEMU answers on its monitor); nothing to shut down"
            ))
        };
        let qmp = d.qmp.as_deref().ok_or_else(not_running)?;
        let pid = proc::peer_pid(qmp).map_err(|_| not_running())?;
        let pidfd = Pidfd::open(pid).map_err(|_| not_running())?;
        let mut via = None;
        if let Some(agent) = &d.agent {
            if let Ok(mut a) = Agent::connect(agent, AGENT_WAIT) {
                if a.send_no_reply("guest-shutdown", serde_json::json!({"mode": "powerdown"}))
                    .is_ok()
                {
                    via = Some(ShutdownVia::Agent);
                }
            }
        }
        let via = match via {
            Some(v) => v,
            None => {
                let mut q =
                    Qmp::connect(qmp, Duration::from_secs(5)).map_err(EngineError::Check)?;
                q.execute("system_powerdown", serde_json::Value::Null)
                    .map_err(EngineError::Check)?;
                ShutdownVia::Acpi
            }
        };
        if let Some(wait) = wait {
            let t0 = Instant::now();
            if !pidfd.wait_exit(wait) {
                return Err(EngineError::ShutdownTimeout {
                    domain: name.into(),
                    waited: t0.elapsed(),
                    via,
                });
            }
            let _ = std::fs::remove_file(self.qemu_launcher().pid_path(name));
        }
        Ok(via)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_files_are_json_arrays_or_objects() {
        let (a, c) =
            parse_launch_file(r#"["qemu-system-x86_64", "-m", "256"]"#, Path::new("/vm")).unwrap();
        assert_eq!(a, ["qemu-system-x86_64", "-m", "256"]);
        assert_eq!(c, Path::new("/vm"));
        let (_, c) =
            parse_launch_file(r#"{"argv": ["q"], "cwd": "run"}"#, Path::new("/vm")).unwrap();
        assert_eq!(c, Path::new("/vm/run"));
        let (_, c) =
            parse_launch_file(r#"{"argv": ["q"], "cwd": "/srv"}"#, Path::new("/vm")).unwrap();
        assert_eq!(c, Path::new("/srv"));
        for bad in ["qemu -m 256", "[]", r#"[""]"#, r#"{"cwd": "/"}"#, "[1, 2]"] {
            let e = parse_launch_file(bad, Path::new("/vm")).unwrap_err();
            assert_eq!(e.kind(), Some(crate::RefusalKind::BadRequest), "{bad}: {e}");
        }
    }
}
