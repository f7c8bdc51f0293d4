//! Group commit: many writers share one flush.
//!
//! Loom model of this module (the same code, on loom's primitives):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p vsnap-journal --release --target-dir target/loom --lib loom
//! ```
//!
//! Writers hand their operation to **one** flusher thread through a channel
//! and wait on a private one-shot reply. The flusher takes one request
//! (blocking), then everything else already queued (`try_recv` until
//! empty), applies every operation of the batch to the [`Sink`], flushes the
//! sink **once**, and only then replies to every writer of the batch. So no
//! writer is acknowledged before the flush that covers its operation, and a
//! writer waits for the flush that covers it, not for one of its own.
//!
//! Shutdown ([`GroupCommit::close`], also run on drop) drops the sending
//! side; the flusher drains and answers every request still queued, sees
//! the channel disconnected, and exits; `close` joins it. A writer that
//! comes after `close` gets [`CommitError::Closed`] and its operation is
//! never applied. An error of the sink is delivered to every writer of the
//! batch it hit (an `apply` error only to the writer of that operation, a
//! `flush` error to all).
//!
//! The logic here is generic over the [`Sink`] and built on the tiny
//! [`sync`] layer: crossbeam-channel and std in normal builds, loom's
//! `Mutex`/`Condvar`/`Arc`/`thread` under `--cfg loom`, so the code loom
//! checks is the code that runs.

/// Where the batches go (sled in [`crate::Journal`], a model under loom).
pub(crate) trait Sink: Send + 'static {
    type Op: Send + 'static;
    type Error: Clone + Send + 'static;
    /// Apply one operation (not yet durable).
    fn apply(&mut self, op: &Self::Op) -> Result<(), Self::Error>;
    /// Make every operation applied so far durable.
    fn flush(&mut self) -> Result<(), Self::Error>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CommitError<E> {
    /// The group commit is closed (or its flusher is gone); the operation
    /// was not applied.
    Closed,
    /// The sink failed on the batch of this operation.
    Sink(E),
    /// The flusher stopped (a panic in the sink) after taking the
    /// operation and before answering: whether it was applied, even made
    /// durable, is unknown.
    Abandoned,
}

/// Most requests one batch takes, so that a flood of writers cannot delay
/// the first one's flush without bound.
const MAX_BATCH: usize = 4096;

type Reply<E> = Result<(), CommitError<E>>;

struct Request<S: Sink> {
    op: S::Op,
    reply: sync::oneshot::Sender<Reply<S::Error>>,
}

pub(crate) struct GroupCommit<S: Sink> {
    tx: sync::Mutex<Option<sync::chan::Sender<Request<S>>>>,
    flusher: sync::Mutex<Option<sync::thread::JoinHandle<()>>>,
}

impl<S: Sink> GroupCommit<S> {
    /// Start the flusher thread, which owns `sink`.
    pub(crate) fn start(sink: S) -> Self {
        let (tx, rx) = sync::chan::unbounded();
        let flusher = sync::thread::spawn(move || flusher(sink, rx));
        GroupCommit {
            tx: sync::Mutex::new(Some(tx)),
            flusher: sync::Mutex::new(Some(flusher)),
        }
    }

    /// Hand `op` to the flusher and wait until the flush covering it is
    /// done (or failed).
    pub(crate) fn submit(&self, op: S::Op) -> Reply<S::Error> {
        let (reply, wait) = sync::oneshot::channel();
        {
            let tx = sync::lock(&self.tx);
            let Some(tx) = tx.as_ref() else {
                return Err(CommitError::Closed);
            };
            if tx.send(Request { op, reply }).is_err() {
                // The flusher is gone (it panicked): nothing will apply it.
                return Err(CommitError::Closed);
            }
        }
        // `None`: the flusher dropped our reply without answering, which
        // only a panic in the sink does.
        wait.recv().unwrap_or(Err(CommitError::Abandoned))
    }

