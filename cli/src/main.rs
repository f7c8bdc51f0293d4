//! `vsnap`: the operator's command line. Thin: parse, call the engine, print.

#[macro_use]
mod common;
mod domain_cmds;
mod service;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use common::*;
use serde_json::json;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use vsnap_engine::{
    CreateRequest, DeleteRequest, Done, Engine, RevertRequest, SnapKind, VolSnapFlags, VolSnapshot,
};

/// Transactional snapshots of QEMU disk images.
///
/// Every operation is compiled into a plan of idempotent steps, written to
/// the journal before anything is touched, and either happens completely or
/// not at all, whatever dies when. After a crash the next vsnap command (or
/// vsnap-recover) finishes or undoes what was in flight.
///
/// A volume is named by its path, and that path stays its active image:
/// scripts and VM configurations never need to change.
///
/// Exit status: 0 success; 1 a negative answer (no current snapshot, a check
/// found problems, a plan needs attention); 2 error (nothing was changed).
#[derive(Parser)]
#[command(name = "vsnap", version, propagate_version = true)]
struct Cli {
    /// State directory (journal and catalog). Default: $VSNAP_STATE_DIR,
    /// /var/lib/vsnap for root, $XDG_STATE_HOME/vsnap otherwise.
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Volumes: single disk images.
    Vol {
        #[command(subcommand)]
        cmd: VolCmd,
    },
    /// Domains: guests and their disks.
    Domain {
        #[command(subcommand)]
        cmd: domain_cmds::DomainCmd,
    },
    /// Domain snapshots (mirroring `virsh snapshot-*`).
    Snapshot {
        #[command(subcommand)]
        cmd: domain_cmds::SnapCmd,
    },
    /// The journal, for operators.
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Serve the state directory: hold its journal open and carry out
    /// every vsnap command run meanwhile on it, one at a time.
    ///
    /// A command then skips opening the journal (taking the lock, starting
    /// sled, recovering), which is most of what a short command costs; it
    /// prints, reads relative paths and exits as it would alone. Commands
    /// find the service through the socket vsnap.sock in the state
    /// directory (mode 0600; only the service's own user is served). With
    /// no service running, or with VSNAP_NO_SERVICE set, a command does the
    /// work itself. vsnap-recover needs the state lock: stop the service
    /// first. SIGTERM or Ctrl-C stops it after the command in progress.
    /// Runs in the foreground (under systemd, a Type=simple unit).
    Serve,
}

#[derive(Subcommand)]
enum VolCmd {
    /// Snapshots of one volume.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapCmd,
    },
    /// Check a volume against the catalog: every snapshot present, no
    /// orphan or temporary file, chains valid (qemu-img check), no
    /// unfinished plan. Exit 1 when anything is wrong.
    Check {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
    },
    /// Record the volume's snapshot files as vsnap's own again, after you
    /// restored them from a backup or moved them to another filesystem.
    ///
    /// vsnap records the inode of every snapshot file it makes and refuses
    /// a file found under that name later (someone who can write the
    /// directory may have swapped it). A restore or a move gives every
    /// file a new inode: adopt them once the volume is otherwise
    /// consistent. Refused, with nothing changed, when `vol check` finds
    /// anything but the files' identities wrong, when a file is a symlink
    /// or has a second name, or when a reflink or copy snapshot's file
    /// does not have the size and content vsnap made. Changes only the
    /// catalog. Exit 0 also when there was nothing to adopt.
    AdoptFiles {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Internal,
    External,
    Reflink,
    Copy,
}

impl From<KindArg> for SnapKind {
    fn from(k: KindArg) -> SnapKind {
        match k {
            KindArg::Internal => SnapKind::Internal,
            KindArg::External => SnapKind::External,
            KindArg::Reflink => SnapKind::Reflink,
            KindArg::Copy => SnapKind::Copy,
        }
    }
}

