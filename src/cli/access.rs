//! `latchkey key …` and `latchkey token …`: run keys for agents, tokens for the admin API.

use std::time::Duration;

use clap::Subcommand;

use crate::pb::{
    CreateTokenRequest, IssueKeyRequest, IssuedKey, ListKeysRequest, ListTokensRequest,
    ReleaseKeyRequest, RevokeKeyRequest, RevokeTokenRequest,
};

use super::output::Output;
use super::{AdminConn, authorized, connect, rfc3339, status_error};

#[derive(Subcommand)]
pub(super) enum KeyCommand {
    /// Print a new run key of a proxy credential, once.
    Issue {
        /// The proxy credential the key belongs to (its rules and limits apply).
        #[arg(long, required_unless_present = "identity_token")]
        credential: Option<String>,
        /// Mint the key with this workload token (a JWT file, such as a projected
        /// service-account token) instead of an admin token: the credential is the one
        /// whose `identity` trusts it, within its maxima. Sent to the gateway.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["credential", "cap_period", "tokens_per_minute", "tokens_per_day"])]
        identity_token: Option<std::path::PathBuf>,
        /// The agent listener that answers mints (`/latchkey/v1/run-keys`).
        #[arg(
            long,
            env = "LATCHKEY_GATEWAY",
            default_value = "http://127.0.0.1:10000"
        )]
        gateway: String,
        /// How long the key lives, e.g. `90s`, `15m`, `2h`, `7d`.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Stop the key once its requests cost this much (USD).
        #[arg(long)]
        spend_cap_usd: Option<f64>,
        /// Reset the spend cap each UTC `day`, `week` (from Monday) or `month`; without
        /// it, the cap holds for the key's whole life.
        #[arg(long, value_parser = ["day", "week", "month"], requires = "spend_cap_usd")]
        cap_period: Option<String>,
        /// LLM tokens the key may use per minute (from the usage answers report).
        #[arg(long)]
        tokens_per_minute: Option<u64>,
        /// LLM tokens the key may use per UTC day.
        #[arg(long)]
        tokens_per_day: Option<u64>,
        /// A label, such as the agent run's id.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List keys by id (never the keys themselves): all, or a page with --limit.
    List {
        /// Only this proxy credential's keys.
        #[arg(long)]
        credential: Option<String>,
        /// One page of at most this many keys (at most 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this key id (the last of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Revoke a key by id; the next request with it is refused.
    Revoke {
        /// The key's id (`key_…`), as `key list` shows it.
        id: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Let a key an anomaly alert quarantined through again, on every replica.
    Release {
        /// The key's id (`key_…`), as the alert and `key list` show it.
        id: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
}

pub(super) async fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Issue {
            credential,
            ttl,
            spend_cap_usd,
            cap_period,
            tokens_per_minute,
            tokens_per_day,
            label,
            identity_token,
            gateway,
            out,
            conn,
        } => {
            if let Some(file) = identity_token {
                let asked = serde_json::json!({
                    "ttl_seconds": ttl.map(|t| t.as_secs().max(1)),
                    "spend_cap_usd": spend_cap_usd,
                    "label": label,
                });
                let k = mint(&gateway, &file, &asked).await?;
                return show_issued(&out, k);
            }
            let mut client = connect(&conn).await?;
            let request = authorized(
                &conn,
                IssueKeyRequest {
                    credential: credential.unwrap_or_default(),
                    ttl_seconds: ttl.map(|t| t.as_secs().max(1)),
                    spend_cap_usd,
                    label: label.unwrap_or_default(),
                    cap_period: cap_period.unwrap_or_default(),
                    tokens_per_minute,
                    tokens_per_day,
                },
            )?;
            let k = client
                .issue_key(request)
                .await
                .map_err(status_error)?
                .into_inner();
            show_issued(&out, k)?;
        }
        KeyCommand::List {
            credential,
            limit,
            after,
            out,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            // Every page, unless one page of `limit` keys was asked for.
            let mut keys = Vec::new();
            let mut token = after.unwrap_or_default();
            loop {
                let request = authorized(
                    &conn,
                    ListKeysRequest {
                        credential: credential.clone().unwrap_or_default(),
                        page_size: limit.unwrap_or(1000),
                        page_token: token,
                    },
                )?;
                let page = client
                    .list_keys(request)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                keys.extend(page.keys);
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
                if limit.is_some() {
                    eprintln!("more: --after {token}");
                    break;
                }
            }
            let now = crate::base::clock::now_unix();
            let status = |k: &crate::pb::KeyInfo| {
                if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|t| t <= now) {
                    "expired"
                } else if k.quarantined_at_ms.is_some() {
                    "quarantined"
                } else {
                    "active"
                }
            };
            if !out.table() {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "id": k.id,
                            "credential": k.credential,
                            "source": k.source,
                            "label": (!k.label.is_empty()).then_some(&k.label),
                            "status": status(k),
                            "created_at": rfc3339(k.created_at),
                            "expires_at": k.expires_at.map(rfc3339),
                            "revoked_at": k.revoked_at.map(rfc3339),
                            "quarantined_at": k.quarantined_at_ms.map(|ms| rfc3339(ms / 1000)),
                            "spend_cap_usd": k.spend_cap_usd,
                            "spent_usd": k.spent_usd,
                            "cap_period": (!k.cap_period.is_empty()).then_some(&k.cap_period),
                            "tokens_per_minute": k.tokens_per_minute,
                            "tokens_per_day": k.tokens_per_day,
                        })
                    })
                    .collect();
                out.print(&rows)?;
            } else {
                println!(
                    "{:<22} {:<20} {:<8} {:<16} {:<8} {:<21} SPENT/CAP USD",
                    "ID", "CREDENTIAL", "SOURCE", "LABEL", "STATUS", "EXPIRES"
                );
                for k in &keys {
                    println!(
                        "{:<22} {:<20} {:<8} {:<16} {:<8} {:<21} {:.2}/{}",
                        k.id,
                        k.credential,
                        k.source,
                        if k.label.is_empty() { "-" } else { &k.label },
                        status(k),
                        k.expires_at.map_or("-".to_owned(), rfc3339),
                        k.spent_usd,
                        k.spend_cap_usd
                            .map_or("-".to_owned(), |c| format!("{c:.2}")),
                    );
                }
            }
        }
        KeyCommand::Revoke { id, out, conn } => {
            let mut client = connect(&conn).await?;
            let request = authorized(&conn, RevokeKeyRequest { id: id.clone() })?;
            let r = client
                .revoke_key(request)
                .await
                .map_err(status_error)?
                .into_inner();
            say_revoked("key", &id, r.already_revoked, out)?;
        }
        KeyCommand::Release { id, out, conn } => {
            let mut client = connect(&conn).await?;
            let request = authorized(&conn, ReleaseKeyRequest { id: id.clone() })?;
            let r = client
                .release_key(request)
                .await
                .map_err(status_error)?
                .into_inner();
            match (out.table(), r.not_quarantined) {
                (true, true) => println!("key {id} was not quarantined"),
                (true, false) => println!("key {id} released"),
                (false, _) => out.print(&serde_json::json!({
                    "id": id, "released": !r.not_quarantined,
                }))?,
            }
        }
    }
    Ok(())
}

