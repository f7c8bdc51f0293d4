//! `vsnap domain ...` and `vsnap snapshot ...` (domain snapshots), mirroring
//! `virsh snapshot-*`.

use crate::common::*;
use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use std::path::PathBuf;
use vsnap_engine::{
    DiskChoice, DiskSource, DomDisk, DomSnapFlags, DomSnapRequest, DomSnapshot, DomainRec, Engine,
    MemoryChoice, ShutdownVia, StartMode, Stopped,
};

#[derive(Subcommand)]
pub enum DomainCmd {
    /// Define a domain from libvirt <domain> XML (`virsh dumpxml` output is
    /// accepted as it is): name, uuid, disks (driver type, source, target,
    /// readonly, shareable) and the guest-agent channel's socket.
    Define {
        /// The <domain> XML file.
        file: PathBuf,
        /// The QEMU monitor socket (QMP) of the running guest; overrides
        /// <metadata><vsnap:qmp xmlns:vsnap='https://vsnap.dev/xmlns/domain/1'>.
        /// Give vsnap a monitor of its own: QEMU accepts several -qmp options.
        #[arg(long, value_name = "SOCKET")]
        qmp: Option<PathBuf>,
        /// How to start the domain's QEMU (for `vsnap domain start` and a
        /// revert that restarts it): a file holding the QEMU command line
        /// as a JSON array of strings, program first, one array element
        /// per argument (no shell, no quoting), e.g.
        /// ["qemu-system-x86_64", "-m", "256", "-drive",
        /// "file=/vm/a.qcow2,format=qcow2,if=virtio", "-qmp",
        /// "unix:/run/vm1.qmp,server=on,wait=off"]; or an object
        /// {"argv": [...], "cwd": "/dir"}. Relative paths in it are
        /// resolved against cwd (default: the file's directory). Every
        /// disk's <source> must be named by one -drive file= or -blockdev
        /// filename= (vsnap rewrites it to the disk's active image at each
        /// start) and the command line must open the domain's QMP socket:
        /// checked now. Without --launch the domain can be snapshotted
        /// (and reverted while shut off) but not started. (`vsnap domain
        /// dumpxml` writes the launch spec as <vsnap:launch> in <metadata>,
        /// which define reads back; --launch wins over it.)
        #[arg(long, value_name = "FILE", verbatim_doc_comment)]
        launch: Option<PathBuf>,
    },
    /// Define a domain from a running QEMU: its disks are what query-block
    /// reports (targets are drive ids, or device ids with -blockdev).
    ///
    /// Also records how that QEMU was started (its launch spec, for
    /// `vsnap domain start`): the process serving the monitor socket
    /// (SO_PEERCRED), its argv (/proc/PID/cmdline) and working directory
    /// (/proc/PID/cwd).
    Attach {
        /// The domain's name.
        name: String,
        /// The QEMU monitor socket (QMP).
        #[arg(long, value_name = "SOCKET")]
        qmp: PathBuf,
        /// The guest agent's socket (the host side of org.qemu.guest_agent.0).
        #[arg(long, value_name = "SOCKET")]
        agent: Option<PathBuf>,
    },
    /// List the domains with their state (running, paused, shutoff).
    List,
    /// Show one domain: state, sockets, disks.
    Info {
        /// The domain's name.
        name: String,
    },
    /// Print the domain as <domain> XML.
    Dumpxml {
        /// The domain's name.
        name: String,
    },
    /// Check a domain against the catalog: QEMU runs on what the catalog
    /// says, no stale block node, filesystems thawed, every snapshot present
    /// on disk and every vsnap file referenced, no unfinished plan. Exit 1
    /// when anything is wrong.
    Check {
        /// The domain's name.
        name: String,
    },
    /// Start a shut-off domain on the catalog's active images.
    ///
    /// Runs the domain's launch spec (recorded by `domain attach`, or given
    /// to `domain define --launch`) with every disk's path rewritten to the
    /// disk's active image and format (-drive file=/file.filename=,
    /// -blockdev filename= in key=value or JSON form). An option vsnap
    /// cannot rewrite (a disk no option names, an image given twice,
    /// -readconfig, -hda and other legacy image options, a backing given on
    /// the command line, a format other than raw or qcow2, -snapshot or
    /// snapshot=on, -loadvm) or a command line
    /// that does not open the domain's QMP socket is refused before
    /// anything is started (exit 2).
    ///
    /// QEMU outlives vsnap: it runs in a session of its own, stdin from
    /// /dev/null, stdout and stderr appended to STATE-DIR/run/NAME.log, its
    /// pid in STATE-DIR/run/NAME.pid. -daemonize and -incoming of the
    /// recorded command line are dropped. QEMU always starts with -S; once
    /// its monitor answers and query-block shows the planned images, the
    /// guest is resumed (unless --paused). Refused when the domain is
    /// running already or has no launch spec.
    ///
    /// The start is a journaled plan (launch, pivot, resume): vsnap killed
    /// while QEMU starts is rolled back by the next vsnap command or
    /// vsnap-recover, which ends the QEMU it spawned; killed after the
    /// pivot, the guest is resumed. Exit 0 started; 2 refused (nothing
    /// started) or QEMU failed to start (its log's last lines are shown;
    /// nothing left running).
    Start {
        /// The domain's name.
        name: String,
        /// Leave the guest paused (QEMU's -S; resume it with QMP cont).
        #[arg(long)]
        paused: bool,
        /// Print the command line that would run; start nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask the guest to power off (as virsh shutdown).
    ///
    /// Through the guest agent (guest-shutdown) when the domain has an agent
    /// socket and the agent answers within 2 s, else the ACPI power button
    /// (QMP system_powerdown). As virsh, shutdown only asks: without
    /// --timeout it returns once the guest was asked (the guest may ignore
    /// the request). With --timeout S it waits up to S seconds for QEMU to
    /// exit and fails (exit 2) if it still runs; it never kills it:
    /// `vsnap domain destroy` does. Refused (exit 2) when the domain does
    /// not run.
    Shutdown {
        /// The domain's name.
        name: String,
        /// Wait up to this many seconds for QEMU to exit.
        #[arg(long, value_name = "S")]
        timeout: Option<f64>,
    },
    /// End the domain's QEMU at once (as virsh destroy).
    ///
    /// QMP quit, then SIGKILL (through a pidfd, so a reused pid is never
    /// hit) if it has not exited within 10 s. The QEMU is found through its
    /// monitor socket (SO_PEERCRED), or, when the monitor does not answer,
    /// by the pidfile of a QEMU vsnap started (killed at once). The guest
    /// gets no chance to flush: what it had not written is lost. Not a
    /// journaled plan: there is nothing to roll back or finish (QEMU runs
    /// or it does not; run destroy again). Refused (exit 2) when the domain
    /// does not run.
    Destroy {
        /// The domain's name.
        name: String,
    },
    /// Forget a domain (its files are not touched).
    Undefine {
        /// The domain's name.
        name: String,
        /// Also forget its snapshots' metadata (their files stay).
        #[arg(long)]
        snapshots_metadata: bool,
    },
}

#[derive(Subcommand)]
pub enum SnapCmd {
    /// Snapshot a domain: all chosen disks at one instant.
    ///
    /// A running guest: with --disk-only, external overlays switched by one
    /// atomic QMP transaction (the guest keeps running; --disk T=reflink
    /// clones a raw disk on btrfs/xfs inside a short pause instead); without
    /// it, an internal snapshot with memory (QEMU's snapshot-save), or with
    /// --memory external:PATH the memory state to PATH and the disks at the
    /// same instant. A shut-off guest: qemu-img per disk (internal for
    /// qcow2, external for raw).
    Create {
        /// The domain's name.
        domain: String,
        /// Snapshot name (default: the creation time in seconds).
        name: Option<String>,
        /// Require a running guest (fail instead of taking an offline snapshot).
        #[arg(long)]
        live: bool,
        /// Disks only, no memory.
        #[arg(long)]
        disk_only: bool,
        /// Freeze the guest's filesystems through its agent around the switch.
        #[arg(long)]
        quiesce: bool,
        /// Accepted for virsh compatibility: vsnap snapshots are always atomic.
        #[arg(long)]
        atomic: bool,
        /// internal (memory inside the disks, QEMU's snapshot-save) or external:PATH.
        #[arg(long, value_name = "internal|external:PATH")]
        memory: Option<String>,
        /// Per disk: TARGET=external[:PATH]|reflink[:PATH]|internal|no (TARGET or the
        /// image's path). reflink: a copy-on-write clone of a raw image
        /// (btrfs, xfs), taken while a running guest is paused.
        #[arg(long = "disk", value_name = "TARGET=SPEC")]
        disks: Vec<String>,
        /// Take the request from <domainsnapshot> XML (libvirt's format);
        /// options on the command line win.
        #[arg(long, value_name = "FILE")]
        xml: Option<PathBuf>,
        /// A free-text description kept with the snapshot.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Do not record the snapshot in the catalog (the disks still switch).
        #[arg(long)]
        no_metadata: bool,
        /// Use overlays that already exist (backed by the disks' images).
        #[arg(long)]
        reuse_external: bool,
        /// Shut the guest off after the snapshot (QMP quit; a running guest
        /// is paused for the snapshot and never resumed).
        #[arg(long)]
        halt: bool,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Revert a domain to one of its snapshots (virsh snapshot-revert).
    ///
    /// What the domain held since the snapshot is discarded; nothing a
    /// snapshot needs is written to, and the discarded branch's files that
    /// no snapshot needs are removed (and named). The disks: new overlays on
    /// the snapshot's frozen files, its internal snapshots applied in place,
    /// its reflink clones cloned back. A running guest on the images that
    /// hold an internal snapshot with memory: QEMU's snapshot-load in that
    /// QEMU. Any other running guest: QEMU quits, the disks are reverted,
    /// and QEMU is started again on them (domain start's plan: the memory
    /// file loaded, or an internal memory state loaded, or a fresh boot for
    /// a disk-only snapshot). A shut-off domain is started only for a
    /// snapshot with memory or with --running/--paused. The guest is left
    /// as the snapshot was (running or paused) unless --running or
    /// --paused. The snapshot becomes the current one: the next snapshot is
    /// its child. Refused (exit 2), with nothing touched: a snapshot whose
    /// files are missing or changed, and a start the domain cannot make (no
    /// launch spec: domain attach or domain define --launch).
    Revert {
        /// The domain's name.
        domain: String,
        /// The snapshot to revert to.
        name: String,
        /// Leave the guest running after the revert.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Leave the guest paused after the revert.
        #[arg(long)]
        paused: bool,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List a domain's snapshots, oldest first.
    List {
        /// The domain's name.
        domain: String,
        /// Show the tree (parents and children).
        #[arg(long)]
        tree: bool,
        /// Names only.
        #[arg(long)]
        name: bool,
    },
    /// Print the current snapshot; exit 1 when there is none.
    Current {
        /// The domain's name.
        domain: String,
    },
    /// Show a snapshot (default: the current one).
    Info {
        /// The domain's name.
        domain: String,
        /// The snapshot's name (default: the current one).
        name: Option<String>,
    },
    /// Print a snapshot as <domainsnapshot> XML (default: the current one).
    Dumpxml {
        /// The domain's name.
        domain: String,
        /// The snapshot's name (default: the current one).
        name: Option<String>,
    },
    /// Print a snapshot's parent; exit 1 when it has none.
    Parent {
        /// The domain's name.
        domain: String,
        /// The snapshot's name (default: the current one).
        name: Option<String>,
    },
}

fn domain_json(engine: &Engine, d: &DomainRec) -> serde_json::Value {
    let state = engine
        .domain_state(d)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    json!({
        "name": d.name, "uuid": d.uuid, "state": state, "qmp": opt_path_json(d.qmp.as_ref()), "agent": opt_path_json(d.agent.as_ref()),
        "current_snapshot": d.current,
        "disks": d.disks.iter().map(disk_json).collect::<Vec<_>>(),
        "launch": d.launch.as_ref().map(|l| json!({
            "argv": l.argv, "cwd": path_json(&l.cwd),
            "disks": l.disks.iter().map(|b| json!({"target": b.target, "path": path_json(&b.path)})).collect::<Vec<_>>(),
        })),
    })
}

fn disk_json(x: &DomDisk) -> serde_json::Value {
    let ty = match &x.source {
        DiskSource::File(_) => "file",
        DiskSource::Block(_) => "block",
        DiskSource::Unsupported { .. } => "unsupported",
    };
    json!({
        "target": x.target,
        "type": ty,
        "device": x.device.as_str(),
        "source": x.image().map(path_json),
        "format": x.format.as_str(),
        "readonly": x.readonly,
        "shareable": x.shareable,
        "snapshot": x.snapshot.map(|s| s.as_str()),
        "unsupported": x.unsupported(),
    })
}

/// A disk for the operator: `vda=/vm/a.qcow2`, or why vsnap cannot snapshot it.
fn disk_text(x: &DomDisk) -> String {
    match (x.image(), x.unsupported()) {
        (Some(p), _) => format!("{}={}", x.target, p.display()),
        (None, why) => format!("{} ({})", x.target, why.unwrap_or("?")),
    }
}

pub fn domain(engine: &Engine, json_out: bool, cmd: &DomainCmd) -> anyhow::Result<u8> {
    match cmd {
        DomainCmd::Define { file, qmp, launch } => {
            let text = vsnap_engine::read_xml_file(file)?;
            let launch = match launch {
                None => None,
                Some(lf) => {
                    let t = std::fs::read_to_string(lf)
                        .with_context(|| format!("cannot read the launch file {}", lf.display()))?;
                    let dir = lf.parent().unwrap_or(std::path::Path::new("."));
                    let dir = if dir.as_os_str().is_empty() {
                        std::path::Path::new(".")
                    } else {
                        dir
                    };
                    Some(
                        vsnap_engine::parse_launch_file(&t, dir)
                            .with_context(|| format!("in {}", lf.display()))?,
                    )
                }
            };
            let d = engine
                .domain_define_with_launch(&text, qmp.clone(), launch)
                .with_context(|| format!("in {}", file.display()))?;
            let left_out = vsnap_engine::xml::domain_left_out(&text);
            if json_out {
                let mut v = domain_json(engine, &d);
                v["left_out"] = json!(left_out);
                print_json(&v);
            } else {
                println!("defined domain {} ({} disk(s))", d.name, d.disks.len());
                for x in d.disks.iter().filter(|x| x.unsupported().is_some()) {
                    println!(
                        "  disk {} is recorded but vsnap cannot snapshot it: a snapshot must leave it out (snapshot='no' on the disk, or --disk {}=no)",
                        disk_text(x),
                        x.target
                    );
                }
                if !left_out.is_empty() {
                    println!("  left out: {}", left_out.join(", "));
                }
            }
        }
        DomainCmd::Attach { name, qmp, agent } => {
            let d = engine.domain_attach(name, qmp, agent.as_deref())?;
            if json_out {
                print_json(&domain_json(engine, &d));
            } else {
                println!(
                    "attached domain {} ({} disk(s): {})",
                    d.name,
                    d.disks.len(),
                    d.disks.iter().map(disk_text).collect::<Vec<_>>().join(", ")
                );
                match &d.launch {
                    None => println!(
                        "  no launch spec (the monitor's process could not be read): `vsnap domain start` cannot start it"
                    ),
                    Some(l) => {
                        println!("  launch spec recorded ({} arguments)", l.argv.len());
                        let mode = StartMode {
                            paused: true,
                            incoming: false,
                        };
                        if let Err(e) = engine.domain_start_plan(&d.name, mode) {
                            println!("  note: `vsnap domain start` would refuse it: {e}");
                        }
                    }
                }
            }
        }
        DomainCmd::List => {
            let all = engine.domain_list()?;
            if json_out {
                print_json(&json!(all
                    .iter()
                    .map(|d| domain_json(engine, d))
                    .collect::<Vec<_>>()));
            } else {
                println!("{:<20} {:<10} {:<6} current", "name", "state", "disks");
                for d in &all {
                    let state = engine
                        .domain_state(d)
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_else(|_| "unknown".into());
                    println!(
                        "{:<20} {:<10} {:<6} {}",
                        d.name,
                        state,
                        d.disks.len(),
                        d.current.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        DomainCmd::Info { name } => {
            let d = engine.domain(name)?;
            let v = domain_json(engine, &d);
            if json_out {
                print_json(&v);
            } else {
                println!("Name:     {}", d.name);
                println!("UUID:     {}", d.uuid.as_deref().unwrap_or("-"));
                println!("State:    {}", v["state"].as_str().unwrap_or("-"));
                println!(
                    "QMP:      {}",
                    d.qmp
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "-".into())
                );
                println!(
                    "Agent:    {}",
                    d.agent
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "-".into())
                );
                println!("Current:  {}", d.current.as_deref().unwrap_or("-"));
                match &d.launch {
                    Some(l) => println!(
                        "Launch:   {} ({} arguments, in {})",
                        l.argv.first().map(String::as_str).unwrap_or("-"),
                        l.argv.len(),
                        l.cwd.display()
                    ),
                    None => {
                        println!("Launch:   - (no launch spec: `domain start` cannot start it)")
                    }
                }
                for x in &d.disks {
                    match x.image() {
                        Some(p) => println!(
                            "Disk:     {} {} ({}){}{}",
                            x.target,
                            p.display(),
                            x.format,
                            if x.readonly { " readonly" } else { "" },
                            x.snapshot
                                .map(|s| format!(" snapshot={}", s.as_str()))
                                .unwrap_or_default()
                        ),
                        None => println!(
                            "Disk:     {} not snapshotted: {}",
                            x.target,
                            x.unsupported().unwrap_or("?")
                        ),
                    }
                }
            }
        }
        DomainCmd::Dumpxml { name } => {
            let x = engine.domain_xml(name)?;
            if json_out {
                print_json(&json!({ "xml": x }));
            } else {
                print!("{x}");
            }
        }
        DomainCmd::Check { name } => {
            let r = engine.domain_check(name)?;
            if json_out {
                print_json(&serde_json::to_value(&r)?);
            } else if r.violations.is_empty() {
                println!("domain {name}: consistent ({} snapshot(s); QEMU, agent and files agree with the catalog)", r.snapshots);
            } else {
                println!("domain {name}: {} problem(s):", r.violations.len());
                for v in &r.violations {
                    println!("  {v}");
                }
            }
            for n in &r.notes {
                println!("  note: {n}");
            }
            return Ok(if r.violations.is_empty() {
                EXIT_OK
            } else {
                EXIT_NO
            });
        }
        DomainCmd::Start {
            name,
            paused,
            dry_run,
        } => {
            let mode = StartMode {
                paused: *paused,
                incoming: false,
            };
            if *dry_run {
                let p = engine.domain_start_plan(name, mode)?;
                if json_out {
                    print_json(
                        &json!({"domain": name, "program": path_json(&p.program), "argv": p.argv, "cwd": path_json(&p.cwd)}),
                    );
                } else {
                    println!("would start domain {name} in {}:", p.cwd.display());
                    for a in &p.argv {
                        println!("  {a}");
                    }
                }
                return Ok(EXIT_OK);
            }
            let t0 = std::time::Instant::now();
            let l = engine.domain_start(name, mode)?;
            let took_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let state = if *paused { "paused" } else { "running" };
            if json_out {
                print_json(
                    &json!({"domain": name, "state": state, "pid": l.pid, "argv": l.argv, "took_ms": took_ms}),
                );
            } else {
                println!(
                    "started domain {name} ({state}{}) in {took_ms:.0} ms",
                    l.pid.map(|p| format!(", QEMU pid {p}")).unwrap_or_default()
                );
            }
        }
        DomainCmd::Shutdown { name, timeout } => {
            let wait = match timeout {
                None => None,
                Some(t) if t.is_finite() && *t >= 0.0 && *t <= 86400.0 => {
                    Some(std::time::Duration::from_secs_f64(*t))
                }
                Some(t) => bail!("--timeout {t}: give seconds between 0 and 86400"),
            };
            let via = engine.domain_shutdown(name, wait)?;
            let how = match via {
                ShutdownVia::Agent => "through its guest agent",
                ShutdownVia::Acpi => "by ACPI power button",
            };
            if json_out {
                print_json(&json!({"domain": name, "via": via, "stopped": wait.is_some()}));
            } else if wait.is_some() {
                println!("domain {name} shut down (asked {how})");
            } else {
                println!("domain {name} is being shut down (asked {how})");
            }
        }
        DomainCmd::Destroy { name } => {
            let st = engine.domain_destroy(name)?;
            let (pid, how) = match st {
                Stopped::Quit { pid } => (pid, "quit"),
                Stopped::Killed { pid } => (pid, "killed"),
            };
            if json_out {
                print_json(&json!({"domain": name, "pid": pid, "how": how}));
            } else {
                println!("domain {name} destroyed (QEMU pid {pid} {how})");
            }
        }
        DomainCmd::Undefine {
            name,
            snapshots_metadata,
        } => {
            engine.domain_undefine(name, *snapshots_metadata)?;
            if json_out {
                print_json(&json!({ "undefined": name }));
            } else {
                println!("undefined domain {name}");
            }
        }
    }
    Ok(EXIT_OK)
}

fn parse_disk_spec(s: &str) -> anyhow::Result<(String, DiskChoice)> {
    let Some((who, spec)) = s.split_once('=') else {
        bail!("--disk {s:?}: expected TARGET=external[:PATH]|reflink[:PATH]|internal|no");
    };
    let choice = match spec {
        "no" => DiskChoice::No,
        "internal" => DiskChoice::Internal,
        "external" => DiskChoice::External(None),
        "reflink" => DiskChoice::Reflink(None),
        _ => match (
            spec.strip_prefix("external:"),
            spec.strip_prefix("reflink:"),
        ) {
            (Some(p), _) if !p.is_empty() => DiskChoice::External(Some(PathBuf::from(p))),
            (_, Some(p)) if !p.is_empty() => DiskChoice::Reflink(Some(PathBuf::from(p))),
            _ => bail!("--disk {s:?}: expected TARGET=external[:PATH]|reflink[:PATH]|internal|no"),
        },
    };
    Ok((who.to_string(), choice))
}

/// `--memory internal|no|external:PATH`.
fn parse_memory_flag(m: &str) -> anyhow::Result<MemoryChoice> {
    Ok(match m {
        "internal" => MemoryChoice::Internal,
        // vsnap's flag: --memory no is --disk-only (`DomSnapRequest::new`).
        "no" => MemoryChoice::No,
        _ => match m.strip_prefix("external:") {
            Some(p) if !p.is_empty() => MemoryChoice::External(PathBuf::from(p)),
            _ => bail!("--memory {m:?}: expected internal or external:PATH"),
        },
    })
}

fn snap_json(s: &DomSnapshot, current: bool) -> serde_json::Value {
    json!({
        "name": s.name, "domain": s.domain, "description": s.description, "creation_time": s.creation_time,
        "parent": s.parent, "state": s.state, "memory": if s.memory_file.is_some() { "external" } else if s.memory_internal { "internal" } else { "no" }, "memory_file": opt_path_json(s.memory_file.as_ref()),
        "quiesced": s.quiesced, "current": current,
        "disks": s.disks.iter().map(|d| json!({"target": d.target, "snapshot": d.mode.as_str(), "state_file": path_json(&d.state_file), "overlay": opt_path_json(d.overlay.as_ref())})).collect::<Vec<_>>(),
    })
}

fn resolve(engine: &Engine, domain: &str, name: &Option<String>) -> anyhow::Result<DomSnapshot> {
    match name {
        Some(n) => Ok(engine.domain_snapshot_lookup_by_name(domain, n)?),
        None => engine
            .domain_snapshot_current(domain)?
            .ok_or_else(|| anyhow::anyhow!("domain {domain:?} has no current snapshot; name one")),
    }
}

pub fn snapshot(engine: &Engine, json_out: bool, cmd: &SnapCmd) -> anyhow::Result<u8> {
    match cmd {
        SnapCmd::Revert {
            domain,
            name,
            running,
            paused,
            dry_run,
        } => {
            let flags = vsnap_engine::DomRevertFlags {
                running: *running,
                paused: *paused,
            };
            let done = engine.domain_snapshot_revert(domain, name, flags, *dry_run)?;
            if json_out {
                print_json(&json!({
                    "plan": done.plan, "dry_run": done.dry_run,
                    "steps": done.plan_text.lines().skip(1).map(str::trim).collect::<Vec<_>>(),
                    "snapshot": done.snapshot, "state": done.state.as_str(), "started": done.started,
                    "removed": done.removed.iter().map(|p| path_json(p)).collect::<Vec<_>>(),
                }));
            } else if done.dry_run {
                print!("{}", done.plan_text);
                println!("(dry run: nothing was changed)");
            } else {
                println!(
                    "domain {domain} reverted to snapshot {:?} ({}) [plan {}]",
                    done.snapshot,
                    done.state.as_str(),
                    done.plan.unwrap_or_default()
                );
                for r in &done.removed {
                    println!(
                        "  removed {} (discarded, no snapshot needs it)",
                        r.display()
                    );
                }
                if let Some(p) = done.started {
                    println!("  QEMU started again on the snapshot's disks [plan {p}]");
                }
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Create {
            domain,
            name,
            live,
            disk_only,
            quiesce,
            atomic: _,
            memory,
            disks,
            xml,
            description,
            no_metadata,
            reuse_external,
            halt,
            dry_run,
        } => {
            // The flags' syntax is the CLI's; how they merge with the
            // document is the engine's (`DomSnapRequest::new`).
            let text = match xml {
                Some(f) => Some(vsnap_engine::read_xml_file(f).context("--xml")?),
                None => None,
            };
            let flags = DomSnapFlags {
                name: name.clone(),
                description: description.clone(),
                live: *live,
                disk_only: *disk_only,
                quiesce: *quiesce,
                memory: memory.as_deref().map(parse_memory_flag).transpose()?,
                disks: disks
                    .iter()
                    .map(|d| parse_disk_spec(d))
                    .collect::<anyhow::Result<_>>()?,
                no_metadata: *no_metadata,
                reuse_external: *reuse_external,
                halt: *halt,
            };
            let req = match (xml, text.as_deref()) {
                (Some(f), Some(t)) => DomSnapRequest::new(domain, Some(t), flags)
                    .with_context(|| format!("in {}", f.display()))?,
                _ => DomSnapRequest::new(domain, None, flags)?,
            };
            let done = engine.domain_snapshot_create(&req, *dry_run)?;
            if json_out {
                print_json(&json!({
                    "plan": done.plan, "dry_run": done.dry_run,
                    "steps": done.plan_text.lines().skip(1).map(str::trim).collect::<Vec<_>>(),
                    "snapshot": snap_json(&done.snapshot, !req.no_metadata),
                }));
            } else if done.dry_run {
                print!("{}", done.plan_text);
                println!("(dry run: nothing was changed)");
            } else {
                println!(
                    "domain snapshot {:?} of {} created [plan {}]",
                    done.snapshot.name,
                    done.snapshot.domain,
                    done.plan.unwrap_or_default()
                );
            }
            Ok(EXIT_OK)
        }
        SnapCmd::List { domain, tree, name } => {
            let snaps = engine.domain_snapshot_list(domain)?;
            let cur = engine.domain(domain)?.current;
            let is_cur = |s: &DomSnapshot| cur.as_deref() == Some(s.name.as_str());
            if json_out {
                print_json(&json!(snaps
                    .iter()
                    .map(|s| snap_json(s, is_cur(s)))
                    .collect::<Vec<_>>()));
            } else if *name {
                for s in &snaps {
                    println!("{}", s.name);
                }
            } else if *tree {
                fn walk(
                    all: &[DomSnapshot],
                    parent: Option<&str>,
                    depth: usize,
                    cur: &Option<String>,
                ) {
                    for s in all.iter().filter(|s| s.parent.as_deref() == parent) {
                        let mark = if cur.as_deref() == Some(s.name.as_str()) {
                            "  (current)"
                        } else {
                            ""
                        };
                        println!(
                            "{}{}{}{mark}",
                            "  ".repeat(depth),
                            if depth > 0 { "└─ " } else { "" },
                            s.name
                        );
                        walk(all, Some(&s.name), depth + 1, cur);
                    }
                }
                walk(&snaps, None, 0, &cur);
            } else {
                println!(
                    "{:<20} {:<24} {:<14} {:<4} disks",
                    "name", "created", "state", "cur"
                );
                for s in &snaps {
                    let disks: Vec<String> = s
                        .disks
                        .iter()
                        .map(|d| format!("{}={}", d.target, d.mode.as_str()))
                        .collect();
                    println!(
                        "{:<20} {:<24} {:<14} {:<4} {}",
                        s.name,
                        utc(s.creation_time),
                        s.state,
                        if is_cur(s) { "*" } else { "" },
                        disks.join(" ")
                    );
                }
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Current { domain } => match engine.domain_snapshot_current(domain)? {
            Some(s) => {
                if json_out {
                    print_json(&snap_json(&s, true));
                } else {
                    println!("{}", s.name);
                }
                Ok(EXIT_OK)
            }
            None => {
                if json_out {
                    print_json(&json!(null));
                }
                eprintln!("vsnap: domain {domain} has no current snapshot");
                Ok(EXIT_NO)
            }
        },
        SnapCmd::Info { domain, name } => {
            let s = resolve(engine, domain, name)?;
            let cur = engine.domain(domain)?.current.as_deref() == Some(s.name.as_str());
            if json_out {
                print_json(&snap_json(&s, cur));
            } else {
                println!("Name:        {}", s.name);
                println!("Domain:      {}", s.domain);
                println!("Created:     {}", utc(s.creation_time));
                println!("State:       {}", s.state);
                println!("Parent:      {}", s.parent.as_deref().unwrap_or("-"));
                println!("Current:     {}", if cur { "yes" } else { "no" });
                match &s.memory_file {
                    Some(f) => println!("Memory:      external ({})", f.display()),
                    None => println!(
                        "Memory:      {}",
                        if s.memory_internal { "internal" } else { "no" }
                    ),
                }
                println!("Quiesced:    {}", if s.quiesced { "yes" } else { "no" });
                for d in &s.disks {
                    let o = d
                        .overlay
                        .as_ref()
                        .map(|o| format!(" (new active image {})", o.display()))
                        .unwrap_or_default();
                    println!(
                        "Disk:        {} {} {}{o}",
                        d.target,
                        d.mode.as_str(),
                        d.state_file.display()
                    );
                }
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Dumpxml { domain, name } => {
            let s = resolve(engine, domain, name)?;
            let x = engine.domain_snapshot_get_xml_desc(domain, &s.name)?;
            if json_out {
                print_json(&json!({ "xml": x }));
            } else {
                print!("{x}");
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Parent { domain, name } => {
            let s = resolve(engine, domain, name)?;
            if json_out {
                print_json(&json!(s.parent));
            }
            match &s.parent {
                Some(p) => {
                    if !json_out {
                        println!("{p}");
                    }
                    Ok(EXIT_OK)
                }
                None => {
                    eprintln!("vsnap: snapshot {} of {domain} has no parent", s.name);
                    Ok(EXIT_NO)
                }
            }
        }
    }
}