    /// Stop taking requests, let the flusher answer every queued one, and
    /// join it. Idempotent.
    pub(crate) fn close(&self) {
        drop(sync::lock(&self.tx).take());
        let handle = sync::lock(&self.flusher).take();
        if let Some(handle) = handle {
            // A panic of the flusher was already reported to its writers.
            let _ = handle.join();
        }
    }
}

impl<S: Sink> Drop for GroupCommit<S> {
    fn drop(&mut self) {
        self.close();
    }
}

fn flusher<S: Sink>(mut sink: S, rx: sync::chan::Receiver<Request<S>>) {
    let mut batch: Vec<Request<S>> = Vec::new();
    let mut applied: Vec<Result<(), S::Error>> = Vec::new();
    while let Some(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Some(req) => batch.push(req),
                None => break,
            }
        }
        applied.extend(batch.iter().map(|req| sink.apply(&req.op)));
        let flushed = sink.flush();
        crate::failpoint::hit("journal.flushed");
        for (req, res) in batch.drain(..).zip(applied.drain(..)) {
            let reply = match (res, &flushed) {
                (Err(e), _) => Err(CommitError::Sink(e)),
                (Ok(()), Err(e)) => Err(CommitError::Sink(e.clone())),
                (Ok(()), Ok(())) => Ok(()),
            };
            req.reply.send(reply);
        }
    }
}

/// The synchronization layer: std + crossbeam-channel normally, loom's
/// primitives under `--cfg loom`. Same interface both ways.
#[cfg(not(loom))]
mod sync {
    pub(crate) use std::sync::Mutex;
    pub(crate) use std::thread;

    pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Multi-producer, single-consumer, unbounded.
    pub(crate) mod chan {
        pub(crate) struct Sender<T>(crossbeam_channel::Sender<T>);
        pub(crate) struct Receiver<T>(crossbeam_channel::Receiver<T>);

        pub(crate) fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
            let (tx, rx) = crossbeam_channel::unbounded();
            (Sender(tx), Receiver(rx))
        }

        impl<T> Sender<T> {
            /// `Err(value)` once the receiver is gone.
            pub(crate) fn send(&self, value: T) -> Result<(), T> {
                self.0.send(value).map_err(|e| e.into_inner())
            }
        }

        impl<T> Receiver<T> {
            /// Blocks; `None` once every sender is gone and the queue is empty.
            pub(crate) fn recv(&self) -> Option<T> {
                self.0.recv().ok()
            }
            /// `None` when nothing is queued right now.
            pub(crate) fn try_recv(&self) -> Option<T> {
                self.0.try_recv().ok()
            }
        }
    }

    /// One reply from the flusher to one writer.
    pub(crate) mod oneshot {
        pub(crate) struct Sender<T>(crossbeam_channel::Sender<T>);
        pub(crate) struct Receiver<T>(crossbeam_channel::Receiver<T>);

        pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
            let (tx, rx) = crossbeam_channel::bounded(1);
            (Sender(tx), Receiver(rx))
        }

        impl<T> Sender<T> {
            pub(crate) fn send(self, value: T) {
                // The one slot is free: this never blocks. A writer that
                // is gone (cannot happen: it waits) just misses the reply.
                let _ = self.0.send(value);
            }
        }

        impl<T> Receiver<T> {
            /// `None` if the sender was dropped without sending.
            pub(crate) fn recv(self) -> Option<T> {
                self.0.recv().ok()
            }
        }
    }
}

#[cfg(loom)]
mod sync {
    pub(crate) use loom::sync::Mutex;
    pub(crate) use loom::thread;

