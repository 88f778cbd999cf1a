//! `latchkey requests` and `latchkey telemetry`: the request log, listed and summed.

use std::time::Duration;

use clap::Args;

use crate::pb::{ListRequestsRequest, RequestFilter, TelemetryRequest};

use super::output::Output;
use super::{AdminConn, authorized, connect, status_error};

/// A point in time: RFC 3339 (`2026-11-25T09:00:00Z`) or an age (`90m`, `2h`, `7d` ago).
pub(super) fn parse_when(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(millis_since_epoch(t));
    }
    match humantime::parse_duration(s) {
        Ok(age) => Ok(crate::base::clock::now_unix_ms() - age.as_millis() as i64),
        Err(_) => Err(format!(
            "{s:?}: an RFC 3339 time (2026-11-25T09:00:00Z) or an age such as 2h"
        )),
    }
}

pub(super) fn millis_since_epoch(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Args)]
pub(super) struct LogFilter {
    /// Only this proxy's requests.
    #[arg(long)]
    proxy: Option<String>,
    /// Only this proxy credential's requests.
    #[arg(long)]
    credential: Option<String>,
    /// A key id, as `key list` shows it.
    #[arg(long = "key")]
    key_id: Option<String>,
    /// A run key's label.
    #[arg(long)]
    label: Option<String>,
    /// A status such as `429`, or a class such as `4xx`.
    #[arg(long)]
    status: Option<String>,
    /// `allow` or an error type such as `rule_denied`.
    #[arg(long)]
    decision: Option<String>,
    /// From this time on: RFC 3339 or an age such as `2h`.
    #[arg(long, value_parser = parse_when)]
    since: Option<i64>,
    /// Before this time: RFC 3339 or an age.
    #[arg(long, value_parser = parse_when)]
    until: Option<i64>,
}

impl LogFilter {
    fn into_request(self) -> RequestFilter {
        RequestFilter {
            proxy: self.proxy.unwrap_or_default(),
            credential: self.credential.unwrap_or_default(),
            key_id: self.key_id.unwrap_or_default(),
            label: self.label.unwrap_or_default(),
            status: self.status.unwrap_or_default(),
            decision: self.decision.unwrap_or_default(),
            since_ms: self.since,
            until_ms: self.until,
        }
    }
}

#[derive(Args)]
pub(super) struct RequestsArgs {
    #[command(flatten)]
    filter: LogFilter,
    /// At most this many records.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(super) enum Interval {
    Hour,
    Day,
}

#[derive(Args)]
pub(super) struct TelemetryArgs {
    /// One bucket per hour (the last day, by default) or per day (the last 30 days).
    #[arg(long, value_enum, default_value = "hour")]
    interval: Interval,
    #[command(flatten)]
    filter: LogFilter,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

pub(super) fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

pub(super) async fn requests(args: RequestsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let filter = args.filter.into_request();
    let mut records = Vec::new();
    let mut page = String::new();
    while records.len() < args.limit as usize {
        let want =
            (args.limit as usize - records.len()).min(crate::store::requests::MAX_LIMIT as usize);
        let request = authorized(
            &args.conn,
            ListRequestsRequest {
                filter: Some(filter.clone()),
                limit: want as u32,
                page: page.clone(),
            },
        )?;
        let response = client
            .list_requests(request)
            .await
            .map_err(status_error)?
            .into_inner();
        records.extend(response.records);
        if response.next_page.is_empty() {
            break;
        }
        page = response.next_page;
    }
    if !args.out.table() {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "request_id": r.request_id,
                    "time": rfc3339_ms(r.time_ms),
                    "proxy": nonempty(&r.proxy),
                    "target": nonempty(&r.target),
                    "credential": nonempty(&r.credential),
                    "key_id": nonempty(&r.key_id),
                    "run_label": nonempty(&r.run_label),
                    "method": r.method,
                    "path": r.path,
                    "status": r.status,
                    "upstream_status": r.upstream_status,
                    "decision": r.decision,
                    "rule_id": nonempty(&r.rule_id),
                    "latency_ms": r.latency_ms,
                    "cost_usd": r.cost_usd,
                    "bytes_in": r.bytes_in,
                    "bytes_out": r.bytes_out,
                    "retries": r.retries,
                    "model": nonempty(&r.model),
                    "input_tokens": r.input_tokens,
                    "output_tokens": r.output_tokens,
                    "cached_tokens": r.cached_tokens,
                    "completed": r.completed,
                    "facts": nonempty(&r.facts),
                    "mcp": mcp_of(&r.facts),
                    "supersedes": nonempty(&r.supersedes),
                    "chain": nonempty(&r.chain),
                    "chain_position": (!r.chain.is_empty()).then_some(r.chain_position),
                    "prev_hash": nonempty(&r.prev_hash),
                    "hash": nonempty(&r.hash),
                })
            })
            .collect();
        args.out.print(&rows)?;
        return Ok(());
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let num = |n: Option<u32>| n.map_or("-".to_owned(), |n| n.to_string());
    println!(
        "{:<24} {:<16} {:<18} {:<7} {:<28} {:<6} {:<8} {:<18} {:>9} COST USD",
        "TIME",
        "PROXY",
        "CREDENTIAL",
        "METHOD",
        "PATH",
        "STATUS",
        "UPSTREAM",
        "DECISION",
        "LATENCY"
    );
    for r in &records {
        println!(
            "{:<24} {:<16} {:<18} {:<7} {:<28} {:<6} {:<8} {:<18} {:>9} {}",
            rfc3339_ms(r.time_ms),
            dash(&r.proxy),
            dash(&r.credential),
            r.method,
            match mcp_of(&r.facts) {
                Some(m) => format!(
                    "{} [{}{}]",
                    r.path,
                    m.method.as_deref().unwrap_or("response"),
                    m.tool.map(|t| format!(" {t}")).unwrap_or_default()
                ),
                None => r.path.clone(),
            },
            num(r.status),
            num(r.upstream_status),
            r.decision,
            r.latency_ms.map_or("-".to_owned(), |l| format!("{l:.1}ms")),
            r.cost_usd.map_or("-".to_owned(), |c| format!("{c:.4}")),
        );
    }
    Ok(())
}

