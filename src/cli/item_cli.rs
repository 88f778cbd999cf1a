//! `latchkey target|credential|proxy|rule create|get|list|update|delete`: one policy item
//! at a time, in its policy-file form.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Subcommand;

use super::output::{Format, Output, render};
use super::policy::print_changes;
use super::{AdminConn, authorized, connect, resolve_material, status_error};
use crate::control::items::Kind;
use crate::pb::{DeleteItemRequest, GetItemRequest, ItemKind, ListItemsRequest, PutItemRequest};
use crate::policy::PolicyFile;

#[derive(Subcommand)]
pub enum ItemCommand {
    /// Create one from its policy-file form (YAML or JSON) in a file, or `-` for stdin.
    Create {
        /// The item's policy-file form (YAML or JSON); `-` for standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Check and report, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Print one in its policy-file form (YAML; JSON with -o json). Never a secret.
    Get {
        /// Its name (a rule: its id).
        name: String,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List them by name: all, or one page with --limit.
    List {
        /// One page of at most this many (the next page's `--after` is printed to stderr).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this name (the last of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Replace one (named by the `name`, or a rule's `id`, in the file) with its new form.
    /// A target credential given `secret: { sealed: true }` keeps the secret it has.
    Update {
        /// The item's policy-file form (YAML or JSON); `-` for standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Check and report, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Delete one; refused, naming them, while other items refer to it.
    Delete {
        /// Its name (a rule: its id).
        name: String,
        /// Check and report, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
}

fn pb_kind(kind: Kind) -> ItemKind {
    match kind {
        Kind::Target => ItemKind::Target,
        Kind::Credential => ItemKind::Credential,
        Kind::Proxy => ItemKind::Proxy,
        Kind::Rule => ItemKind::Rule,
    }
}

/// The columns a listing shows besides the name, by kind.
fn columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Target => &["url"],
        Kind::Credential => &["type", "auth"],
        Kind::Proxy => &["target", "target_credential", "default_effect"],
        Kind::Rule => &["proxy", "credential", "effect", "priority", "path"],
    }
}

pub async fn run(kind: Kind, command: ItemCommand) -> anyhow::Result<()> {
    match command {
        ItemCommand::Create {
            file,
            dry_run,
            out,
            conn,
        } => put(kind, &file, dry_run, out, conn, true).await,
        ItemCommand::Update {
            file,
            dry_run,
            out,
            conn,
        } => put(kind, &file, dry_run, out, conn, false).await,
        ItemCommand::Delete {
            name,
            dry_run,
            out,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            let request = DeleteItemRequest {
                kind: pb_kind(kind) as i32,
                name,
                dry_run,
            };
            let changes = client
                .delete_item(authorized(&conn, request)?)
                .await
                .map_err(status_error)?
                .into_inner()
                .changes;
            print_changes(&changes, out, dry_run)
        }
        ItemCommand::Get { name, out, conn } => {
            let mut client = connect(&conn).await?;
            let request = GetItemRequest {
                kind: pb_kind(kind) as i32,
                name,
            };
            let item = client
                .get_item(authorized(&conn, request)?)
                .await
                .map_err(status_error)?
                .into_inner();
            let spec: serde_json::Value = serde_json::from_str(&item.spec_json)?;
            // Its table is its policy-file form.
            match out.format() {
                Format::Table => print!("{}", render(Format::Yaml, &spec)?),
                _ => out.print(&spec)?,
            }
            Ok(())
        }
        ItemCommand::List {
            limit,
            after,
            out,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            let mut items = Vec::new();
            let mut token = after.unwrap_or_default();
            // Without --limit, every page (of the server's largest size) in turn.
            let more = loop {
                let request = ListItemsRequest {
                    kind: pb_kind(kind) as i32,
                    page_size: limit.unwrap_or(1000),
                    page_token: token,
                };
                let page = client
                    .list_items(authorized(&conn, request)?)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                items.extend(page.items);
                token = page.next_page_token;
                if token.is_empty() || limit.is_some() {
                    break token;
                }
            };
            let specs = items
                .iter()
                .map(|i| Ok((i.name.as_str(), serde_json::from_str(&i.spec_json)?)))
                .collect::<anyhow::Result<Vec<(&str, serde_json::Value)>>>()?;
            if !out.table() {
                let all: Vec<_> = specs.into_iter().map(|(_, s)| s).collect();
                out.print(&all)?;
            } else {
                print_table(kind, &specs);
            }
            if !more.is_empty() {
                eprintln!("more: --after {more}");
            }
            Ok(())
        }
    }
}

fn print_table(kind: Kind, specs: &[(&str, serde_json::Value)]) {
    let header: Vec<String> = std::iter::once(if kind == Kind::Rule { "id" } else { "name" })
        .chain(columns(kind).iter().copied())
        .map(str::to_uppercase)
        .collect();
    let rows: Vec<Vec<String>> = specs
        .iter()
        .map(|(name, spec)| {
            std::iter::once(name.to_string())
                .chain(columns(kind).iter().map(|c| match &spec[*c] {
                    serde_json::Value::Null => "-".to_owned(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

async fn put(
    kind: Kind,
    file: &Path,
    dry_run: bool,
    out: Output,
    conn: AdminConn,
    create: bool,
) -> anyhow::Result<()> {
    let spec = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    // A credential's secret and keys are resolved here, as `apply` does.
    let (secrets, keys) = if kind == Kind::Credential {
        let credential = serde_norway::from_str(&spec).map_err(|e| anyhow!("credential: {e}"))?;
        let one = PolicyFile {
            credentials: vec![credential],
            ..PolicyFile::default()
        };
        let base = file.parent().unwrap_or(Path::new("."));
        resolve_material(&one, base)?
    } else {
        (Vec::new(), Vec::new())
    };
    let mut client = connect(&conn).await?;
    let request = authorized(
        &conn,
        PutItemRequest {
            kind: pb_kind(kind) as i32,
            spec,
            secrets,
            keys,
            dry_run,
        },
    )?;
    let changes = if create {
        client.create_item(request).await
    } else {
        client.update_item(request).await
    }
    .map_err(status_error)?
    .into_inner()
    .changes;
    print_changes(&changes, out, dry_run)
}
