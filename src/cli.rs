//! The `latchkey` command line (DESIGN.md §3).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

mod item_cli;

use item_cli::ItemCommand;

use crate::channel::{Guard, ProvidedTls};
use crate::crypto::{self, MasterKey};
use crate::items::Kind;
use crate::pb::admin_client::AdminClient;
use crate::pb::{
    ApplyRequest, CheckRequest, CreateTokenRequest, ExportRequest, Header, ImportedKeys,
    IssueKeyRequest, ListKeysRequest, ListRequestsRequest, ListTokensRequest, RequestFilter,
    ResolvedSecret, RevokeKeyRequest, RevokeTokenRequest, TelemetryRequest,
};
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
    /// Explain how the live policy decides a request, without calling the upstream.
    Check(CheckArgs),
    /// Issue, list and revoke proxy keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print the live policy as a policy file (secrets by reference, never in clear).
    Export {
        /// Write it to this file instead of standard output.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Create, list and revoke admin API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The request log, newest first.
    Requests(RequestsArgs),
    /// The request log aggregated per hour or day: counts, latency percentiles, cost.
    Telemetry(TelemetryArgs),
    /// Re-seal every stored secret under the running master key (after starting the
    /// replicas with a new LATCHKEY_MASTER_KEY and the old one in
    /// LATCHKEY_MASTER_KEY_PREVIOUS).
    Rekey {
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Print a new master key.
    Keygen,
    /// Targets, one at a time (the policy file's `targets:` items).
    Target {
        #[command(subcommand)]
        command: ItemCommand,
    },
    /// Credentials, one at a time; secrets are write-only.
    Credential {
        #[command(subcommand)]
        command: ItemCommand,
    },
    /// Proxies, one at a time.
    Proxy {
        #[command(subcommand)]
        command: ItemCommand,
    },
    /// Rules, one at a time, named by id.
    Rule {
        #[command(subcommand)]
        command: ItemCommand,
    },
}

/// A point in time: RFC 3339 (`2026-11-25T09:00:00Z`) or an age (`90m`, `2h`, `7d` ago).
fn parse_when(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(millis_since_epoch(t));
    }
    match humantime::parse_duration(s) {
        Ok(age) => Ok(crate::state::now_unix_ms() - age.as_millis() as i64),
        Err(_) => Err(format!(
            "{s:?}: an RFC 3339 time (2026-11-25T09:00:00Z) or an age such as 2h"
        )),
    }
}

