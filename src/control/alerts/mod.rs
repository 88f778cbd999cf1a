//! Anomaly alerts (`guards.alerts`): every request's decision and answer, handed on by
//! the audit writer, is weighed against its key's and its proxy's baseline ([`watch`]).
//! What departs is stored as an alert, posted to the proxy's webhooks ([`webhook`]) and,
//! when the proxy asks, gets the key quarantined: refused on this replica at once, and on
//! the others as soon as they hear of the store's new version.
//!
//! Baselines are kept per replica, in memory: behind a balancer each replica sees its
//! share of a key's traffic, so factors hold as they are while floors (`min`) count per
//! replica. A restart learns them again.

pub mod watch;
pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::base::clock::now_unix_ms;
use crate::control::sync::PolicySync;
use crate::dataplane::denial::Kind;
use crate::dataplane::identity;
use crate::dataplane::shared::Shared;
use crate::dataplane::snapshot::AlertRule;
use crate::dataplane::snapshot::KeyChange;
use crate::store::Store;
use crate::store::alerts::AlertRow;
use crate::telemetry::metrics::AlertLabels;
use crate::telemetry::tap::{Observed, Tap};
use watch::{Fired, MAX_KEY_PATHS, MAX_PATHS, Seen, Watch};
use webhook::{Post, Poster};

/// Subjects watched at most; past it, new keys are not (their proxy still is).
const MAX_WATCHES: usize = 200_000;
/// Forwarded requests waiting for their answer at most, and for how long.
const MAX_AWAITED: usize = 200_000;
const AWAIT_MS: i64 = 600_000;
/// Alerts waiting to be raised; past it, one is dropped (and logged).
const RAISE_QUEUE: usize = 1024;

/// What a key is answerable for. Its denials: those [`Kind::caller_caused`] — not the
/// limits, caps and outages it shares with other keys, which another agent could spend
/// to get it quarantined. Its errors: the vendor's 4xx but 401, 407 and 429 (what was
/// asked was wrong), not 5xx or an account's quota (the vendor's state).
fn key_error(status: u16) -> bool {
    (400..500).contains(&status) && ![401, 407, 429].contains(&status)
}

type Subject = (Arc<str>, Option<Arc<str>>);

/// The watching side: baselines, fed by the audit writer's batches.
pub struct Alerting {
    shared: Arc<Shared>,
    tap: Tap,
    watches: HashMap<Subject, Watch>,
    /// Run labels of the keys watched, for the alert's record.
    labels: HashMap<Arc<str>, Arc<str>>,
    /// Forwarded requests by id: whose answer the vendor's status will be.
    awaited: HashMap<String, (Subject, i64)>,
    raise: mpsc::Sender<Raised>,
    /// Until spawned: the raising side, and what it takes its alerts from.
    raiser: Option<(Raiser, mpsc::Receiver<Raised>)>,
}

/// The raising side: stores, quarantines and posts, one alert at a time, apart from
/// the watching so a slow store never stalls it.
struct Raiser {
    shared: Arc<Shared>,
    store: Store,
    sync: Arc<PolicySync>,
    poster: Poster,
    /// Quarantines the store has not taken yet: kept in force here and retried.
    pending: Vec<AlertRow>,
}

/// One departure, of whom.
struct Raised {
    proxy: Arc<str>,
    key_id: Option<Arc<str>>,
    run_label: Option<Arc<str>>,
    fired: Fired,
    time_ms: i64,
}

impl Alerting {
    pub fn new(
        shared: Arc<Shared>,
        store: Store,
        sync: Arc<PolicySync>,
        tap: Tap,
        poster: Poster,
    ) -> Self {
        let (raise, raised) = mpsc::channel(RAISE_QUEUE);
        let raiser = Raiser {
            shared: shared.clone(),
            store,
            sync,
            poster,
            pending: Vec::new(),
        };
        Self {
            shared,
            tap,
            watches: HashMap::new(),
            labels: HashMap::new(),
            awaited: HashMap::new(),
            raise,
            raiser: Some((raiser, raised)),
        }
    }