pub(super) fn say_revoked(what: &str, id: &str, already: bool, out: Output) -> anyhow::Result<()> {
    match (out.table(), already) {
        (true, true) => println!("{what} {id} was already revoked"),
        (true, false) => println!("{what} {id} revoked"),
        (false, _) => out.print(&serde_json::json!({
            "id": id, "revoked": true, "already_revoked": already,
        }))?,
    }
    Ok(())
}

#[derive(Subcommand)]
pub(super) enum TokenCommand {
    /// Print a new admin token once: `admin` may change policy, `viewer` may only read.
    Create {
        /// A name for people, e.g. who or what holds the token.
        #[arg(long)]
        name: String,
        /// `admin` may change policy and keys; `viewer` may only read.
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List admin tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Revoke an admin token by id; it is refused from the next call on.
    Revoke {
        /// The token's id, as `token list` shows it.
        id: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
}

pub(super) async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            out,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            let t = client
                .create_token(authorized(&conn, CreateTokenRequest { name, role })?)
                .await
                .map_err(status_error)?
                .into_inner();
            if !out.table() {
                let doc = serde_json::json!({
                    "id": t.id, "token": t.token, "name": t.name, "role": t.role,
                });
                out.print(&doc)?;
            } else {
                println!("{}", t.token);
                eprintln!(
                    "admin token {} ({}, {}): shown once, keep it safe",
                    t.id, t.name, t.role
                );
            }
        }
        TokenCommand::List { out, conn } => {
            let mut client = connect(&conn).await?;
            let mut tokens = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = ListTokensRequest {
                    page_size: 1000,
                    page_token,
                };
                let page = client
                    .list_tokens(authorized(&conn, request)?)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                tokens.extend(page.tokens);
                page_token = page.next_page_token;
                if page_token.is_empty() {
                    break;
                }
            }
            if !out.table() {
                let rows: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id,
                            "name": t.name,
                            "role": t.role,
                            "created_at": rfc3339(t.created_at),
                            "revoked_at": t.revoked_at.map(rfc3339),
                        })
                    })
                    .collect();
                out.print(&rows)?;
            } else {
                println!(
                    "{:<22} {:<24} {:<7} {:<21} REVOKED",
                    "ID", "NAME", "ROLE", "CREATED"
                );
                for t in &tokens {
                    println!(
                        "{:<22} {:<24} {:<7} {:<21} {}",
                        t.id,
                        t.name,
                        t.role,
                        rfc3339(t.created_at),
                        t.revoked_at.map_or("-".to_owned(), rfc3339)
                    );
                }
            }
        }
        TokenCommand::Revoke { id, out, conn } => {
            let mut client = connect(&conn).await?;
            let r = client
                .revoke_token(authorized(&conn, RevokeTokenRequest { id: id.clone() })?)
                .await
                .map_err(status_error)?
                .into_inner();
            say_revoked("admin token", &id, r.already_revoked, out)?;
        }
    }
    Ok(())
}

