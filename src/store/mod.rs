//! The SQL store, and every SQL statement latchkey runs: the durable policy and keys
//! (here), the audit's rows ([`audit`]), the request log's queries ([`requests`]) and the
//! admin tokens ([`tokens`]). The request path never reads it: it works from the snapshot
//! compiled from [`Store::load`], and the audit writes off the path.

pub(crate) mod alerts;
pub(crate) mod approvals;
pub(crate) mod audit;
pub mod chain;
mod desired;
mod keys;
pub use keys::AlreadyRevoked;
pub mod memory;
mod policy;
pub mod requests;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod tokens;
pub mod verify;

pub use desired::{Change, Desired, DesiredCredential};

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::{Any, Executor, Transaction};

use crate::policy::rows::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("corrupt row in {table}: {problem}")]
    Corrupt {
        table: &'static str,
        problem: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The request cannot be carried out as asked; nothing was changed.
    #[error("{0}")]
    Invalid(String),
}

/// Which SQL database the store is: SQLite for one replica, PostgreSQL for many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The stored policy's version, read alone or beside the policy it labels.
pub(crate) const SELECT_VERSION: &str = "SELECT version FROM policy_version WHERE id = 1";

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens (creating a SQLite file if missing) the database and runs the embedded
    /// migrations of its kind. The SQL is written once for both where it can be: `$n`
    /// parameters and `ON CONFLICT` upserts mean the same in each (the audit's writes
    /// differ, for speed; see `store::audit`).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            let create = if url.contains("mode=") {
                ""
            } else if url.contains('?') {
                "&mode=rwc"
            } else {
                "?mode=rwc"
            };
            (Backend::Sqlite, format!("{url}{create}"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers never wait for the writer; a writer waits up to
                        // 5 s for another. Temporary data (a statement's undo journal, as the
                        // audit's batch INSERTs keep; sorts) stays in memory instead of
                        // spilling to temporary files; a read that sorts millions of rows
                        // takes `spilling_connection` instead.
                        // Each pooled connection caches 512 KiB of pages, not 2 MiB: the
                        // policy lives in memory and the audit appends, so a larger cache
                        // is resident memory that buys nothing.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; \
                             PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; \
                             PRAGMA temp_store = MEMORY; PRAGMA cache_size = -512",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("migrations/postgres").run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A transaction that reads, then writes, one at a time across every replica.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        Ok(match self.backend {
            // Take SQLite's write lock up front, or a write committed by another
            // connection in between (the audit) would fail this transaction.
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(7472657)")
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A connection for reads that sort or group millions of rows. On SQLite their
    /// temporary data goes to files, where the pool's connections keep it in memory: a
    /// month of records sorted in memory peaked at over 200 MiB of resident memory. The
    /// connection is closed when dropped, never handed back with the setting changed.
    pub(crate) async fn spilling_connection(&self) -> Result<PoolConnection<Any>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Sqlite {
            conn.close_on_drop();
            conn.execute("PRAGMA temp_store = FILE").await?;
        }
        Ok(conn)
    }

    /// For the request log, which keeps its own SQL beside its own types.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The version of the stored policy: it grows with every change.
    pub async fn version(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(SELECT_VERSION)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Marks a change inside its transaction; on PostgreSQL every replica listening is
    /// told when it commits.
    pub(crate) async fn bump_version(
        &self,
        tx: &mut Transaction<'_, Any>,
    ) -> Result<i64, StoreError> {
        let version: i64 = sqlx::query_scalar(
            "UPDATE policy_version SET version = version + 1 WHERE id = 1 RETURNING version",
        )
        .fetch_one(&mut **tx)
        .await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify('latchkey_policy', '')")
                .execute(&mut **tx)
                .await?;
        }
        Ok(version)
    }
}
