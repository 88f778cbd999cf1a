//! Anomaly alerts as stored, the keys they quarantined, and webhook posts that could not
//! be delivered.

use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub id: String,
    pub time_ms: i64,
    pub kind: String,
    pub proxy: String,
    pub key_id: Option<String>,
    pub run_label: Option<String>,
    pub observed: f64,
    pub baseline: f64,
    pub threshold: f64,
    pub message: String,
    pub quarantined: bool,
    /// `none` (no webhooks), `pending`, `delivered` or `dead_letter`.
    pub delivery: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub time_ms: i64,
    /// Scheme and host only.
    pub webhook: String,
    pub event_id: String,
    pub payload: String,
    pub attempts: i64,
    pub error: String,
}

const ALERT_COLUMNS: &str = "id, time_ms, kind, proxy, key_id, run_label, observed, baseline, \
                             threshold, message, quarantined, delivery";

type Row = (
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    f64,
    f64,
    f64,
    String,
    i64,
    String,
);

fn alert(r: Row) -> AlertRow {
    AlertRow {
        id: r.0,
        time_ms: r.1,
        kind: r.2,
        proxy: r.3,
        key_id: r.4,
        run_label: r.5,
        observed: r.6,
        baseline: r.7,
        threshold: r.8,
        message: r.9,
        quarantined: r.10 != 0,
        delivery: r.11,
    }
}

/// What `release_key` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// The policy version the release made.
    Now(i64),
    NotQuarantined,
}

impl Store {
    /// Records an alert; with `quarantine`, in the same transaction the key is
    /// quarantined (if it is not already) and every replica told. Returns the policy
    /// version the quarantine made, if it made one.
    pub async fn record_alert(&self, a: &AlertRow) -> Result<Option<i64>, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO alerts ({ALERT_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&a.id)
        .bind(a.time_ms)
        .bind(&a.kind)
        .bind(&a.proxy)
        .bind(&a.key_id)
        .bind(&a.run_label)
        .bind(a.observed)
        .bind(a.baseline)
        .bind(a.threshold)
        .bind(&a.message)
        .bind(i64::from(a.quarantined))
        .bind(&a.delivery)
        .execute(&mut *tx)
        .await?;
        let mut version = None;
        if let (true, Some(key)) = (a.quarantined, &a.key_id) {
            let done = sqlx::query(
                "UPDATE proxy_keys SET quarantined_at = $1, quarantine_alert = $2
                 WHERE id = $3 AND quarantined_at IS NULL",
            )
            .bind(a.time_ms)
            .bind(&a.id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                version = Some(self.bump_version(&mut tx).await?);
            }
        }
        tx.commit().await?;
        Ok(version)
    }

    pub async fn set_alert_delivery(&self, id: &str, delivery: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE alerts SET delivery = $2 WHERE id = $1")
            .bind(id)
            .bind(delivery)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Newest first, since `since_ms`, of one proxy or all.
    pub async fn list_alerts(
        &self,
        since_ms: i64,
        proxy: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE time_ms >= $1 AND ($2 = '' OR proxy = $2)
             ORDER BY time_ms DESC, id LIMIT $3"
        ))
        .bind(since_ms)
        .bind(proxy.unwrap_or_default())
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(alert).collect())
    }

    /// Lets a quarantined key through again.
    pub async fn release_key(&self, id: &str) -> Result<Released, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE proxy_keys SET quarantined_at = NULL, quarantine_alert = NULL
             WHERE id = $1 AND quarantined_at IS NOT NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            let version = self.bump_version(&mut tx).await?;
            tx.commit().await?;
            return Ok(Released::Now(version));
        }
        crate::store::keys::unchanged_key(tx, id)
            .await
            .map(|()| Released::NotQuarantined)
    }

    pub async fn dead_letter(&self, d: &DeadLetter) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_dead_letters (id, time_ms, webhook, event_id, payload, attempts, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&d.id)
        .bind(d.time_ms)
        .bind(&d.webhook)
        .bind(&d.event_id)
        .bind(&d.payload)
        .bind(d.attempts)
        .bind(&d.error)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn list_dead_letters(
        &self,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows: Vec<(String, i64, String, String, String, i64, String)> = sqlx::query_as(
            "SELECT id, time_ms, webhook, event_id, payload, attempts, error
             FROM webhook_dead_letters WHERE time_ms >= $1 ORDER BY time_ms DESC, id LIMIT $2",
        )
        .bind(since_ms)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| DeadLetter {
                id: r.0,
                time_ms: r.1,
                webhook: r.2,
                event_id: r.3,
                payload: r.4,
                attempts: r.5,
                error: r.6,
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) fn sample(key_id: Option<&str>, quarantined: bool) -> AlertRow {
    AlertRow {
        id: crate::base::crypto::random_id("alr"),
        time_ms: 1_000,
        kind: "requests".into(),
        proxy: "p".into(),
        key_id: key_id.map(str::to_owned),
        run_label: None,
        observed: 40.0,
        baseline: 2.0,
        threshold: 30.0,
        message: "m".into(),
        quarantined,
        delivery: "pending".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing;

    #[tokio::test]
    async fn alerts_and_dead_letters_are_kept_and_listed() {
        for (label, _scratch, store) in testing::stores().await {
            let before = store.version().await.unwrap();
            let a = sample(None, false);
            assert_eq!(store.record_alert(&a).await.unwrap(), None, "{label}");
            store.record_alert(&sample(None, false)).await.unwrap();
            store.set_alert_delivery(&a.id, "delivered").await.unwrap();
            let listed = store.list_alerts(0, Some("p"), 10).await.unwrap();
            assert_eq!(listed.len(), 2, "{label}");
            assert_eq!(
                listed.iter().filter(|r| r.delivery == "delivered").count(),
                1
            );
            assert!(
                store
                    .list_alerts(0, Some("q"), 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert!(store.list_alerts(2_000, None, 10).await.unwrap().is_empty());
            assert_eq!(
                store.version().await.unwrap(),
                before,
                "{label}: no key, no change"
            );
            let d = DeadLetter {
                id: "dl_1".into(),
                time_ms: 5,
                webhook: "https://h/…".into(),
                event_id: a.id.clone(),
                payload: "{}".into(),
                attempts: 4,
                error: "refused".into(),
            };
            store.dead_letter(&d).await.unwrap();
            assert_eq!(
                store.list_dead_letters(0, 10).await.unwrap(),
                vec![d],
                "{label}"
            );
        }
    }
}