fn millis_since_epoch(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Args)]
struct LogFilter {
    #[arg(long)]
    proxy: Option<String>,
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
struct RequestsArgs {
    #[command(flatten)]
    filter: LogFilter,
    /// At most this many records.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: AdminConn,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Interval {
    Hour,
    Day,
}

#[derive(Args)]
struct TelemetryArgs {
    #[arg(long, value_enum, default_value = "hour")]
    interval: Interval,
    #[command(flatten)]
    filter: LogFilter,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: AdminConn,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new admin token once: `admin` may change policy, `viewer` may only read.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List admin tokens (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Revoke an admin token by id; it is refused from the next call on.
    Revoke {
        id: String,
        #[command(flatten)]
        conn: AdminConn,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a new run key of a proxy credential, once.
    Issue {
        #[arg(long)]
        credential: String,
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
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List keys by id (never the keys themselves): all, or a page with --limit.
    List {
        #[arg(long)]
        credential: Option<String>,
        /// One page of at most this many keys (at most 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this key id (the last of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Revoke a key by id; the next request with it is refused.
    Revoke {
        id: String,
        #[command(flatten)]
        conn: AdminConn,
    },
}

#[derive(Args)]
struct CheckArgs {
    #[arg(long)]
    proxy: String,
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
    /// Print the explanation as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: AdminConn,
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
    /// `host:port`, or `unix:/path` for a Unix domain socket beside Envoy.
    #[arg(long, env = "LATCHKEY_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: serve::GrpcAddr,
    #[arg(long, env = "LATCHKEY_ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    admin_addr: SocketAddr,
    #[arg(long, env = "LATCHKEY_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    http_addr: SocketAddr,
    /// Share rate limits between replicas in this Redis; per replica when unset.
    #[arg(long, env = "LATCHKEY_REDIS_URL")]
    redis_url: Option<String>,
    /// Delete request-log records older than this many days (checked hourly); 0 keeps
    /// them all.
    #[arg(long, env = "LATCHKEY_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    audit_retention_days: u32,
    /// TLS for the admin listener: certificate chain (PEM).
    #[arg(long, env = "LATCHKEY_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// TLS for the admin listener: private key (PEM).
    #[arg(long, env = "LATCHKEY_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// Require admin clients to present a certificate signed by this CA (mTLS).
    #[arg(
        long,
        env = "LATCHKEY_ADMIN_TLS_CLIENT_CA",
        requires = "admin_tls_cert"
    )]
    admin_tls_client_ca: Option<PathBuf>,
    /// Mutual TLS on the TCP ext_proc port: latchkey's certificate (PEM). Without it,
    /// latchkey mints a local CA and certificates for itself and Envoy under
    /// --grpc-tls-dir.
    #[arg(
        long,
        env = "LATCHKEY_GRPC_TLS_CERT",
        requires_all = ["grpc_tls_key", "grpc_tls_client_ca"]
    )]
    grpc_tls_cert: Option<PathBuf>,
    /// Mutual TLS on the TCP ext_proc port: latchkey's private key (PEM).
    #[arg(long, env = "LATCHKEY_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    grpc_tls_key: Option<PathBuf>,
    /// Mutual TLS on the TCP ext_proc port: the CA that signed Envoy's client
    /// certificate; callers without one it signed fail the handshake.
    #[arg(long, env = "LATCHKEY_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    grpc_tls_client_ca: Option<PathBuf>,
    /// Where the minted local CA and certificates live (Envoy's shipped configs read
    /// them from `.latchkey/tls/` when run from the same directory).
    #[arg(long, env = "LATCHKEY_GRPC_TLS_DIR", default_value = ".latchkey/tls")]
    grpc_tls_dir: PathBuf,
    /// Serve the ext_proc port over plain, unauthenticated TCP: any process that
    /// reaches it can obtain upstream credentials. For throwaway setups only.
    #[arg(long, env = "LATCHKEY_GRPC_INSECURE", conflicts_with = "grpc_tls_cert")]
    grpc_insecure: bool,
    /// The Envoy filter in front: `ext_proc` (the full feature set) or `ext_authz`
    /// (headers only: policies that need bodies or responses are refused). Both APIs
    /// are served either way.
    #[arg(long, env = "LATCHKEY_MODE", value_enum, default_value = "ext_proc")]
    mode: serve::Mode,
}

/// Where the admin API is and the token it wants.
#[derive(Args)]
struct AdminConn {
    /// `host:port`, or `https://host:port` for an admin API behind TLS.
    #[arg(long, env = "LATCHKEY_ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    admin_addr: String,
    #[arg(long, env = "LATCHKEY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The CA that signed the admin API's certificate (PEM): implies TLS.
    #[arg(long, env = "LATCHKEY_ADMIN_CA")]
    admin_ca: Option<PathBuf>,
    /// A client certificate and key (PEM), for an admin API that requires mTLS.
    #[arg(
        long,
        env = "LATCHKEY_ADMIN_CLIENT_CERT",
        requires = "admin_client_key"
    )]
    admin_client_cert: Option<PathBuf>,
    #[arg(
        long,
        env = "LATCHKEY_ADMIN_CLIENT_KEY",
        requires = "admin_client_cert"
    )]
    admin_client_key: Option<PathBuf>,
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
                previous_master_keys: std::env::var("LATCHKEY_MASTER_KEY_PREVIOUS")
                    .ok()
                    .map(Zeroizing::new),
                grpc_addr: args.grpc_addr,
                grpc_guard: match (args.grpc_insecure, args.grpc_tls_cert) {
                    (true, _) => Guard::Insecure,
                    (false, Some(cert)) => Guard::Provided(ProvidedTls {
                        cert,
                        key: args.grpc_tls_key.expect("required by clap"),
                        client_ca: args.grpc_tls_client_ca.expect("required by clap"),
                    }),
                    (false, None) => Guard::Minted(args.grpc_tls_dir),
                },
                admin_addr: args.admin_addr,
                http_addr: args.http_addr,
                admin_token: std::env::var("LATCHKEY_ADMIN_TOKEN")
                    .ok()
                    .map(Zeroizing::new),
                redis_url: args.redis_url,
                audit_retention_days: args.audit_retention_days,
                mode: args.mode,
                admin_tls: args
                    .admin_tls_cert
                    .zip(args.admin_tls_key)
                    .map(|(cert, key)| serve::AdminTls {
                        cert,
                        key,
                        client_ca: args.admin_tls_client_ca,
                    }),
            })
            .await
        }
        Command::Apply(args) => apply(args).await,
        Command::Check(args) => check(args).await,
        Command::Key { command } => key(command).await,
        Command::Export { output, conn } => export(output, conn).await,
        Command::Token { command } => token(command).await,
        Command::Rekey { conn } => {
            let mut client = connect(&conn).await?;
            let r = client
                .rekey(authorized(&conn, crate::pb::RekeyRequest {})?)
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{} secret(s) re-sealed; every secret is sealed under master key {}",
                r.resealed, r.master_key_id
            );
            Ok(())
        }
        Command::Requests(args) => requests(args).await,
        Command::Telemetry(args) => telemetry(args).await,
        Command::Target { command } => item_cli::run(Kind::Target, command).await,
        Command::Credential { command } => item_cli::run(Kind::Credential, command).await,
        Command::Proxy { command } => item_cli::run(Kind::Proxy, command).await,
        Command::Rule { command } => item_cli::run(Kind::Rule, command).await,
        Command::Keygen => {
            println!("{}", MasterKey::generate());
            Ok(())
        }
    }
}

