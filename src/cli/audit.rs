//! `latchkey audit verify`: whether the audit's hash chains are intact. Exit 0 when they
//! are, 1 naming the first record edited, deleted or inserted behind latchkey's back.

use clap::{Args, Subcommand};

use super::log::{parse_when, rfc3339_ms};
use super::output::Output;
use super::{AdminConn, Denied, authorized, connect, status_error};
use crate::pb::{AuditBreak, VerifyAuditRequest, VerifyAuditResponse};

#[derive(Subcommand)]
pub(super) enum AuditCommand {
    /// Walk every chain and check each link and signed checkpoint. Exit 0 when intact,
    /// 1 naming the first broken record.
    Verify(VerifyArgs),
}

#[derive(Args)]
pub(super) struct VerifyArgs {
    /// Only from the last checkpoint at or before this time: RFC 3339 or an age such as
    /// `24h` (default: every record kept).
    #[arg(long, value_parser = parse_when)]
    since: Option<i64>,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

pub(super) async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::Verify(args) = command;
    let request = VerifyAuditRequest {
        since_ms: args.since.unwrap_or(0),
    };
    let mut client = connect(&args.conn).await?;
    let report = client
        .verify_audit(authorized(&args.conn, request)?)
        .await
        .map_err(status_error)?
        .into_inner();
    if args.out.table() {
        print_table(&report);
    } else {
        args.out.print(&document(&report))?;
    }
    if report.intact {
        Ok(())
    } else {
        Err(Denied.into())
    }
}

/// Where the break is, in words: the record's row and request id, or the chain position.
fn blame(b: &AuditBreak) -> String {
    let mut at = Vec::new();
    if let Some(seq) = b.seq {
        at.push(format!("record {seq}"));
    }
    if !b.request_id.is_empty() {
        at.push(format!("request {}", b.request_id));
    }
    if !b.chain.is_empty() {
        match b.position {
            Some(p) => at.push(format!("chain {} position {p}", b.chain)),
            None => at.push(format!("chain {}", b.chain)),
        }
    }
    at.join(", ")
}

fn print_table(r: &VerifyAuditResponse) {
    match &r.broken {
        Some(b) => println!("BROKEN at {}: {}", blame(b), b.reason),
        None => println!(
            "intact: {} record(s), {} superseded link(s), {} checkpoint(s) verified",
            r.records, r.superseded, r.checkpoints
        ),
    }
    if r.unchained_before > 0 {
        println!(
            "{} record(s) predate the chains and are not covered",
            r.unchained_before
        );
    }
    if r.chains.is_empty() {
        return;
    }
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:<26} STATE",
        "CHAIN", "FROM", "TO", "RECORDS", "UNSIGNED", "SIGNED AT"
    );
    for c in &r.chains {
        let state = if c.closed { "closed" } else { "open" };
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:>10} {:<26} {state}",
            c.chain,
            c.from,
            c.to,
            c.records,
            c.unsigned,
            rfc3339_ms(c.signed_time_ms)
        );
    }
}

fn document(r: &VerifyAuditResponse) -> serde_json::Value {
    serde_json::json!({
        "intact": r.intact,
        "records": r.records,
        "superseded": r.superseded,
        "checkpoints": r.checkpoints,
        "unchained_before": r.unchained_before,
        "broken": r.broken.as_ref().map(|b| serde_json::json!({
            "chain": (!b.chain.is_empty()).then_some(&b.chain),
            "position": b.position,
            "seq": b.seq,
            "request_id": (!b.request_id.is_empty()).then_some(&b.request_id),
            "reason": b.reason,
        })),
        "chains": r.chains.iter().map(|c| serde_json::json!({
            "chain": c.chain,
            "from": c.from,
            "to": c.to,
            "records": c.records,
            "signed_to": c.signed_to,
            "signed_at": rfc3339_ms(c.signed_time_ms),
            "unsigned": c.unsigned,
            "closed": c.closed,
        })).collect::<Vec<_>>(),
        "public_keys": r.public_keys,
    })
}
