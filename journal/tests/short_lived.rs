//! Many short processes on one journal, each ending without closing it,
//! the way every `vsnap` command ends (harness = false: it re-executes
//! itself, one child per round).
//!
//! Children of two kinds, one after the other: 150 that each write one
//! plan (begin, then pivot commit with a catalog entry and `Finished`: two
//! flushes), as one `vsnap` command does, then 6 that each write 80 plans
//! (about 110 KiB of log, so each crosses a 64 KiB segment boundary on its
//! own), as a manager embedding the library and dying would. None closes
//! the journal. After every child the parent reopens it and checks that
//! every plan so far reads back whole, with its catalog entry; at the end
//! it prints `short-lived writers: ..., plans lost or damaged: L` and
//! fails if L > 0.
//!
//! sled replays its log at every open from the newest snapshot and zeroes
//! any segment it takes for torn; vsnap patches that replay (the tail of
//! the last segment is no longer rewritten when already clean), so this
//! checks the pattern of opens vsnap produces, not just sled's own tests.
use std::path::Path;
use std::process::Command;
use vsnap_journal::*;

const CHILD_ENV: &str = "VSNAP_SHORT_LIVED_CHILD";
const ROUND_ENV: &str = "VSNAP_SHORT_LIVED_ROUND";
const COUNT_ENV: &str = "VSNAP_SHORT_LIVED_COUNT";
/// Children that write one plan each, as one `vsnap` command does.
const ONE_PLAN_CHILDREN: usize = 150;
/// Then children that write this many plans each (about 110 KiB of log:
/// each crosses a 64 KiB segment boundary itself).
const MANY_PLANS: u32 = 80;
const MANY_PLAN_CHILDREN: usize = 6;
const TREE: &str = "short-lived";

fn body(round: u32) -> Vec<u8> {
    (0..1024u32)
        .map(|i| (i.wrapping_mul(31) ^ round) as u8)
        .collect()
}

fn child(dir: &Path, first: u32, count: u32) -> ! {
    let j = Journal::open(dir).expect("child: open");
    for round in first..first + count {
        write_round(&j, round);
    }
    // As `vsnap` does: every record is durable, the process just ends.
    std::process::exit(0)
}

fn write_round(j: &Journal, round: u32) {
    let header = PlanHeader {
        op: "short-lived".into(),
        summary: format!("round {round}"),
        steps: 1,
        pivot: 0,
        created_unix: 1_700_000_000,
    };
    let id = j
        .begin_with(header, body(round), &[Record::Started(0)], &[])
        .expect("child: begin");
    let put = CatalogOp::Put {
        tree: TREE.into(),
        key: round.to_be_bytes().to_vec(),
        value: codec::encode(&id.0),
    };
    j.append_all(
        id,
        &[Record::Done(0), Record::Finished(Outcome::Committed)],
        &[put],
    )
    .expect("child: commit");
}

/// The plans of rounds 0..=last that do not read back whole.
fn damaged(dir: &Path, last: u32) -> Vec<String> {
    let j = match Journal::open(dir) {
        Ok(j) => j,
        Err(e) => return vec![format!("the journal does not open: {e}")],
    };
    let mut bad = Vec::new();
    for round in 0..=last {
        let key = round.to_be_bytes();
        let id = match j.catalog_get(TREE, &key) {
            Ok(Some(v)) => PlanId(codec::decode::<u64>(&v).expect("catalog value")),
            Ok(None) => {
                bad.push(format!("round {round}: catalog entry missing"));
                continue;
            }
            Err(e) => {
                bad.push(format!("round {round}: catalog: {e}"));
                continue;
            }
        };
        match j.plan(id) {
            Ok(p) if p.body == body(round) && p.records.len() == 3 => {}
            Ok(p) => bad.push(format!(
                "round {round}: plan {} has {} records, body {} bytes",
                id.0,
                p.records.len(),
                p.body.len()
            )),
            Err(e) => bad.push(format!("round {round}: plan {}: {e}", id.0)),
        }
    }
    bad
}

fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        let first = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
        let count = std::env::var(COUNT_ENV).unwrap().parse().unwrap();
        child(Path::new(&dir), first, count);
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // One plan per process (a `vsnap` command), then processes that each
    // write enough to cross a segment boundary on their own (a manager
    // embedding the library, ending without a close).
    let children: Vec<u32> = std::iter::repeat_n(1, ONE_PLAN_CHILDREN)
        .chain(std::iter::repeat_n(MANY_PLANS, MANY_PLAN_CHILDREN))
        .collect();
    let mut lost = Vec::new();
    let mut round = 0;
    for count in &children {
        let status = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, &state)
            .env(ROUND_ENV, round.to_string())
            .env(COUNT_ENV, count.to_string())
            .status()
            .unwrap();
        round += count;
        if !status.success() {
            lost.push(format!("rounds before {round}: child failed ({status})"));
            break;
        }
        lost = damaged(&state, round - 1);
        if !lost.is_empty() {
            break;
        }
    }
    let log = std::fs::metadata(state.join("db/db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "short-lived writers: {} processes, {round} plans, plans lost or damaged: {} (log {} KiB)",
        children.len(),
        lost.len(),
        log / 1024
    );
    for l in lost.iter().take(10) {
        println!("  {l}");
    }
    assert!(lost.is_empty(), "plans lost or damaged");
    assert!(
        log > 4 * 64 * 1024,
        "the log should outgrow several segments"
    );
}
