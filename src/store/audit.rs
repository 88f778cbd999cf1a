//! The audit's table, `requests`: one row per decided request, written a batch per
//! transaction by the audit writer, completed and charged as later events arrive.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use sqlx::{Any, Transaction};

use crate::base::money::{Usage, to_usd};
use crate::base::trace::TraceParent;
use crate::policy::Vendor;
use crate::store::chain::{self, Chain, Content, Link};
use crate::store::{Backend, Store, StoreError};

/// The decision half of a record.
#[derive(Debug, Clone, Default)]
pub struct Decided {
    pub request_id: String,
    pub time_ms: i64,
    /// How long latchkey took to decide, budgets included.
    pub elapsed_us: u32,
    pub proxy: Option<Arc<str>>,
    pub target: Option<Arc<str>>,
    pub credential: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub run_label: Option<Arc<str>>,
    pub method: String,
    pub path: String,
    /// Known now for a denial; for an allowed request, when it completes.
    pub status: Option<u16>,
    pub decision: &'static str,
    pub rule_id: Option<Arc<str>>,
    /// What is kept of the headers and query the rules read (`dataplane::facts`).
    pub facts: Option<Box<str>>,
    /// The agent's trace, which the decision's span joins (telemetry only, not stored).
    pub trace: Option<TraceParent>,
    /// The caller's spend passed 80 % of a cap with this request (for the anomaly
    /// alerts; not stored).
    pub near_cap: bool,
}

/// The completion half, from Envoy's access log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completed {
    pub request_id: String,
    pub status: Option<u16>,
    pub upstream_status: Option<u16>,
    pub latency_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub retries: u32,
}

/// An LLM call's model and tokens, for the audit and telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct Llm {
    /// The model the request named (the client's word, at most 128 bytes).
    pub model: Option<Arc<str>>,
    /// The price-table entry it was priced by (a name from the policy), if any.
    pub priced_as: Option<Arc<str>>,
    pub vendor: Vendor,
    pub usage: Usage,
}

/// What a record has been charged so far.
#[derive(Debug, Clone, Default)]
pub struct Spent {
    pub micros: u64,
    pub llm: Option<Llm>,
}

impl Spent {
    pub fn add(&mut self, micros: u64, llm: &Option<Llm>) {
        self.micros += micros;
        if llm.is_some() {
            self.llm.clone_from(llm);
        }
    }
}

/// One row to insert: a decision, completed or not yet.
pub struct Row {
    pub decided: Decided,
    pub completed: Option<Completed>,
    pub cost: Spent,
}

/// A cost for a row already written: request id, key id, micro-dollars, LLM usage.
pub type Cost = (String, Arc<str>, u64, Option<Llm>);

impl Store {
    /// One transaction: new rows, costs of written rows, completions of written rows and
    /// what each key spent, each row a link of `chain`. Returns whether each completion
    /// found its row (a completion whose decision another replica has not written yet is
    /// retried by the writer), and the chain as the transaction left it, to keep once it
    /// has committed.
    pub async fn write_audit(
        &self,
        chain: &Chain,
        rows: &[Row],
        costs: &[Cost],
        completions: &[&Completed],
        spend: &HashMap<Arc<str>, u64>,
    ) -> Result<(Vec<bool>, Chain), StoreError> {
        let mut chain = chain.clone();
        let mut tx = self.pool().begin().await?;
        chain.begin(&mut tx).await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            insert(&mut tx, self.backend(), &mut chain, chunk).await?;
        }
        // Costs before completions: a request's cost is queued before its completion, so
        // its record is still open (and found as such) when the cost is added.
        for (request_id, key_id, micros, llm) in costs {
            add_cost(
                &mut tx,
                self.backend(),
                &mut chain,
                request_id,
                key_id,
                *micros,
                llm,
            )
            .await?;
        }
        let mut found = Vec::with_capacity(completions.len());
        for c in completions {
            found.push(complete(&mut tx, &mut chain, c).await?);
        }
        for (key_id, micros) in spend {
            sqlx::query("UPDATE proxy_keys SET spent_usd = spent_usd + $1 WHERE id = $2")
                .bind(to_usd(*micros))
                .bind(key_id.as_ref())
                .execute(&mut *tx)
                .await?;
        }
        if chain.checkpoint_due() {
            chain.checkpoint(&mut tx, chain::Kind::Periodic).await?;
        }
        tx.commit().await?;
        Ok((found, chain))
    }

    /// Signs the chain's head: `Periodic` when it has gone unsigned a while with nothing
    /// to write, `Closed` when the writer stops.
    pub async fn checkpoint_audit(
        &self,
        chain: &Chain,
        kind: chain::Kind,
    ) -> Result<Chain, StoreError> {
        let mut chain = chain.clone();
        let mut tx = self.pool().begin().await?;
        chain.begin(&mut tx).await?;
        chain.checkpoint(&mut tx, kind).await?;
        tx.commit().await?;
        Ok(chain)
    }
}

/// Rows per INSERT statement: 29 parameters each, well under either database's limit.
pub const ROWS_PER_INSERT: usize = 64;
const COLUMNS: usize = chain::CONTENT_LEN + 4;

