//! The module's audit on its way to `latchkey serve`: records queued by Envoy's worker
//! threads as requests end, sent in batches by a thread of the channel's own, and kept
//! while `serve` is away or is of another build.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::envoy::module::wire::{
    BATCH_COUNTS, BATCH_RECORDS, Batch, Count, MAX_BATCH_FRAME, Record,
};

/// A request between its decision and its record's queueing: a channel that closes
/// waits for these, so a request decided just before `serve` stopped is not left out.
pub(super) struct Deciding(&'static AtomicU64);

impl Deciding {
    fn new(count: &'static AtomicU64) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Deciding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Records on their way to `serve`: sent in batches of up to [`BATCH`] records and
/// [`BATCH_BYTES`], at least every [`FLUSH_EVERY`]; kept while `serve` is away (or is
/// of another build), up to [`MAX_QUEUED`]. And the rate-limit counts `send_counts` is
/// given, sent at once after the records queued before them.
pub(super) struct Outbox {
    pub(super) queue: Mutex<VecDeque<Record>>,
    ready: Condvar,
    /// Whether the `serve` on the line pushed from this build, and so reads our batches.
    pub(super) peer_ok: AtomicBool,
    /// The policy version last taken up, and the one `serve` was last told of.
    pub(super) taken_up: AtomicI64,
    told: AtomicI64,
    /// Rate-limit counts for `serve`, sent ahead of any record (`send_counts`).
    pub(super) counts: Mutex<Vec<Count>>,
    /// Requests decided whose records are not queued yet.
    pub(super) deciding: AtomicU64,
    pub(super) queued: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
}

const BATCH: usize = BATCH_RECORDS;
/// No version told on this connection yet, not even that none is in force: the first
/// batch goes as soon as `serve` names this build, and is how it knows the module reads
/// it (a module of another build, which sends nothing, is not waited for).
const NEVER: i64 = i64::MIN;
/// Well under what `serve` reads in one frame: a batch of requests with long paths
/// (Envoy allows headers of 60 KiB) must not make a frame it refuses, again and again.
const BATCH_BYTES: usize = MAX_BATCH_FRAME / 4;
const FLUSH_EVERY: Duration = Duration::from_millis(50);
const MAX_QUEUED: usize = 1_000_000;
/// Records waiting for `serve` past which requests go to ext_proc (which waits for the
/// audit) instead of being decided here.
pub(super) const HIGH_WATER: u64 = 100_000;
/// How long a closing channel waits for requests still being answered.
const LINGER: Duration = Duration::from_secs(3);

impl Default for Outbox {
    fn default() -> Self {
        Self {
            queue: Mutex::default(),
            ready: Condvar::new(),
            peer_ok: AtomicBool::new(false),
            taken_up: AtomicI64::new(-1),
            told: AtomicI64::new(NEVER),
            counts: Mutex::default(),
            deciding: AtomicU64::default(),
            queued: AtomicU64::default(),
            sent: AtomicU64::default(),
            dropped: AtomicU64::default(),
        }
    }
}

/// How many of `items`, from the first, go in one batch: `most` at most, and no more
/// than [`BATCH_BYTES`] of frame, but at least one (no item is near that alone).
fn fitting<'a, M: prost::Message + 'a>(
    items: impl ExactSizeIterator<Item = &'a M>,
    most: usize,
) -> usize {
    let any = items.len() > 0;
    let mut bytes = 0;
    let fits = items.take(most).take_while(|m| {
        // An item in the frame: its field's tag (one byte), its length (a varint) and
        // itself.
        let len = m.encoded_len();
        bytes += 1 + prost::length_delimiter_len(len) + len;
        bytes <= BATCH_BYTES
    });
    fits.count().max(usize::from(any))
}

impl Outbox {
    /// Counts a request being decided until the guard drops.
    pub(super) fn deciding(&'static self) -> Deciding {
        Deciding::new(&self.deciding)
    }

    /// Whether `serve` is behind on the audit: past [`HIGH_WATER`] records.
    pub(super) fn behind(&self) -> bool {
        self.backlog() >= HIGH_WATER
    }

    /// Records queued, sent and dropped (the queue full while `serve` was away).
    pub(super) fn counts(&self) -> (u64, u64, u64) {
        let get = |n: &AtomicU64| n.load(Ordering::Acquire);
        (get(&self.queued), get(&self.sent), get(&self.dropped))
    }

    /// Records decided and not yet sent (or dropped).
    fn backlog(&self) -> u64 {
        let done = self.sent.load(Ordering::Acquire) + self.dropped.load(Ordering::Acquire);
        self.queued.load(Ordering::Acquire).saturating_sub(done)
    }

    /// A new connection: nothing is in force, nor sent until `serve` names its build.
    pub(super) fn connected(&self) {
        self.taken_up.store(-1, Ordering::Release);
        self.peer(false);
    }

    pub(super) fn peer(&self, same_build: bool) {
        self.peer_ok.store(same_build, Ordering::Release);
        self.wake();
    }

    pub(super) fn taken_up(&self, version: i64) {
        self.taken_up.store(version, Ordering::Release);
        self.wake();
    }

    /// Wakes the sender: under the lock, so it cannot miss the wake-up between its
    /// check and its wait.
    pub(super) fn wake(&self) {
        let _queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.ready.notify_all();
    }

    /// Counts to send `serve` at once, in place of any not sent yet: this module's
    /// rate-limit counts (`Budgets::in_use`), as it stops deciding to compile a push.
    pub(super) fn send_counts(&self, counts: Vec<(String, u64)>) {
        let counts = (counts.into_iter())
            .map(|(key, until_us)| Count { key, until_us })
            .collect();
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
        self.wake();
    }

    /// The next of the counts waiting, as many as fit a batch.
    fn next_counts(&self) -> Vec<Count> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = fitting(counts.iter(), BATCH_COUNTS);
        counts.drain(..n).collect()
    }

    pub(super) fn push(&self, record: Record) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.queued.fetch_add(1, Ordering::AcqRel);
        if queue.len() >= MAX_QUEUED {
            self.dropped.fetch_add(1, Ordering::AcqRel);
            return;
        }
        queue.push_back(record);
        if queue.len() >= BATCH {
            self.ready.notify_one();
        }
    }

    /// Sends batches until the connection fails or closes; a batch that could not be
    /// written goes back to the front of the queue.
    pub(super) fn send_until(&self, mut out: UnixStream, closed: &AtomicBool) {
        // A new connection is told the version anew.
        self.told.store(NEVER, Ordering::Release);
        let untold = || self.taken_up.load(Ordering::Acquire) != self.told.load(Ordering::Acquire);
        let mut closed_at = None;
        loop {
            if !self.peer_ok.load(Ordering::Acquire) {
                // Records wait in the queue for a `serve` that can read them.
                if closed.load(Ordering::Acquire) {
                    return;
                }
                let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let _ = self.ready.wait_timeout(queue, FLUSH_EVERY);
                continue;
            }
            // (The counts' lock is taken under the queue's, never the other way round.)
            let counts_waiting =
                || !(self.counts.lock().unwrap_or_else(|p| p.into_inner())).is_empty();
            let batch: Vec<Record> = {
                let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let (mut queue, _) = self
                    .ready
                    .wait_timeout_while(queue, FLUSH_EVERY, |q| {
                        let closing = closed.load(Ordering::Acquire);
                        q.len() < BATCH
                            && !untold()
                            && !counts_waiting()
                            && (!closing || q.is_empty())
                    })
                    .unwrap_or_else(|p| p.into_inner());
                let n = fitting(queue.iter(), BATCH);
                queue.drain(..n).collect()
            };
            // Counts go once the records queued before them have, in a batch of their
            // own (either may fill a frame): `serve` counts the records, then takes the
            // counts up as the later of its own and these, so that only requests still
            // open are counted twice (when their records come).
            let counts = if batch.is_empty() {
                self.next_counts()
            } else {
                Vec::new()
            };
            let closing = closed.load(Ordering::Acquire);
            if closing && batch.is_empty() && counts.is_empty() && !untold() {
                // Done once no decided request is still to be recorded.
                let since: &Instant = closed_at.get_or_insert_with(Instant::now);
                // A record is queued before its request stops counting as deciding: with
                // none deciding, an empty queue stays empty.
                let idle = self.deciding.load(Ordering::Acquire) == 0
                    && self.queue.lock().is_ok_and(|q| q.is_empty());
                if idle || since.elapsed() > LINGER {
                    return;
                }
            }
            let version = self.taken_up.load(Ordering::Acquire);
            let tell = version != self.told.load(Ordering::Acquire);
            if batch.is_empty() && counts.is_empty() && !tell {
                continue;
            }
            let n = batch.len() as u64;
            let mut batch = Batch {
                records: batch,
                version: tell.then_some(version),
                counts,
            };
            if out.write_all(&batch.frame()).is_err() {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                for record in batch.records.drain(..).rev() {
                    queue.push_front(record);
                }
                return;
            }
            self.sent.fetch_add(n, Ordering::AcqRel);
            if tell {
                self.told.store(version, Ordering::Release);
            }
        }
    }

    pub(super) fn drain(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            self.ready.notify_all();
            let left = self.backlog();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the module queues it, its path `length` bytes long.
    fn record(length: usize) -> Record {
        Record {
            request_id: "r-1".into(),
            path: "/".repeat(length),
            decision: "allowed".into(),
            ..Record::default()
        }
    }

    /// The next batch on `from`, if one comes within `wait`.
    fn next_batch(from: &mut UnixStream, wait: Duration) -> Option<Batch> {
        from.set_read_timeout(Some(wait)).unwrap();
        let body = crate::envoy::module::wire::read_body(from).ok()??;
        Some(Batch::parse(&body).unwrap())
    }

    #[test]
    fn records_wait_for_a_serve_of_this_build_and_go_in_frames_it_reads() {
        let outbox: &'static Outbox = Box::leak(Box::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let closed: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        // Enough long paths for twice what one frame may hold.
        let long = 60 * 1024;
        let many = 2 * MAX_BATCH_FRAME / long;
        for _ in 0..many {
            outbox.push(record(long));
        }
        let sender = std::thread::spawn(move || outbox.send_until(ours, closed));
        assert!(
            next_batch(&mut theirs, Duration::from_millis(300)).is_none(),
            "nothing goes before serve's push names its build"
        );
        outbox.peer(false);
        assert!(next_batch(&mut theirs, Duration::from_millis(300)).is_none());
        outbox.peer(true);
        let mut got = 0;
        while got < many {
            let batch = next_batch(&mut theirs, Duration::from_secs(5)).expect("a batch");
            let size = prost::Message::encoded_len(&batch);
            // Counted exactly: at most the version's field (11 bytes) past the cap.
            assert!(size <= BATCH_BYTES + 11, "a frame of {size} bytes");
            got += batch.records.len();
        }
        assert_eq!(got, many);
        closed.store(true, Ordering::Release);
        outbox.wake();
        sender.join().unwrap();
    }

    /// Counts go after the records queued before them, in batches of their own, in as
    /// many as they need.
    #[test]
    fn counts_follow_the_records_queued_before_them_in_batches_of_their_own() {
        let outbox: &'static Outbox = Box::leak(Box::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let closed: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        outbox.peer(true);
        outbox.taken_up(7);
        for _ in 0..3 {
            outbox.push(record(10));
        }
        let counts: Vec<(String, u64)> = (0..BATCH_COUNTS + 1)
            .map(|i| (format!("c:agent-{i}:rpm"), 1_700_000_000_000_000 + i as u64))
            .collect();
        outbox.send_counts(counts.clone());
        let sender = std::thread::spawn(move || outbox.send_until(ours, closed));
        let first = next_batch(&mut theirs, Duration::from_secs(5)).expect("the records");
        assert_eq!(
            (first.version, first.records.len(), first.counts.len()),
            (Some(7), 3, 0)
        );
        let mut got = Vec::new();
        while got.len() < counts.len() {
            let batch = next_batch(&mut theirs, Duration::from_secs(5)).expect("counts");
            assert!(batch.records.is_empty() && batch.counts.len() <= BATCH_COUNTS);
            got.extend(batch.counts.into_iter().map(|c| (c.key, c.until_us)));
        }
        assert_eq!(got, counts);
        assert!(next_batch(&mut theirs, Duration::from_millis(200)).is_none());
        closed.store(true, Ordering::Release);
        outbox.wake();
        sender.join().unwrap();
    }

    #[test]
    fn a_serve_of_this_build_hears_at_once_that_nothing_is_in_force_then_each_version() {
        let outbox: &'static Outbox = Box::leak(Box::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let closed: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        outbox.taken_up(3);
        outbox.connected();
        let sender = std::thread::spawn(move || outbox.send_until(ours, closed));
        assert!(next_batch(&mut theirs, Duration::from_millis(200)).is_none());
        outbox.peer(true);
        let hello = next_batch(&mut theirs, Duration::from_secs(5)).expect("at once");
        // Not the version of a connection before: nothing is in force on a new one.
        assert_eq!((hello.records.len(), hello.version), (0, Some(-1)));
        outbox.taken_up(7);
        let told = next_batch(&mut theirs, Duration::from_secs(5)).expect("a version");
        assert_eq!(told.version, Some(7));
        assert!(next_batch(&mut theirs, Duration::from_millis(200)).is_none());
        closed.store(true, Ordering::Release);
        outbox.wake();
        sender.join().unwrap();
    }
}
