//! Run keys issued one at a time, by an admin (`latchkey key issue`) or by a workload
//! with its token (`dataplane::mint`): into the store, in effect on this replica before
//! the key is handed out, on the others when they are told.

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::control::sync::PolicySync;
use crate::dataplane::mint::{Grant, Minted, Minter, Minting};
use crate::dataplane::snapshot::KeyChange;
use crate::policy::rows::{KeyRow, NewKey};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] crate::control::sync::SyncError),
}

/// Stores `key` and puts it into effect here.
pub async fn issue(
    store: &Store,
    sync: &PolicySync,
    key: &NewKey<'_>,
) -> Result<KeyRow, IssueError> {
    let (row, version) = store.issue_key(key).await?;
    sync.keys_changed(version, KeyChange::Issued(row.clone()))
        .await?;
    Ok(row)
}

/// Mints the run keys workloads ask for with their tokens.
pub struct StoreMinter {
    store: Store,
    sync: Arc<PolicySync>,
}

impl StoreMinter {
    pub fn new(store: Store, sync: Arc<PolicySync>) -> Self {
        Self { store, sync }
    }
}

impl Minter for StoreMinter {
    fn mint<'a>(&'a self, grant: &'a Grant) -> Minting<'a> {
        Box::pin(async move {
            let key = Zeroizing::new(crate::base::crypto::new_proxy_key());
            let ttl_ms = i64::try_from(grant.ttl_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
            let expires_at_ms = crate::base::clock::now_unix_ms().saturating_add(ttl_ms);
            let new = NewKey {
                credential: &grant.credential,
                hash: crate::base::crypto::hash_key(key.as_bytes()),
                label: grant.label.as_deref(),
                expires_at_ms: Some(expires_at_ms),
                spend_cap_usd: grant.spend_cap_usd,
                cap_period: None,
                tokens_per_minute: None,
                tokens_per_day: None,
            };
            let row = issue(&self.store, &self.sync, &new)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(key_id = %row.id, credential = %grant.credential,
                subject = %grant.subject, ttl_s = grant.ttl_seconds,
                "run key minted with a workload token");
            Ok(Minted {
                id: row.id,
                key,
                expires_at_ms,
            })
        })
    }
}
