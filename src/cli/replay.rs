//! `latchkey replay`: what a draft policy would decide differently on the recorded
//! requests, before it is applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::log::parse_when;
use super::output::Output;
use super::{AdminConn, authorized, connect, resolve_material, rfc3339, status_error};
use crate::pb::{ReplayRequest, ReplayResponse, ResolvedSecret};
use crate::policy::PolicyFile;

#[derive(Args)]
pub(super) struct ReplayArgs {
    /// The draft policy file (YAML).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Records from this time on: RFC 3339 or an age such as `24h` (default: the last
    /// day).
    #[arg(long, value_parser = parse_when)]
    since: Option<i64>,
    /// Only this proxy's records.
    #[arg(long)]
    proxy: Option<String>,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

/// Changes alike: proxy, rule, what was decided, what would be.
type Group<'a> = (&'a str, &'a str, &'a str, &'a str);

pub(super) async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let base = args.file.parent().unwrap_or(Path::new("."));
    let r = ask(&text, base, args.since, args.proxy, &args.conn).await?;
    print(&r, args.out)
}

/// The draft replayed on the records since `since` (default: the last day).
pub(super) async fn ask(
    text: &str,
    base: &Path,
    since: Option<i64>,
    proxy: Option<String>,
    conn: &AdminConn,
) -> anyhow::Result<ReplayResponse> {
    let file = PolicyFile::parse(text)?;
    // The draft only compiles on the server: nothing is sent upstream, so a secret this
    // machine cannot read stands in as a placeholder.
    let (secrets, keys) = resolve_material(&file, base).or_else(|e| {
        eprintln!("note: {e}; replaying with placeholder secrets (replay calls no vendor)");
        let placeholders = (file.target_secrets())
            .map(|c| ResolvedSecret {
                credential: c.name.clone(),
                value: "placeholder".to_owned(),
            })
            .collect();
        anyhow::Ok((placeholders, Vec::new()))
    })?;
    let day_ago = crate::base::clock::now_unix_ms() - 86_400_000;
    let request = ReplayRequest {
        policy_yaml: text.to_owned(),
        secrets,
        keys,
        since_ms: since.unwrap_or(day_ago),
        proxy: proxy.unwrap_or_default(),
    };
    let mut client = connect(conn).await?;
    Ok(client
        .replay(authorized(conn, request)?)
        .await
        .map_err(status_error)?
        .into_inner())
}

pub(super) fn print(r: &ReplayResponse, out: Output) -> anyhow::Result<()> {
    if !out.table() {
        let changed: Vec<_> = (r.changed.iter())
            .map(|c| {
                serde_json::json!({
                    "request_id": c.request_id,
                    "time": rfc3339(c.time_ms / 1000),
                    "proxy": c.proxy,
                    "credential": c.credential,
                    "method": c.method,
                    "path": c.path,
                    "was": c.was,
                    "now": c.now,
                    "rule_id": (!c.rule_id.is_empty()).then_some(&c.rule_id),
                })
            })
            .collect();
        let reasons: serde_json::Map<_, _> = (r.unjudged_reasons.iter())
            .map(|u| (u.reason.clone(), u.count.into()))
            .collect();
        return out.print(&serde_json::json!({
            "judged": r.judged,
            "unjudged": r.unjudged,
            "changed": changed,
            "changed_total": r.changed_total,
            "unjudged_reasons": reasons,
        }));
    }
    // Grouped by proxy, rule and change, with a few examples each.
    let mut groups: BTreeMap<Group, (u64, Vec<String>)> = BTreeMap::new();
    for c in &r.changed {
        let rule = if c.rule_id.is_empty() {
            "-"
        } else {
            &c.rule_id
        };
        let group = groups.entry((&c.proxy, rule, &c.was, &c.now)).or_default();
        group.0 += 1;
        if group.1.len() < 3 {
            group.1.push(format!("{} {}", c.method, c.path));
        }
    }
    println!(
        "{} judged, {} unjudged, {} would be decided differently",
        r.judged, r.unjudged, r.changed_total
    );
    for ((proxy, rule, was, now), (count, examples)) in &groups {
        println!(
            "  {count} on proxy {proxy}: {was} -> {now} (rule {rule}), e.g. {}",
            examples.join(", ")
        );
    }
    if r.changed_total > r.changed.len() as u64 {
        println!("  (the first {} listed)", r.changed.len());
    }
    for u in &r.unjudged_reasons {
        println!("  unjudged: {} ({})", u.reason, u.count);
    }
    Ok(())
}
