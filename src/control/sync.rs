//! Keeps this replica's policy snapshot (and admin tokens) current with the store: a change made through
//! any replica's admin API (apply, key issue, key revoke) is taken in here too. On
//! PostgreSQL the change is pushed (LISTEN/NOTIFY) and lands within milliseconds; the
//! store's policy version is also compared on a timer, as a safety net for a missed
//! notification and for a listener that had to reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::base::crypto::MasterKey;
use crate::control::secrets::{self, SecretWatch};
use crate::control::tokens::Tokens;
use crate::dataplane::shared::Shared;
use crate::dataplane::snapshot::{CompileError, KeyChange, Policy};
use crate::policy::rows::StoredPolicy;
use crate::store::{Backend, Store, StoreError};

/// How often the version is compared without a notification.
const SAFETY_NET: Duration = Duration::from_secs(5);

/// Failed reloads in a row after which this replica says it is not ready: its policy
/// is stale (revocations still apply, see [`Policy::apply_revocations`]), so the load
/// balancer should prefer replicas that are current.
const STALE_AFTER: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("the policy compile stopped: {0}")]
    Stopped(#[from] tokio::task::JoinError),
}

pub struct PolicySync {
    shared: Arc<Shared>,
    tokens: Tokens,
    store: Store,
    master: Arc<MasterKey>,
    secrets: Arc<SecretWatch>,
    /// The store version the running snapshot was built from.
    running: AtomicI64,
    /// One reload at a time: each sees what the previous one installed. Holds the
    /// number of failed reloads in a row.
    reloading: Mutex<u32>,
    /// gRPC health, which Envoy checks: not serving while the policy is stale.
    health: std::sync::OnceLock<tonic_health::server::HealthReporter>,
}

impl PolicySync {
    pub fn new(
        shared: Arc<Shared>,
        tokens: Tokens,
        store: Store,
        master: Arc<MasterKey>,
        secrets: Arc<SecretWatch>,
        running: i64,
    ) -> Self {
        Self {
            shared,
            tokens,
            store,
            master,
            secrets,
            running: AtomicI64::new(running),
            reloading: Mutex::new(0),
            health: std::sync::OnceLock::new(),
        }
    }

    /// Reports staleness on gRPC health too, so Envoy's health checks move traffic to
    /// replicas that are current.
    pub fn report_to(&self, health: tonic_health::server::HealthReporter) {
        let _ = self.health.set(health);
    }

