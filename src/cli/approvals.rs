//! `latchkey approvals`: the requests `approve` rules hold, and a person's decision.

use clap::Subcommand;

use super::output::Output;
use super::{AdminConn, authorized, connect, rfc3339, status_error};
use crate::pb::{ApprovalInfo, DecideApprovalRequest, ListApprovalsRequest};

#[derive(Subcommand)]
pub(super) enum ApprovalCommand {
    /// Requests waiting for a person, newest first (with --all, decided and used too).
    List {
        /// Every approval of the last --limit, not only those waiting.
        #[arg(long)]
        all: bool,
        /// At most this many (at most 1000).
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Let a held request through: the same request, sent again, passes once.
    Approve {
        /// The approval's id (`apr_…`), as the agent's denial and `approvals list` show it.
        id: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Refuse a held request: the same request stays refused until the approval expires.
    Deny {
        /// The approval's id (`apr_…`).
        id: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
}

fn doc(a: &ApprovalInfo) -> serde_json::Value {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    serde_json::json!({
        "id": a.id,
        "status": a.status,
        "proxy": a.proxy,
        "credential": some(&a.credential),
        "key_id": some(&a.key_id),
        "run_label": some(&a.run_label),
        "rule_id": a.rule_id,
        "method": a.method,
        "path": a.path,
        "body": a.body_summary,
        "created_at": rfc3339(a.created_at_ms / 1000),
        "expires_at": rfc3339(a.expires_at_ms / 1000),
        "decided_by": some(&a.decided_by),
    })
}

pub(super) async fn approvals(command: ApprovalCommand) -> anyhow::Result<()> {
    let (id, approve, out, conn) = match command {
        ApprovalCommand::List {
            all,
            limit,
            out,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            let request = ListApprovalsRequest {
                all,
                limit: limit.unwrap_or(1000),
            };
            let list = client
                .list_approvals(authorized(&conn, request)?)
                .await
                .map_err(status_error)?
                .into_inner()
                .approvals;
            if !out.table() {
                return out.print(&list.iter().map(doc).collect::<Vec<_>>());
            }
            println!(
                "{:<22} {:<9} {:<16} {:<22} {:<7} {:<30} BODY",
                "ID", "STATUS", "PROXY", "KEY", "METHOD", "PATH"
            );
            for a in &list {
                let who = [&a.key_id, &a.credential]
                    .into_iter()
                    .find(|s| !s.is_empty())
                    .map_or("-", |s| s.as_str());
                println!(
                    "{:<22} {:<9} {:<16} {:<22} {:<7} {:<30} {}",
                    a.id, a.status, a.proxy, who, a.method, a.path, a.body_summary
                );
            }
            return Ok(());
        }
        ApprovalCommand::Approve { id, out, conn } => (id, true, out, conn),
        ApprovalCommand::Deny { id, out, conn } => (id, false, out, conn),
    };
    let mut client = connect(&conn).await?;
    let decided = client
        .decide_approval(authorized(&conn, DecideApprovalRequest { id, approve })?)
        .await
        .map_err(status_error)?
        .into_inner();
    if out.table() {
        println!(
            "approval {} {}: {} {} on proxy {}",
            decided.id, decided.status, decided.method, decided.path, decided.proxy
        );
        return Ok(());
    }
    out.print(&doc(&decided))
}
