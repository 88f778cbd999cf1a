//! What every part of a running `serve` shares: the live policy snapshot and the metrics.

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::audit::{AuditCounters, AuditLog};
use crate::budget::Budgets;
use crate::pipeline::{Decision, Outcome};
use crate::policy::Policy;
use crate::spend::Spend;

pub struct Shared {
    pub policy: ArcSwap<Policy>,
    pub budgets: Budgets,
    pub spend: Spend,
    pub audit: AuditLog,
    pub metrics: Metrics,
}

impl Shared {
    pub fn new(
        policy: Policy,
        budgets: Budgets,
        spend: Spend,
        audit: AuditLog,
        metrics: Metrics,
    ) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            budgets,
            spend,
            audit,
            metrics,
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
    decision_seconds: Histogram,
    pub audit: AuditCounters,
    audit_queued: Gauge,
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
        // 5 µs to 40 ms: latchkey's own time per decision, budgets included.
        let decision_seconds = Histogram::new(exponential_buckets(5e-6, 2.0, 14));
        registry.register(
            "decision_seconds",
            "Time latchkey took to decide a request, budget checks included",
            decision_seconds.clone(),
        );
        let audit = AuditCounters::default();
        registry.register(
            "audit_events_written",
            "Audit events stored",
            audit.written.clone(),
        );
        registry.register(
            "audit_waits",
            "Times a request waited because the audit queue was full",
            audit.waited.clone(),
        );
        registry.register(
            "audit_events_dropped",
            "Audit events lost because the writer had stopped (only at shutdown)",
            audit.dropped.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed audit batch writes (each is retried)",
            audit.write_errors.clone(),
        );
        let audit_queued = Gauge::default();
        registry.register(
            "audit_queue_depth",
            "Audit events waiting to be written",
            audit_queued.clone(),
        );
        Self {
            registry,
            decisions,
            decision_seconds,
            audit,
            audit_queued,
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

    pub fn observe_decision(&self, elapsed: std::time::Duration) {
        self.decision_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn encode(&self, audit_queued: usize) -> String {
        self.audit_queued
            .set(i64::try_from(audit_queued).unwrap_or(i64::MAX));
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

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
