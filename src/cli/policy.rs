//! `latchkey apply`, `check` and `export`: the policy file, whole.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};

use crate::pb::{ApplyRequest, CheckRequest, ExportRequest, Header};
use crate::policy::PolicyFile;

use super::output::{Format, Output, render};
use super::{AdminConn, authorized, connect, resolve_material, status_error};

#[derive(Args)]
pub(super) struct ApplyArgs {
    /// The policy file (YAML).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Report what would change without changing anything.
    #[arg(long)]
    dry_run: bool,
    /// A dry run that shows each changed item before and after (secrets never shown).
    #[arg(long)]
    diff: bool,
    /// With --diff: also what the draft's rules would decide differently on the last
    /// day's recorded requests (`latchkey replay`).
    #[arg(long, requires = "diff")]
    replay: bool,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

pub(super) async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let file = PolicyFile::parse(&text)?;
    let base = args.file.parent().unwrap_or(Path::new("."));
    let (secrets, keys) = resolve_material(&file, base)?;

    let dry_run = args.dry_run || args.diff;
    let mut client = connect(&args.conn).await?;
    let request = authorized(
        &args.conn,
        ApplyRequest {
            policy_yaml: text.clone(),
            secrets,
            keys,
            dry_run,
        },
    )?;
    let changes = client
        .apply(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .changes;
    if !args.diff || !args.out.table() {
        return print_changes(&changes, args.out, dry_run);
    }
    let live = client
        .export(authorized(&args.conn, ExportRequest {})?)
        .await
        .map_err(status_error)?
        .into_inner()
        .policy_yaml;
    super::diff::print(&changes, &PolicyFile::parse(&live)?, &file);
    println!("{} would change", plural(changes.len(), "item"));
    if args.replay {
        let replayed = super::replay::ask(&text, base, None, None, &args.conn).await?;
        super::replay::print(&replayed, args.out)?;
    }
    Ok(())
}

/// What a change did: a line per item, or JSON.
pub(super) fn print_changes(
    changes: &[crate::pb::Change],
    out: Output,
    dry_run: bool,
) -> anyhow::Result<()> {
    if !out.table() {
        let rows: Vec<_> = changes
            .iter()
            .map(|c| serde_json::json!({"kind": c.kind, "name": c.name, "action": c.action}))
            .collect();
        out.print(&rows)?;
    } else if changes.is_empty() {
        println!("no changes");
    } else {
        for c in changes {
            println!("{} {}: {}", c.kind, c.name, c.action);
        }
        let verb = if dry_run { "would change" } else { "changed" };
        println!("{} {verb}", plural(changes.len(), "item"));
    }
    Ok(())
}

pub(super) fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[derive(Args)]
pub(super) struct CheckArgs {
    /// The proxy the request would go to (the first path segment agents use).
    #[arg(long)]
    proxy: String,
    /// The HTTP method, e.g. `POST`.
    #[arg(long)]
    method: String,
    /// The upstream path with an optional query, e.g. `/v1/charges?limit=3`.
    #[arg(long)]
    path: String,
    /// Judge the request as this proxy key's owner.
    #[arg(long, conflicts_with = "credential")]
    key: Option<String>,
    /// Judge the request as this proxy credential.
    #[arg(long)]
    credential: Option<String>,
    /// A request header, `name:value`; repeat for more.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// A file holding the request body.
    #[arg(long)]
    body: Option<PathBuf>,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: AdminConn,
}

pub(super) async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| anyhow!("--header {h:?}: expected NAME:VALUE"))?;
            Ok(Header {
                name: name.trim().to_owned(),
                value: value.trim_start().to_owned(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let body = args
        .body
        .as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
        .transpose()?;
    let mut client = connect(&args.conn).await?;
    let request = authorized(
        &args.conn,
        CheckRequest {
            proxy: args.proxy.clone(),
            method: args.method.clone(),
            path: args.path.clone(),
            key: args.key.clone().unwrap_or_default(),
            credential: args.credential.clone().unwrap_or_default(),
            headers,
            body,
        },
    )?;
    let r = client
        .check(request)
        .await
        .map_err(status_error)?
        .into_inner();
    if !args.out.table() {
        let rule = r.rule.as_ref().map(|rule| {
            serde_json::json!({
                "id": rule.id, "effect": rule.effect, "priority": rule.priority,
                "notes": (!rule.notes.is_empty()).then_some(&rule.notes),
            })
        });
        let doc = serde_json::json!({
            "allowed": r.allowed,
            "decision": r.decision,
            "status": (r.status != 0).then_some(r.status),
            "message": r.message,
            "proxy": args.proxy,
            "credential": (!r.credential.is_empty()).then_some(&r.credential),
            "rule": rule,
            "default_effect": (!r.default_effect.is_empty()).then_some(&r.default_effect),
            "guards": r.guards,
        });
        args.out.print(&doc)?;
        return if r.allowed {
            Ok(())
        } else {
            Err(Denied.into())
        };
    }
    let who = if r.credential.is_empty() {
        "anyone (proxy rules only)".to_owned()
    } else {
        format!("credential {}", r.credential)
    };
    println!(
        "{} {} on proxy {}, as {who}",
        args.method, args.path, args.proxy
    );
    if r.allowed {
        println!("decision: allow");
    } else {
        println!("decision: {} ({} {})", r.message, r.status, r.decision);
    }
    match &r.rule {
        Some(rule) if rule.notes.is_empty() => {
            println!(
                "rule: {} ({}, priority {})",
                rule.id, rule.effect, rule.priority
            )
        }
        Some(rule) => println!(
            "rule: {} ({}, priority {}): {}",
            rule.id, rule.effect, rule.priority, rule.notes
        ),
        None if !r.default_effect.is_empty()
            && matches!(r.decision.as_str(), "allow" | "rule_denied") =>
        {
            println!(
                "rule: none matched; the proxy's default effect is {}",
                r.default_effect
            )
        }
        None => {}
    }
    for guard in &r.guards {
        println!("guard: {guard}");
    }
    if r.allowed {
        Ok(())
    } else {
        Err(Denied.into())
    }
}

/// An answer of "no", already printed: exit code 1 (`check`: the request would be
/// denied; `doctor`: a check failed). Any other failure exits 2.
#[derive(Debug, thiserror::Error)]
#[error("the request would be denied")]
pub struct Denied;

/// Where `export` writes: `-o yaml|json` to standard output (`table` is YAML: a policy
/// file is its own table), or `-o FILE` (JSON for a `.json` name, else YAML).
#[derive(Debug, Clone)]
pub(super) enum ExportTo {
    Stdout(Format),
    File(PathBuf),
}

pub(super) fn export_to(value: &str) -> Result<ExportTo, String> {
    Ok(match Format::from_str(value, true) {
        Ok(format) => ExportTo::Stdout(format),
        Err(_) if value.is_empty() => return Err("a format or a file name".into()),
        Err(_) => ExportTo::File(PathBuf::from(value)),
    })
}

pub(super) async fn export(to: ExportTo, conn: AdminConn) -> anyhow::Result<()> {
    let mut client = connect(&conn).await?;
    let yaml = client
        .export(authorized(&conn, ExportRequest {})?)
        .await
        .map_err(status_error)?
        .into_inner()
        .policy_yaml;
    let as_json = || -> anyhow::Result<String> {
        let doc: serde_json::Value = serde_norway::from_str(&yaml)?;
        render(Format::Json, &doc)
    };
    match to {
        ExportTo::Stdout(Format::Json) => print!("{}", as_json()?),
        ExportTo::Stdout(_) => print!("{yaml}"),
        ExportTo::File(path) => {
            let text = if path.extension().is_some_and(|e| e == "json") {
                as_json()?
            } else {
                yaml
            };
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
    }
    Ok(())
}