/// The MCP method and tool a record's facts keep.
fn mcp_of(facts: &str) -> Option<crate::dataplane::facts::McpFacts<'static>> {
    (!facts.is_empty())
        .then(|| crate::dataplane::facts::Recorded::parse(facts))
        .flatten()
        .and_then(|f| f.mcp)
}

pub(super) async fn telemetry(args: TelemetryArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let mut filter = args.filter.into_request();
    // Without --since: the last day by the hour, the last 30 days by the day.
    let (interval, default_age_ms) = match args.interval {
        Interval::Hour => ("hour", 86_400_000),
        Interval::Day => ("day", 30 * 86_400_000),
    };
    filter
        .since_ms
        .get_or_insert(crate::base::clock::now_unix_ms() - default_age_ms);
    let request = authorized(
        &args.conn,
        TelemetryRequest {
            interval: interval.to_owned(),
            filter: Some(filter),
        },
    )?;
    let buckets = client
        .telemetry(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .buckets;
    if !args.out.table() {
        let rows: Vec<_> = buckets
            .iter()
            .map(|b| {
                serde_json::json!({
                    "start": rfc3339_ms(b.start_ms),
                    "requests": b.requests,
                    "decisions": b.decisions,
                    "status_classes": b.status_classes,
                    "p50_latency_ms": b.p50_latency_ms,
                    "p95_latency_ms": b.p95_latency_ms,
                    "cost_usd": b.cost_usd,
                    "models": b.models.iter().map(|(model, u)| {
                        (model.clone(), serde_json::json!({
                            "requests": u.requests,
                            "input_tokens": u.input_tokens,
                            "cached_tokens": u.cached_tokens,
                            "output_tokens": u.output_tokens,
                            "cost_usd": u.cost_usd,
                        }))
                    }).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        args.out.print(&rows)?;
        return Ok(());
    }
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let counts = |m: &std::collections::HashMap<String, u64>| {
        let mut pairs: Vec<_> = m.iter().collect();
        pairs.sort();
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>10}  DECISIONS / STATUS",
        "START", "REQUESTS", "P50 MS", "P95 MS", "COST USD"
    );
    for b in &buckets {
        println!(
            "{:<24} {:>8} {:>8} {:>8} {:>10.4}  {} / {}",
            rfc3339_ms(b.start_ms),
            b.requests,
            ms(b.p50_latency_ms),
            ms(b.p95_latency_ms),
            b.cost_usd,
            counts(&b.decisions),
            counts(&b.status_classes),
        );
        let mut models: Vec<_> = b.models.iter().collect();
        models.sort_by(|a, b| a.0.cmp(b.0));
        for (model, u) in models {
            println!(
                "{:<24} {:>8} {:>8} {:>8} {:>10.4}  model {model}: {} in, {} cached, {} out",
                "",
                u.requests,
                "",
                "",
                u.cost_usd,
                u.input_tokens,
                u.cached_tokens,
                u.output_tokens
            );
        }
    }
    Ok(())
}
