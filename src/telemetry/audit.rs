//! Step 8, audit: a record of every request latchkey decides, allowed or denied, written
//! off the request path. Events go through a bounded queue to one writer that stores them
//! a batch per transaction. When the store falls behind and the queue is full, the
//! request waits for room (back-pressure, counted): records are never dropped to keep up.
//!
//! A record is written in two halves joined by `request_id`: the decision, when latchkey
//! makes it, and the completion (status, latency, bytes), when Envoy's access log reports
//! the finished request (`envoy::access_log`). A request whose response never comes is still
//! recorded: its decision row is there from the start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::base::crypto::AuditSigner;
use crate::store::audit::{Cost, Row, Spent};
use crate::store::chain::{CHECKPOINT_EVERY, Chain, Kind};
use crate::store::{Store, StoreError};
pub use crate::telemetry::events::{Completed, Decided, Event, Llm};
use crate::telemetry::otlp::Otlp;
use crate::telemetry::tap::Tap;

/// Events waiting for the writer; beyond this a request waits for room.
pub const QUEUE_CAPACITY: usize = 16_384;
/// Events written per transaction at most.
const BATCH: usize = 1_024;
/// After the first event of a batch, how long the writer gathers more before it works:
/// one wake-up and one transaction per linger rather than per request, which on a busy
/// host would otherwise contend with Envoy for the cores on every request.
const LINGER: Duration = Duration::from_millis(50);
/// How long a completion whose decision row is not there yet (another replica has not
/// written it) keeps being retried.
const ORPHAN_TTL: Duration = Duration::from_secs(30);

/// The audit's counters, registered with the metrics.
#[derive(Clone, Default)]
pub struct AuditCounters {
    pub written: Counter,
    pub waited: Counter,
    pub dropped: Counter,
    pub write_errors: Counter,
    /// Batches the OTLP exporter had no room for.
    pub otlp_dropped: Counter,
}

/// Who reads what the writer stored, besides the store.
#[derive(Default)]
pub struct Outlets {
    pub otlp: Option<Otlp>,
    /// The anomaly alerts.
    pub tap: Option<Tap>,
}

/// The sending side, shared by everything that records.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Event>,
    counters: AuditCounters,
    /// The anomaly alerts' tap, told whether anything is watched.
    tap: Option<Tap>,
}

/// The writer task; [`AuditWriter::finish`] drains the queue and returns when every
/// queued event is stored.
pub struct AuditWriter {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl AuditLog {
    /// The writer also hands each written batch to the outlets there are.
    /// The writer's records are links of a chain of its own, its checkpoints signed by
    /// `signer`.
    pub fn start(
        store: Store,
        signer: AuditSigner,
        counters: AuditCounters,
        outlets: Outlets,
    ) -> (Self, AuditWriter) {
        Self::with_capacity(store, signer, counters, outlets, QUEUE_CAPACITY)
    }

    pub fn with_capacity(
        store: Store,
        signer: AuditSigner,
        counters: AuditCounters,
        outlets: Outlets,
        capacity: usize,
    ) -> (Self, AuditWriter) {
        let (tx, rx) = mpsc::channel(capacity);
        let tap = outlets.tap.clone();
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (stop, counters) = (stop.clone(), counters.clone());
            async move {
                let chain = Chain::new(signer);
                write_loop(store, chain, rx, stop, counters, &outlets).await;
                if let Some(otlp) = outlets.otlp {
                    otlp.finish().await;
                }
            }
        });
        (Self { tx, counters, tap }, AuditWriter { stop, task })
    }

    /// Queues an event; waits only while the queue is full.
    pub async fn record(&self, event: Event) {
        let event = match self.tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(event)) => event,
            Err(mpsc::error::TrySendError::Closed(event)) => return self.lost(&event),
        };
        self.counters.waited.inc();
        if let Err(mpsc::error::SendError(event)) = self.tx.send(event).await {
            self.lost(&event);
        }
    }

    /// Only after the writer has finished (shutdown): nothing is left to write with.
    fn lost(&self, event: &Event) {
        self.counters.dropped.inc();
        let request_id = match event {
            Event::Decided(d) => &d.request_id,
            Event::Completed(c) => &c.request_id,
            Event::Charged { request_id, .. } => request_id,
        };
        tracing::error!(request_id, "audit event dropped: the writer has stopped");
    }

    /// Whether the written events are to be handed to the anomaly alerts.
    pub fn tap_wanted(&self, wanted: bool) {
        if let Some(tap) = &self.tap {
            tap.want(wanted);
        }
    }

    /// Events queued and not yet written.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

