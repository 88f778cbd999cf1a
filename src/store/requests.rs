//! Reading the request log: filtered listings (`latchkey requests`), aggregates per hour
//! or day (`latchkey telemetry`) and retention. Writing is the audit writer's job (`telemetry::audit`, `store::audit`).

use std::collections::BTreeMap;

use futures_util::TryStreamExt;
use sqlx::Row;

use crate::base::crypto::AuditSigner;
use crate::store::chain::{Link, read_link};
use crate::store::{Store, StoreError, verify};

/// Rows per page at most.
pub const MAX_LIMIT: u32 = 10_000;

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub proxy: Option<String>,
    pub credential: Option<String>,
    pub key_id: Option<String>,
    pub label: Option<String>,
    pub status: Option<StatusFilter>,
    pub decision: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// `429` or a class such as `4xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exact(u16),
    Class(u16),
}

impl std::str::FromStr for StatusFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("status {s:?}: a code such as 429 or a class such as 4xx");
        let lower = s.to_ascii_lowercase();
        if let Some(class) = lower.strip_suffix("xx") {
            return match class.parse::<u16>() {
                Ok(c @ 1..=5) if class.len() == 1 => Ok(StatusFilter::Class(c)),
                _ => Err(bad()),
            };
        }
        match s.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(StatusFilter::Exact(code)),
            _ => Err(bad()),
        }
    }
}

/// One request as the log holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: i64,
    pub request_id: String,
    pub time_ms: i64,
    pub proxy: Option<String>,
    pub target: Option<String>,
    pub credential: Option<String>,
    pub key_id: Option<String>,
    pub run_label: Option<String>,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    pub upstream_status: Option<u16>,
    pub decision: String,
    pub rule_id: Option<String>,
    pub latency_ms: Option<f64>,
    pub cost_usd: Option<f64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub retries: Option<u32>,
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub completed: bool,
    /// What was kept of the headers and query its rules read (`dataplane::facts`).
    pub facts: Option<String>,
    /// For a record amended after it was written: the hash of the link it left.
    pub supersedes: Option<String>,
    /// Its link of the audit's hash chain (none for records written before chaining).
    pub link: Option<Link>,
}

/// A statement being built, with `$n` placeholders (the same in SQLite and PostgreSQL).
struct Sql {
    text: String,
    args: Vec<Arg>,
}

enum Arg {
    Text(String),
    Int(i64),
}

impl Sql {
    fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            args: Vec::new(),
        }
    }

    /// Appends `text` followed by a placeholder for `arg`.
    fn push(&mut self, text: &str, arg: Arg) -> &mut Self {
        self.args.push(arg);
        self.text.push_str(text);
        self.text.push_str(&format!("${}", self.args.len()));
        self
    }

    fn query(&self) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
        let mut query = sqlx::query(&self.text);
        for arg in &self.args {
            query = match arg {
                Arg::Text(s) => query.bind(s.as_str()),
                Arg::Int(i) => query.bind(*i),
            };
        }
        query
    }

    async fn fetch_all<'c>(
        &self,
        on: impl sqlx::Executor<'c, Database = sqlx::Any>,
    ) -> Result<Vec<sqlx::any::AnyRow>, StoreError> {
        Ok(self.query().fetch_all(on).await?)
    }

    /// The rows one at a time, as the database sends them.
    fn stream<'a>(
        &'a self,
        conn: &'a mut sqlx::AnyConnection,
    ) -> impl futures_util::Stream<Item = Result<sqlx::any::AnyRow, sqlx::Error>> + 'a {
        self.query().fetch(conn)
    }
}

fn push_filter(q: &mut Sql, f: &Filter) {
    q.text.push_str(" WHERE 1 = 1");
    let text = [
        ("proxy", &f.proxy),
        ("credential", &f.credential),
        ("key_id", &f.key_id),
        ("run_label", &f.label),
        ("decision", &f.decision),
    ];
    for (column, value) in text {
        if let Some(v) = value {
            q.push(&format!(" AND {column} = "), Arg::Text(v.clone()));
        }
    }
    match f.status {
        Some(StatusFilter::Exact(code)) => {
            q.push(" AND status = ", Arg::Int(i64::from(code)));
        }
        Some(StatusFilter::Class(c)) => {
            q.push(" AND status >= ", Arg::Int(i64::from(c) * 100));
            q.push(" AND status < ", Arg::Int(i64::from(c + 1) * 100));
        }
        None => {}
    }
    if let Some(t) = f.since_ms {
        q.push(" AND time_ms >= ", Arg::Int(t));
    }
    if let Some(t) = f.until_ms {
        q.push(" AND time_ms < ", Arg::Int(t));
    }
}