    /// Watches until the audit writer stops handing batches on.
    pub fn spawn(mut self, mut rx: mpsc::Receiver<Vec<Observed>>, tasks: &mut JoinSet<()>) {
        if let Some((raiser, raised)) = self.raiser.take() {
            tasks.spawn(raiser.run(raised));
        }
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut ticks = 0u64;
            loop {
                tokio::select! {
                    batch = rx.recv() => match batch {
                        Some(batch) => self.take(batch),
                        None => return,
                    },
                    _ = tick.tick() => {
                        ticks += 1;
                        self.tick(ticks.is_multiple_of(60));
                    }
                }
            }
        });
    }

    /// Now and then, forgets subjects idle for longer than their baseline remembers, and
    /// answers that never came. (Each snapshot installed tells the tap whether anything
    /// is watched; this is only a safety net.)
    fn tick(&mut self, sweep: bool) {
        let wanted = self.shared.policy.load().has_alerts();
        self.tap.want(wanted);
        if sweep || !wanted {
            let now = now_unix_ms();
            self.watches
                .retain(|_, w| wanted && now - w.last_ms < w.rule.baseline_ms as i64);
            let live: HashSet<&Arc<str>> = self
                .watches
                .keys()
                .filter_map(|(_, k)| k.as_ref())
                .collect();
            self.labels.retain(|key, _| live.contains(key));
            self.awaited
                .retain(|_, (_, since)| wanted && now - *since < AWAIT_MS);
        }
    }

    fn take(&mut self, batch: Vec<Observed>) {
        let policy = self.shared.policy.load_full();
        for observed in &batch {
            // Whose it is, and what it says of the key and of the proxy.
            let (subject, time_ms, of_key, of_proxy) = match observed {
                Observed::Decided {
                    request_id,
                    time_ms,
                    proxy,
                    key_id,
                    run_label,
                    decision,
                    path,
                    near_cap,
                } => {
                    if let (Some(key), Some(label)) = (key_id, run_label) {
                        self.labels.insert(key.clone(), label.clone());
                    }
                    // A quarantined key knocking is what quarantine is for, not news.
                    if *decision == "quarantined" {
                        continue;
                    }
                    let allowed = *decision == "allow";
                    let subject = (proxy.clone(), key_id.clone());
                    if allowed && self.awaited.len() < MAX_AWAITED {
                        (self.awaited).insert(request_id.clone(), (subject.clone(), *time_ms));
                    }
                    // Paths are learned from forwarded requests only: a caller without
                    // a key cannot fill the proxy's memory of them.
                    let path = allowed.then_some(path.as_str());
                    let of_key = Seen {
                        request: true,
                        denied: Kind::parse(decision).is_some_and(Kind::caller_caused),
                        near_cap: *near_cap,
                        path,
                        ..Seen::default()
                    };
                    let of_proxy = Seen {
                        request: true,
                        denied: !allowed,
                        path,
                        ..Seen::default()
                    };
                    (subject, *time_ms, of_key, of_proxy)
                }
                Observed::Answered {
                    request_id,
                    upstream_status,
                } => {
                    let Some((subject, _)) = self.awaited.remove(request_id) else {
                        continue;
                    };
                    let of_key = Seen {
                        answered: Some(key_error(*upstream_status)),
                        ..Seen::default()
                    };
                    let of_proxy = Seen {
                        answered: Some(*upstream_status >= 400),
                        ..Seen::default()
                    };
                    (subject, now_unix_ms(), of_key, of_proxy)
                }
            };
            let (proxy, key_id) = subject;
            let Some(rule) = policy.proxy(&proxy).and_then(|p| p.guards.alerts.clone()) else {
                continue;
            };
            let subjects = [key_id.map(|k| (Some(k), of_key)), Some((None, of_proxy))];
            for (key, seen) in subjects.into_iter().flatten() {
                self.observe(&proxy, key, seen, &rule, time_ms);
            }
        }
    }

    fn observe(
        &mut self,
        proxy: &Arc<str>,
        key: Option<Arc<str>>,
        seen: Seen<'_>,
        rule: &Arc<AlertRule>,
        time_ms: i64,
    ) {
        let subject = (proxy.clone(), key.clone());
        if key.is_some()
            && !self.watches.contains_key(&subject)
            && self.watches.len() >= MAX_WATCHES
        {
            return;
        }
        let max_paths = if key.is_some() {
            MAX_KEY_PATHS
        } else {
            MAX_PATHS
        };
        let watch = self
            .watches
            .entry(subject)
            .or_insert_with(|| Watch::new(rule.clone(), time_ms, max_paths));
        if !Arc::ptr_eq(&watch.rule, rule) {
            // The policy changed: same alerts, same baseline; else learn anew.
            if watch.rule == *rule {
                watch.rule = rule.clone();
            } else {
                *watch = Watch::new(rule.clone(), time_ms, max_paths);
            }
        }
        for fired in watch.observe(seen, time_ms) {
            let raised = Raised {
                proxy: proxy.clone(),
                run_label: key.as_ref().and_then(|k| self.labels.get(k).cloned()),
                key_id: key.clone(),
                fired,
                time_ms,
            };
            if let Err(e) = self.raise.try_send(raised) {
                let dropped = match e {
                    mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
                };
                tracing::error!(proxy = %dropped.proxy, kind = dropped.fired.kind.as_str(),
                    "too many alerts at once: one was dropped");
            }
        }
    }
}

