//! The `latchkey` command line (DESIGN.md §3).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use crate::crypto::{self, MasterKey};
use crate::pb::admin_client::AdminClient;
use crate::pb::{ApplyRequest, ImportedKeys, ResolvedSecret};
use crate::policy_file::PolicyFile;
use crate::serve::{self, ServeConfig};

#[derive(Parser)]
#[command(name = "latchkey", version, about = "Credential gateway for AI agents")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ext_proc, admin and health/metrics servers.
    Serve(ServeArgs),
    /// Make the store match a policy file (idempotent); prints what changed.
    Apply(ApplyArgs),
    /// Print a new master key.
    Keygen,
}

#[derive(Args)]
struct ServeArgs {
    #[arg(
        long,
        env = "LATCHKEY_DATABASE_URL",
        default_value = "sqlite://latchkey.db"
    )]
    database_url: String,
    /// File holding the master key (the key itself is read from LATCHKEY_MASTER_KEY only,
    /// never from a flag, so it stays out of process listings).
    #[arg(long, env = "LATCHKEY_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    #[arg(long, env = "LATCHKEY_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    #[arg(long, env = "LATCHKEY_ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    admin_addr: SocketAddr,
    #[arg(long, env = "LATCHKEY_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    http_addr: SocketAddr,
}

/// Where the admin API is and the token it wants.
#[derive(Args)]
struct AdminConn {
    #[arg(long, env = "LATCHKEY_ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    admin_addr: String,
    #[arg(long, env = "LATCHKEY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

#[derive(Args)]
struct ApplyArgs {
    /// The policy file (YAML).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Report what would change without changing anything.
    #[arg(long)]
    dry_run: bool,
    /// Print the changes as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: AdminConn,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            serve::run(ServeConfig {
                database_url: args.database_url,
                master_key: std::env::var("LATCHKEY_MASTER_KEY")
                    .ok()
                    .map(Zeroizing::new),
                master_key_file: args.master_key_file,
                grpc_addr: args.grpc_addr,
                admin_addr: args.admin_addr,
                http_addr: args.http_addr,
                admin_token: std::env::var("LATCHKEY_ADMIN_TOKEN")
                    .ok()
                    .map(Zeroizing::new),
            })
            .await
        }
        Command::Apply(args) => apply(args).await,
        Command::Keygen => {
            println!("{}", MasterKey::generate());
            Ok(())
        }
    }
}

async fn connect(conn: &AdminConn) -> anyhow::Result<AdminClient<Channel>> {
    let url = if conn.admin_addr.contains("://") {
        conn.admin_addr.clone()
    } else {
        format!("http://{}", conn.admin_addr)
    };
    let channel = Endpoint::from_shared(url)
        .with_context(|| format!("bad admin address {:?}", conn.admin_addr))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the admin API at {}: {e}", conn.admin_addr))?;
    Ok(AdminClient::new(channel))
}

fn authorized<T>(conn: &AdminConn, message: T) -> anyhow::Result<tonic::Request<T>> {
    let token = conn
        .admin_token
        .as_deref()
        .ok_or_else(|| anyhow!("no admin token: set LATCHKEY_ADMIN_TOKEN or --admin-token"))?;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the admin token holds characters a header cannot carry")?,
    );
    Ok(request)
}

/// A gRPC error as one line: its message is written for people.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow!("{}", status.message())
}

/// Imported keys shorter than this are refused: a proxy key must not be guessable.
const MIN_IMPORTED_KEY_LEN: usize = 16;

async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let file = PolicyFile::parse(&text)?;
    let base = args.file.parent().unwrap_or(Path::new("."));
    let mut secrets = Vec::new();
    for (name, secret) in file.target_secrets() {
        let value = secret
            .resolve(base)
            .map_err(|e| anyhow!("credential {name:?}: secret: {e}"))?;
        secrets.push(ResolvedSecret {
            credential: name.to_owned(),
            value,
        });
    }
    let mut keys = Vec::new();
    for (name, refs) in file.imported_keys() {
        let mut sha256 = Vec::new();
        for (i, key) in refs.iter().enumerate() {
            let key = Zeroizing::new(
                key.resolve(base)
                    .map_err(|e| anyhow!("credential {name:?}: keys[{i}]: {e}"))?,
            );
            if key.len() < MIN_IMPORTED_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(anyhow!(
                    "credential {name:?}: keys[{i}]: a proxy key is at least {MIN_IMPORTED_KEY_LEN} printable characters"
                ));
            }
            sha256.push(crypto::hash_key(key.as_bytes()).to_vec());
        }
        keys.push(ImportedKeys {
            credential: name.to_owned(),
            sha256,
        });
    }

    let mut client = connect(&args.conn).await?;
    let request = authorized(
        &args.conn,
        ApplyRequest {
            policy_yaml: text,
            secrets,
            keys,
            dry_run: args.dry_run,
        },
    )?;
    let changes = client
        .apply(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .changes;
    if args.json {
        let rows: Vec<_> = changes
            .iter()
            .map(|c| serde_json::json!({"kind": c.kind, "name": c.name, "action": c.action}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if changes.is_empty() {
        println!("no changes");
    } else {
        for c in &changes {
            println!("{} {}: {}", c.kind, c.name, c.action);
        }
        let verb = if args.dry_run {
            "would change"
        } else {
            "changed"
        };
        println!("{} {verb}", plural(changes.len(), "item"));
    }
    Ok(())
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
