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
use crate::dataplane::shared::Shared;
use crate::store::Store;
use crate::store::alerts::AlertRow;
use crate::telemetry::metrics::AlertLabels;
use crate::telemetry::tap::{Observed, Tap};
use watch::{Fired, Seen, Watch};
use webhook::{Post, Poster};

/// Subjects watched at most; past it, new keys are not (their proxy still is).
const MAX_WATCHES: usize = 200_000;

type Subject = (Arc<str>, Option<Arc<str>>);

pub struct Alerting {
    shared: Arc<Shared>,
    store: Store,
    sync: Arc<PolicySync>,
    tap: Tap,
    poster: Poster,
    watches: HashMap<Subject, Watch>,
    /// Run labels of the keys watched, for the alert's record.
    labels: HashMap<Arc<str>, Arc<str>>,
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
        Self {
            shared,
            store,
            sync,
            tap,
            poster,
            watches: HashMap::new(),
            labels: HashMap::new(),
        }
    }

    /// Watches until the audit writer stops handing batches on.
    pub fn spawn(mut self, mut rx: mpsc::Receiver<Vec<Observed>>, tasks: &mut JoinSet<()>) {
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut ticks = 0u64;
            loop {
                tokio::select! {
                    batch = rx.recv() => match batch {
                        Some(batch) => self.take(batch).await,
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

    /// Tells the writer whether anything is watched; now and then, forgets subjects
    /// idle for longer than their baseline remembers.
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
        }
    }

    async fn take(&mut self, batch: Vec<Observed>) {
        let policy = self.shared.policy.load_full();
        let mut raised = Vec::new();
        for observed in batch {
            let (proxy, key_id, time_ms, seen) = match &observed {
                Observed::Decided {
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
                    let seen = Seen {
                        request: true,
                        denied: *decision != "allow",
                        answered: None,
                        near_cap: *near_cap,
                        path: Some(path.as_str()),
                    };
                    (proxy, key_id, *time_ms, seen)
                }
                Observed::Answered {
                    time_ms,
                    proxy,
                    key_id,
                    upstream_status,
                } => {
                    let seen = Seen {
                        answered: Some(*upstream_status),
                        ..Seen::default()
                    };
                    (proxy, key_id, *time_ms, seen)
                }
            };
            let Some(rule) = policy.proxy(proxy).and_then(|p| p.guards.alerts.clone()) else {
                continue;
            };
            let subjects = [
                key_id
                    .clone()
                    .map(|k| (Some(k), Seen { path: None, ..seen })),
                Some((
                    None,
                    Seen {
                        near_cap: false,
                        ..seen
                    },
                )),
            ];
            for (key, seen) in subjects.into_iter().flatten() {
                let subject = (proxy.clone(), key.clone());
                if !self.watches.contains_key(&subject) && self.watches.len() >= MAX_WATCHES {
                    continue;
                }
                let watch = self
                    .watches
                    .entry(subject)
                    .or_insert_with(|| Watch::new(rule.clone(), time_ms));
                if !Arc::ptr_eq(&watch.rule, &rule) {
                    // The policy changed: same alerts, same baseline; else learn anew.
                    if watch.rule == rule {
                        watch.rule = rule.clone();
                    } else {
                        *watch = Watch::new(rule.clone(), time_ms);
                    }
                }
                for fired in watch.observe(seen, time_ms) {
                    raised.push(Raised {
                        proxy: proxy.clone(),
                        run_label: key.as_ref().and_then(|k| self.labels.get(k).cloned()),
                        key_id: key.clone(),
                        fired,
                        time_ms,
                    });
                }
            }
        }
        for r in raised {
            self.raise(r).await;
        }
    }

    /// Stores the alert (quarantining the key with it, if asked), puts a quarantine into
    /// effect here at once, and posts the alert to the proxy's webhooks in the background.
    async fn raise(&self, r: Raised) {
        let policy = self.shared.policy.load_full();
        let Some(proxy) = policy.proxy(&r.proxy) else {
            return;
        };
        let Some(rule) = &proxy.guards.alerts else {
            return;
        };
        let quarantine = rule.spec.quarantine && r.key_id.is_some() && r.fired.kind.quarantines();
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
        let metrics = &self.shared.metrics;
        (metrics.alerts.fired)
            .get_or_create(&AlertLabels {
                proxy: row.proxy.clone(),
                kind: r.fired.kind.as_str(),
            })
            .inc();
        tracing::warn!(alert = %row.id, proxy = %row.proxy, key_id = row.key_id.as_deref(),
            kind = %row.kind, quarantine, "{}", row.message);
        match self.store.record_alert(&row).await {
            Ok(Some(version)) => {
                let key = row.key_id.as_deref().unwrap_or_default();
                metrics.alerts.quarantined.inc();
                let installed = self
                    .sync
                    .keys_changed(version, |running| {
                        running.set_quarantined(key, true);
                        Some(Ok(running.clone()))
                    })
                    .await;
                if let Err(e) = installed {
                    tracing::error!(error = %e, key_id = key, "quarantine stored, not yet in effect here");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, alert = %row.id, "could not store an alert");
                if quarantine && let Some(key) = &row.key_id {
                    // Fail closed on this replica at least, until the store answers.
                    policy.set_quarantined(key, true);
                }
            }
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
