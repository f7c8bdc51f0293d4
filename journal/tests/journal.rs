//! Journal behaviour through the public API, across close and reopen.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use vsnap_journal::*;

fn header(op: &str, steps: u32, pivot: u32) -> PlanHeader {
    PlanHeader {
        op: op.into(),
        summary: format!("{op} summary"),
        steps,
        pivot,
        created_unix: 1_700_000_000,
    }
}

fn put(tree: &str, key: &[u8], value: &str) -> CatalogOp {
    CatalogOp::Put {
        tree: tree.into(),
        key: key.to_vec(),
        value: codec::encode(&value.to_string()),
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (a, b, c);
    {
        let j = Journal::open(&state).unwrap();
        assert_eq!(j.state_dir(), state);
        a = j.begin(header("a", 3, 1), b"body a".to_vec()).unwrap();
        b = j.begin(header("b", 2, 0), vec![0xff; 10_000]).unwrap();
        c = j.begin(header("c", 1, 0), vec![]).unwrap();
        assert!(a < b && b < c);
        for r in [Record::Started(0), Record::Done(0), Record::Started(1)] {
            j.append(a, r).unwrap();
        }
        j.append(b, Record::Started(0)).unwrap();
        j.append(b, Record::RollingBack).unwrap();
        j.append(b, Record::Undone(0)).unwrap();
        j.append(b, Record::Finished(Outcome::RolledBack)).unwrap();
        j.append(
            c,
            Record::Finished(Outcome::NeedsAttention("look at /vm/x".into())),
        )
        .unwrap();
        // Interleaved with an older plan: a's record after c's.
        j.append(a, Record::Done(1)).unwrap();
    }
    let j = Journal::open(&state).unwrap();
    let plans = j.plans().unwrap();
    assert_eq!(
        plans.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![a, b, c]
    );
    let pa = j.plan(a).unwrap();
    assert_eq!(pa.header, header("a", 3, 1));
    assert_eq!(pa.body, b"body a");
    assert_eq!(
        pa.records,
        vec![
            Record::Started(0),
            Record::Done(0),
            Record::Started(1),
            Record::Done(1)
        ]
    );
    assert_eq!(pa.outcome(), None);
    let pb = j.plan(b).unwrap();
    assert_eq!(pb.body, vec![0xff; 10_000]);
    assert_eq!(pb.outcome(), Some(&Outcome::RolledBack));
    assert_eq!(
        j.plan(c).unwrap().outcome(),
        Some(&Outcome::NeedsAttention("look at /vm/x".into()))
    );
    assert_eq!(
        j.unfinished()
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        vec![a]
    );
    // Appending after a restart keeps the order, and ids keep growing.
    j.append(a, Record::Started(2)).unwrap();
    j.append(a, Record::Done(2)).unwrap();
    j.append(a, Record::Finished(Outcome::Committed)).unwrap();
    let d = j.begin(header("d", 1, 0), vec![]).unwrap();
    assert!(d > c);
    assert_eq!(j.plan(a).unwrap().records.len(), 7);
    assert_eq!(
        j.plan(a).unwrap().records[4..],
        [
            Record::Started(2),
            Record::Done(2),
            Record::Finished(Outcome::Committed)
        ]
    );
    assert_eq!(
        j.unfinished()
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        vec![d]
    );
    drop(j);
    let j = Journal::open(&state).unwrap();
    assert!(j.begin(header("e", 1, 0), vec![]).unwrap() > d);
}

#[test]
fn plan_ids_increase_across_many_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = PlanId(0);
    for _ in 0..5 {
        let j = Journal::open(dir.path()).unwrap();
        for _ in 0..3 {
            let id = j.begin(header("x", 1, 0), vec![]).unwrap();
            assert!(id > last);
            last = id;
        }
    }
}