#[derive(Args)]
struct CreateArgs {
    /// The disk image (qcow2 or raw). Its path stays the active image.
    image: PathBuf,
    /// Snapshot name (default: the creation time in seconds).
    name: Option<String>,
    /// internal: inside the qcow2 image. external: the current state is
    /// frozen under a new name (--file) and a new qcow2 overlay takes the
    /// image's path (a raw image thereby becomes qcow2). reflink: a
    /// copy-on-write clone (btrfs, xfs). copy: a full copy. Default: the
    /// kind of the volume's snapshots, else internal for qcow2, reflink or
    /// copy for raw.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Where the frozen state (external) or clone (reflink, copy) goes.
    /// Default: beside the image, <stem>.<name>.<ext>.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Take name, description, kind and file from a <volsnapshot> XML
    /// document; options given on the command line win.
    #[arg(long, value_name = "FILE")]
    xml: Option<PathBuf>,
    /// A free-text description kept with the snapshot.
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// The image's format, needed the first time vsnap sees an image
    /// whose name does not state it (a qcow2 image not named .qcow2, or a
    /// raw disk whose bytes start like a qcow2 header). vsnap never guesses
    /// a format from an image's bytes; it records the format and keeps it.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Print the plan; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Raw,
    Qcow2,
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Create a snapshot.
    Create(CreateArgs),
    /// List the volume's snapshots, oldest first.
    List {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
        /// Only snapshots of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Show the snapshot tree (parents and children).
        #[arg(long)]
        tree: bool,
        /// Names only, one per line.
        #[arg(long)]
        name: bool,
    },
    /// Print the current snapshot (the last made or reverted to); exit 1 when there is none.
    Current {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
    },
    /// Exit 0 (and print "yes") when the volume has a current snapshot, else 1 ("no").
    HasCurrent {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
    },
    /// Count the volume's snapshots.
    Count {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
    },
    /// Show one snapshot.
    Info {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
        /// The snapshot's name.
        name: String,
    },
    /// Print one snapshot as <volsnapshot> XML.
    Dumpxml {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
        /// The snapshot's name.
        name: String,
    },
    /// Revert the image to a snapshot. What was written since is discarded.
    Revert {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
        /// The snapshot's name.
        name: String,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a snapshot. Its children are re-parented onto its parent
    /// (external: their files are rebased, keeping every byte they show).
    Delete {
        /// The disk image (qcow2 or raw), by the path it is used under.
        image: PathBuf,
        /// The snapshot's name.
        name: String,
        /// Delete the snapshot's children (its whole subtree) too.
        #[arg(long)]
        children: bool,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum PlanCmd {
    /// Every plan in the journal with its outcome.
    List,
    /// One plan: its steps and its records.
    Show {
        /// The plan's id, as `vsnap plan list` shows it.
        id: u64,
    },
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some(code) = service::forward(&args) {
        return ExitCode::from(code);
    }
    let code = run_args(args);
    if SERVED.get().is_none() {
        if let Some(engine) = OPENED.get() {
            // A query, a dry run or a refused request on a state
            // directory that this command made: it leaves nothing behind.
            let _ = engine.remove_state_if_unused();
        }
    }
    ExitCode::from(code)
}

/// Parse and carry out one command line; its exit status.
fn run_args(args: Vec<OsString>) -> u8 {
    match parse(args) {
        Ok(cli) => run(&cli),
        Err(code) => code,
    }
}

/// Whether `--json` is among the options (before any `--`).
fn wants_json(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Parse a command line; a usage error is printed (with `--json`, also as
/// `{"error": ...}` on standard output, as every other error is) and its
/// exit status returned.
fn parse(args: Vec<OsString>) -> Result<Cli, u8> {
    use clap::error::ErrorKind;
    let json = wants_json(&args);
    Cli::try_parse_from(args).map_err(|e| {
        let code = u8::try_from(e.exit_code()).unwrap_or(EXIT_ERROR);
        if json && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let msg = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                "incomplete command: a subcommand is missing; see `vsnap --help`".to_string()
            } else {
                let text = e.render().to_string();
                let text = text.trim();
                let text = text.strip_prefix("error: ").unwrap_or(text);
                text.split("\n\n").next().unwrap_or(text).to_string()
            };
            print_json(&json!({ "error": msg }));
        }
        let _ = e.print();
        code
    })
}

fn run(cli: &Cli) -> u8 {
    match try_main(cli) {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                // A refusal also carries its kind, for a machine to match on.
                let kind = e.chain().find_map(|c| {
                    c.downcast_ref::<vsnap_engine::EngineError>()
                        .and_then(vsnap_engine::EngineError::kind)
                });
                match kind {
                    Some(k) => {
                        print_json(&json!({ "error": format!("{e:#}"), "kind": k.as_str() }))
                    }
                    None => print_json(&json!({ "error": format!("{e:#}") })),
                }
            }
            report_error("vsnap", &e);
            exit_code_of(&e)
        }
    }
}

/// Exit 1 for an error that leaves a change behind for recovery or an
/// operator (a step after the pivot failed: the change is committed; a
/// plan that needs attention); 2 for the rest (refused, or rolled back:
/// nothing changed).
fn exit_code_of(e: &anyhow::Error) -> u8 {
    let attention = e.chain().any(|c| {
        c.downcast_ref::<vsnap_engine::EngineError>()
            .is_some_and(vsnap_engine::EngineError::needs_attention)
    });
    if attention {
        EXIT_NO
    } else {
        EXIT_ERROR
    }
}

/// The engine of `vsnap serve` and the state directory it serves
/// (canonical), once it is open.
static SERVED: OnceLock<(PathBuf, &'static Engine)> = OnceLock::new();
/// The engine this process opened for its command (not under the service).
static OPENED: OnceLock<&'static Engine> = OnceLock::new();

/// `vsnap serve`: open the engine once, then carry out the commands that
/// clients send (see `service.rs`) until stopped.
fn serve(cli: &Cli) -> anyhow::Result<u8> {
    let dir = std::path::absolute(state_dir(cli.state_dir.clone()))?;
    let engine = open(cli)?;
    let canonical = std::fs::canonicalize(&dir)?;
    let _ = SERVED.set((canonical.clone(), engine));
    // The newest plan before the command in progress: after a panic, the
    // plans it began are the ones after it.
    let before = std::cell::Cell::new(None);
    service::serve(
        &dir,
        &|args| {
            let cli = match parse(args) {
                Ok(cli) => cli,
                Err(code) => return code,
            };
            let theirs = std::fs::canonicalize(state_dir(cli.state_dir.clone()));
            if matches!(cli.cmd, Cmd::Serve) || theirs.ok().as_deref() != Some(canonical.as_path())
            {
                return service::NOT_MINE;
            }
            before.set(engine.last_plan_id().ok().flatten());
            run(&cli)
        },
        &|| after_panic(engine, before.get()),
    )?;
    Ok(EXIT_OK)
}

/// Under `vsnap serve`, after a command panicked (a bug; the panic message
/// went to the client's stderr): recover what it left unfinished, on the
/// service's engine, before any other command runs, and tell the client
/// what became of the plans it began. Exit 2 when none of them changed
/// anything, 1 when one committed or needs attention.
fn after_panic(engine: &Engine, before: Option<u64>) -> Result<u8, String> {
    eprintln!(
        "vsnap: error: internal error: the command panicked (a bug in vsnap; the message \
         above says where); the service recovers what it left and serves on"
    );
    for r in engine.recover(false).map_err(|e| e.to_string())? {
        eprintln!(
            "vsnap: recovered plan {} ({}): {}: {}",
            r.plan, r.summary, r.outcome, r.detail
        );
    }
    let mut code = EXIT_ERROR;
    let after = engine.last_plan_id().map_err(|e| e.to_string())?;
    let first = before.map_or(1, |b| b + 1);
    for id in first..=after.unwrap_or(0) {
        let (stored, _) = engine.plan(id).map_err(|e| e.to_string())?;
        match stored.outcome() {
            Some(vsnap_engine::Outcome::RolledBack) => {}
            o => {
                eprintln!(
                    "vsnap: plan {id} ({}) ended {o:?}: it changed something; `vsnap plan \
                     show {id}` and `vsnap vol check` tell what",
                    stored.header.summary
                );
                code = EXIT_NO;
            }
        }
    }
    if code == EXIT_ERROR {
        eprintln!("vsnap: nothing was changed");
    }
    Ok(code)
}

/// Open the state directory (recovering what was interrupted). The engine
/// is leaked on purpose, never dropped: every record is durable when the
/// call that wrote it returns, so a command's process can end like a crash
/// after its last write, which the journal is built for, without the 1-3 ms
/// of closing sled (joining its threads, a last flush of nothing new).
/// The state lock goes with the process.
fn open(cli: &Cli) -> anyhow::Result<&'static Engine> {
    let print = |reports: Vec<vsnap_engine::PlanReport>| {
        for r in reports {
            eprintln!(
                "vsnap: recovered plan {} ({}): {}: {}",
                r.plan, r.summary, r.outcome, r.detail
            );
        }
    };
    if let Some((_, engine)) = SERVED.get() {
        // `vsnap serve` checked that the command names its directory.
        // What a command alone would recover first (a plan an earlier
        // command left unfinished after its pivot), the service does too.
        print(engine.recover(false)?);
        return Ok(engine);
    }
    let dir = state_dir(cli.state_dir.clone());
    let (mut engine, reports) = Engine::open(&dir)?;
    print(reports);
    engine.set_progress(move |p| {
        // Written with errors ignored: progress must never stop a plan
        // (a closed pipe or a client gone under `vsnap serve`). Asked each
        // time whether stderr is a terminal: under `vsnap serve` it is
        // each client's.
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let tty = err.is_terminal();
        let pct = (p.done_bytes * 100)
            .checked_div(p.total_bytes)
            .unwrap_or(100);
        let (done, total) = (p.done_bytes >> 20, p.total_bytes >> 20);
        let _ = if !tty {
            writeln!(err, "{}: {pct}% ({done} of {total} MiB)", p.what)
        } else if p.done_bytes >= p.total_bytes {
            writeln!(err, "\r{}: {pct:3}% ({done} of {total} MiB)", p.what)
        } else {
            write!(err, "\r{}: {pct:3}% ({done} of {total} MiB)", p.what)
        };
    });
    let engine: &'static Engine = Box::leak(Box::new(engine));
    let _ = OPENED.set(engine);
    Ok(engine)
}

fn try_main(cli: &Cli) -> anyhow::Result<u8> {
    match &cli.cmd {
        Cmd::Vol {
            cmd: VolCmd::Snapshot { cmd },
        } => snapshot(cli, cmd),
        Cmd::Vol {
            cmd: VolCmd::Check { image },
        } => {
            let engine = open(cli)?;
            let r = engine.vol_check(image)?;
            if cli.json {
                print_json(&serde_json::to_value(&r)?);
            } else if r.violations.is_empty() {
                println!(
                    "{}: consistent ({} snapshot(s), chains checked, no orphan or temporary file)",
                    r.image.display(),
                    r.snapshots
                );
            } else {
                println!("{}: {} problem(s):", r.image.display(), r.violations.len());
                for v in &r.violations {
                    println!("  {v}");
                }
            }
            for n in &r.notes {
                println!("  note: {n}");
            }
            Ok(if r.violations.is_empty() {
                EXIT_OK
            } else {
                EXIT_NO
            })
        }
        Cmd::Vol {
            cmd: VolCmd::AdoptFiles { image },
        } => {
            let engine = open(cli)?;
            let r = engine.vol_adopt_files(image)?;
            if cli.json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                for a in &r.adopted {
                    println!(
                        "adopted {} (snapshot {:?}; was: {})",
                        a.file.display(),
                        a.snapshot,
                        a.was
                    );
                }
                println!(
                    "{}: {} file(s) adopted, {} already vsnap's",
                    r.image.display(),
                    r.adopted.len(),
                    r.unchanged
                );
            }
            Ok(EXIT_OK)
        }
        Cmd::Plan { cmd } => plans(cli, cmd),
        Cmd::Serve => serve(cli),
        Cmd::Domain { cmd } => domain_cmds::domain(open(cli)?, cli.json, cmd),
        Cmd::Snapshot { cmd } => domain_cmds::snapshot(open(cli)?, cli.json, cmd),
    }
}

