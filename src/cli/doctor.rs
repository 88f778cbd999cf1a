//! `latchkey doctor`: is this setup working? The admin API and the caller's token, client
//! and server versions, what the server reaches (store, Redis, OTLP, the secrets it
//! reads), and with `--envoy` a request through Envoy that latchkey must answer. Exits 0
//! when every check passes, 1 when one fails (each printed), 2 when it cannot run.

use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::output::Output;
use super::policy::Denied;
use super::{AdminConn, authorized, connect, status_error};
use crate::pb::DiagnoseRequest;

#[derive(Args)]
pub(super) struct DoctorArgs {
    /// Envoy's agent listener, e.g. `http://127.0.0.1:10000`: a request without a key
    /// sent there must be answered by latchkey.
    #[arg(long, env = "LATCHKEY_ENVOY_URL")]
    envoy: Option<String>,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

#[derive(Serialize)]
struct Check {
    name: String,
    /// `ok`, `fail` or `skipped`.
    result: &'static str,
    detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        result: if ok { "ok" } else { "fail" },
        detail: detail.into(),
    }
}

pub(super) async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let diagnosis = match connect(&args.conn).await {
        Ok(mut client) => client
            .diagnose(authorized(&args.conn, DiagnoseRequest {})?)
            .await
            .map(tonic::Response::into_inner)
            .map_err(status_error),
        Err(e) => Err(e),
    };
    match diagnosis {
        Err(e) => checks.push(check(
            "admin",
            false,
            format!("{}: {e:#}", args.conn.admin_addr),
        )),
        Ok(d) => {
            checks.push(check(
                "admin",
                true,
                format!(
                    "{} answers; this token's role: {}; mode {}",
                    args.conn.admin_addr, d.role, d.mode
                ),
            ));
            let client_version = env!("CARGO_PKG_VERSION");
            checks.push(check(
                "version",
                d.server_version == client_version,
                format!("client {client_version}, server {}", d.server_version),
            ));
            checks.push(check(
                "policy",
                d.policy_current,
                if d.policy_current {
                    format!("running the store's version {}", d.policy_version)
                } else {
                    format!(
                        "behind the store's version {}: reloads fail (see the server's log)",
                        d.policy_version
                    )
                },
            ));
            checks.extend(d.probes.into_iter().map(|p| check(&p.name, p.ok, p.detail)));
        }
    }
    checks.push(match &args.envoy {
        Some(url) => through_envoy(url).await,
        None => Check {
            name: "envoy".into(),
            result: "skipped",
            detail: "give --envoy URL (Envoy's agent listener) to send a request through it".into(),
        },
    });

    if args.out.table() {
        for c in &checks {
            println!("{:<8} {:<8} {}", c.result, c.name, c.detail);
        }
    } else {
        args.out.print(&checks)?;
    }
    if checks.iter().any(|c| c.result == "fail") {
        return Err(Denied.into());
    }
    Ok(())
}

/// A request without a key, through Envoy: latchkey's JSON denial proves the path from
/// Envoy to latchkey works (Envoy's own answer, e.g. a 5xx with no JSON, does not).
async fn through_envoy(url: &str) -> Check {
    let target = format!("{}/latchkey-doctor/", url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client");
    let response = match client.get(&target).send().await {
        Ok(r) => r,
        Err(e) => return check("envoy", false, format!("{target}: {e}")),
    };
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let answer: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let kind = answer
        .as_ref()
        .and_then(|a| a.pointer("/error/type")?.as_str().map(str::to_owned));
    let request_id = answer
        .as_ref()
        .and_then(|a| a.pointer("/error/request_id")?.as_str().map(str::to_owned));
    match (kind, request_id) {
        (Some(kind), Some(id)) => check(
            "envoy",
            true,
            format!("latchkey answered through Envoy: {status} {kind} (request {id})"),
        ),
        _ => {
            let shown: String = body.chars().take(160).collect();
            check(
                "envoy",
                false,
                format!("{target}: {status} was not latchkey's answer: {shown:?}"),
            )
        }
    }
}