/// What a link covers of a row about to be inserted.
pub(crate) fn content(row: &Row) -> Content<'_> {
    let (d, c) = (&row.decided, row.completed.as_ref());
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    fn text(s: &Option<Arc<str>>) -> Option<Cow<'_, str>> {
        s.as_deref().map(Cow::Borrowed)
    }
    let llm = row.cost.llm.as_ref();
    Content {
        request_id: Cow::Borrowed(&d.request_id),
        time_ms: d.time_ms,
        proxy: text(&d.proxy),
        target: text(&d.target),
        credential: text(&d.credential),
        key_id: text(&d.key_id),
        run_label: text(&d.run_label),
        method: Cow::Borrowed(&d.method),
        path: Cow::Borrowed(&d.path),
        status: c.and_then(|c| c.status).or(d.status).map(i64::from),
        upstream_status: c.and_then(|c| c.upstream_status).map(i64::from),
        decision: Cow::Borrowed(d.decision),
        rule_id: text(&d.rule_id),
        latency_ms: c.and_then(|c| c.latency_ms),
        cost_usd: (row.cost.micros > 0).then(|| to_usd(row.cost.micros)),
        bytes_in: c.map(|c| int(c.bytes_in)),
        bytes_out: c.map(|c| int(c.bytes_out)),
        retries: c.map(|c| i64::from(c.retries)),
        completed: i64::from(c.is_some()),
        model: llm.and_then(|l| l.model.as_deref()).map(Cow::Borrowed),
        input_tokens: llm.map(|l| int(l.usage.input)),
        output_tokens: llm.map(|l| int(l.usage.output)),
        cached_tokens: llm.map(|l| int(l.usage.cached_input)),
        facts: d.facts.as_deref().map(Cow::Borrowed),
        supersedes: None,
    }
}

async fn insert(
    tx: &mut Transaction<'_, Any>,
    backend: Backend,
    chain: &mut Chain,
    rows: &[Row],
) -> Result<(), StoreError> {
    let mut sql = format!(
        "INSERT INTO requests ({}, chain, chain_pos, prev_hash, hash) VALUES ",
        chain::CONTENT_COLUMNS
    );
    for i in 0..rows.len() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for c in 0..COLUMNS {
            if c > 0 {
                sql.push_str(", ");
            }
            match backend {
                // SQLite looks up each named parameter (`$n`) in a list of all of them:
                // quadratic in a 1,728-parameter statement, and the writer's main cost.
                // Anonymous `?` parameters bind by position.
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => write!(sql, "${}", i * COLUMNS + c + 1).expect("to a String"),
            }
        }
        sql.push(')');
    }
    let contents: Vec<Content> = rows.iter().map(content).collect();
    let links: Vec<Link> = contents.iter().map(|c| chain.link(c)).collect();
    let chain_id = chain.id.as_str();
    let mut query = sqlx::query(&sql);
    for (content, link) in contents.iter().zip(&links) {
        query = content
            .bind(query)
            .bind(chain_id)
            .bind(link.pos)
            .bind(link.prev_hash.as_str())
            .bind(link.hash.as_str());
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// What an amending UPDATE returns: the row as it now is, with its old link.
fn returning() -> String {
    format!(
        " RETURNING seq, chain, chain_pos, prev_hash, hash, {}",
        chain::CONTENT_COLUMNS
    )
}

/// The newest row of a request id not yet completed: a client that replays an id can
/// not rewrite an older record.
async fn complete(
    tx: &mut Transaction<'_, Any>,
    chain: &mut Chain,
    c: &Completed,
) -> Result<bool, StoreError> {
    let amended = sqlx::query(&format!(
        "UPDATE requests SET status = COALESCE($1, status), upstream_status = $2, latency_ms = $3,
                bytes_in = $4, bytes_out = $5, retries = $6, completed = 1
         WHERE seq = (SELECT max(seq) FROM requests WHERE request_id = $7 AND completed = 0){}",
        returning()
    ))
    .bind(c.status.map(i64::from))
    .bind(c.upstream_status.map(i64::from))
    .bind(c.latency_ms)
    .bind(i64::try_from(c.bytes_in).unwrap_or(i64::MAX))
    .bind(i64::try_from(c.bytes_out).unwrap_or(i64::MAX))
    .bind(i64::from(c.retries))
    .bind(&c.request_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(amended) = amended else {
        return Ok(false);
    };
    chain::relink(tx, chain, &amended).await?;
    Ok(true)
}

async fn add_cost(
    tx: &mut Transaction<'_, Any>,
    backend: Backend,
    chain: &mut Chain,
    request_id: &str,
    key_id: &str,
    micros: u64,
    llm: &Option<Llm>,
) -> Result<(), StoreError> {
    // SQLite indexes request ids of open records only. Its one replica queues a cost
    // before the completion, so the record is open. Replicas sharing PostgreSQL may
    // complete a record before another adds its cost: any record, by the full index.
    let open_only = match backend {
        Backend::Sqlite => " AND completed = 0",
        Backend::Postgres => "",
    };
    let sql = format!(
        "UPDATE requests SET cost_usd = COALESCE(cost_usd, 0) + $1,
                model = COALESCE($4, model), input_tokens = COALESCE($5, input_tokens),
                output_tokens = COALESCE($6, output_tokens),
                cached_tokens = COALESCE($7, cached_tokens)
         WHERE seq = (SELECT max(seq) FROM requests
                      WHERE request_id = $2 AND key_id = $3{open_only}){}",
        returning()
    );
    let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let llm = llm.as_ref();
    let amended = sqlx::query(&sql)
        .bind(to_usd(micros))
        .bind(request_id)
        .bind(key_id)
        .bind(llm.and_then(|l| l.model.as_deref()))
        .bind(llm.map(|l| tokens(l.usage.input)))
        .bind(llm.map(|l| tokens(l.usage.output)))
        .bind(llm.map(|l| tokens(l.usage.cached_input)))
        .fetch_optional(&mut **tx)
        .await?;
    match amended {
        Some(amended) => chain::relink(tx, chain, &amended).await,
        None => {
            // No record to add it to (gone with retention; on SQLite, one already
            // completed): no reason to retry. The key's spend has counted it all the same.
            tracing::warn!(request_id, key_id, "a cost found no open audit record");
            Ok(())
        }
    }
}
