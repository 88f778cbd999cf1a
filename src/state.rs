//! What every part of a running `serve` shares: the live policy snapshot and the metrics.

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::budget::Budgets;
use crate::pipeline::{Decision, Outcome};
use crate::policy::Policy;

pub struct Shared {
    pub policy: ArcSwap<Policy>,
    pub budgets: Budgets,
    pub metrics: Metrics,
}

impl Shared {
    pub fn new(policy: Policy, budgets: Budgets) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            budgets,
            metrics: Metrics::default(),
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
