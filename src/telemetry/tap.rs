//! What the anomaly alerts read of each request, handed on by the audit writer after it
//! stores a batch: off the request path, and only while some proxy has alerts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::store::audit::Row;
use crate::telemetry::events::Event;

/// One request as the alerts see it: its decision, or the vendor's answer to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Decided {
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
        time_ms: i64,
        proxy: Arc<str>,
        key_id: Option<Arc<str>>,
        upstream_status: u16,
    },
}

/// Batches waiting for the alerts; beyond, a batch is dropped (and counted): alerts are
/// advice, and must never hold the audit up.
const CAPACITY: usize = 256;

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

    /// The decisions of a written batch, and the answers of the rows it completed.
    pub(crate) fn offer(&self, batch: &[Event], rows: &[Row]) {
        if !self.wanted.load(Ordering::Relaxed) {
            return;
        }
        let decided = batch.iter().filter_map(|e| match e {
            Event::Decided(d) => Some(Observed::Decided {
                time_ms: d.time_ms,
                proxy: d.proxy.clone()?,
                key_id: d.key_id.clone(),
                run_label: d.run_label.clone(),
                decision: d.decision,
                path: d.path.split('?').next().unwrap_or_default().to_owned(),
                near_cap: d.near_cap,
            }),
            _ => None,
        });
        let answered = rows.iter().filter_map(|r| {
            Some(Observed::Answered {
                time_ms: r.decided.time_ms,
                proxy: r.decided.proxy.clone()?,
                key_id: r.decided.key_id.clone(),
                upstream_status: r.completed.as_ref()?.upstream_status?,
            })
        });
        let observed: Vec<Observed> = decided.chain(answered).collect();
        if !observed.is_empty() && self.tx.try_send(observed).is_err() {
            self.dropped.inc();
        }
    }
}
