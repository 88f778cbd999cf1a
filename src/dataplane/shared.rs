//! What every part of a running `serve` shares: the live policy snapshot, the budget
//! counters, the audit and the metrics.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::dataplane::budget::Budgets;
use crate::dataplane::denial::Denial;
use crate::dataplane::keys;
use crate::dataplane::pipeline::{Caller, Judgement, RequestView, decide_as};
use crate::dataplane::rules::Body;
use crate::dataplane::snapshot::KeyChange;
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
    /// Workload tokens verified, and their issuers' keys.
    pub identities: crate::dataplane::identity::Identities,
    /// False while the running policy is known to be behind the store's.
    policy_current: AtomicBool,
    /// Where requests held by `approve` rules go; without one they are refused.
    pub desk: Option<std::sync::Arc<dyn crate::dataplane::approval::Desk>>,
    /// Where run keys minted with workload tokens are issued; set once the control plane
    /// is up, and until then mints are refused.
    pub minter: std::sync::OnceLock<Box<dyn crate::dataplane::mint::Minter>>,
    /// The store version of each snapshot put into effect, for whoever follows them
    /// (the in-process module's feed).
    pub installs: tokio::sync::watch::Sender<i64>,
    /// The version each connected in-process module last put into effect, by connection.
    pub modules: tokio::sync::watch::Sender<std::collections::BTreeMap<u64, i64>>,
    /// The latest key changes put into effect, each with the version it made: what the
    /// modules are sent in place of the whole policy, which at 100,000 keys takes them
    /// seconds to compile.
    key_changes: std::sync::Mutex<KeptChanges>,
    /// Keys quarantined here that the store has not taken yet (an alert's, while the
    /// store fails), by id: in force in the running snapshot, and sent to the modules
    /// after every push until the store has them.
    pub held: tokio::sync::watch::Sender<Vec<String>>,
}

/// Key changes kept for the modules; one further behind gets the whole policy.
const KEY_CHANGES_KEPT: usize = 1024;