fn snap_json(s: &VolSnapshot, current: bool) -> serde_json::Value {
    json!({
        "name": s.name,
        "volume": path_json(&s.volume),
        "kind": s.kind.as_str(),
        "description": s.description,
        "creation_time": s.creation_time,
        "parent": s.parent,
        "file": opt_path_json(s.file.as_ref()),
        "format": s.format.as_str(),
        "current": current,
    })
}

fn done_output(cli: &Cli, verb: &str, d: &Done) -> u8 {
    if cli.json {
        print_json(&json!({
            "plan": d.plan,
            "dry_run": d.dry_run,
            "steps": d.plan_text.lines().skip(1).map(str::trim).collect::<Vec<_>>(),
            "snapshot": snap_json(&d.snapshot, false),
            "deleted_with_it": d.deleted,
        }));
    } else if d.dry_run {
        print!("{}", d.plan_text);
        println!("(dry run: nothing was changed)");
    } else {
        let file = d
            .snapshot
            .file
            .as_ref()
            .map(|f| format!(" (file {})", f.display()))
            .unwrap_or_default();
        println!(
            "{verb} {} snapshot {:?} of {}{file} [plan {}]",
            d.snapshot.kind,
            d.snapshot.name,
            d.snapshot.volume.display(),
            d.plan.unwrap_or_default()
        );
        if !d.deleted.is_empty() {
            println!("deleted with it: {}", d.deleted.join(", "));
        }
    }
    EXIT_OK
}

