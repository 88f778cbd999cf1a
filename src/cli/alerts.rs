//! `latchkey alerts`: what the anomaly alerts fired, and webhook posts that failed.

use clap::Args;

use super::log::parse_when;
use super::output::Output;
use super::{AdminConn, authorized, connect, rfc3339, status_error};
use crate::pb::{AlertInfo, DeadLetterInfo, ListAlertsRequest};

#[derive(Args)]
pub(super) struct AlertsArgs {
    /// From this time on: RFC 3339 or an age such as `2h` (default: the last day).
    #[arg(long, value_parser = parse_when)]
    since: Option<i64>,
    /// Only this proxy's alerts.
    #[arg(long)]
    proxy: Option<String>,
    /// At most this many, newest first (at most 1000).
    #[arg(long)]
    limit: Option<u32>,
    /// The webhook posts that failed every attempt, whole, instead of the alerts.
    #[arg(long)]
    dead_letters: bool,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn alert_doc(a: &AlertInfo) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "time": rfc3339(a.time_ms / 1000),
        "kind": a.kind,
        "proxy": a.proxy,
        "key_id": some(&a.key_id),
        "run_label": some(&a.run_label),
        "observed": a.observed,
        "baseline": a.baseline,
        "threshold": a.threshold,
        "message": a.message,
        "quarantined": a.quarantined,
        "delivery": a.delivery,
    })
}

fn letter_doc(d: &DeadLetterInfo) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "time": rfc3339(d.time_ms / 1000),
        "webhook": d.webhook,
        "event_id": d.event_id,
        "attempts": d.attempts,
        "error": d.error,
        "payload": serde_json::from_str::<serde_json::Value>(&d.payload)
            .unwrap_or_else(|_| d.payload.clone().into()),
    })
}

pub(super) async fn alerts(args: AlertsArgs) -> anyhow::Result<()> {
    let day_ago = crate::base::clock::now_unix_ms() - 86_400_000;
    let request = ListAlertsRequest {
        since_ms: args.since.unwrap_or(day_ago),
        proxy: args.proxy.unwrap_or_default(),
        limit: args.limit.unwrap_or(1000),
        dead_letters: args.dead_letters,
    };
    let mut client = connect(&args.conn).await?;
    let list = client
        .list_alerts(authorized(&args.conn, request)?)
        .await
        .map_err(status_error)?
        .into_inner();
    let out = args.out;
    if args.dead_letters {
        if !out.table() {
            return out.print(&list.dead_letters.iter().map(letter_doc).collect::<Vec<_>>());
        }
        println!(
            "{:<20} {:<24} {:<30} {:<8} ERROR",
            "TIME", "EVENT", "WEBHOOK", "ATTEMPTS"
        );
        for d in &list.dead_letters {
            println!(
                "{:<20} {:<24} {:<30} {:<8} {}",
                rfc3339(d.time_ms / 1000),
                d.event_id,
                d.webhook,
                d.attempts,
                d.error
            );
        }
        return Ok(());
    }
    if !out.table() {
        return out.print(&list.alerts.iter().map(alert_doc).collect::<Vec<_>>());
    }
    println!(
        "{:<20} {:<14} {:<16} {:<22} {:<11} {:<11} MESSAGE",
        "TIME", "KIND", "PROXY", "KEY", "ACTION", "DELIVERY"
    );
    for a in &list.alerts {
        println!(
            "{:<20} {:<14} {:<16} {:<22} {:<11} {:<11} {}",
            rfc3339(a.time_ms / 1000),
            a.kind,
            a.proxy,
            some(&a.key_id).unwrap_or("-"),
            if a.quarantined { "quarantine" } else { "-" },
            a.delivery,
            a.message
        );
    }
    Ok(())
}
