//! Tests of the grammar and the decisions.
//!
//! Records are written in a short notation: `S3` = `Started(3)`, `D3` =
//! `Done(3)`, `R` = `RollingBack`, `U3` = `Undone(3)`, `FC` / `FR` / `FN` =
//! `Finished(Committed | RolledBack | NeedsAttention("x"))`.

use super::*;
use std::collections::{BTreeSet, HashSet};

fn header(steps: u32, pivot: u32) -> PlanHeader {
    PlanHeader {
        op: "vol.snapshot.create".to_string(),
        summary: "external snapshot s1 of /vm/a.qcow2".to_string(),
        steps,
        pivot,
        created_unix: 0,
    }
}

fn recs(s: &str) -> Vec<Record> {
    s.split_whitespace()
        .map(|t| match t {
            "R" => Record::RollingBack,
            "FC" => Record::Finished(Outcome::Committed),
            "FR" => Record::Finished(Outcome::RolledBack),
            "FN" => Record::Finished(Outcome::NeedsAttention("x".to_string())),
            _ => {
                let i: u32 = t[1..].parse().unwrap_or_else(|_| panic!("bad token {t}"));
                match &t[..1] {
                    "S" => Record::Started(i),
                    "D" => Record::Done(i),
                    "U" => Record::Undone(i),
                    _ => panic!("bad token {t}"),
                }
            }
        })
        .collect()
}

