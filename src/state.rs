//! What every part of a running `serve` shares: the live policy snapshot and the metrics.

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::budget::Budgets;
use crate::pipeline::{Decision, Outcome};
use crate::policy::Policy;
use crate::spend::Spend;
use crate::store::Store;

pub struct Shared {
    pub policy: ArcSwap<Policy>,
    pub budgets: Budgets,
    pub spend: Spend,
    pub spend_log: SpendLog,
    pub metrics: Metrics,
}

impl Shared {
    pub fn new(policy: Policy, budgets: Budgets, spend: Spend, spend_log: SpendLog) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            budgets,
            spend,
            spend_log,
            metrics: Metrics::default(),
        }
    }
}

/// Writes what keys spent to the store, off the request path: charges are queued, summed
/// per key and written one transaction per batch; a failed write is retried, not dropped.
#[derive(Clone)]
pub struct SpendLog {
    tx: mpsc::UnboundedSender<(Arc<str>, u64)>,
}

impl SpendLog {
    pub fn start(store: Store) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Arc<str>, u64)>();
        tokio::spawn(async move {
            let mut pending: HashMap<Arc<str>, u64> = HashMap::new();
            loop {
                if pending.is_empty() {
                    let Some((key, micros)) = rx.recv().await else {
                        break;
                    };
                    *pending.entry(key).or_default() += micros;
                }
                while let Ok((key, micros)) = rx.try_recv() {
                    *pending.entry(key).or_default() += micros;
                }
                match store.add_spend(&pending).await {
                    Ok(()) => pending.clear(),
                    Err(e) => {
                        tracing::error!(error = %e, "could not record key spend; will retry");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Self { tx }
    }

    /// Queues a charge to a key; never blocks.
    pub fn charge(&self, key_id: Arc<str>, micros: u64) {
        if micros > 0 {
            let _ = self.tx.send((key_id, micros));
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// Only names from the policy: never a value a client made up.
    proxy: String,
    decision: &'static str,
}

pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("latchkey");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Requests decided, by proxy and decision",
            decisions.clone(),
        );
        Self {
            registry,
            decisions,
        }
    }
}

impl Metrics {
    pub fn record(&self, decision: &Decision) {
        let labels = DecisionLabels {
            proxy: decision
                .subject
                .proxy
                .as_deref()
                .unwrap_or_default()
                .to_owned(),
            decision: match &decision.outcome {
                Outcome::Forward(_) => "allow",
                Outcome::Deny(denial) => denial.kind(),
                Outcome::NeedBody => return,
            },
        };
        self.decisions.get_or_create(&labels).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