#[test]
fn commit_pivot_writes_record_and_catalog_together() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let j = Journal::open(dir.path()).unwrap();
        j.catalog_apply(&[
            put("volumes", b"/vm/a", "old"),
            put("volumes", b"/vm/gone", "x"),
        ])
        .unwrap();
        id = j.begin(header("pivot", 3, 1), vec![1]).unwrap();
        j.append(id, Record::Started(0)).unwrap();
        j.append(id, Record::Done(0)).unwrap();
        j.append(id, Record::Started(1)).unwrap();
        j.commit_pivot(
            id,
            1,
            &[
                put("volumes", b"/vm/a", "new"),
                put("volsnaps", b"/vm/a\0s1", "snap"),
                CatalogOp::Delete {
                    tree: "volumes".into(),
                    key: b"/vm/gone".to_vec(),
                },
            ],
        )
        .unwrap();
        // Visible at once.
        assert_eq!(j.plan(id).unwrap().records.last(), Some(&Record::Done(1)));
        assert_eq!(
            j.catalog_get("volumes", b"/vm/a").unwrap(),
            Some(codec::encode(&"new".to_string()))
        );
    }
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.plan(id).unwrap().records.last(), Some(&Record::Done(1)));
    assert_eq!(
        j.catalog_get("volumes", b"/vm/a").unwrap(),
        Some(codec::encode(&"new".to_string()))
    );
    assert_eq!(
        j.catalog_get("volsnaps", b"/vm/a\0s1").unwrap(),
        Some(codec::encode(&"snap".to_string()))
    );
    assert_eq!(j.catalog_get("volumes", b"/vm/gone").unwrap(), None);
    // A catalog tree named like a journal tree does not clash with it.
    j.catalog_apply(&[put("records", b"k", "v"), put("plans", b"k", "v")])
        .unwrap();
    assert_eq!(j.plans().unwrap().len(), 1);
    assert_eq!(j.catalog_scan("plans", b"").unwrap().len(), 1);
}

#[test]
fn catalog_scan_prefix_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    j.catalog_apply(&[
        put("snaps", b"vm2/b", "4"),
        put("snaps", b"vm1/c", "3"),
        put("snaps", b"vm1/a", "1"),
        put("snaps", b"vm10/z", "x"),
        put("snaps", b"vm1/b", "2"),
        put("other", b"vm1/a", "y"),
    ])
    .unwrap();
    let scan = j.catalog_scan("snaps", b"vm1/").unwrap();
    let keys: Vec<_> = scan.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, vec![&b"vm1/a"[..], b"vm1/b", b"vm1/c"]);
    let values: Vec<String> = scan
        .iter()
        .map(|(_, v)| codec::decode(v).unwrap())
        .collect();
    assert_eq!(values, vec!["1", "2", "3"]);
    assert_eq!(j.catalog_scan("snaps", b"").unwrap().len(), 5);
    assert_eq!(j.catalog_scan("snaps", b"vm3").unwrap(), vec![]);
    assert_eq!(j.catalog_scan("never-written", b"").unwrap(), vec![]);
    assert_eq!(j.catalog_get("never-written", b"k").unwrap(), None);
}

#[test]
fn catalog_values_must_be_codec_envelopes() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let bad = CatalogOp::Put {
        tree: "t".into(),
        key: b"k".to_vec(),
        value: b"raw".to_vec(),
    };
    assert!(matches!(
        j.catalog_apply(&[put("t", b"ok", "v"), bad.clone()]),
        Err(JournalError::Transaction(_))
    ));
    // Nothing of the refused transaction was written.
    assert_eq!(j.catalog_get("t", b"ok").unwrap(), None);
    let id = j.begin(header("p", 1, 0), vec![]).unwrap();
    assert!(matches!(
        j.commit_pivot(id, 0, &[bad]),
        Err(JournalError::Transaction(_))
    ));
    assert_eq!(j.plan(id).unwrap().records, vec![]);
}