    pub(crate) fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) mod chan {
        use super::lock;
        use loom::sync::{Arc, Condvar, Mutex};
        use std::collections::VecDeque;

        struct State<T> {
            queue: VecDeque<T>,
            senders: usize,
            receiver: bool,
        }

        struct Shared<T> {
            state: Mutex<State<T>>,
            ready: Condvar,
        }

        pub(crate) struct Sender<T>(Arc<Shared<T>>);
        pub(crate) struct Receiver<T>(Arc<Shared<T>>);

        pub(crate) fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
            let shared = Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    senders: 1,
                    receiver: true,
                }),
                ready: Condvar::new(),
            });
            (Sender(shared.clone()), Receiver(shared))
        }

        impl<T> Sender<T> {
            pub(crate) fn send(&self, value: T) -> Result<(), T> {
                let mut st = lock(&self.0.state);
                if !st.receiver {
                    return Err(value);
                }
                st.queue.push_back(value);
                drop(st);
                self.0.ready.notify_one();
                Ok(())
            }
        }

        impl<T> Drop for Sender<T> {
            fn drop(&mut self) {
                let mut st = lock(&self.0.state);
                st.senders -= 1;
                let last = st.senders == 0;
                drop(st);
                if last {
                    self.0.ready.notify_all();
                }
            }
        }

        impl<T> Receiver<T> {
            pub(crate) fn recv(&self) -> Option<T> {
                let mut st = lock(&self.0.state);
                loop {
                    if let Some(v) = st.queue.pop_front() {
                        return Some(v);
                    }
                    if st.senders == 0 {
                        return None;
                    }
                    st = self.0.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            pub(crate) fn try_recv(&self) -> Option<T> {
                lock(&self.0.state).queue.pop_front()
            }
        }

        impl<T> Drop for Receiver<T> {
            fn drop(&mut self) {
                // Like crossbeam: queued messages are dropped with the
                // receiver (outside the lock: dropping them may notify).
                let mut st = lock(&self.0.state);
                st.receiver = false;
                let queued = std::mem::take(&mut st.queue);
                drop(st);
                drop(queued);
            }
        }
    }

    pub(crate) mod oneshot {
        use super::lock;
        use loom::sync::{Arc, Condvar, Mutex};

        struct Slot<T> {
            value: Option<T>,
            sender: bool,
        }

        struct Shared<T> {
            slot: Mutex<Slot<T>>,
            ready: Condvar,
        }

        pub(crate) struct Sender<T>(Arc<Shared<T>>);
        pub(crate) struct Receiver<T>(Arc<Shared<T>>);

        pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
            let shared = Arc::new(Shared {
                slot: Mutex::new(Slot {
                    value: None,
                    sender: true,
                }),
                ready: Condvar::new(),
            });
            (Sender(shared.clone()), Receiver(shared))
        }

        impl<T> Sender<T> {
            pub(crate) fn send(self, value: T) {
                lock(&self.0.slot).value = Some(value);
                // Drop wakes the receiver.
            }
        }

        impl<T> Drop for Sender<T> {
            fn drop(&mut self) {
                lock(&self.0.slot).sender = false;
                self.0.ready.notify_one();
            }
        }

        impl<T> Receiver<T> {
            pub(crate) fn recv(self) -> Option<T> {
                let mut slot = lock(&self.0.slot);
                loop {
                    if let Some(v) = slot.value.take() {
                        return Some(v);
                    }
                    if !slot.sender {
                        return None;
                    }
                    slot = self.0.ready.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that records what was applied and what was flushed.
    #[derive(Default)]
    struct Log {
        applied: Vec<u32>,
        durable: Vec<u32>,
        flushes: usize,
        fail_apply: Option<u32>,
        fail_flushes: usize,
    }

    struct TestSink(Arc<Mutex<Log>>, std::time::Duration);

    impl Sink for TestSink {
        type Op = u32;
        type Error = String;
        fn apply(&mut self, op: &u32) -> Result<(), String> {
            let mut log = self.0.lock().unwrap();
            if log.fail_apply == Some(*op) {
                return Err(format!("apply {op} failed"));
            }
            log.applied.push(*op);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), String> {
            std::thread::sleep(self.1);
            let mut log = self.0.lock().unwrap();
            log.flushes += 1;
            if log.fail_flushes > 0 {
                log.fail_flushes -= 1;
                return Err("flush failed".into());
            }
            let applied = std::mem::take(&mut log.applied);
            log.durable.extend(applied);
            Ok(())
        }
    }

    #[test]
    fn many_writers_share_flushes_and_are_durable_when_acked() {
        let log = std::sync::Arc::new(Mutex::new(Log::default()));
        let gc = Arc::new(GroupCommit::start(TestSink(
            log.clone(),
            std::time::Duration::from_millis(2),
        )));
        let threads: Vec<_> = (0..32u32)
            .map(|t| {
                let gc = gc.clone();
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..20u32 {
                        let op = t * 1000 + i;
                        gc.submit(op).unwrap();
                        assert!(
                            log.lock().unwrap().durable.contains(&op),
                            "op {op} acked before durable"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = log.lock().unwrap();
        assert_eq!(log.durable.len(), 640);
        assert!(
            log.flushes < 640 / 2,
            "no group commit: {} flushes for 640 ops",
            log.flushes
        );
    }

    #[test]
    fn errors_reach_the_writers_of_the_batch() {
        let log = std::sync::Arc::new(Mutex::new(Log {
            fail_apply: Some(7),
            fail_flushes: 1,
            ..Log::default()
        }));
        let gc = GroupCommit::start(TestSink(log.clone(), std::time::Duration::ZERO));
        assert_eq!(gc.submit(1), Err(CommitError::Sink("flush failed".into())));
        assert_eq!(gc.submit(2), Ok(()));
        assert_eq!(
            gc.submit(7),
            Err(CommitError::Sink("apply 7 failed".into()))
        );
        assert_eq!(gc.submit(3), Ok(()));
    }

    #[test]
    fn closed_after_close_and_queued_writers_drained() {
        let log = std::sync::Arc::new(Mutex::new(Log::default()));
        let gc = Arc::new(GroupCommit::start(TestSink(
            log.clone(),
            std::time::Duration::from_millis(20),
        )));
        let writers: Vec<_> = (0..8u32)
            .map(|i| {
                let gc = gc.clone();
                std::thread::spawn(move || gc.submit(i))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(5));
        gc.close();
        let mut ok = 0;
        for w in writers {
            match w.join().unwrap() {
                Ok(()) => ok += 1,
                Err(CommitError::Closed) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        // Every writer that got Ok is durable, and nothing else was applied.
        let log = log.lock().unwrap();
        assert_eq!(log.durable.len(), ok);
        assert!(log.applied.is_empty());
        assert_eq!(gc.submit(99), Err(CommitError::Closed));
    }

    #[test]
    fn panicking_sink_does_not_hang_writers() {
        struct Boom;
        impl Sink for Boom {
            type Op = ();
            type Error = ();
            fn apply(&mut self, _: &()) -> Result<(), ()> {
                panic!("boom (expected by the test)")
            }
            fn flush(&mut self) -> Result<(), ()> {
                Ok(())
            }
        }
        let gc = GroupCommit::start(Boom);
        assert_eq!(gc.submit(()), Err(CommitError::Abandoned));
        // Queued while the flusher unwinds (Abandoned) or after (Closed):
        // either way an answer, not a hang.
        for _ in 0..3 {
            let r = gc.submit(());
            assert!(
                matches!(r, Err(CommitError::Closed | CommitError::Abandoned)),
                "{r:?}"
            );
        }
        gc.close();
        assert_eq!(gc.submit(()), Err(CommitError::Closed));
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    // The model sink's log is test instrumentation, not logic under test:
    // a std mutex (loom runs one thread at a time and never switches inside
    // it) keeps it out of the explored interleavings.
    use std::sync::Mutex;

    /// Explore with a bounded number of preemptions (3 by default; the
    /// `LOOM_MAX_PREEMPTIONS` environment variable overrides it): bugs of
    /// this handoff need at most two, and the full space of three threads
    /// on a mutex, two condvars and a channel does not finish in minutes.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(3);
        }
        b.check(f);
    }

    #[derive(Default)]
    struct Log {
        applied: Vec<u32>,
        durable: Vec<u32>,
        fail_next_flush: bool,
    }

    struct ModelSink(std::sync::Arc<Mutex<Log>>);

    impl Sink for ModelSink {
        type Op = u32;
        type Error = ();
        fn apply(&mut self, op: &u32) -> Result<(), ()> {
            self.0.lock().unwrap().applied.push(*op);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), ()> {
            let mut log = self.0.lock().unwrap();
            if std::mem::take(&mut log.fail_next_flush) {
                return Err(());
            }
            let applied = std::mem::take(&mut log.applied);
            log.durable.extend(applied);
            Ok(())
        }
    }

    /// A writer: submit, and on Ok check the op is already durable.
    fn writer(gc: &GroupCommit<ModelSink>, log: &std::sync::Arc<Mutex<Log>>, op: u32) -> Reply<()> {
        let r = gc.submit(op);
        let l = log.lock().unwrap();
        match &r {
            Ok(()) => assert!(
                l.durable.contains(&op),
                "op {op} acknowledged before the flush covering it"
            ),
            Err(CommitError::Closed) => {
                assert!(
                    !l.applied.contains(&op) && !l.durable.contains(&op),
                    "closed op {op} was applied"
                )
            }
            Err(CommitError::Sink(())) => {}
            Err(CommitError::Abandoned) => panic!("op {op} was taken and never answered"),
        }
        r
    }

    /// Two writers race; every one is acknowledged, only after its flush,
    /// and no wake-up is lost (loom reports a deadlock otherwise).
    #[test]
    fn loom_ack_only_after_flush() {
        model(|| {
            let log = std::sync::Arc::new(Mutex::new(Log::default()));
            let gc = Arc::new(GroupCommit::start(ModelSink(log.clone())));
            let w = {
                let (gc, log) = (gc.clone(), log.clone());
                loom::thread::spawn(move || writer(&gc, &log, 1))
            };
            assert_eq!(writer(&gc, &log, 2), Ok(()));
            assert_eq!(w.join().unwrap(), Ok(()));
            gc.close();
            let l = log.lock().unwrap();
            assert_eq!(l.durable.len(), 2);
        });
    }

    /// Shutdown races two writers: every writer returns (none is left
    /// waiting), each either durable and Ok or Closed and never applied,
    /// and the flusher is joined.
    #[test]
    fn loom_shutdown_drains_waiting_writers() {
        model(|| {
            let log = std::sync::Arc::new(Mutex::new(Log::default()));
            let gc = Arc::new(GroupCommit::start(ModelSink(log.clone())));
            let ws: Vec<_> = (1..=2)
                .map(|op| {
                    let (gc, log) = (gc.clone(), log.clone());
                    loom::thread::spawn(move || writer(&gc, &log, op))
                })
                .collect();
            gc.close();
            let oks = ws
                .into_iter()
                .map(|w| w.join().unwrap())
                .filter(|r| r.is_ok())
                .count();
            let l = log.lock().unwrap();
            assert_eq!(l.durable.len(), oks);
            assert!(
                l.applied.is_empty(),
                "applied but never flushed: {:?}",
                l.applied
            );
            drop(l);
            assert_eq!(gc.submit(3), Err(CommitError::Closed));
        });
    }

    /// A failed flush reaches every writer of its batch, and the next
    /// batch still works.
    #[test]
    fn loom_flush_error_reaches_its_batch() {
        model(|| {
            let log = std::sync::Arc::new(Mutex::new(Log {
                fail_next_flush: true,
                ..Log::default()
            }));
            let gc = Arc::new(GroupCommit::start(ModelSink(log.clone())));
            let w = {
                let (gc, log) = (gc.clone(), log.clone());
                loom::thread::spawn(move || writer(&gc, &log, 1))
            };
            let r2 = writer(&gc, &log, 2);
            let r1 = w.join().unwrap();
            // Exactly the first batch failed: one or both writers saw it.
            let failed = [r1, r2]
                .iter()
                .filter(|r| **r == Err(CommitError::Sink(())))
                .count();
            assert!(failed >= 1);
            assert_eq!(writer(&gc, &log, 3), Ok(()));
            gc.close();
        });
    }
}