async fn connect(conn: &AdminConn) -> anyhow::Result<AdminClient<Channel>> {
    let tls = conn.admin_ca.is_some() || conn.admin_addr.starts_with("https://");
    let url = if conn.admin_addr.contains("://") {
        conn.admin_addr.clone()
    } else if tls {
        format!("https://{}", conn.admin_addr)
    } else {
        format!("http://{}", conn.admin_addr)
    };
    let mut endpoint = Endpoint::from_shared(url)
        .with_context(|| format!("bad admin address {:?}", conn.admin_addr))?;
    if tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &conn.admin_ca {
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&conn.admin_client_cert, &conn.admin_client_key) {
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint.tls_config(config).context("admin TLS")?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the admin API at {}: {e}", conn.admin_addr))?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(serve::MAX_ADMIN_MESSAGE)
        .max_encoding_message_size(serve::MAX_ADMIN_MESSAGE))
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

/// The secrets and imported keys a file refers to, resolved here (where the `env` and
/// `file` references make sense): secrets to send, keys hashed so none crosses the wire.
pub(crate) fn resolve_material(
    file: &PolicyFile,
    base: &Path,
) -> anyhow::Result<(Vec<ResolvedSecret>, Vec<ImportedKeys>)> {
    let mut secrets = Vec::new();
    for credential in file.target_secrets() {
        let value = credential
            .resolve_secret(base)
            .map_err(|e| anyhow!("credential {:?}: {e}", credential.name))?;
        secrets.push(ResolvedSecret {
            credential: credential.name.clone(),
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
            if !crate::keys::strong_enough(key.as_bytes()) {
                return Err(anyhow!(
                    "credential {name:?}: keys[{i}]: a proxy key is 16 to 512 printable characters, at least 8 of them different"
                ));
            }
            sha256.push(crypto::hash_key(key.as_bytes()).to_vec());
        }
        keys.push(ImportedKeys {
            credential: name.to_owned(),
            sha256,
        });
    }
    Ok((secrets, keys))
}

async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let file = PolicyFile::parse(&text)?;
    let base = args.file.parent().unwrap_or(Path::new("."));
    let (secrets, keys) = resolve_material(&file, base)?;

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
    print_changes(&changes, args.json, args.dry_run)
}

/// What a change did: a line per item, or JSON.
pub(crate) fn print_changes(
    changes: &[crate::pb::Change],
    json: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    if json {
        let rows: Vec<_> = changes
            .iter()
            .map(|c| serde_json::json!({"kind": c.kind, "name": c.name, "action": c.action}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
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

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<()> {
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
    if args.json {
        let rule = r.rule.as_ref().map(|rule| {
            serde_json::json!({
                "id": rule.id, "effect": rule.effect, "priority": rule.priority,
                "notes": (!rule.notes.is_empty()).then_some(&rule.notes),
            })
        });
        let out = serde_json::json!({
            "allowed": r.allowed,
            "decision": r.decision,
            "status": (r.status != 0).then_some(r.status),
            "message": r.message,
            "proxy": args.proxy,
            "credential": (!r.credential.is_empty()).then_some(&r.credential),
            "rule": rule,
            "default_effect": (!r.default_effect.is_empty()).then_some(&r.default_effect),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
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
    if r.allowed {
        Ok(())
    } else {
        Err(Denied.into())
    }
}

/// `latchkey check`'s answer "denied": exit code 1, the explanation already printed
/// (any other failure exits 2).
#[derive(Debug, thiserror::Error)]
#[error("the request would be denied")]
pub struct Denied;

/// Unix seconds as RFC 3339, the form every printed time takes.
fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Issue {
            credential,
            ttl,
            spend_cap_usd,
            cap_period,
            tokens_per_minute,
            tokens_per_day,
            label,
            json,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            let request = authorized(
                &conn,
                IssueKeyRequest {
                    credential,
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
            if json {
                let out = serde_json::json!({
                    "id": k.id,
                    "key": k.key,
                    "credential": k.credential,
                    "expires_at": k.expires_at.map(rfc3339),
                    "spend_cap_usd": k.spend_cap_usd,
                    "label": (!k.label.is_empty()).then_some(&k.label),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
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
        }
        KeyCommand::List {
            credential,
            limit,
            after,
            json,
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
            let now = crate::state::now_unix();
            let status = |k: &crate::pb::KeyInfo| {
                if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|t| t <= now) {
                    "expired"
                } else {
                    "active"
                }
            };
            if json {
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
                            "spend_cap_usd": k.spend_cap_usd,
                            "spent_usd": k.spent_usd,
                            "cap_period": (!k.cap_period.is_empty()).then_some(&k.cap_period),
                            "tokens_per_minute": k.tokens_per_minute,
                            "tokens_per_day": k.tokens_per_day,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
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
        KeyCommand::Revoke { id, conn } => {
            let mut client = connect(&conn).await?;
            let request = authorized(&conn, RevokeKeyRequest { id: id.clone() })?;
            let r = client
                .revoke_key(request)
                .await
                .map_err(status_error)?
                .into_inner();
            say_revoked("key", &id, r.already_revoked);
        }
    }
    Ok(())
}

fn say_revoked(what: &str, id: &str, already: bool) {
    if already {
        println!("{what} {id} was already revoked");
    } else {
        println!("{what} {id} revoked");
    }
}

fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

async fn requests(args: RequestsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let filter = args.filter.into_request();
    let mut records = Vec::new();
    let mut page = String::new();
    while records.len() < args.limit as usize {
        let want =
            (args.limit as usize - records.len()).min(crate::request_log::MAX_LIMIT as usize);
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
    if args.json {
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
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
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
            r.path,
            num(r.status),
            num(r.upstream_status),
            r.decision,
            r.latency_ms.map_or("-".to_owned(), |l| format!("{l:.1}ms")),
            r.cost_usd.map_or("-".to_owned(), |c| format!("{c:.4}")),
        );
    }
    Ok(())
}

async fn telemetry(args: TelemetryArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let mut filter = args.filter.into_request();
    // Without --since: the last day by the hour, the last 30 days by the day.
    let (interval, default_age_ms) = match args.interval {
        Interval::Hour => ("hour", 86_400_000),
        Interval::Day => ("day", 30 * 86_400_000),
    };
    filter
        .since_ms
        .get_or_insert(crate::state::now_unix_ms() - default_age_ms);
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
    if args.json {
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
        println!("{}", serde_json::to_string_pretty(&rows)?);
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

async fn export(output: Option<PathBuf>, conn: AdminConn) -> anyhow::Result<()> {
    let mut client = connect(&conn).await?;
    let yaml = client
        .export(authorized(&conn, ExportRequest {})?)
        .await
        .map_err(status_error)?
        .into_inner()
        .policy_yaml;
    match output {
        Some(path) => {
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{yaml}"),
    }
    Ok(())
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            json,
            conn,
        } => {
            let mut client = connect(&conn).await?;
            let t = client
                .create_token(authorized(&conn, CreateTokenRequest { name, role })?)
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let out = serde_json::json!({
                    "id": t.id, "token": t.token, "name": t.name, "role": t.role,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "admin token {} ({}, {}): shown once, keep it safe",
                    t.id, t.name, t.role
                );
            }
        }
        TokenCommand::List { json, conn } => {
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
            if json {
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
                println!("{}", serde_json::to_string_pretty(&rows)?);
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
        TokenCommand::Revoke { id, conn } => {
            let mut client = connect(&conn).await?;
            let r = client
                .revoke_token(authorized(&conn, RevokeTokenRequest { id: id.clone() })?)
                .await
                .map_err(status_error)?
                .into_inner();
            say_revoked("admin token", &id, r.already_revoked);
        }
    }
    Ok(())
}