impl AuditWriter {
    pub async fn finish(self) {
        self.stop.notify_one();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the audit writer failed");
        }
    }
}

/// How long a decision waits in memory for its completion, so the two halves go into the
/// store as one row (Envoy flushes its access log every 200 ms). One write per request
/// instead of two is most of the audit's cost.
const HOLD: Duration = Duration::from_millis(1000);

/// A decision waiting for its completion.
struct Held {
    decided: Decided,
    since: Instant,
    cost: Spent,
}

/// What one transaction writes.
#[derive(Default)]
struct Plan {
    rows: Vec<Row>,
    /// Completions of decisions already written (or written by another replica).
    completions: Vec<(Instant, Completed)>,
    /// Costs of requests whose rows are already written.
    costs: Vec<Cost>,
    /// What each key spent in this batch, summed.
    spend: HashMap<Arc<str>, u64>,
}

async fn write_loop(
    store: Store,
    mut chain: Chain,
    mut rx: mpsc::Receiver<Event>,
    stop: Arc<Notify>,
    counters: AuditCounters,
    outlets: &Outlets,
) {
    let mut batch: Vec<Event> = Vec::with_capacity(BATCH);
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut orphans: Vec<(Instant, Completed)> = Vec::new();
    let mut closing = false;
    let mut open = true;
    while open || !held.is_empty() || !orphans.is_empty() {
        if open {
            tokio::select! {
                biased;
                () = stop.notified(), if !closing => {
                    // Refuse new events; what is queued is still received below.
                    rx.close();
                    closing = true;
                    continue;
                }
                n = rx.recv_many(&mut batch, BATCH) => {
                    open = n > 0;
                    if open && batch.len() < BATCH {
                        // Senders do not wake a writer that is not waiting on the queue.
                        tokio::time::sleep(LINGER).await;
                        while batch.len() < BATCH {
                            match rx.try_recv() {
                                Ok(event) => batch.push(event),
                                Err(mpsc::error::TryRecvError::Empty) => break,
                                Err(mpsc::error::TryRecvError::Disconnected) => {
                                    open = false;
                                    break;
                                }
                            }
                        }
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(200)),
                    if !held.is_empty() || !orphans.is_empty() => {}
                () = tokio::time::sleep(CHECKPOINT_EVERY), if chain.unsigned() => {}
            }
        }
        let now = Instant::now();
        let mut plan = Plan::default();
        for event in &batch {
            plan.take(event, &mut held, now);
        }
        // Decisions whose completion is late (or will never come) go in alone; on the way
        // out, all of them.
        // Held decisions are bounded like the queue: past that, all go in at once.
        let overfull = held.len() > QUEUE_CAPACITY;
        let due: Vec<String> = held
            .iter()
            .filter(|(_, h)| !open || overfull || now.duration_since(h.since) >= HOLD)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(h) = held.remove(&id) {
                plan.rows.push(Row {
                    decided: h.decided,
                    completed: None,
                    cost: h.cost,
                });
            }
        }
        orphans.retain(|(since, c)| {
            let keep = open && now.duration_since(*since) < ORPHAN_TTL;
            if !keep {
                tracing::debug!(request_id = %c.request_id, "completion of a request latchkey did not decide");
            }
            keep
        });
        plan.completions.append(&mut orphans);
        let unmatched = loop {
            if plan.is_empty() {
                if chain.checkpoint_due() {
                    checkpoint(&store, &mut chain, Kind::Periodic, &counters).await;
                }
                break Vec::new();
            }
            match plan.write(&store, &chain).await {
                Ok((unmatched, written)) => {
                    chain = written;
                    break unmatched;
                }
                Err(e) => {
                    // Kept, not dropped: the queue fills and requests wait meanwhile.
                    counters.write_errors.inc();
                    // It may have committed all the same: the retry goes into a chain
                    // of its own, and the old one ends unsigned rather than forked.
                    chain = chain.restart();
                    tracing::error!(error = %e, rows = plan.rows.len(), "could not write the audit; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        orphans = unmatched;
        counters.written.inc_by(batch.len() as u64);
        if let Some(otlp) = &outlets.otlp {
            otlp.offer(&batch);
        }
        if let Some(tap) = &outlets.tap {
            tap.offer(&batch);
        }
        batch.clear();
    }
    if chain.started() {
        checkpoint(&store, &mut chain, Kind::Closed, &counters).await;
    }
}

/// Signs the chain's head in a transaction of its own. A failure is logged and left:
/// the next write's checkpoint, or the next idle one, signs the same links.
async fn checkpoint(store: &Store, chain: &mut Chain, kind: Kind, counters: &AuditCounters) {
    match store.checkpoint_audit(chain, kind).await {
        Ok(signed) => *chain = signed,
        Err(e) => {
            counters.write_errors.inc();
            tracing::error!(error = %e, kind = kind.as_str(), "could not sign the audit chain's head");
        }
    }
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.completions.is_empty()
            && self.costs.is_empty()
            && self.spend.is_empty()
    }

    fn take(&mut self, event: &Event, held: &mut HashMap<String, Held>, now: Instant) {
        match event {
            Event::Decided(d) => {
                let fresh = Held {
                    decided: d.clone(),
                    since: now,
                    cost: Spent::default(),
                };
                // The same id again (a client's own): the earlier one is written as is.
                if let Some(earlier) = held.insert(d.request_id.clone(), fresh) {
                    self.rows.push(Row {
                        decided: earlier.decided,
                        completed: None,
                        cost: earlier.cost,
                    });
                }
            }
            Event::Completed(c) => match held.remove(&c.request_id) {
                Some(h) => self.rows.push(Row {
                    decided: h.decided,
                    completed: Some(c.clone()),
                    cost: h.cost,
                }),
                None => self.completions.push((now, c.clone())),
            },
            Event::Charged {
                request_id,
                key_id,
                micros,
                llm,
                ..
            } => {
                *self.spend.entry(key_id.clone()).or_default() += micros;
                if let Some(h) = held.get_mut(request_id) {
                    h.cost.add(*micros, llm);
                } else if let Some(row) = self.rows.iter_mut().rfind(|r| {
                    r.decided.request_id == *request_id
                        && r.decided.key_id.as_deref() == Some(&**key_id)
                }) {
                    // Its completion came first, in this batch: the row is not written yet.
                    row.cost.add(*micros, llm);
                } else {
                    self.costs
                        .push((request_id.clone(), key_id.clone(), *micros, llm.clone()));
                }
            }
        }
    }

    /// One transaction. Returns the completions whose decision row is not (yet) in the
    /// store, to retry.
    async fn write(
        &self,
        store: &Store,
        chain: &Chain,
    ) -> Result<(Vec<(Instant, Completed)>, Chain), StoreError> {
        let completions: Vec<&Completed> = self.completions.iter().map(|(_, c)| c).collect();
        let (found, chain) = store
            .write_audit(chain, &self.rows, &self.costs, &completions, &self.spend)
            .await?;
        let unmatched = self
            .completions
            .iter()
            .zip(found)
            .filter(|(_, found)| !found)
            .map(|(pair, _)| pair.clone())
            .collect();
        Ok((unmatched, chain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::audit::ROWS_PER_INSERT;
    use crate::store::{Backend, testing};

    fn decided(id: &str) -> Event {
        Event::Decided(Decided {
            request_id: id.to_owned(),
            time_ms: 1_700_000_000_000,
            method: "GET".into(),
            path: "/v1/x".into(),
            decision: "allow",
            ..Decided::default()
        })
    }

    /// A decision on a key's request: what a cost is charged to.
    fn decided_by(id: &str, key_id: &str) -> Event {
        let mut event = decided(id);
        if let Event::Decided(d) = &mut event {
            d.key_id = Some(key_id.into());
        }
        event
    }

    async fn count(store: &Store) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM requests")
            .fetch_one(store.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn completion_finds_its_decision_and_a_replayed_id_adds_a_row() {
        for (_label, _scratch, store) in testing::stores().await {
            completion_and_replay(store).await;
        }
    }

    async fn completion_and_replay(store: Store) {
        let (log, writer) = AuditLog::start(
            store.clone(),
            AuditSigner::ephemeral(),
            AuditCounters::default(),
            Outlets::default(),
        );
        for event in [
            decided("r1"),
            Event::Completed(Completed {
                request_id: "r1".into(),
                status: Some(200),
                upstream_status: Some(200),
                latency_ms: Some(1.5),
                ..Completed::default()
            }),
            // The same id again (a client that sent its own): a second record, and the
            // completed first one is left as it was.
            decided("r1"),
        ] {
            log.record(event).await;
        }
        writer.finish().await;
        let rows: Vec<(Option<i64>, i64)> =
            sqlx::query_as("SELECT status, completed FROM requests ORDER BY seq")
                .fetch_all(store.pool())
                .await
                .unwrap();
        assert_eq!(rows, vec![(Some(200), 1), (None, 0)]);
    }

    /// A slow response: the decision goes in alone after HOLD, then its cost and its
    /// completion find it (on SQLite through the index of open records, not a scan).
    #[tokio::test]
    async fn a_late_cost_and_completion_find_their_written_record() {
        for (_label, _scratch, store) in testing::stores().await {
            let signer = AuditSigner::ephemeral();
            let (log, writer) = AuditLog::start(
                store.clone(),
                signer.clone(),
                AuditCounters::default(),
                Outlets::default(),
            );
            log.record(decided_by("slow", "k1")).await;
            tokio::time::sleep(HOLD + Duration::from_millis(400)).await;
            assert_eq!(count(&store).await, 1, "written alone after HOLD");
            log.record(Event::Charged {
                request_id: "slow".into(),
                started_ms: 0,
                key_id: "k1".into(),
                micros: 2_500_000,
                llm: None,
                trace: None,
            })
            .await;
            log.record(Event::Completed(Completed {
                request_id: "slow".into(),
                status: Some(200),
                ..Completed::default()
            }))
            .await;
            writer.finish().await;
            let row: (Option<i64>, Option<f64>, i64) =
                sqlx::query_as("SELECT status, cost_usd, completed FROM requests")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            assert_eq!(row, (Some(200), Some(2.5), 1));
            // Written, charged and completed: three links, the last two amendments, all
            // signed by the writer's closing checkpoint.
            let report = crate::store::verify::verify(&store, &[signer.public_key()], None)
                .await
                .unwrap();
            assert!(report.intact, "{report:?}");
            assert_eq!((report.records, report.superseded), (1, 2));
            assert!(report.chains[0].closed);
            if store.backend() == Backend::Sqlite {
                let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
                    "EXPLAIN QUERY PLAN SELECT max(seq) FROM requests
                     WHERE request_id = 'x' AND completed = 0",
                )
                .fetch_all(store.pool())
                .await
                .unwrap();
                assert!(
                    plan.iter()
                        .any(|(.., detail)| detail.contains("requests_open")),
                    "{plan:?}"
                );
            }
        }
    }

    /// A cost that comes after its completion, in the same batch, still lands on the row.
    #[tokio::test]
    async fn a_cost_after_its_completion_in_one_batch_is_kept() {
        for (_label, _scratch, store) in testing::stores().await {
            let (log, writer) = AuditLog::start(
                store.clone(),
                AuditSigner::ephemeral(),
                AuditCounters::default(),
                Outlets::default(),
            );
            log.record(decided_by("r1", "k1")).await;
            log.record(Event::Completed(Completed {
                request_id: "r1".into(),
                status: Some(200),
                ..Completed::default()
            }))
            .await;
            log.record(Event::Charged {
                request_id: "r1".into(),
                started_ms: 0,
                key_id: "k1".into(),
                micros: 1_000_000,
                llm: None,
                trace: None,
            })
            .await;
            writer.finish().await;
            let row: (Option<f64>, i64) =
                sqlx::query_as("SELECT cost_usd, completed FROM requests")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            assert_eq!(row, (Some(1.0), 1));
        }
    }

    /// More rows than one INSERT takes: every row lands, each with its own values in
    /// the right columns (parameters are numbered on PostgreSQL, positional on SQLite).
    #[tokio::test]
    async fn a_batch_of_several_statements_lands_whole() {
        for (_label, _scratch, store) in testing::stores().await {
            let (log, writer) = AuditLog::start(
                store.clone(),
                AuditSigner::ephemeral(),
                AuditCounters::default(),
                Outlets::default(),
            );
            let n = ROWS_PER_INSERT * 2 + 7;
            for i in 0..n {
                let mut event = decided(&format!("r{i}"));
                if let Event::Decided(d) = &mut event {
                    d.path = format!("/v1/{i}");
                    d.time_ms += i as i64;
                }
                log.record(event).await;
            }
            writer.finish().await;
            let rows: Vec<(String, String, i64)> =
                sqlx::query_as("SELECT request_id, path, time_ms FROM requests ORDER BY time_ms")
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
            assert_eq!(rows.len(), n);
            for (i, (id, path, time_ms)) in rows.iter().enumerate() {
                assert_eq!(
                    (id.as_str(), path.as_str(), *time_ms),
                    (
                        &*format!("r{i}"),
                        &*format!("/v1/{i}"),
                        1_700_000_000_000 + i as i64
                    )
                );
            }
        }
    }

    /// The stated back-pressure: with the store locked, the writer retries, the queue
    /// fills and the next request waits; once the store is free, every record lands.
    #[tokio::test]
    async fn a_slow_store_makes_requests_wait_and_loses_nothing() {
        for (_label, _scratch, store) in testing::stores().await {
            slow_store(store).await;
        }
    }

    async fn slow_store(store: Store) {
        let counters = AuditCounters::default();
        let (log, writer) = AuditLog::with_capacity(
            store.clone(),
            AuditSigner::ephemeral(),
            counters.clone(),
            Outlets::default(),
            4,
        );
        // Hold the write lock from another connection.
        let mut blocker = store.pool().acquire().await.unwrap();
        let lock: &[&str] = match store.backend() {
            Backend::Sqlite => &["BEGIN IMMEDIATE"],
            Backend::Postgres => &["BEGIN", "LOCK TABLE requests IN ACCESS EXCLUSIVE MODE"],
        };
        for statement in lock {
            sqlx::query(statement).execute(&mut *blocker).await.unwrap();
        }
        // Decisions wait up to HOLD for their completions; then the writer needs the
        // store, blocks on the lock, and the queue behind it fills.
        for i in 0..10 {
            log.record(decided(&format!("r{i}"))).await;
        }
        tokio::time::sleep(HOLD + Duration::from_millis(300)).await;
        let sender = tokio::spawn({
            let log = log.clone();
            async move {
                for i in 10..30 {
                    log.record(decided(&format!("r{i}"))).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!sender.is_finished(), "a full queue makes the sender wait");
        assert!(counters.waited.get() >= 1);
        sqlx::query("ROLLBACK")
            .execute(&mut *blocker)
            .await
            .unwrap();
        drop(blocker);
        tokio::time::timeout(Duration::from_secs(30), sender)
            .await
            .expect("the sender gets through once the store is free")
            .unwrap();
        writer.finish().await;
        assert_eq!(count(&store).await, 30);
        assert_eq!(counters.dropped.get(), 0);
        assert_eq!(counters.written.get(), 30);
    }

    #[tokio::test]
    async fn after_finish_an_event_is_counted_as_dropped() {
        let (_label, _scratch, store) = testing::stores().await.remove(0);
        let counters = AuditCounters::default();
        let (log, writer) = AuditLog::start(
            store.clone(),
            AuditSigner::ephemeral(),
            counters.clone(),
            Outlets::default(),
        );
        log.record(decided("before")).await;
        writer.finish().await;
        log.record(decided("after")).await;
        assert_eq!(count(&store).await, 1);
        assert_eq!(counters.dropped.get(), 1);
    }
}