fn snapshot(cli: &Cli, cmd: &SnapCmd) -> anyhow::Result<u8> {
    let engine = open(cli)?;
    match cmd {
        SnapCmd::Create(a) => {
            // The options' syntax is the CLI's; how they merge with the
            // document is the engine's (`CreateRequest::new`).
            let flags = VolSnapFlags {
                name: a.name.clone(),
                description: a.description.clone(),
                kind: a.kind.map(Into::into),
                file: a.file.clone(),
                format: a.format.map(|f| match f {
                    FormatArg::Raw => vsnap_engine::Format::Raw,
                    FormatArg::Qcow2 => vsnap_engine::Format::Qcow2,
                }),
            };
            let req = match &a.xml {
                Some(x) => {
                    let text = vsnap_engine::read_xml_file(x).context("--xml")?;
                    CreateRequest::new(&a.image, Some(&text), flags)
                        .with_context(|| format!("in {}", x.display()))?
                }
                None => CreateRequest::new(&a.image, None, flags)?,
            };
            let d = engine.vol_snapshot_create(&req, a.dry_run)?;
            Ok(done_output(cli, "created", &d))
        }
        SnapCmd::Revert {
            image,
            name,
            dry_run,
        } => {
            let d = engine.vol_snapshot_revert(
                &RevertRequest {
                    image: image.clone(),
                    name: name.clone(),
                },
                *dry_run,
            )?;
            Ok(done_output(cli, "reverted to", &d))
        }
        SnapCmd::Delete {
            image,
            name,
            children,
            dry_run,
        } => {
            let d = engine.vol_snapshot_delete(
                &DeleteRequest {
                    image: image.clone(),
                    name: name.clone(),
                    children: *children,
                },
                *dry_run,
            )?;
            Ok(done_output(cli, "deleted", &d))
        }
        SnapCmd::List {
            image,
            kind,
            tree,
            name,
        } => {
            let snaps = engine.vol_snapshot_list(image, kind.map(Into::into))?;
            let current = engine.vol_snapshot_current(image)?.map(|c| c.name);
            let is_cur = |s: &VolSnapshot| current.as_deref() == Some(s.name.as_str());
            if cli.json {
                print_json(&json!(snaps
                    .iter()
                    .map(|s| snap_json(s, is_cur(s)))
                    .collect::<Vec<_>>()));
            } else if *name {
                for s in &snaps {
                    println!("{}", s.name);
                }
            } else if *tree {
                print_tree(&snaps, None, "", &current);
            } else {
                println!(
                    "{:<20} {:<9} {:<24} {:<12} {:<4} file",
                    "name", "kind", "created", "parent", "cur"
                );
                for s in &snaps {
                    println!(
                        "{:<20} {:<9} {:<24} {:<12} {:<4} {}",
                        s.name,
                        s.kind,
                        utc(s.creation_time),
                        s.parent.as_deref().unwrap_or("-"),
                        if is_cur(s) { "*" } else { "" },
                        s.file
                            .as_ref()
                            .map(|f| f.display().to_string())
                            .unwrap_or_else(|| "(inside the image)".into())
                    );
                }
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Current { image } => match engine.vol_snapshot_current(image)? {
            Some(s) => {
                if cli.json {
                    print_json(&snap_json(&s, true));
                } else {
                    println!("{}", s.name);
                }
                Ok(EXIT_OK)
            }
            None => {
                if cli.json {
                    print_json(&json!(null));
                }
                eprintln!("vsnap: {} has no current snapshot", image.display());
                Ok(EXIT_NO)
            }
        },
        SnapCmd::HasCurrent { image } => {
            let yes = engine.vol_has_current_snapshot(image)?;
            if cli.json {
                print_json(&json!(yes));
            } else {
                println!("{}", if yes { "yes" } else { "no" });
            }
            Ok(if yes { EXIT_OK } else { EXIT_NO })
        }
        SnapCmd::Count { image, kind } => {
            let n = engine.vol_snapshot_num(image, kind.map(Into::into))?;
            if cli.json {
                print_json(&json!(n));
            } else {
                println!("{n}");
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Info { image, name } => {
            let s = engine.vol_snapshot_lookup_by_name(image, name)?;
            let cur = engine
                .vol_snapshot_current(image)?
                .is_some_and(|c| c.name == s.name);
            let children = engine.vol_snapshot_children(image, name)?;
            if cli.json {
                let mut v = snap_json(&s, cur);
                v["children"] = json!(children);
                print_json(&v);
            } else {
                println!("Name:          {}", s.name);
                println!("Volume:        {}", s.volume.display());
                println!("Kind:          {}", s.kind);
                println!("Created:       {}", utc(s.creation_time));
                println!("Description:   {}", s.description.as_deref().unwrap_or("-"));
                println!("Parent:        {}", s.parent.as_deref().unwrap_or("-"));
                println!(
                    "Children:      {}",
                    if children.is_empty() {
                        "-".to_string()
                    } else {
                        children.join(", ")
                    }
                );
                println!("Current:       {}", if cur { "yes" } else { "no" });
                println!(
                    "File:          {}",
                    s.file
                        .as_ref()
                        .map(|f| f.display().to_string())
                        .unwrap_or_else(|| "(inside the image)".into())
                );
                println!("Format:        {}", s.format);
            }
            Ok(EXIT_OK)
        }
        SnapCmd::Dumpxml { image, name } => {
            let x = engine.vol_snapshot_get_xml_desc(image, name)?;
            if cli.json {
                print_json(&json!({ "xml": x }));
            } else {
                print!("{x}");
            }
            Ok(EXIT_OK)
        }
    }
}

fn print_tree(snaps: &[VolSnapshot], parent: Option<&str>, indent: &str, current: &Option<String>) {
    let kids: Vec<&VolSnapshot> = snaps
        .iter()
        .filter(|s| s.parent.as_deref() == parent)
        .collect();
    for (i, s) in kids.iter().enumerate() {
        let last = i + 1 == kids.len();
        let (branch, next) = if parent.is_none() {
            ("", String::new())
        } else if last {
            ("└─ ", format!("{indent}   "))
        } else {
            ("├─ ", format!("{indent}│  "))
        };
        let mark = if current.as_deref() == Some(s.name.as_str()) {
            "  (current)"
        } else {
            ""
        };
        println!("{indent}{branch}{} [{}]{mark}", s.name, s.kind);
        print_tree(snaps, Some(&s.name), &next, current);
    }
}

fn plans(cli: &Cli, cmd: &PlanCmd) -> anyhow::Result<u8> {
    // Operators inspect the journal as it is: no recovery first. Under
    // `vsnap serve`, the service's engine (it recovered when it started).
    let engine = match SERVED.get() {
        Some((_, engine)) => *engine,
        None => {
            let dir = state_dir(cli.state_dir.clone());
            let engine: &'static Engine = Box::leak(Box::new(Engine::open_without_recovery(&dir)?));
            let _ = OPENED.set(engine);
            engine
        }
    };
    match cmd {
        PlanCmd::List => {
            let all = engine.plans()?;
            let rows: Vec<_> = all
                .iter()
                .map(|p| {
                    let outcome = match p.outcome() {
                        None => "UNFINISHED".to_string(),
                        Some(o) => format!("{o:?}"),
                    };
                    (
                        p.id.0,
                        p.header.op.clone(),
                        p.header.summary.clone(),
                        outcome,
                        p.header.created_unix,
                    )
                })
                .collect();
            if cli.json {
                print_json(&json!(rows
                    .iter()
                    .map(|(id, op, sum, out, t)| json!({"id": id, "op": op, "summary": sum, "outcome": out, "created": t}))
                    .collect::<Vec<_>>()));
            } else {
                if rows.is_empty() {
                    println!("the journal holds no plan");
                }
                for (id, op, sum, out, t) in rows {
                    println!("{id:>6}  {}  {op:<20} {out:<14} {sum}", utc(t));
                }
            }
            Ok(EXIT_OK)
        }
        PlanCmd::Show { id } => {
            let (stored, plan) = engine.plan(*id)?;
            if cli.json {
                print_json(&json!({
                    "id": id,
                    "op": plan.op,
                    "summary": plan.summary,
                    "pivot": plan.pivot,
                    "steps": plan.steps.iter().map(|s| s.describe()).collect::<Vec<_>>(),
                    "records": stored.records.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>(),
                }));
            } else {
                print!("{}", plan.render());
                println!("records:");
                for r in &stored.records {
                    println!("  {r:?}");
                }
            }
            Ok(EXIT_OK)
        }
    }
}