    async fn set_health(&self, current: bool) {
        if let Some(health) = self.health.get() {
            let status = if current {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
        }
    }

    /// Builds the snapshot from the store and swaps it in, if the store has moved on.
    /// When it cannot be built, the store's revocations (keys and admin tokens) are
    /// applied to the running snapshot anyway, and after [`STALE_AFTER`] failures in a
    /// row the replica turns not ready.
    pub async fn reload(&self) -> Result<(), SyncError> {
        self.reload_with(false).await
    }

    /// Waits for the in-process modules to decide by the running version.
    pub async fn propagated(&self) {
        let running = self.running.load(Ordering::Acquire);
        self.shared.propagated(running).await;
    }

    /// The secrets the server reads, whose values a compile takes.
    pub fn secrets(&self) -> &SecretWatch {
        &self.secrets
    }

    /// `rebuild`: the store has not moved on, but a secret the server reads has.
    async fn reload_with(&self, rebuild: bool) -> Result<(), SyncError> {
        let mut failures = self.reloading.lock().await;
        let result = self.try_reload(rebuild).await;
        match &result {
            Ok(()) => {
                if *failures >= STALE_AFTER {
                    self.set_health(true).await;
                    tracing::info!("policy current again; ready");
                }
                *failures = 0;
                self.shared.set_policy_current(true);
            }
            Err(e) => {
                *failures += 1;
                self.shared.metrics.policy_reload_failures.inc();
                if *failures == STALE_AFTER {
                    self.shared.set_policy_current(false);
                    self.set_health(false).await;
                }
                tracing::error!(error = %e, failures = *failures, ready = *failures < STALE_AFTER,
                    "could not reload the policy; the running one stays, with the store's revocations");
            }
        }
        result
    }

    async fn try_reload(&self, rebuild: bool) -> Result<(), SyncError> {
        if !rebuild && self.store.version().await? <= self.running.load(Ordering::Acquire) {
            return Ok(());
        }
        // The version of what is loaded, read with it: an apply's install (which skips
        // versions no newer than the running one) must never take it for an older one.
        let (version, stored) = self.store.load_versioned().await?;
        // Revocations need no compile: they hold here whatever follows (a compile that
        // fails, or panics).
        let stopped = self.shared.policy.load().apply_revocations(&stored);
        if stopped > 0 {
            tracing::info!(stopped, "keys revoked or quarantined in the running policy");
        }
        let installed = self.install_stored(stored, version).await;
        if installed.is_err() && stopped > 0 {
            // In-process modules are pushed the store again, which has them. (A compile
            // that works pushes them the new policy: pushed now too, they would compile
            // the policy twice.)
            self.shared.push_whole();
        }
        installed
    }

    /// The policy `stored`, of store version `version`, compiled and put into effect.
    async fn install_stored(&self, stored: StoredPolicy, version: i64) -> Result<(), SyncError> {
        self.tokens.reload(&self.store).await?;
        // Decrypting every secret and compiling every regex is CPU work: off the
        // runtime's workers, which keep answering Envoy meanwhile. A change of keys alone
        // (a run key issued or revoked) reuses the running snapshot's compiled part.
        self.secrets.ensure(&stored).await;
        let server = self.secrets.current();
        let master = self.master.clone();
        let running = self.shared.policy.load_full();
        let policy =
            tokio::task::spawn_blocking(move || running.recompile(&stored, &master, &server))
                .await??;
        self.shared.install(policy, version);
        self.running.fetch_max(version, Ordering::AcqRel);
        tracing::info!(version, "policy reloaded");
        released().await;
        Ok(())
    }

    /// A change of keys made here, which made store version `version`, put into effect
    /// without reading the store back: made on the running snapshot when that is the
    /// version just before (nothing else changed in between) and it can be; otherwise
    /// the store is read as for any change.
    pub async fn keys_changed(&self, version: i64, change: KeyChange) -> Result<(), SyncError> {
        {
            let _one_at_a_time = self.reloading.lock().await;
            let running = self.shared.policy.load_full();
            if self.running.load(Ordering::Acquire) == version - 1
                && let Some(next) = running.changed(&change)
            {
                self.shared.install_change(next?, version, change);
                self.running.store(version, Ordering::Release);
                drop(_one_at_a_time);
                self.propagated().await;
                return Ok(());
            }
        }
        self.reload().await
    }

    /// Puts into effect `policy`, of store version `version`, which an apply compiled
    /// already: under the reload lock, and only if no later version is in effect (a
    /// reload that took in another replica's change meanwhile), which it would undo
    /// until the next change.
    pub async fn install_compiled(&self, policy: Policy, version: i64) {
        let _one_at_a_time = self.reloading.lock().await;
        if version > self.running.load(Ordering::Acquire) {
            self.shared.install(policy, version);
            self.running.store(version, Ordering::Release);
        }
        drop(_one_at_a_time);
        released().await;
    }

    /// Keeps the snapshot current, in tasks of `tasks` (the server stops them at
    /// shutdown).
    pub fn spawn(self: &Arc<Self>, database_url: &str, tasks: &mut JoinSet<()>) {
        let me = self.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(SAFETY_NET);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                // A failure is logged and counted by `reload`.
                let _ = me.reload().await;
            }
        });
        // A secret the server reads changed: the snapshot is rebuilt with it.
        let me = self.clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(secrets::POLL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Until a rebuild succeeds, the change is still to be taken in.
            let mut behind = false;
            loop {
                every.tick().await;
                behind |= me.secrets.refresh().await;
                if behind {
                    behind = me.reload_with(true).await.is_err();
                }
            }
        });
        if self.store.backend() == Backend::Postgres {
            let me = self.clone();
            let url = database_url.to_owned();
            tasks.spawn(async move { me.listen(&url).await });
        }
    }

    async fn listen(&self, url: &str) {
        loop {
            let mut listener = match PgListener::connect(url).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for policy changes; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen("latchkey_policy").await {
                tracing::warn!(error = %e, "cannot listen for policy changes; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // Whatever changed while not listening.
            let _ = self.reload().await;
            // Ends when the connection drops: reconnect and catch up.
            while let Ok(Some(_)) = listener.try_recv().await {
                let _ = self.reload().await;
            }
        }
    }
}

/// What a whole policy's load freed (the store's rows, the policy it replaced) goes back
/// to the system, off the runtime's workers: malloc keeps it resident otherwise.
async fn released() {
    let _ = tokio::task::spawn_blocking(latchkey_sys::release_free_memory).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::budget::{Budgets, LocalBudgets, SystemClock};
    use crate::dataplane::spend::{LocalSpend, Spend};
    use crate::store::{memory, testing};
    use crate::telemetry::audit::AuditLog;
    use crate::telemetry::metrics::Metrics;

    /// An apply's snapshot installed after a reload took in a later version (another
    /// replica's change) would undo that change until the next one: it is not installed.
    #[tokio::test]
    async fn an_apply_never_installs_over_a_later_version() {
        let (_, _scratch, store) = testing::stores().await.remove(0);
        let master = Arc::new(MasterKey::parse(&MasterKey::generate()).unwrap());
        let stored = memory::stored(testing::POLICY, &master).unwrap();
        let compile = || Policy::compile(&stored, &master, &Default::default()).unwrap();
        let metrics = Metrics::default();
        let (audit, _writer) = AuditLog::start(
            store.clone(),
            master.audit_signer().clone(),
            metrics.audit.clone(),
            crate::telemetry::audit::Outlets::default(),
        );
        let shared = Arc::new(Shared::new(
            compile(),
            Budgets::Local(LocalBudgets::new(Arc::new(SystemClock))),
            Spend::Local(LocalSpend::default()),
            audit,
            metrics,
        ));
        let secrets = Arc::new(SecretWatch::new(Default::default(), Vec::new()));
        let sync = PolicySync::new(
            shared.clone(),
            Tokens::default(),
            store,
            master.clone(),
            secrets,
            1,
        );

        sync.install_compiled(compile(), 3).await;
        let three = shared.policy.load_full();
        assert_eq!(*shared.installs.borrow(), 3);
        sync.install_compiled(compile(), 2).await;
        assert!(Arc::ptr_eq(&shared.policy.load_full(), &three), "2 undid 3");
        assert_eq!(*shared.installs.borrow(), 3);
        sync.install_compiled(compile(), 4).await;
        assert!(!Arc::ptr_eq(&shared.policy.load_full(), &three));
        assert_eq!(sync.running.load(Ordering::Acquire), 4);

        // An apply's install waits for a reload under way, and then sees what it put
        // into effect: here version 6, installed while the apply's 5 waited.
        let sync = Arc::new(sync);
        let reloading = sync.reloading.lock().await;
        let apply = tokio::spawn({
            let sync = sync.clone();
            let five = compile();
            async move { sync.install_compiled(five, 5).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!apply.is_finished(), "the apply's install did not wait");
        shared.install(compile(), 6);
        sync.running.store(6, Ordering::Release);
        let six = shared.policy.load_full();
        drop(reloading);
        apply.await.unwrap();
        assert!(Arc::ptr_eq(&shared.policy.load_full(), &six), "5 undid 6");
        assert_eq!(sync.running.load(Ordering::Acquire), 6);
    }
}
