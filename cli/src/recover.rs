//! `vsnap-recover`: finish or undo every plan a crash interrupted.

#[macro_use]
mod common;

use clap::Parser;
use common::*;
use std::path::PathBuf;
use std::process::ExitCode;

/// Finish or undo whatever vsnap had in flight when it (or the host) died.
///
/// For every plan in the journal that has no end record, vsnap-recover
/// decides from the journal and a probe of the real world: a plan whose
/// pivot had not happened is rolled back (every step undone, newest first);
/// one whose pivot happened is rolled forward; one whose pivot cannot be
/// probed ends "needs attention" and nothing is deleted. It prints one line
/// per plan. Running it again with nothing to do changes nothing and says so.
///
/// Exit status: 0 everything is consistent; 1 a plan needs attention;
/// 2 error (for example the state directory is locked by a running vsnap).
#[derive(Parser)]
#[command(name = "vsnap-recover", version)]
struct Args {
    /// State directory (journal and catalog). Default: $VSNAP_STATE_DIR,
    /// /var/lib/vsnap for root, $XDG_STATE_HOME/vsnap otherwise.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Say what would be done; change nothing (the pivot may be probed, read-only).
    #[arg(long)]
    dry_run: bool,
    /// Print a JSON document instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match try_main(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report_error("vsnap-recover", &e);
            let sock = state_dir(args.state_dir.clone()).join("vsnap.sock");
            if sock.exists() && format!("{e:#}").contains("is locked by process") {
                eprintln!(
                    "  hint: a `vsnap serve` holds it (its socket is {}); a running service has \
                     recovered at its start: stop it (SIGTERM) to run vsnap-recover",
                    sock.display()
                );
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn try_main(args: &Args) -> anyhow::Result<u8> {
    let dir = state_dir(args.state_dir.clone());
    let engine = vsnap_engine::Engine::open_without_recovery(&dir)?;
    let reports = engine.recover(args.dry_run)?;
    let attention = reports
        .iter()
        .any(|r| r.outcome == vsnap_engine::PlanOutcome::NeedsAttention);
    if args.json {
        print_json(&serde_json::json!({
            "state_dir": dir,
            "dry_run": args.dry_run,
            "plans": reports,
            "consistent": !attention,
        }));
    } else if reports.is_empty() {
        let total = engine.plans()?.len();
        println!("nothing to recover: {total} plan(s) in the journal, all finished");
    } else {
        let prefix = if args.dry_run { "would be " } else { "" };
        for r in &reports {
            println!(
                "plan {} ({}: {}): {prefix}{}: {}",
                r.plan, r.op, r.summary, r.outcome, r.detail
            );
        }
    }
    // Run on a state directory that did not exist (or was empty): it
    // leaves nothing behind.
    let _ = engine.remove_state_if_unused();
    Ok(if attention { EXIT_NO } else { EXIT_OK })
}