fn enc(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| match r {
            Record::Started(i) => format!("S{i}"),
            Record::Done(i) => format!("D{i}"),
            Record::Undone(i) => format!("U{i}"),
            Record::RollingBack => "R".to_string(),
            Record::Finished(Outcome::Committed) => "FC".to_string(),
            Record::Finished(Outcome::RolledBack) => "FR".to_string(),
            Record::Finished(Outcome::NeedsAttention(_)) => "FN".to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a table row expects from `decide`.
#[derive(Debug)]
enum Expect {
    Is(Decision),
    /// Illegal, with the offending record at this index.
    Illegal(usize),
}

fn back(undo: &[u32]) -> Expect {
    Expect::Is(Decision::RollBack {
        undo: undo.to_vec(),
        already_rolling_back: false,
    })
}
fn back_already(undo: &[u32]) -> Expect {
    Expect::Is(Decision::RollBack {
        undo: undo.to_vec(),
        already_rolling_back: true,
    })
}
fn fwd(from: u32) -> Expect {
    Expect::Is(Decision::RollForward { from })
}
const PROBE: Expect = Expect::Is(Decision::ProbePivot);
const NOTHING: Expect = Expect::Is(Decision::Nothing);
fn err(index: usize) -> Expect {
    Expect::Illegal(index)
}

/// `(steps, pivot, records, expected decision)`.
fn table() -> Vec<(u32, u32, &'static str, Expect)> {
    vec![
        // Every prefix of a normal 4-step plan, pivot 2.
        (4, 2, "", back(&[])),
        (4, 2, "S0", back(&[0])),
        (4, 2, "S0 D0", back(&[0])),
        (4, 2, "S0 D0 S1", back(&[1, 0])),
        (4, 2, "S0 D0 S1 D1", back(&[1, 0])),
        (4, 2, "S0 D0 S1 D1 S2", PROBE),
        (4, 2, "S0 D0 S1 D1 S2 D2", fwd(3)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3", fwd(3)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 D3", fwd(4)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 D3 FC", NOTHING),
        // Every prefix of a rollback after step 1 failed.
        (4, 2, "S0 D0 S1 R", back_already(&[1, 0])),
        (4, 2, "S0 D0 S1 R U1", back_already(&[0])),
        (4, 2, "S0 D0 S1 R U1 U0", back_already(&[])),
        (4, 2, "S0 D0 S1 R U1 U0 FR", NOTHING),
        // A rollback after step 0 failed, or after step 1 was done.
        (4, 2, "S0 R", back_already(&[0])),
        (4, 2, "S0 R U0 FR", NOTHING),
        (4, 2, "S0 D0 S1 D1 R U1 U0 FR", NOTHING),
        // The pivot failed cleanly (or its probe said NotApplied): no U2.
        (4, 2, "S0 D0 S1 D1 S2 R", back_already(&[1, 0])),
        (4, 2, "S0 D0 S1 D1 S2 R U1", back_already(&[0])),
        (4, 2, "S0 D0 S1 D1 S2 R U1 U0 FR", NOTHING),
        (4, 2, "S0 D0 S1 D1 S2 S2 R U1 U0 FR", NOTHING),
        // Nothing started: an empty rollback.
        (4, 2, "R", back_already(&[])),
        (4, 2, "R FR", NOTHING),
        (4, 2, "FR", NOTHING),
        // Retries: the pivot re-run after a probe, retriable steps retried.
        (4, 2, "S0 D0 S1 D1 S2 S2", PROBE),
        (4, 2, "S0 D0 S1 D1 S2 S2 S2", PROBE),
        (4, 2, "S0 D0 S1 D1 S2 S2 D2", fwd(3)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 S3", fwd(3)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 S3 S3 D3 FC", NOTHING),
        // NeedsAttention at any point.
        (4, 2, "FN", NOTHING),
        (4, 2, "S0 D0 S1 FN", NOTHING),
        (4, 2, "S0 D0 S1 D1 S2 FN", NOTHING),
        (4, 2, "S0 D0 S1 R U1 FN", NOTHING),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 FN", NOTHING),
        // Pivot first and last.
        (3, 0, "", back(&[])),
        (3, 0, "S0", PROBE),
        (3, 0, "S0 S0", PROBE),
        (3, 0, "S0 D0", fwd(1)),
        (3, 0, "S0 R FR", NOTHING),
        (3, 0, "S0 FR", NOTHING),
        (3, 0, "S0 D0 FR", err(2)),
        (3, 0, "S0 D0 R", err(2)),
        (3, 2, "S0 D0 S1 D1 S2 D2", fwd(3)),
        (3, 2, "S0 D0 S1 D1 S2 D2 FC", NOTHING),
        (1, 0, "S0 D0 FC", NOTHING),
        // Illegal: a step before the pivot started twice.
        (4, 2, "S0 S0", err(1)),
        (4, 2, "S0 D0 S1 S1", err(3)),
        // Illegal: out-of-range indices, and a bad header.
        (4, 2, "S4", err(0)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 D4", err(7)),
        (4, 2, "S0 R U7", err(2)),
        (4, 4, "", err(0)),
        (0, 0, "", err(0)),
        // Illegal: records after Finished.
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 D3 FC S0", err(9)),
        (4, 2, "FN FN", err(1)),
        (4, 2, "S0 R U0 FR R", err(4)),
        // Illegal: out of order forward.
        (4, 2, "D0", err(0)),
        (4, 2, "S0 D1", err(1)),
        (4, 2, "S0 D0 D0", err(2)),
        (4, 2, "S0 D0 S2", err(2)),
        (4, 2, "S1", err(0)),
        (4, 2, "S0 D0 S1 D1 S2 S3", err(5)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 D3 S3", err(8)),
        (4, 2, "S0 D0 S0", err(2)),
        // Illegal: undo out of order, of a never-started step, of the pivot.
        (4, 2, "S0 D0 S1 R U0", err(4)),
        (4, 2, "S0 D0 S1 R U3", err(4)),
        (4, 2, "S0 R U1", err(2)),
        (4, 2, "S0 D0 S1 R U1 U1", err(5)),
        (4, 2, "S0 D0 S1 D1 S2 R U2", err(6)),
        (4, 2, "U0", err(0)),
        // Illegal: RollingBack past the pivot, twice, or forward after it.
        (4, 2, "S0 D0 S1 D1 S2 D2 R", err(6)),
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 R", err(7)),
        (4, 2, "R R", err(1)),
        (4, 2, "S0 R U0 S1", err(3)),
        (4, 2, "S0 R D0", err(2)),
        // Illegal: endings that do not match the records.
        (4, 2, "S0 D0 S1 D1 S2 D2 S3 FC", err(7)),
        (4, 2, "S0 D0 S1 D1 S2 D2 FC", err(6)),
        (4, 2, "FC", err(0)),
        (4, 2, "S0 D0 S1 R U1 FR", err(5)),
        (4, 2, "S0 D0 S1 R FC", err(4)),
        (4, 2, "S0 FR", err(1)),
        (4, 2, "S0 D0 S1 D1 S2 D2 FR", err(6)),
        (3, 1, "S0 D0 S1 FR", err(3)),
    ]
}

#[test]
fn table_of_sequences() {
    let rows = table();
    assert!(rows.len() >= 40, "{} rows", rows.len());
    for (steps, pivot, text, expect) in rows {
        let h = header(steps, pivot);
        let records = recs(text);
        let got = decide(&h, &records);
        let context = format!("steps {steps}, pivot {pivot}, records [{text}]");
        match (&expect, &got) {
            (Expect::Is(want), Ok(got)) => assert_eq!(want, got, "{context}"),
            (Expect::Illegal(index), Err(e)) => {
                assert_eq!(*index, e.index, "{context}: {e}");
                assert!(!e.why.is_empty());
                if let Some(r) = records.get(*index) {
                    assert_eq!(format!("{r:?}"), e.record, "{context}: {e}");
                }
                // validate and decide_after_probe agree on illegal sequences.
                assert_eq!(validate(&h, &records).as_ref(), Err(e), "{context}");
                assert_eq!(
                    decide_after_probe(&h, &records, PivotSeen::Applied).as_ref(),
                    Err(e),
                    "{context}"
                );
            }
            _ => panic!("{context}: expected {expect:?}, got {got:?}"),
        }
        if got.is_ok() {
            assert_eq!(validate(&h, &records), Ok(()), "{context}");
        }
    }
}

#[test]
fn illegal_messages_name_the_problem() {
    let h = header(4, 2);
    let why = |text: &str| decide(&h, &recs(text)).unwrap_err().why;
    assert!(why("S0 S0").contains("before the pivot"));
    assert!(why("S5").contains("out of range"));
    assert!(why("S0 D0 S1 R U0").contains("out of order"));
    assert!(why("S0 D0 S1 D1 S2 R U2").contains("pivot"));
    assert!(why("S0 D0 S1 D1 S2 D2 R").contains("only goes forward"));
    assert!(why("S0 D0 S1 D1 S2 D2 S3 FC").contains("step 3"));
    assert!(why("S0 D0 S1 R U1 FR").contains("step 0"));
    assert!(why("FC S0").contains("Finished"));
    let e = decide(&header(2, 2), &[]).unwrap_err();
    assert!(e.record.contains("header"), "{e}");
    assert!(e.to_string().contains("pivot"), "{e}");
}

#[test]
fn decisions_after_probe() {
    let h = header(4, 2);
    for text in ["S0 D0 S1 D1 S2", "S0 D0 S1 D1 S2 S2"] {
        let r = recs(text);
        assert_eq!(decide(&h, &r), Ok(Decision::ProbePivot));
        assert_eq!(
            decide_after_probe(&h, &r, PivotSeen::Applied),
            Ok(Decision::RollForward { from: 2 })
        );
        assert_eq!(
            decide_after_probe(&h, &r, PivotSeen::NotApplied),
            Ok(Decision::RollBack {
                undo: vec![1, 0],
                already_rolling_back: false
            })
        );
        let seen = PivotSeen::Unknown("QEMU process 4242 is gone".to_string());
        let Ok(Decision::NeedsAttention(msg)) = decide_after_probe(&h, &r, seen) else {
            panic!("expected NeedsAttention");
        };
        for part in [
            "QEMU process 4242 is gone",
            "step 2",
            "vol.snapshot.create",
            "external snapshot s1 of /vm/a.qcow2",
            "Nothing was deleted",
            "vsnap plan show",
            "does not act on it again",
        ] {
            assert!(msg.contains(part), "{part:?} missing from {msg:?}");
        }
    }
    // Pivot first: NotApplied leaves nothing to undo.
    assert_eq!(
        decide_after_probe(&header(3, 0), &recs("S0"), PivotSeen::NotApplied),
        Ok(Decision::RollBack {
            undo: vec![],
            already_rolling_back: false
        })
    );
    // When no probe was asked for, the probe's answer changes nothing.
    for (text, want) in [
        ("S0 D0", back(&[0])),
        ("S0 D0 S1 D1 S2 D2", fwd(3)),
        ("S0 D0 S1 D1 S2 R", back_already(&[1, 0])),
        ("S0 D0 S1 D1 S2 D2 S3 D3 FC", NOTHING),
    ] {
        let Expect::Is(want) = want else {
            unreachable!()
        };
        for seen in [
            PivotSeen::Applied,
            PivotSeen::NotApplied,
            PivotSeen::Unknown("?".to_string()),
        ] {
            assert_eq!(decide_after_probe(&h, &recs(text), seen), Ok(want.clone()));
        }
    }
}

#[test]
fn check_next_matches_validate() {
    let h = header(4, 2);
    let r = recs("S0 D0 S1");
    assert_eq!(check_next(&h, &r, &Record::Done(1)), Ok(()));
    assert_eq!(check_next(&h, &r, &Record::RollingBack), Ok(()));
    let e = check_next(&h, &r, &Record::Started(1)).unwrap_err();
    assert_eq!(e.index, 3);
    assert_eq!(e.record, "Started(1)");
    // An illegal prefix is reported at its own index.
    let e = check_next(&h, &recs("S0 S0"), &Record::Done(0)).unwrap_err();
    assert_eq!(e.index, 1);
}

#[test]
fn replay_reports_progress() {
    let h = header(4, 2);
    assert_eq!(replay(&h, &[]), Ok(Progress::START));
    assert_eq!(
        replay(&h, &recs("S0 D0 S1")),
        Ok(Progress::Forward {
            done: 1,
            in_flight: true
        })
    );
    assert_eq!(
        replay(&h, &recs("S0 D0 S1 D1 S2 R U1")),
        Ok(Progress::RollingBack { remaining: vec![0] })
    );
    assert_eq!(
        replay(&h, &recs("FN")),
        Ok(Progress::Finished(Outcome::NeedsAttention("x".to_string())))
    );
}

// ---------------------------------------------------------------------------
// The grammar as an independent oracle: every legal sequence, built from the
// "prefix of a complete word" definition in the crate docs, and every
// one-record extension of each compared with `validate`.

/// How many `Started(i)` in a row the oracle generates for `i >= pivot`.
const MAX_STARTS: usize = 2;

fn legal_words(steps: u32, pivot: u32) -> BTreeSet<String> {
    // Forward parts: each step i >= pivot is started 1..=MAX_STARTS times.
    let mut forwards: Vec<Vec<Record>> = vec![vec![]];
    for i in 0..steps {
        let mut next = vec![];
        for f in &forwards {
            let max = if i >= pivot { MAX_STARTS } else { 1 };
            for k in 1..=max {
                let mut g = f.clone();
                g.extend(std::iter::repeat_n(Record::Started(i), k));
                g.push(Record::Done(i));
                next.push(g);
            }
        }
        forwards = next;
    }
    let mut complete: Vec<Vec<Record>> = vec![];
    for f in &forwards {
        let mut c = f.clone();
        c.push(Record::Finished(Outcome::Committed));
        complete.push(c);
        // Cut before Done(pivot), then roll back.
        let cut_max = f.iter().position(|r| *r == Record::Done(pivot)).unwrap();
        for cut in 0..=cut_max {
            let w = &f[..cut];
            let mut started: Vec<u32> = w
                .iter()
                .filter_map(|r| match r {
                    Record::Started(i) if *i != pivot => Some(*i),
                    _ => None,
                })
                .collect();
            started.dedup();
            started.reverse();
            let mut c = w.to_vec();
            c.push(Record::RollingBack);
            c.extend(started.iter().map(|&i| Record::Undone(i)));
            c.push(Record::Finished(Outcome::RolledBack));
            complete.push(c);
            if started.is_empty() {
                let mut c = w.to_vec();
                c.push(Record::Finished(Outcome::RolledBack));
                complete.push(c);
            }
        }
    }
    let mut legal = BTreeSet::new();
    for c in &complete {
        for n in 0..=c.len() {
            legal.insert(enc(&c[..n]));
            if n < c.len() {
                let mut a = c[..n].to_vec();
                a.push(Record::Finished(Outcome::NeedsAttention("x".to_string())));
                legal.insert(enc(&a));
            }
        }
    }
    legal
}

#[test]
fn grammar_oracle_agrees_with_validate() {
    let mut checked = 0usize;
    for steps in 1..=5u32 {
        for pivot in 0..steps {
            let h = header(steps, pivot);
            let legal = legal_words(steps, pivot);
            let mut alphabet = vec![
                Record::RollingBack,
                Record::Finished(Outcome::Committed),
                Record::Finished(Outcome::RolledBack),
                Record::Finished(Outcome::NeedsAttention("x".to_string())),
            ];
            for i in 0..=steps {
                alphabet.extend([Record::Started(i), Record::Done(i), Record::Undone(i)]);
            }
            for word in &legal {
                let records = recs(word);
                assert_eq!(validate(&h, &records), Ok(()), "{steps}/{pivot} [{word}]");
                for x in &alphabet {
                    let mut r = records.clone();
                    r.push(x.clone());
                    let run = r.iter().rev().take_while(|y| *y == x).count();
                    if matches!(x, Record::Started(_)) && run > MAX_STARTS {
                        continue; // legal, but beyond what the oracle generates
                    }
                    let want = legal.contains(&enc(&r));
                    let got = validate(&h, &r);
                    assert_eq!(
                        want,
                        got.is_ok(),
                        "steps {steps}, pivot {pivot}, [{}]: {got:?}",
                        enc(&r)
                    );
                    if let Err(e) = got {
                        assert_eq!(e.index, records.len());
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 25_000, "{checked}");
}

// ---------------------------------------------------------------------------
// Exhaustive: every execution the engine and recovery can produce, with
// failures and crashes at every point.

/// Who writes the next record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Actor {
    /// The engine running the plan: `next` is the step to run, `started`
    /// whether `Started(next)` is written, `retries` of that step so far.
    Engine {
        next: u32,
        started: bool,
        retries: u8,
    },
    /// Writes these records in order (a rollback, a roll-forward, an end).
    Script(Vec<String>),
    /// Done: nothing more is written.
    Idle,
}

const MAX_CRASHES: u8 = 2;
const MAX_RETRIES: u8 = 1;

/// Recovery's scripts for these records: one per probe answer, and both
/// spellings the engine may use where two are legal.
fn recovery_scripts(h: &PlanHeader, records: &[Record]) -> Vec<Actor> {
    let first = decide(h, records).unwrap_or_else(|e| panic!("[{}]: {e}", enc(records)));
    let decisions = if first == Decision::ProbePivot {
        [
            PivotSeen::Applied,
            PivotSeen::NotApplied,
            PivotSeen::Unknown("the QEMU process is gone".to_string()),
        ]
        .into_iter()
        .map(|seen| decide_after_probe(h, records, seen).unwrap())
        .collect()
    } else {
        vec![first]
    };
    let mut scripts = vec![];
    for d in decisions {
        match d {
            Decision::Nothing => scripts.push(vec![]),
            Decision::ProbePivot => panic!("ProbePivot after a probe"),
            Decision::NeedsAttention(_) => scripts.push(vec!["FN".to_string()]),
            Decision::RollBack {
                undo,
                already_rolling_back,
            } => {
                let mut s = vec![];
                if !already_rolling_back {
                    s.push("R".to_string());
                }
                s.extend(undo.iter().map(|i| format!("U{i}")));
                s.push("FR".to_string());
                if undo.is_empty() && !already_rolling_back {
                    scripts.push(vec!["FR".to_string()]);
                }
                scripts.push(s);
            }
            Decision::RollForward { from } => {
                let mut s = vec![];
                for i in from..h.steps {
                    s.push(format!("S{i}"));
                    s.push(format!("D{i}"));
                }
                s.push("FC".to_string());
                if from == h.pivot {
                    // The pivot may also be completed straight after its
                    // last Started, without a new one.
                    scripts.push(s[1..].to_vec());
                }
                scripts.push(s);
            }
        }
    }
    scripts.into_iter().map(script).collect()
}

fn script(s: Vec<String>) -> Actor {
    if s.is_empty() {
        Actor::Idle
    } else {
        Actor::Script(s)
    }
}

/// The engine's own rollback after step `failed` (<= pivot) failed.
fn engine_rollback(h: &PlanHeader, failed: u32) -> Actor {
    let mut s = vec!["R".to_string()];
    s.extend(
        (0..=failed)
            .rev()
            .filter(|&i| i != h.pivot)
            .map(|i| format!("U{i}")),
    );
    s.push("FR".to_string());
    script(s)
}

/// `(record written, if any; who writes next)` for every way on.
fn moves(h: &PlanHeader, actor: &Actor) -> Vec<(Option<Record>, Actor)> {
    let give_up = (
        Some(Record::Finished(Outcome::NeedsAttention(
            "gave up".to_string(),
        ))),
        Actor::Idle,
    );
    match actor {
        Actor::Idle => vec![],
        Actor::Script(s) => {
            let rest = script(s[1..].to_vec());
            vec![(Some(recs(&s[0]).remove(0)), rest), give_up]
        }
        Actor::Engine { next, .. } if *next == h.steps => {
            vec![(Some(Record::Finished(Outcome::Committed)), Actor::Idle)]
        }
        Actor::Engine {
            next,
            started: false,
            ..
        } => vec![(
            Some(Record::Started(*next)),
            Actor::Engine {
                next: *next,
                started: true,
                retries: 0,
            },
        )],
        Actor::Engine {
            next,
            started: true,
            retries,
        } => {
            let next = *next;
            let mut v = vec![(
                Some(Record::Done(next)),
                Actor::Engine {
                    next: next + 1,
                    started: false,
                    retries: 0,
                },
            )];
            if next <= h.pivot {
                // A compensatable step failed, or the pivot failed cleanly.
                v.push((None, engine_rollback(h, next)));
            } else if *retries < MAX_RETRIES {
                v.push((
                    Some(Record::Started(next)),
                    Actor::Engine {
                        next,
                        started: true,
                        retries: retries + 1,
                    },
                ));
            }
            v.push(give_up);
            v
        }
    }
}

/// Checks that hold for every sequence the system can produce.
fn check_sequence(h: &PlanHeader, records: &[Record]) -> Decision {
    let ctx = || format!("steps {}, pivot {}, [{}]", h.steps, h.pivot, enc(records));
    let p = h.pivot;
    assert_eq!(validate(h, records), Ok(()), "{}", ctx());
    for k in 0..records.len() {
        assert_eq!(
            check_next(h, &records[..k], &records[k]),
            Ok(()),
            "{}",
            ctx()
        );
    }
    let has = |r: Record| records.contains(&r);
    let rolling_back = has(Record::RollingBack);
    let finished = matches!(records.last(), Some(Record::Finished(_)));
    let d = decide(h, records).unwrap_or_else(|e| panic!("{}: {e}", ctx()));
    match &d {
        Decision::Nothing => assert!(finished, "{}", ctx()),
        Decision::ProbePivot => {
            assert!(!finished && !rolling_back, "{}", ctx());
            assert!(
                has(Record::Started(p)) && !has(Record::Done(p)),
                "{}",
                ctx()
            );
            assert_eq!(
                decide_after_probe(h, records, PivotSeen::Applied),
                Ok(Decision::RollForward { from: p })
            );
            assert_eq!(
                decide_after_probe(h, records, PivotSeen::NotApplied),
                Ok(Decision::RollBack {
                    undo: (0..p).rev().collect(),
                    already_rolling_back: false
                })
            );
            let got = decide_after_probe(h, records, PivotSeen::Unknown("W!".to_string()));
            assert!(
                matches!(&got, Ok(Decision::NeedsAttention(m)) if m.contains("W!")),
                "{}: {got:?}",
                ctx()
            );
        }
        Decision::RollForward { from } => {
            assert!(!finished && !rolling_back, "{}", ctx());
            assert!(
                has(Record::Done(p)),
                "RollForward without Done(pivot): {}",
                ctx()
            );
            assert!(*from > p && *from <= h.steps, "{}", ctx());
            assert!((0..*from).all(|i| has(Record::Done(i))), "{}", ctx());
            assert!(!has(Record::Done(*from)), "{}", ctx());
        }
        Decision::RollBack {
            undo,
            already_rolling_back,
        } => {
            assert!(!finished && !has(Record::Done(p)), "{}", ctx());
            assert_eq!(*already_rolling_back, rolling_back, "{}", ctx());
            assert!(undo.windows(2).all(|w| w[0] > w[1]), "{}", ctx());
            let owed: Vec<u32> = (0..h.steps)
                .rev()
                .filter(|&i| i != p && has(Record::Started(i)) && !has(Record::Undone(i)))
                .collect();
            assert_eq!(*undo, owed, "{}", ctx());
        }
        Decision::NeedsAttention(_) => panic!("decide alone never needs attention: {}", ctx()),
    }
    d
}

/// Checks on a finished execution.
fn check_end(h: &PlanHeader, records: &[Record]) {
    let has = |r: Record| records.contains(&r);
    let ctx = || format!("steps {}, pivot {}, [{}]", h.steps, h.pivot, enc(records));
    match records.last() {
        Some(Record::Finished(Outcome::Committed)) => {
            assert!((0..h.steps).all(|i| has(Record::Done(i))), "{}", ctx());
            assert!(!has(Record::RollingBack), "{}", ctx());
        }
        Some(Record::Finished(Outcome::RolledBack)) => {
            assert!(!has(Record::Done(h.pivot)), "{}", ctx());
            for i in 0..h.steps {
                if i != h.pivot && has(Record::Started(i)) {
                    assert!(has(Record::Undone(i)), "{}", ctx());
                }
            }
        }
        Some(Record::Finished(Outcome::NeedsAttention(_))) => {}
        _ => panic!("execution ended unfinished: {}", ctx()),
    }
    assert_eq!(decide(h, records), Ok(Decision::Nothing), "{}", ctx());
}

#[test]
fn exhaustive_executions_of_a_five_step_plan() {
    let steps = 5;
    let mut total_sequences = 0usize;
    let mut total_ends = 0usize;
    for pivot in 0..steps {
        let h = header(steps, pivot);
        let start = (
            Vec::<Record>::new(),
            Actor::Engine {
                next: 0,
                started: false,
                retries: 0,
            },
            0u8,
        );
        let mut seen_states = HashSet::new();
        let mut sequences = HashSet::new();
        let mut ends = HashSet::new();
        let mut decisions = BTreeSet::new();
        let mut outcomes = BTreeSet::new();
        let mut stack = vec![start];
        while let Some((records, actor, crashes)) = stack.pop() {
            if !seen_states.insert((enc(&records), actor.clone(), crashes)) {
                continue;
            }
            if sequences.insert(enc(&records)) {
                let d = check_sequence(&h, &records);
                decisions.insert(
                    format!("{d:?}")
                        .split([' ', '('])
                        .next()
                        .unwrap()
                        .to_string(),
                );
            }
            if actor == Actor::Idle {
                check_end(&h, &records);
                outcomes.insert(enc(&records[records.len() - 1..]));
                ends.insert(enc(&records));
                continue;
            }
            for (record, next) in moves(&h, &actor) {
                let mut r = records.clone();
                r.extend(record);
                stack.push((r, next, crashes));
            }
            // A crash here, then recovery (again and again).
            let unfinished = !matches!(records.last(), Some(Record::Finished(_)));
            if unfinished && crashes < MAX_CRASHES {
                for next in recovery_scripts(&h, &records) {
                    stack.push((records.clone(), next, crashes + 1));
                }
            }
        }
        // Every kind of decision and ending was reached.
        for kind in ["Nothing", "ProbePivot", "RollBack", "RollForward"] {
            assert!(
                decisions.contains(kind),
                "pivot {pivot}: no {kind}: {decisions:?}"
            );
        }
        for kind in ["FC", "FR", "FN"] {
            assert!(outcomes.contains(kind), "pivot {pivot}: no {kind}");
        }
        total_sequences += sequences.len();
        total_ends += ends.len();
    }
    assert!(total_sequences > 1_000, "{total_sequences}");
    assert!(total_ends > 500, "{total_ends}");
}