/// Where a page ended: records are ordered by decision time, then by row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub time_ms: i64,
    pub seq: i64,
}

impl Cursor {
    pub fn of(entry: &Entry) -> Self {
        Self {
            time_ms: entry.time_ms,
            seq: entry.seq,
        }
    }

    /// As `time_ms.seq`, the page token of the admin API.
    pub fn token(&self) -> String {
        format!("{}.{}", self.time_ms, self.seq)
    }

    pub fn parse(token: &str) -> Option<Self> {
        let (t, s) = token.split_once('.')?;
        Some(Self {
            time_ms: t.parse().ok()?,
            seq: s.parse().ok()?,
        })
    }
}

const SELECT: &str =
    "SELECT seq, request_id, time_ms, proxy, target, credential, key_id, run_label, method,
            path, status, upstream_status, decision, rule_id, latency_ms, cost_usd, bytes_in,
            bytes_out, retries, model, input_tokens, output_tokens, cached_tokens, completed,
            facts, supersedes, chain, chain_pos, prev_hash, hash
     FROM requests";

/// Every record of `filter`, in the order they were stored, newest first, a page after
/// the row `before_seq`: by the primary key, so reading all of a million costs one pass
/// over the table (a time-ordered page would sort on every call).
pub async fn scan(
    store: &Store,
    filter: &Filter,
    limit: u32,
    before_seq: Option<i64>,
) -> Result<Vec<Entry>, StoreError> {
    let mut q = Sql::new(SELECT);
    push_filter(&mut q, filter);
    if let Some(seq) = before_seq {
        q.push(" AND seq < ", Arg::Int(seq));
    }
    q.push(
        " ORDER BY seq DESC LIMIT ",
        Arg::Int(i64::from(limit.clamp(1, MAX_LIMIT))),
    );
    entries(&q.fetch_all(store.pool()).await?)
}

/// Newest first (by decision time); `before` is where a previous page ended.
pub async fn list(
    store: &Store,
    filter: &Filter,
    limit: u32,
    before: Option<Cursor>,
) -> Result<Vec<Entry>, StoreError> {
    let mut q = Sql::new(SELECT);
    push_filter(&mut q, filter);
    if let Some(c) = before {
        // The first bound alone lets the time index narrow the scan: the OR below
        // cannot, and a page deep into a million records took 3 s without it.
        q.push(" AND time_ms <= ", Arg::Int(c.time_ms));
        q.push(" AND (time_ms < ", Arg::Int(c.time_ms));
        q.push(" OR (time_ms = ", Arg::Int(c.time_ms));
        q.push(" AND seq < ", Arg::Int(c.seq));
        q.text.push_str("))");
    }
    q.push(
        " ORDER BY time_ms DESC, seq DESC LIMIT ",
        Arg::Int(i64::from(limit.clamp(1, MAX_LIMIT))),
    );
    entries(&q.fetch_all(store.pool()).await?)
}

