//! What the anomaly alerts read of each request, handed on by the audit writer after it
//! stores a batch: off the request path, and only while some proxy has alerts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::telemetry::events::Event;

/// One request as the alerts see it: its decision, or, whenever it comes, the vendor's
/// answer to it (joined by the alerts, which saw the decision).
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Decided {
        request_id: String,
        time_ms: i64,
        proxy: Arc<str>,
        key_id: Option<Arc<str>>,
        run_label: Option<Arc<str>>,
        /// `allow`, or the denial's type.
        decision: &'static str,
        /// Without its query.
        path: String,
        near_cap: bool,
    },
    Answered {
        request_id: String,
        upstream_status: u16,
    },
}

/// Batches waiting for the alerts; beyond, a batch is dropped (and counted): alerts are
/// advice, and must never hold the audit up. At most 64 × 1,024 requests wait.
const CAPACITY: usize = 64;

/// The writer's side.
#[derive(Clone)]
pub struct Tap {
    tx: mpsc::Sender<Vec<Observed>>,
    wanted: Arc<AtomicBool>,
    dropped: Counter,
}

impl Tap {
    pub fn new(dropped: Counter) -> (Self, mpsc::Receiver<Vec<Observed>>) {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let tap = Self {
            tx,
            wanted: Arc::new(AtomicBool::new(false)),
            dropped,
        };
        (tap, rx)
    }

    /// Whether any proxy has alerts: while none has, nothing is handed on.
    pub fn want(&self, wanted: bool) {
        self.wanted.store(wanted, Ordering::Relaxed);
    }

    /// The decisions and answers of a written batch.
    pub(crate) fn offer(&self, batch: &[Event]) {
        if !self.wanted.load(Ordering::Relaxed) {
            return;
        }
        let observed: Vec<Observed> = batch
            .iter()
            .filter_map(|e| match e {
                Event::Decided(d) => Some(Observed::Decided {
                    request_id: d.request_id.clone(),
                    time_ms: d.time_ms,
                    proxy: d.proxy.clone()?,
                    key_id: d.key_id.clone(),
                    run_label: d.run_label.clone(),
                    decision: d.decision,
                    path: d.path.split('?').next().unwrap_or_default().to_owned(),
                    near_cap: d.near_cap,
                }),
                Event::Completed(c) => Some(Observed::Answered {
                    request_id: c.request_id.clone(),
                    upstream_status: c.upstream_status?,
                }),
                Event::Charged { .. } => None,
            })
            .collect();
        if !observed.is_empty() && self.tx.try_send(observed).is_err() {
            self.dropped.inc();
        }
    }
}
