//! Run keys: issued and revoked one at a time, outside any policy file.

use crate::base::clock::now_unix;
use crate::base::crypto::{self};
use crate::policy::period::Period;
use crate::policy::rows::*;
use crate::store::{Store, StoreError};

impl Store {
    /// Stores a new run key of a proxy credential; returns its id.
    /// Returns the key's row as stored and the policy version the issue made.
    pub async fn issue_key(&self, key: &NewKey<'_>) -> Result<(KeyRow, i64), StoreError> {
        let mut tx = self.begin_write().await?;
        let credential: Option<String> =
            sqlx::query_scalar("SELECT id FROM credentials WHERE name = $1 AND kind = 'proxy'")
                .bind(key.credential)
                .fetch_optional(&mut *tx)
                .await?;
        let credential = credential.ok_or_else(|| {
            StoreError::NotFound(format!("no proxy credential named {:?}", key.credential))
        })?;
        let id = crypto::random_id("key");
        let created_at = now_unix();
        sqlx::query(
            "INSERT INTO proxy_keys (id, credential_id, key_hash, source, label, created_at,
                                     expires_at, expires_at_ms, spend_cap_usd, cap_period,
                                     tokens_per_minute, tokens_per_day)
             VALUES ($1, $2, $3, 'issued', $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(&credential)
        .bind(key.hash.as_slice())
        .bind(key.label)
        .bind(created_at)
        // Seconds, rounded up, for display; the milliseconds decide.
        .bind(
            key.expires_at_ms
                .map(|ms| ms.saturating_add(999).div_euclid(1000)),
        )
        .bind(key.expires_at_ms)
        .bind(key.spend_cap_usd)
        .bind(key.cap_period.map(Period::name))
        .bind(key.tokens_per_minute.map(|n| n.min(i64::MAX as u64) as i64))
        .bind(key.tokens_per_day.map(|n| n.min(i64::MAX as u64) as i64))
        .execute(&mut *tx)
        .await?;
        let version = self.bump_version(&mut tx).await?;
        tx.commit().await?;
        let row = KeyRow {
            id,
            credential_id: credential,
            hash: key.hash.to_vec(),
            policy_sourced: false,
            label: key.label.map(str::to_owned),
            created_at,
            expires_at_ms: key.expires_at_ms,
            revoked_at: None,
            quarantined_at: None,
            spend_cap_usd: key.spend_cap_usd,
            spent_usd: 0.0,
            cap_period: key.cap_period,
            tokens_per_minute: key.tokens_per_minute,
            tokens_per_day: key.tokens_per_day,
        };
        Ok((row, version))
    }

    /// Marks a key revoked; `Ok(true)` if it already was.
    /// Whether the key was revoked already; if not, the policy version its revocation
    /// made.
    pub async fn revoke_key(&self, id: &str) -> Result<Result<i64, AlreadyRevoked>, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE proxy_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now_unix())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            let version = self.bump_version(&mut tx).await?;
            tx.commit().await?;
            return Ok(Ok(version));
        }
        unchanged_key(tx, id).await.map(|()| Err(AlreadyRevoked))
    }
}

/// A change of one key that changed nothing: rolled back, and an error if there is no
/// such key.
pub(crate) async fn unchanged_key(
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
) -> Result<(), StoreError> {
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM proxy_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    tx.rollback().await?;
    exists
        .map(|_| ())
        .ok_or_else(|| StoreError::NotFound(format!("no key with id {id:?}")))
}

/// A revocation of a key that was revoked before: nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyRevoked;