impl Raiser {
    async fn run(mut self, mut raised: mpsc::Receiver<Raised>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = raised.recv() => match r {
                    Some(r) => self.raise(r).await,
                    None => return,
                },
                _ = tick.tick(), if !self.pending.is_empty() => self.retry().await,
            }
        }
    }

    /// Quarantines the store did not take, asked of it again (meanwhile they are held:
    /// in force here across reloads, and in the modules).
    async fn retry(&mut self) {
        for row in std::mem::take(&mut self.pending) {
            self.quarantine(row).await;
        }
    }

    /// Stores the alert and, with it, the key's quarantine; puts the quarantine into
    /// effect here at once. A store that fails keeps it pending: in force here, retried.
    async fn quarantine(&mut self, row: AlertRow) {
        let key = row.key_id.clone().unwrap_or_default();
        match self.store.record_alert(&row).await {
            Ok(Some(version)) => {
                self.shared.metrics.alerts.quarantined.inc();
                let installed = self
                    .sync
                    .keys_changed(version, KeyChange::Quarantined(key.clone()))
                    .await;
                if let Err(e) = installed {
                    // Stored: every reload has it. Meanwhile, in force on what runs.
                    self.shared.policy.load().set_quarantined(&key, true);
                    tracing::error!(error = %e, key_id = %key, "quarantine stored; this replica's reload failed");
                }
                self.shared.quarantine_stored(&key);
            }
            // Quarantined already (another replica's alert): nothing changed.
            Ok(None) => self.shared.quarantine_stored(&key),
            Err(e) => {
                tracing::error!(error = %e, alert = %row.id, "could not store an alert; retrying");
                if row.quarantined {
                    self.shared.hold_quarantine(&key);
                    self.pending.push(row);
                }
            }
        }
    }

    /// Records, counts and logs the alert, quarantines the key if the proxy asks, and
    /// posts the alert to the proxy's webhooks in the background.
    async fn raise(&mut self, r: Raised) {
        let policy = self.shared.policy.load_full();
        let Some(proxy) = policy.proxy(&r.proxy) else {
            return;
        };
        let Some(rule) = &proxy.guards.alerts else {
            return;
        };
        // A workload's token is no stored key: its alert is raised and posted, never
        // said to quarantine what nothing could hold (narrow the identity instead).
        let stored_key = r
            .key_id
            .as_deref()
            .is_some_and(|k| !identity::is_workload(k));
        let quarantine = rule.spec.quarantine && stored_key && r.fired.kind.quarantines();
        let hooks = proxy.guards.webhooks.clone();
        let row = AlertRow {
            id: crate::base::crypto::random_id("alr"),
            time_ms: r.time_ms,
            kind: r.fired.kind.as_str().to_owned(),
            proxy: r.proxy.to_string(),
            key_id: r.key_id.as_deref().map(str::to_owned),
            run_label: r.run_label.as_deref().map(str::to_owned),
            observed: r.fired.observed,
            baseline: r.fired.baseline,
            threshold: r.fired.threshold,
            message: r.fired.message.clone(),
            quarantined: quarantine,
            delivery: if hooks.is_empty() { "none" } else { "pending" }.to_owned(),
        };
        (self.shared.metrics.alerts.fired)
            .get_or_create(&AlertLabels {
                proxy: row.proxy.clone(),
                kind: r.fired.kind.as_str(),
            })
            .inc();
        tracing::warn!(alert = %row.id, proxy = %row.proxy, key_id = row.key_id.as_deref(),
            kind = %row.kind, quarantine, "{}", row.message);
        if quarantine {
            self.quarantine(row.clone()).await;
        } else if let Err(e) = self.store.record_alert(&row).await {
            tracing::error!(error = %e, alert = %row.id, "could not store an alert");
        }
        if hooks.is_empty() {
            return;
        }
        let (poster, store) = (self.poster.clone(), self.store.clone());
        tokio::spawn(async move {
            let post = alert_post(&row);
            let delivery = if poster.post(&hooks, &post).await {
                "delivered"
            } else {
                "dead_letter"
            };
            if let Err(e) = store.set_alert_delivery(&row.id, delivery).await {
                tracing::warn!(error = %e, alert = %row.id, "could not record the delivery");
            }
        });
    }
}

/// An alert as posted.
fn alert_post(row: &AlertRow) -> Post {
    let who = match (&row.key_id, &row.run_label) {
        (Some(key), Some(label)) => format!("key {key} ({label})"),
        (Some(key), None) => format!("key {key}"),
        _ => "the proxy".to_owned(),
    };
    let then = if row.quarantined {
        format!(
            " The key is quarantined: `latchkey key release {}` lets it through again.",
            row.key_id.as_deref().unwrap_or_default()
        )
    } else {
        String::new()
    };
    Post {
        event_id: row.id.clone(),
        json: serde_json::json!({
            "type": "latchkey.alert",
            "alert": {
                "id": row.id,
                "time_ms": row.time_ms,
                "kind": row.kind,
                "proxy": row.proxy,
                "key_id": row.key_id,
                "run_label": row.run_label,
                "observed": row.observed,
                "baseline": row.baseline,
                "threshold": row.threshold,
                "message": row.message,
                "quarantined": row.quarantined,
            }
        }),
        text: format!(
            "latchkey alert {} on proxy {}, {who}: {}.{then}",
            row.kind, row.proxy, row.message
        ),
    }
}