/// How long a change waits for the in-process modules to take it up before it returns
/// anyway (a module that stopped answering is logged, not waited for).
pub const PROPAGATION: std::time::Duration = std::time::Duration::from_secs(5);

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
            identities: Default::default(),
            policy_current: AtomicBool::new(true),
            desk: None,
            minter: std::sync::OnceLock::new(),
            installs: tokio::sync::watch::Sender::new(0),
            modules: tokio::sync::watch::Sender::new(Default::default()),
            key_changes: Default::default(),
            held: tokio::sync::watch::Sender::new(Vec::new()),
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

    /// Steps 1 to 5 for a request as it arrives: a workload's token, where one is
    /// presented, verified first (the only step that may wait, on its issuer's keys).
    pub async fn decide(
        &self,
        policy: &Policy,
        req: &RequestView<'_>,
        body: &Body,
        now_ms: i64,
    ) -> Judgement {
        let presented = keys::presented(req.headers);
        match (
            self.identities.token(policy, &presented, now_ms).await,
            &presented,
        ) {
            (Some(verified), Ok(token)) => {
                let caller = Caller::Token {
                    verified: &verified,
                    token,
                };
                decide_as(policy, req, body, caller, now_ms)
            }
            _ => decide_as(policy, req, body, Caller::Presented(&presented), now_ms),
        }
    }

    /// latchkey's answer to a request for itself (`mint`): a run key's JSON, or why not.
    pub async fn answer_own(&self, req: &RequestView<'_>) -> Result<Vec<u8>, Denial> {
        let policy = self.policy.load_full();
        let minter = self.minter.get().map(|m| &**m);
        let identities = &self.identities;
        crate::dataplane::mint::answer_request(&policy, identities, &self.budgets, minter, req)
            .await
    }

    /// Waits until every connected in-process module decides by `version` or a later
    /// one: a change an admin made holds for the next request, wherever it is decided.
    pub async fn propagated(&self, version: i64) {
        let mut modules = self.modules.subscribe();
        let caught_up =
            |m: &std::collections::BTreeMap<u64, i64>| m.values().all(|v| *v >= version);
        if tokio::time::timeout(PROPAGATION, modules.wait_for(caught_up))
            .await
            .is_err()
        {
            tracing::warn!(
                version,
                "an in-process module has not taken up the policy yet"
            );
        }
    }

    /// Puts into effect `policy`, which `change` made from version `version - 1`: the
    /// modules may be sent the change alone.
    pub fn install_change(&self, policy: Policy, version: i64, change: KeyChange) {
        self.policy.store(std::sync::Arc::new(policy));
        self.kept().record(version, change);
        self.announce(version);
    }

    /// The key changes that made version `to` from version `from`, if that is all that
    /// happened in between and they are still kept.
    pub fn key_changes(&self, from: i64, to: i64) -> Option<Vec<KeyChange>> {
        self.kept().between(from, to)
    }

    /// Puts a new policy into effect for the next request, with the quarantines the
    /// store has not taken (a reload rebuilt the key table without them).
    pub fn install(&self, policy: Policy, version: i64) {
        for key in self.held.borrow().iter() {
            policy.set_quarantined(key, true);
        }
        self.policy.store(std::sync::Arc::new(policy));
        self.installed(version);
    }

    /// The store's policy version the running snapshot was built from, as a gauge: a
    /// replica behind the others shows a lower value. And whether the anomaly alerts
    /// are to be told of requests, from the first one the snapshot decides. The modules
    /// get the whole policy next, whatever its version.
    pub fn installed(&self, version: i64) {
        self.kept().barrier();
        self.announce(version);
    }

    /// Has the modules sent the whole policy again, at the version in force: the
    /// running snapshot changed in place (revocations another replica made).
    pub fn push_whole(&self) {
        self.kept().barrier();
        self.installs.send_modify(|_| {});
    }

    /// A quarantine the store did not take, in force here all the same (and after every
    /// reload, see [`Shared::install`]): the modules hold it too.
    pub fn hold_quarantine(&self, key_id: &str) {
        self.policy.load().set_quarantined(key_id, true);
        self.held.send_if_modified(|held| {
            let new = !held.iter().any(|k| k == key_id);
            if new {
                held.push(key_id.to_owned());
            }
            new
        });
    }

    /// The store has the key's quarantine: it reaches the modules as any change does.
    pub fn quarantine_stored(&self, key_id: &str) {
        self.held.send_if_modified(|held| {
            let before = held.len();
            held.retain(|k| k != key_id);
            held.len() != before
        });
    }

    fn announce(&self, version: i64) {
        self.metrics.policy_version.set(version);
        self.installs.send_replace(version);
        self.audit.tap_wanted(self.policy.load().has_alerts());
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, KeptChanges> {
        self.key_changes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The latest key changes put into effect, with the versions they made, since the last
/// snapshot that was not one (after which the modules need the whole policy).
#[derive(Default)]
struct KeptChanges(VecDeque<(i64, KeyChange)>);

impl KeptChanges {
    fn record(&mut self, version: i64, change: KeyChange) {
        if self.0.len() == KEY_CHANGES_KEPT {
            self.0.pop_front();
        }
        self.0.push_back((version, change));
    }

    /// Something other than a key change happened: no change sent from here on may
    /// reach across it. (A reinstall at the same version, where a module was sent that
    /// version already, would otherwise look like nothing new.)
    fn barrier(&mut self) {
        self.0.clear();
    }

    /// The changes that made `to` from `from`: one for each version in between.
    fn between(&self, from: i64, to: i64) -> Option<Vec<KeyChange>> {
        let changes: Vec<&(i64, KeyChange)> = self
            .0
            .iter()
            .filter(|(v, _)| (from + 1..=to).contains(v))
            .collect();
        let whole = from < to
            && changes.len() as i64 == to - from
            && changes
                .iter()
                .zip(from + 1..)
                .all(|((v, _), want)| *v == want);
        whole.then(|| changes.into_iter().map(|(_, c)| c.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_are_sent_only_where_they_are_all_that_happened() {
        let revoked = |id: &str| KeyChange::Revoked(id.to_owned());
        let mut kept = KeptChanges::default();
        kept.record(4, revoked("a"));
        // Version 5 was a whole reload, 6 to 8 key changes.
        kept.barrier();
        for (v, id) in [(6, "b"), (7, "c"), (8, "d")] {
            kept.record(v, revoked(id));
        }
        let ids = |changes: Option<Vec<KeyChange>>| {
            changes.map(|cs| {
                cs.into_iter()
                    .map(|c| match c {
                        KeyChange::Revoked(id) => id,
                        other => panic!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            ids(kept.between(5, 8)),
            Some(vec!["b".into(), "c".into(), "d".into()])
        );
        assert_eq!(ids(kept.between(7, 8)), Some(vec!["d".into()]));
        assert!(kept.between(4, 8).is_none(), "5 is not a change of keys");
        assert!(
            kept.between(3, 4).is_none(),
            "nothing from before the barrier"
        );
        // Nothing newer: the whole policy.
        assert!(kept.between(8, 8).is_none());
        assert!(kept.between(8, 9).is_none());
        assert!(kept.between(9, 8).is_none());
        // Reinstalled at version 8 (a secret rotated) before a module was sent 8: the
        // module, at 7, must not be sent 8's change alone.
        kept.barrier();
        assert!(kept.between(7, 8).is_none());
    }
}
