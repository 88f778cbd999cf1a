//! What every part of a running `serve` shares: the live policy snapshot, the budget
//! counters, the audit and the metrics.

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::dataplane::budget::Budgets;
use crate::dataplane::snapshot::Policy;
use crate::dataplane::spend::Spend;
use crate::telemetry::audit::AuditLog;
use crate::telemetry::metrics::Metrics;

pub struct Shared {
    pub policy: ArcSwap<Policy>,
    pub budgets: Budgets,
    pub spend: Spend,
    pub audit: AuditLog,
    pub metrics: Metrics,
    /// False while the running policy is known to be behind the store's.
    policy_current: AtomicBool,
    /// Where requests held by `approve` rules go; without one they are refused.
    pub desk: Option<std::sync::Arc<dyn crate::dataplane::approval::Desk>>,
}

impl Shared {
    pub fn new(
        policy: Policy,
        budgets: Budgets,
        spend: Spend,
        audit: AuditLog,
        metrics: Metrics,
    ) -> Self {
        // The version it runs is set by whoever loaded it (`installed`).
        Self {
            policy: ArcSwap::from_pointee(policy),
            budgets,
            spend,
            audit,
            metrics,
            policy_current: AtomicBool::new(true),
            desk: None,
        }
    }

    /// With a desk for requests that `approve` rules hold.
    pub fn with_desk(mut self, desk: std::sync::Arc<dyn crate::dataplane::approval::Desk>) -> Self {
        self.desk = Some(desk);
        self
    }

    pub fn set_policy_current(&self, current: bool) {
        self.policy_current.store(current, Ordering::Release);
    }

    pub fn policy_is_current(&self) -> bool {
        self.policy_current.load(Ordering::Acquire)
    }

    /// Puts a new policy into effect for the next request.
    pub fn install(&self, policy: Policy, version: i64) {
        self.policy.store(std::sync::Arc::new(policy));
        self.installed(version);
    }

    /// The store's policy version the running snapshot was built from, as a gauge: a
    /// replica behind the others shows a lower value. And whether the anomaly alerts
    /// are to be told of requests, from the first one the snapshot decides.
    pub fn installed(&self, version: i64) {
        self.metrics.policy_version.set(version);
        self.audit.tap_wanted(self.policy.load().has_alerts());
    }
}