#[test]
fn thirty_two_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    const THREADS: u32 = 32;
    const RECORDS: u32 = 25;
    let ids: Vec<PlanId>;
    {
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    let id = j
                        .begin(
                            header(&format!("t{t}"), RECORDS, 0),
                            vec![t as u8; t as usize],
                        )
                        .unwrap();
                    for i in 0..RECORDS {
                        j.append(id, Record::Done(i)).unwrap();
                    }
                    j.commit_pivot(id, RECORDS, &[put("c", format!("t{t:02}").as_bytes(), "v")])
                        .unwrap();
                    id
                })
            })
            .collect();
        ids = threads.into_iter().map(|t| t.join().unwrap()).collect();
    }
    let j = Journal::open(dir.path()).unwrap();
    let plans = j.plans().unwrap();
    assert_eq!(plans.len(), THREADS as usize);
    for (t, id) in ids.iter().enumerate() {
        let p = j.plan(*id).unwrap();
        assert_eq!(p.header.op, format!("t{t}"));
        assert_eq!(p.body, vec![t as u8; t]);
        let want: Vec<Record> = (0..=RECORDS).map(Record::Done).collect();
        assert_eq!(p.records, want);
    }
    assert_eq!(j.catalog_scan("c", b"t").unwrap().len(), THREADS as usize);
}

#[test]
fn no_such_plan() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    assert!(matches!(
        j.plan(PlanId(7)),
        Err(JournalError::NoSuchPlan(PlanId(7)))
    ));
    assert!(matches!(
        j.append(PlanId(7), Record::Started(0)),
        Err(JournalError::NoSuchPlan(PlanId(7)))
    ));
    assert!(matches!(
        j.commit_pivot(PlanId(7), 0, &[]),
        Err(JournalError::NoSuchPlan(PlanId(7)))
    ));
}

#[test]
fn closed_journal_refuses_writes_but_reads() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let id = j.begin(header("p", 1, 0), vec![]).unwrap();
    j.close();
    assert!(matches!(
        j.append(id, Record::Started(0)),
        Err(JournalError::Closed)
    ));
    assert!(matches!(
        j.begin(header("q", 1, 0), vec![]),
        Err(JournalError::Closed)
    ));
    assert!(matches!(
        j.catalog_apply(&[put("t", b"k", "v")]),
        Err(JournalError::Closed)
    ));
    assert_eq!(j.plans().unwrap().len(), 1);
}

#[test]
fn second_open_is_locked_with_our_pid() {
    let dir = tempfile::tempdir().unwrap();
    let _j = Journal::open(dir.path()).unwrap();
    match Journal::open(dir.path()) {
        Err(JournalError::Locked { pid, lock, .. }) => {
            assert_eq!(pid, std::process::id().to_string());
            assert_eq!(lock, dir.path().join("lock"));
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("opened twice"),
    }
}

#[test]
fn state_dir_mode_0700() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a/b/state");
    drop(Journal::open(&state).unwrap());
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("lock")), 0o600);
    // An existing empty directory that others may read is used as it
    // is: vsnap never changes the mode of a directory it did not create.
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Journal::open(&loose).unwrap());
    assert_eq!(mode(&loose), 0o755);
    // A file where the directory should be is an error, not a panic.
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    assert!(matches!(
        Journal::open(&file),
        Err(JournalError::StateDirRefused { .. })
    ));
}

/// Damage the database behind a closed journal with sled directly.
fn damage(state: &Path, tree: &str, f: impl FnOnce(&sled::Tree)) {
    // A journal's segment size (sled refuses to open it with another).
    let db = sled::Config::new()
        .path(state.join("db"))
        .segment_size(64 * 1024)
        .open()
        .unwrap();
    f(&db.open_tree(tree).unwrap());
    db.flush().unwrap();
}