fn show_issued(out: &Output, k: IssuedKey) -> anyhow::Result<()> {
    if !out.table() {
        let doc = serde_json::json!({
            "id": k.id,
            "key": k.key,
            "credential": k.credential,
            "expires_at": k.expires_at.map(rfc3339),
            "spend_cap_usd": k.spend_cap_usd,
            "label": (!k.label.is_empty()).then_some(&k.label),
        });
        out.print(&doc)?;
    } else {
        println!("{}", k.key);
        eprintln!(
            "key {} for {}{}: shown once, keep it safe",
            k.id,
            k.credential,
            k.expires_at
                .map(|t| format!(", expires {}", rfc3339(t)))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// A run key minted at the gateway with the workload token in `file`.
async fn mint(
    gateway: &str,
    file: &std::path::Path,
    asked: &serde_json::Value,
) -> anyhow::Result<IssuedKey> {
    use anyhow::Context;
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("reading the identity token {}", file.display()))?;
    let url = format!("{}/latchkey/v1/run-keys", gateway.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(token.trim())
        .json(asked)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .with_context(|| format!("POST {url}: {status}, not JSON"))?;
    if !status.is_success() {
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("no reason given");
        anyhow::bail!("the gateway refused to mint a key ({status}): {message}");
    }
    let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
    Ok(IssuedKey {
        id: text("id"),
        key: text("key"),
        credential: text("credential"),
        expires_at: body["expires_at"].as_i64(),
        spend_cap_usd: body["spend_cap_usd"].as_f64(),
        label: text("label"),
    })
}
