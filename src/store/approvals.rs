//! Requests held for approval, as stored: created by the data plane's desk when an
//! `approve` rule holds a request, decided by a person through the admin API, used once.

use crate::store::{Store, StoreError};

/// How long a held request waits for a person, and an approval for its request.
pub const APPROVAL_TTL_MS: i64 = 3_600_000;

/// The most requests of one caller that wait at once: beyond, no new approval is asked.
pub const MAX_PENDING_PER_CALLER: i64 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    pub id: String,
    pub proxy: String,
    pub credential: Option<String>,
    pub key_id: Option<String>,
    pub run_label: Option<String>,
    pub rule_id: String,
    pub method: String,
    pub path: String,
    pub body_summary: String,
    pub status: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub decided_by: Option<String>,
}

/// A held request to record: the row without its id, status and times.
pub struct NewApproval<'a> {
    pub fingerprint: &'a str,
    pub proxy: &'a str,
    pub credential: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub run_label: Option<&'a str>,
    pub rule_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub body_summary: &'a str,
}

/// What the store says of a held request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// It was approved, and is now used.
    Approved,
    /// Recorded now, under this id.
    Created(String),
    Pending(String),
    /// A person denied it, under this id: the same request stays refused until it expires.
    Denied(String),
    Backlogged(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("approval {0} is not waiting for a decision (unknown, decided, used or expired)")]
    NotPending(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const COLUMNS: &str = "id, proxy, credential, key_id, run_label, rule_id, method, path, \
                       body_summary, status, created_ms, expires_ms, decided_by";

type Row = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<String>,
);

fn row(r: Row) -> ApprovalRow {
    ApprovalRow {
        id: r.0,
        proxy: r.1,
        credential: r.2,
        key_id: r.3,
        run_label: r.4,
        rule_id: r.5,
        method: r.6,
        path: r.7,
        body_summary: r.8,
        status: r.9,
        created_ms: r.10,
        expires_ms: r.11,
        decided_by: r.12,
    }
}

impl Store {
    /// The held request's state: approved (and now used, exactly once whichever replica
    /// asks), pending under an id (recorded now if it was not), or backlogged.
    pub async fn hold(&self, ask: &NewApproval<'_>, now_ms: i64) -> Result<Held, StoreError> {
        const LATEST: &str = "SELECT id, status FROM approvals
             WHERE fingerprint = $1 AND status IN ('pending', 'approved', 'denied')
               AND expires_ms > $2
             ORDER BY created_ms DESC LIMIT 1";
        // Asked again while it waits, or after a denial: answered without the write lock
        // (a looping agent must not stall policy edits).
        let seen: Option<(String, String)> = sqlx::query_as(LATEST)
            .bind(ask.fingerprint)
            .bind(now_ms)
            .fetch_optional(self.pool())
            .await?;
        match seen {
            Some((id, status)) if status == "pending" => return Ok(Held::Pending(id)),
            Some((id, status)) if status == "denied" => return Ok(Held::Denied(id)),
            Some((id, _)) => {
                // Used once: of two identical requests, one changes the row.
                let used = sqlx::query(
                    "UPDATE approvals SET status = 'used', used_ms = $2
                     WHERE id = $1 AND status = 'approved'",
                )
                .bind(&id)
                .bind(now_ms)
                .execute(self.pool())
                .await?
                .rows_affected();
                if used == 1 {
                    return Ok(Held::Approved);
                }
            }
            None => {}
        }
        let mut tx = self.begin_write().await?;
        let found: Option<(String, String)> = sqlx::query_as(LATEST)
            .bind(ask.fingerprint)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
        let held = match found {
            // Decided or asked by another replica meanwhile: as it stands now (an approval
            // is used only by the update above).
            Some((id, status)) if status == "denied" => Held::Denied(id),
            Some((id, _)) => Held::Pending(id),
            None => {
                let caller = ask.key_id.or(ask.credential).unwrap_or_default();
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM approvals
                     WHERE COALESCE(key_id, credential, '') = $1 AND status = 'pending'
                       AND expires_ms > $2",
                )
                .bind(caller)
                .bind(now_ms)
                .fetch_one(&mut *tx)
                .await?;
                if waiting >= MAX_PENDING_PER_CALLER {
                    return Ok(Held::Backlogged(waiting as u32));
                }
                let id = crate::base::crypto::random_id("apr");
                sqlx::query(
                    "INSERT INTO approvals (id, fingerprint, proxy, credential, key_id, run_label,
                       rule_id, method, path, body_summary, status, created_ms, expires_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', $11, $12)",
                )
                .bind(&id)
                .bind(ask.fingerprint)
                .bind(ask.proxy)
                .bind(ask.credential)
                .bind(ask.key_id)
                .bind(ask.run_label)
                .bind(ask.rule_id)
                .bind(ask.method)
                .bind(ask.path)
                .bind(ask.body_summary)
                .bind(now_ms)
                .bind(now_ms + APPROVAL_TTL_MS)
                .execute(&mut *tx)
                .await?;
                Held::Created(id)
            }
        };
        tx.commit().await?;
        Ok(held)
    }

    /// Approves or denies a pending request; `by` names who decided.
    pub async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        by: &str,
        now_ms: i64,
    ) -> Result<ApprovalRow, DecideError> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE approvals SET status = $2, decided_by = $3, decided_ms = $4
             WHERE id = $1 AND status = 'pending' AND expires_ms > $4",
        )
        .bind(id)
        .bind(if approve { "approved" } else { "denied" })
        .bind(by)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?
        .rows_affected();
        if changed == 0 {
            return Err(DecideError::NotPending(id.to_owned()));
        }
        let r: Row = sqlx::query_as(&format!("SELECT {COLUMNS} FROM approvals WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(row(r))
    }

    /// Newest first: the pending ones (not expired), or with `all` every one of the last
    /// `limit`.
    pub async fn list_approvals(
        &self,
        all: bool,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<ApprovalRow>, StoreError> {
        let filter = if all {
            "1 = 1 OR expires_ms > $1"
        } else {
            "status = 'pending' AND expires_ms > $1"
        };
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE {filter} ORDER BY created_ms DESC LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(row).collect())
    }
}