#[test]
fn damaged_record_is_a_corrupt_error_naming_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad);
    {
        let j = Journal::open(dir.path()).unwrap();
        good = j.begin(header("good", 1, 0), vec![]).unwrap();
        bad = j.begin(header("bad", 2, 0), vec![]).unwrap();
        j.append(good, Record::Started(0)).unwrap();
        j.append(bad, Record::Started(0)).unwrap();
        j.append(bad, Record::Done(0)).unwrap();
    }
    // Flip one payload bit of bad's second record.
    damage(dir.path(), "records", |t| {
        let (k, v) = t.scan_prefix(bad.0.to_be_bytes()).nth(1).unwrap().unwrap();
        let mut v = v.to_vec();
        *v.last_mut().unwrap() ^= 1;
        t.insert(k, v).unwrap();
    });
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.plan(good).unwrap().records, vec![Record::Started(0)]);
    for r in [
        j.plan(bad).map(drop),
        j.plans().map(drop),
        j.unfinished().map(drop),
    ] {
        match r {
            Err(e @ JournalError::Corrupt { plan, .. }) => {
                assert_eq!(plan, bad);
                assert!(e.to_string().contains("checksum"), "{e}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    drop(j);
    // A plan header replaced by garbage.
    damage(dir.path(), "plans", |t| {
        t.insert(good.0.to_be_bytes(), &b"garbage"[..]).unwrap();
    });
    let j = Journal::open(dir.path()).unwrap();
    match j.plan(good) {
        Err(JournalError::Corrupt { plan, what, reason }) => {
            assert_eq!((plan, what.as_str()), (good, "plan header"));
            assert!(reason.contains("magic"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn damaged_catalog_value_is_corrupt_catalog() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(dir.path()).unwrap();
        j.catalog_apply(&[put("volumes", b"/vm/a", "a"), put("volumes", b"/vm/b", "b")])
            .unwrap();
    }
    damage(dir.path(), "cat/volumes", |t| {
        let mut v = t.get(b"/vm/b").unwrap().unwrap().to_vec();
        v.truncate(v.len() - 1);
        t.insert(b"/vm/b", v).unwrap();
    });
    let j = Journal::open(dir.path()).unwrap();
    assert!(j.catalog_get("volumes", b"/vm/a").unwrap().is_some());
    for r in [
        j.catalog_get("volumes", b"/vm/b").map(drop),
        j.catalog_scan("volumes", b"/vm/").map(drop),
    ] {
        match r {
            Err(JournalError::CorruptCatalog { tree, key, reason }) => {
                assert_eq!((tree.as_str(), key.as_str()), ("volumes", "/vm/b"));
                assert!(reason.contains("length"), "{reason}");
            }
            other => panic!("expected CorruptCatalog, got {other:?}"),
        }
    }
}

#[test]
fn large_bodies_round_trip() {
    // Values this large are kept by sled as separate blob files, which the
    // journal fsyncs itself.
    let dir = tempfile::tempdir().unwrap();
    let bodies: Vec<Vec<u8>> = [0usize, 1, 200_000, 1 << 20]
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
        .collect();
    let mut ids = Vec::new();
    {
        let j = Journal::open(dir.path()).unwrap();
        for b in &bodies {
            ids.push(j.begin(header("big", 1, 0), b.clone()).unwrap());
        }
    }
    assert!(
        std::fs::read_dir(dir.path().join("db/blobs"))
            .unwrap()
            .count()
            > 0,
        "no blob was written"
    );
    let j = Journal::open(dir.path()).unwrap();
    for (id, b) in ids.iter().zip(&bodies) {
        assert_eq!(&j.plan(*id).unwrap().body, b);
    }
}

#[test]
fn records_without_a_plan_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let id;
    {
        let j = Journal::open(dir.path()).unwrap();
        id = j.begin(header("p", 1, 0), vec![]).unwrap();
        j.append(id, Record::Started(0)).unwrap();
    }
    let orphan = PlanId(id.0 + 5);
    damage(dir.path(), "records", |t| {
        let mut k = orphan.0.to_be_bytes().to_vec();
        k.extend_from_slice(&1u64.to_be_bytes());
        t.insert(k, codec::encode(&Record::Started(0))).unwrap();
    });
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.plan(id).unwrap().records, vec![Record::Started(0)]);
    match j.plans() {
        Err(JournalError::Corrupt { plan, .. }) => assert_eq!(plan, orphan),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn close_and_reopen_at_once_many_times() {
    // sled can hold its own file lock a moment after it is dropped (a
    // background task of its recovery); open waits for it.
    let dir = tempfile::tempdir().unwrap();
    let id = Journal::open(dir.path())
        .unwrap()
        .begin(header("p", 1, 0), vec![])
        .unwrap();
    for i in 0..40 {
        let j = Journal::open(dir.path()).unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        j.append(id, Record::Started(i)).unwrap();
    }
    assert_eq!(
        Journal::open(dir.path())
            .unwrap()
            .plan(id)
            .unwrap()
            .records
            .len(),
        40
    );
}

/// Batches: a plan with its first records, and several records with
/// catalog changes and `Finished`, each in one transaction, read back in
/// order after a reopen; a finished batch takes the plan off `unfinished`.
#[test]
fn batches_are_written_in_order_and_together() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (a, b);
    {
        let j = Journal::open(&state).unwrap();
        a = j
            .begin_with(header("a", 3, 2), b"a".to_vec(), &[Record::Started(0)], &[])
            .unwrap();
        j.append_all(a, &[Record::Done(0), Record::Started(1)], &[])
            .unwrap();
        b = j.begin_with(header("b", 1, 0), vec![], &[], &[]).unwrap();
        // A plan whose only step is a no-op pivot: all of it at once.
        let whole = j
            .begin_with(
                header("w", 1, 0),
                vec![],
                &[
                    Record::Started(0),
                    Record::Done(0),
                    Record::Finished(Outcome::Committed),
                ],
                &[put("cat", b"w", "whole")],
            )
            .unwrap();
        assert_eq!(j.plan(whole).unwrap().outcome(), Some(&Outcome::Committed));
        assert_eq!(
            j.catalog_get("cat", b"w").unwrap(),
            Some(codec::encode(&"whole".to_string()))
        );
        j.append_all(
            a,
            &[
                Record::Done(1),
                Record::Started(2),
                Record::Done(2),
                Record::Finished(Outcome::Committed),
            ],
            &[put("cat", b"k", "v")],
        )
        .unwrap();
        assert_eq!(
            j.unfinished()
                .unwrap()
                .iter()
                .map(|p| p.id)
                .collect::<Vec<_>>(),
            vec![b]
        );
        assert!(matches!(
            j.append_all(PlanId(99), &[Record::Started(0), Record::Done(0)], &[]),
            Err(JournalError::NoSuchPlan(_))
        ));
    }
    let j = Journal::open(&state).unwrap();
    let pa = j.plan(a).unwrap();
    assert_eq!(
        pa.records,
        vec![
            Record::Started(0),
            Record::Done(0),
            Record::Started(1),
            Record::Done(1),
            Record::Started(2),
            Record::Done(2),
            Record::Finished(Outcome::Committed)
        ]
    );
    assert_eq!(pa.body, b"a");
    assert!(j.plan(b).unwrap().records.is_empty());
    assert_eq!(
        j.catalog_get("cat", b"k").unwrap(),
        Some(codec::encode(&"v".to_string()))
    );
    assert_eq!(
        j.unfinished()
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        vec![b]
    );
}

/// `unfinished` reads the `active` index: finished plans leave it in the
/// same transaction as their `Finished`; a journal written before the
/// index existed (no `meta` mark, no `active` tree) gets it built at open.
#[test]
fn active_index_tracks_unfinished_plans_and_is_built_for_old_journals() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (done, open1, open2);
    {
        let j = Journal::open(&state).unwrap();
        open1 = j.begin(header("a", 1, 0), vec![]).unwrap();
        done = j
            .begin_with(header("b", 1, 0), vec![], &[Record::Started(0)], &[])
            .unwrap();
        j.append_all(
            done,
            &[Record::Done(0), Record::Finished(Outcome::Committed)],
            &[],
        )
        .unwrap();
        open2 = j
            .begin_with(header("c", 2, 1), vec![], &[Record::Started(0)], &[])
            .unwrap();
        for _ in 0..50 {
            let id = j.begin(header("x", 1, 0), vec![]).unwrap();
            j.append(id, Record::Finished(Outcome::RolledBack)).unwrap();
        }
        let ids: Vec<_> = j.unfinished().unwrap().iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![open1, open2]);
    }
    // As an older vsnap left it: no index, no mark.
    damage(&state, "active", |t| t.clear().unwrap());
    damage(&state, "meta", |t| t.clear().unwrap());
    let j = Journal::open(&state).unwrap();
    let ids: Vec<_> = j.unfinished().unwrap().iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![open1, open2]);
    j.append(open1, Record::Finished(Outcome::RolledBack))
        .unwrap();
    drop(j);
    let j = Journal::open(&state).unwrap();
    let ids: Vec<_> = j.unfinished().unwrap().iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![open2]);
}

/// New journals use 64 KiB log segments; a database sled made with its
/// default (512 KiB, as every journal before this change) still opens,
/// with its records.
#[test]
fn segment_size_new_and_existing() {
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new");
    drop(Journal::open(&new).unwrap());
    let conf = std::fs::read(new.join("db/conf")).unwrap();
    assert!(
        String::from_utf8_lossy(&conf).contains("segment_size: 65536"),
        "{}",
        String::from_utf8_lossy(&conf)
    );

    let old = dir.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    {
        let db = sled::open(old.join("db")).unwrap();
        db.flush().unwrap();
    }
    let id = {
        let j = Journal::open(&old).unwrap();
        let id = j.begin(header("a", 1, 0), b"x".to_vec()).unwrap();
        j.append(id, Record::Started(0)).unwrap();
        id
    };
    let conf = std::fs::read(old.join("db/conf")).unwrap();
    assert!(String::from_utf8_lossy(&conf).contains("segment_size: 524288"));
    let j = Journal::open(&old).unwrap();
    assert_eq!(j.plan(id).unwrap().records, vec![Record::Started(0)]);
}

/// A journal sled cannot read (here: its snapshot file damaged, so that
/// its checksum fails) is named as such, with the state directory, the
/// database and what to do; and what the message says to do works.
#[test]
fn damaged_journal_says_where_it_is_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let j = Journal::open(&state).unwrap();
        j.catalog_apply(&[put("t", b"k", "v")]).unwrap();
    }
    // sled writes its snapshot file at the next open.
    drop(Journal::open(&state).unwrap());
    let db = state.join("db");
    let snap = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("snap.")
        })
        .expect("sled writes a snapshot file at open");
    let mut bytes = std::fs::read(&snap).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&snap, bytes).unwrap();

    let err = Journal::open(&state)
        .err()
        .expect("a damaged journal does not open");
    assert!(matches!(err, JournalError::Damaged { .. }), "{err:?}");
    let msg = err.to_string();
    for words in [
        &format!("state directory {} is damaged", state.display()),
        &format!("cp -a {} {}.copy", state.display(), state.display()),
        &format!("mv {} {}.damaged", db.display(), db.display()),
    ] {
        assert!(msg.contains(words.as_str()), "{words:?} not in: {msg}");
    }
    assert!(!msg.contains("backtrace"), "{msg}");

    // The advice: move the database aside, start afresh.
    std::fs::rename(&db, state.join("db.damaged")).unwrap();
    let j = Journal::open(&state).unwrap();
    assert!(j.plans().unwrap().is_empty());
    assert_eq!(j.catalog_get("t", b"k").unwrap(), None);
}