fn entries(rows: &[sqlx::any::AnyRow]) -> Result<Vec<Entry>, StoreError> {
    rows.iter()
        .map(|r| {
            let u16_of = |name: &str| -> Result<Option<u16>, sqlx::Error> {
                Ok(r.try_get::<Option<i64>, _>(name)?
                    .and_then(|v| u16::try_from(v).ok()))
            };
            let u64_of = |name: &str| -> Result<Option<u64>, sqlx::Error> {
                Ok(r.try_get::<Option<i64>, _>(name)?
                    .and_then(|v| u64::try_from(v).ok()))
            };
            Ok(Entry {
                seq: r.try_get("seq")?,
                request_id: r.try_get("request_id")?,
                time_ms: r.try_get("time_ms")?,
                proxy: r.try_get("proxy")?,
                target: r.try_get("target")?,
                credential: r.try_get("credential")?,
                key_id: r.try_get("key_id")?,
                run_label: r.try_get("run_label")?,
                method: r.try_get("method")?,
                path: r.try_get("path")?,
                status: u16_of("status")?,
                upstream_status: u16_of("upstream_status")?,
                decision: r.try_get("decision")?,
                rule_id: r.try_get("rule_id")?,
                latency_ms: r.try_get("latency_ms")?,
                cost_usd: r.try_get("cost_usd")?,
                bytes_in: u64_of("bytes_in")?,
                bytes_out: u64_of("bytes_out")?,
                retries: u64_of("retries")?.and_then(|v| u32::try_from(v).ok()),
                model: r.try_get("model")?,
                input_tokens: u64_of("input_tokens")?,
                output_tokens: u64_of("output_tokens")?,
                cached_tokens: u64_of("cached_tokens")?,
                completed: r.try_get::<i64, _>("completed")? != 0,
                facts: r.try_get("facts")?,
                supersedes: r.try_get("supersedes")?,
                link: read_link(r)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Aggregates over one hour or one day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    pub start_ms: i64,
    pub requests: u64,
    pub decisions: BTreeMap<String, u64>,
    /// `2xx`, `4xx`, …; `none` while a request has no status yet.
    pub status_classes: BTreeMap<String, u64>,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    pub cost_usd: f64,
    /// LLM calls, by the model their requests named.
    pub models: BTreeMap<String, ModelUse>,
}

/// What the LLM calls of one model used in a bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelUse {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

/// Buckets of `width_ms`, oldest first, over the filtered records. Summed by the
/// database, a query per aspect; latency percentiles from the latencies streamed in
/// order, so a window of millions of records is answered in bounded memory.
pub async fn telemetry(
    store: &Store,
    filter: &Filter,
    width_ms: i64,
) -> Result<Vec<Bucket>, StoreError> {
    // Our own number, never the caller's text: written into the statement.
    let width = width_ms.max(1);
    let slot = format!("(time_ms / {width})");
    let mut buckets: BTreeMap<i64, (Bucket, u64)> = BTreeMap::new();
    // Every statement below sorts the whole window.
    let mut conn = store.spilling_connection().await?;
    let q = grouped(
        filter,
        &format!(
            "{slot}, COUNT(*), COUNT(latency_ms), \
             CAST(SUM(COALESCE(cost_usd, 0)) AS DOUBLE PRECISION)"
        ),
        "",
        "1",
    );
    for r in q.fetch_all(&mut *conn).await? {
        let slot: i64 = r.try_get(0)?;
        let bucket = Bucket {
            start_ms: slot * width,
            requests: count(r.try_get(1)?),
            cost_usd: r.try_get(3)?,
            ..Bucket::default()
        };
        buckets.insert(slot, (bucket, count(r.try_get(2)?)));
    }
    let q = grouped(filter, &format!("{slot}, decision, COUNT(*)"), "", "1, 2");
    for r in q.fetch_all(&mut *conn).await? {
        if let Some((bucket, _)) = buckets.get_mut(&r.try_get::<i64, _>(0)?) {
            bucket.decisions.insert(r.try_get(1)?, count(r.try_get(2)?));
        }
    }
    let class = "CAST(CASE WHEN status IS NULL THEN -1 ELSE status / 100 END AS BIGINT)";
    let q = grouped(filter, &format!("{slot}, {class}, COUNT(*)"), "", "1, 2");
    for r in q.fetch_all(&mut *conn).await? {
        if let Some((bucket, _)) = buckets.get_mut(&r.try_get::<i64, _>(0)?) {
            let class = match r.try_get::<i64, _>(1)? {
                -1 => "none".to_owned(),
                c => format!("{c}xx"),
            };
            bucket.status_classes.insert(class, count(r.try_get(2)?));
        }
    }
    let sum = |column: &str| format!("CAST(SUM(COALESCE({column}, 0)) AS BIGINT)");
    let q = grouped(
        filter,
        &format!(
            "{slot}, model, COUNT(*), {}, {}, {}, \
             CAST(SUM(COALESCE(cost_usd, 0)) AS DOUBLE PRECISION)",
            sum("input_tokens"),
            sum("cached_tokens"),
            sum("output_tokens")
        ),
        " AND model IS NOT NULL",
        "1, 2",
    );
    for r in q.fetch_all(&mut *conn).await? {
        if let Some((bucket, _)) = buckets.get_mut(&r.try_get::<i64, _>(0)?) {
            bucket.models.insert(
                r.try_get(1)?,
                ModelUse {
                    requests: count(r.try_get(2)?),
                    input_tokens: count(r.try_get(3)?),
                    cached_tokens: count(r.try_get(4)?),
                    output_tokens: count(r.try_get(5)?),
                    cost_usd: r.try_get(6)?,
                },
            );
        }
    }
    // Nearest rank within each bucket, the latencies arriving sorted: one pass, nothing
    // kept but the position.
    let mut q = Sql::new(&format!("SELECT {slot}, latency_ms FROM requests"));
    push_filter(&mut q, filter);
    q.text.push_str(" AND latency_ms IS NOT NULL ORDER BY 1, 2");
    let mut rows = q.stream(&mut conn);
    let (mut current, mut seen) = (None, 0u64);
    while let Some(r) = rows.try_next().await? {
        let slot: i64 = r.try_get(0)?;
        if current != Some(slot) {
            (current, seen) = (Some(slot), 0);
        }
        seen += 1;
        let Some((bucket, latencies)) = buckets.get_mut(&slot) else {
            continue;
        };
        let latency: f64 = r.try_get(1)?;
        if seen == rank(50, *latencies) {
            bucket.p50_latency_ms = Some(latency);
        }
        if seen == rank(95, *latencies) {
            bucket.p95_latency_ms = Some(latency);
        }
    }
    Ok(buckets.into_values().map(|(bucket, _)| bucket).collect())
}

/// `SELECT columns FROM requests WHERE <filter><and> GROUP BY group`.
fn grouped(filter: &Filter, columns: &str, and: &str, group: &str) -> Sql {
    let mut q = Sql::new(&format!("SELECT {columns} FROM requests"));
    push_filter(&mut q, filter);
    q.text.push_str(and);
    q.text.push_str(&format!(" GROUP BY {group}"));
    q
}

/// A count from the database, never negative.
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Nearest rank (1-based) of the `p`th percentile among `n` values: the smallest with at
/// least `p`% of the values at or below it.
fn rank(p: u64, n: u64) -> u64 {
    (p * n).div_ceil(100).max(1)
}

/// Deletes records older than `cutoff_ms`, in slices so writers are never held up for
/// long. Returns how many went.
pub async fn prune(store: &Store, signer: &AuditSigner, cutoff_ms: i64) -> Result<u64, StoreError> {
    // Approvals are kept as long as the requests they held.
    sqlx::query("DELETE FROM approvals WHERE expires_ms < $1")
        .bind(cutoff_ms)
        .execute(store.pool())
        .await?;
    // Alerts and undelivered webhook posts too, but the alert a key is still
    // quarantined by: it says why.
    sqlx::query(
        "DELETE FROM alerts WHERE time_ms < $1 AND id NOT IN
           (SELECT quarantine_alert FROM proxy_keys WHERE quarantine_alert IS NOT NULL)",
    )
    .bind(cutoff_ms)
    .execute(store.pool())
    .await?;
    sqlx::query("DELETE FROM webhook_dead_letters WHERE time_ms < $1")
        .bind(cutoff_ms)
        .execute(store.pool())
        .await?;
    // Chained records go a chain at a time, leaving each a signed base; records from
    // before the chains, by time.
    let mut total = verify::prune(store, signer, cutoff_ms).await?;
    loop {
        let done = sqlx::query(
            "DELETE FROM requests WHERE seq IN
               (SELECT seq FROM requests WHERE chain IS NULL AND time_ms < $1 LIMIT 5000)",
        )
        .bind(cutoff_ms)
        .execute(store.pool())
        .await?;
        total += done.rows_affected();
        if done.rows_affected() < 5000 {
            return Ok(total);
        }
    }
}

/// What one key spent since a moment: micro-dollars and LLM tokens, with its credential.
#[derive(Debug, Clone, PartialEq)]
pub struct SpentSince {
    pub key_id: String,
    pub credential: String,
    pub micros: u64,
    pub tokens: u64,
}

/// Each key's recorded spend since `since_ms` (Unix milliseconds), from the audit.
pub async fn spent_since(store: &Store, since_ms: i64) -> Result<Vec<SpentSince>, StoreError> {
    let rows: Vec<(String, String, f64, i64)> = sqlx::query_as(
        "SELECT key_id, credential,
                CAST(SUM(COALESCE(cost_usd, 0)) AS DOUBLE PRECISION),
                CAST(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)
                         + COALESCE(cached_tokens, 0)) AS BIGINT)
         FROM requests
         WHERE time_ms >= $1 AND key_id IS NOT NULL AND credential IS NOT NULL
         GROUP BY key_id, credential",
    )
    .bind(since_ms)
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key_id, credential, usd, tokens)| SpentSince {
            key_id,
            credential,
            micros: crate::base::money::to_micros(usd),
            tokens: u64::try_from(tokens).unwrap_or(0),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::audit::{AuditCounters, AuditLog, Completed, Decided, Event};

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(rank(50, 100), 50);
        assert_eq!(rank(95, 100), 95);
        assert_eq!(rank(95, 1), 1);
        assert_eq!(rank(50, 3), 2);
    }

    #[test]
    fn status_filters() {
        assert_eq!("429".parse(), Ok(StatusFilter::Exact(429)));
        assert_eq!("4xx".parse(), Ok(StatusFilter::Class(4)));
        assert_eq!("5XX".parse(), Ok(StatusFilter::Class(5)));
        for bad in ["42", "9xx", "xx", "40x", "abc", "600"] {
            assert!(bad.parse::<StatusFilter>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn filters_pages_buckets_and_retention() {
        for (_label, _scratch, store) in crate::store::testing::stores().await {
            filters_on(store).await;
        }
    }

    async fn filters_on(store: Store) {
        let (log, writer) = AuditLog::start(
            store.clone(),
            crate::base::crypto::AuditSigner::ephemeral(),
            AuditCounters::default(),
            crate::telemetry::audit::Outlets::default(),
        );
        let hour = 3_600_000;
        let base = 1_700_000_000_000 / hour * hour;
        for i in 0..10i64 {
            let denied = i % 3 == 0;
            log.record(Event::Decided(Decided {
                request_id: format!("r{i}"),
                time_ms: base + (i / 5) * hour + i,
                proxy: Some(if i % 2 == 0 { "a" } else { "b" }.into()),
                method: "GET".into(),
                path: "/x".into(),
                status: denied.then_some(403),
                decision: if denied { "rule_denied" } else { "allow" },
                ..Decided::default()
            }))
            .await;
            if !denied {
                log.record(Event::Completed(Completed {
                    request_id: format!("r{i}"),
                    status: Some(200),
                    upstream_status: Some(200),
                    latency_ms: Some(i as f64),
                    ..Completed::default()
                }))
                .await;
            }
        }
        writer.finish().await;

        let all = list(&store, &Filter::default(), 100, None).await.unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0].request_id, "r9", "newest first");
        let page = list(&store, &Filter::default(), 4, Some(Cursor::of(&all[3])))
            .await
            .unwrap();
        assert_eq!(page[0].request_id, "r5");
        let proxy_a = Filter {
            proxy: Some("a".into()),
            status: Some(StatusFilter::Class(4)),
            ..Filter::default()
        };
        let ids: Vec<String> = list(&store, &proxy_a, 100, None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.request_id)
            .collect();
        assert_eq!(ids, ["r6", "r0"]);

        let buckets = telemetry(&store, &Filter::default(), hour).await.unwrap();
        assert_eq!(buckets.len(), 2);
        assert_eq!(buckets[0].start_ms, base);
        assert_eq!(buckets[0].requests, 5);
        assert_eq!(buckets[0].decisions["rule_denied"], 2); // r0, r3
        assert_eq!(buckets[0].status_classes["2xx"], 3);
        assert_eq!(buckets[0].p50_latency_ms, Some(2.0)); // of 1, 2, 4
        assert_eq!(buckets[0].p95_latency_ms, Some(4.0));

        // Chained records go by when their chain signed them, not by the time a record
        // claims: these were all written just now.
        let signer = crate::base::crypto::AuditSigner::ephemeral();
        assert_eq!(prune(&store, &signer, base + hour).await.unwrap(), 0);
        let now = crate::base::clock::now_unix_ms();
        assert_eq!(prune(&store, &signer, now + 1_000).await.unwrap(), 10);
        assert!(
            list(&store, &Filter::default(), 100, None)
                .await
                .unwrap()
                .is_empty()
        );
        // Records from before the chains go by their time.
        sqlx::query(
            "INSERT INTO requests (request_id, time_ms, method, path, decision)
             VALUES ('old', $1, 'GET', '/x', 'allow'), ('new', $2, 'GET', '/x', 'allow')",
        )
        .bind(base)
        .bind(base + 2 * hour)
        .execute(store.pool())
        .await
        .unwrap();
        assert_eq!(prune(&store, &signer, base + hour).await.unwrap(), 1);
    }
}
