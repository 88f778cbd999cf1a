//! The `latchkey` command line (DESIGN.md §3).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

mod access;
mod alerts;
mod approvals;
mod audit;
mod diff;
mod doctor;
mod install_module;
mod item_cli;
mod log;
mod output;
mod policy;
mod replay;

use access::{KeyCommand, TokenCommand, key, token};
use item_cli::ItemCommand;
use log::{RequestsArgs, TelemetryArgs, requests, telemetry};
use output::{Format, Output};
pub use policy::Denied;
use policy::{ApplyArgs, CheckArgs, ExportTo, apply, check, export};

use crate::base::crypto::{self, MasterKey};
use crate::control::items::Kind;
use crate::envoy::channel::{Guard, ProvidedTls};
use crate::pb::admin_client::AdminClient;
use crate::pb::{ImportedKeys, ResolvedSecret};
use crate::policy::PolicyFile;
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
        /// `yaml` (the default) or `json` to standard output, or a file to write (JSON
        /// for a `.json` name, else YAML).
        #[arg(short = 'o', long = "output", value_name = "FORMAT|FILE",
              value_parser = policy::export_to, default_value = "yaml")]
        output: ExportTo,
        /// The same as `-o json`.
        #[arg(long, conflicts_with = "output")]
        json: bool,
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
        out: Output,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// What a draft policy would decide differently on the recorded requests, judged on
    /// their proxy, credential, method and path; nothing is applied.
    Replay(replay::ReplayArgs),
    /// Anomaly alerts that fired (newest first), or with --dead-letters the webhook posts
    /// that failed every attempt.
    Alerts(alerts::AlertsArgs),
    /// The audit's tamper evidence: `latchkey audit verify` checks the hash chains.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Requests held by `approve` rules: list them, approve or deny one.
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalCommand,
    },
    /// Check the setup: the admin API and this token, versions, what the server
    /// reaches, and (with --envoy) a request through Envoy. Exit 1 if a check fails.
    Doctor(doctor::DoctorArgs),
    /// Print shell completions: `latchkey completions bash > /etc/bash_completion.d/latchkey`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `latchkey man | man -l -`.
    Man,
    /// Copy the in-process module shipped with this binary (liblatchkey_module.so) into
    /// DIR, where Envoy loads it from (ENVOY_DYNAMIC_MODULES_SEARCH_PATH): in Kubernetes,
    /// an init container from latchkey's image, so Envoy runs the module of the `serve`
    /// beside it.
    InstallModule {
        /// The directory to copy it into.
        dir: PathBuf,
        /// The module to copy, if not the one shipped beside this binary.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Print a new master key.
    Keygen {
        #[command(flatten)]
        out: Output,
    },
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

#[derive(Args)]
struct ServeArgs {
    /// The store: `sqlite://PATH` for one replica, `postgres://…` for many. Its value is
    /// never printed by `--help` (it may hold a password).
    #[arg(
        long,
        env = "LATCHKEY_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://latchkey.db"
    )]
    database_url: String,
    /// File holding the master key (the key itself is read from LATCHKEY_MASTER_KEY only,
    /// never from a flag, so it stays out of process listings).
    #[arg(long, env = "LATCHKEY_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// File holding the bootstrap admin token (a mounted Secret); the token itself is read
    /// from LATCHKEY_ADMIN_TOKEN only, never from a flag.
    #[arg(long, env = "LATCHKEY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// `host:port`, or `unix:/path` for a Unix domain socket beside Envoy.
    #[arg(long, env = "LATCHKEY_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: serve::GrpcAddr,
    /// The admin gRPC API's `host:port` (the CLI's and grpcurl's).
    #[arg(long, env = "LATCHKEY_ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    admin_addr: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics`: `host:port`.
    #[arg(long, env = "LATCHKEY_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    http_addr: SocketAddr,
    /// Share rate limits between replicas in this Redis; per replica when unset. Its
    /// value is never printed by `--help` (it may hold a password).
    #[arg(long, env = "LATCHKEY_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Feed Envoy's in-process module (`envoy/envoy-inprocess.yaml`) its policy on this
    /// Unix socket, made owner-only, and store the audit it sends back.
    #[arg(long, env = "LATCHKEY_MODULE_SOCKET")]
    module_socket: Option<PathBuf>,
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
    /// The admin API token. Its value is never printed by `--help`.
    #[arg(long, env = "LATCHKEY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A file holding the admin API token (a mounted Secret), when no token is given.
    #[arg(long, env = "LATCHKEY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
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
    /// The client certificate's key (PEM).
    #[arg(
        long,
        env = "LATCHKEY_ADMIN_CLIENT_KEY",
        requires = "admin_client_cert"
    )]
    admin_client_key: Option<PathBuf>,
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
                admin_token: match (
                    std::env::var("LATCHKEY_ADMIN_TOKEN")
                        .ok()
                        .filter(|t| !t.is_empty()),
                    &args.admin_token_file,
                ) {
                    (Some(token), _) => Some(Zeroizing::new(token)),
                    (None, Some(file)) => Some(read_token(file)?),
                    (None, None) => None,
                },
                redis_url: args.redis_url,
                audit_retention_days: args.audit_retention_days,
                module_socket: args.module_socket,
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
        Command::Export { output, json, conn } => {
            let to = if json {
                ExportTo::Stdout(Format::Json)
            } else {
                output
            };
            export(to, conn).await
        }
        Command::Token { command } => token(command).await,
        Command::Rekey { out, conn } => {
            let mut client = connect(&conn).await?;
            let r = client
                .rekey(authorized(&conn, crate::pb::RekeyRequest {})?)
                .await
                .map_err(status_error)?
                .into_inner();
            if out.table() {
                println!(
                    "{} secret(s) re-sealed; every secret is sealed under master key {}",
                    r.resealed, r.master_key_id
                );
                return Ok(());
            }
            out.print(&serde_json::json!({
                "resealed": r.resealed, "master_key_id": r.master_key_id,
            }))
        }
        Command::Requests(args) => requests(args).await,
        Command::Telemetry(args) => telemetry(args).await,
        Command::Target { command } => item_cli::run(Kind::Target, command).await,
        Command::Credential { command } => item_cli::run(Kind::Credential, command).await,
        Command::Proxy { command } => item_cli::run(Kind::Proxy, command).await,
        Command::Rule { command } => item_cli::run(Kind::Rule, command).await,
        Command::Doctor(args) => doctor::doctor(args).await,
        Command::Alerts(args) => alerts::alerts(args).await,
        Command::Audit { command } => audit::audit(command).await,
        Command::Replay(args) => replay::replay(args).await,
        Command::Approvals { command } => approvals::approvals(command).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "latchkey", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::InstallModule { dir, from } => {
            let from = match from {
                Some(from) => from,
                None => {
                    let exe = install_module::this_binary()?;
                    install_module::shipped(&exe).with_context(|| {
                        format!(
                            "no {} beside {} or in its ../lib/latchkey",
                            install_module::FILE,
                            exe.display()
                        )
                    })?
                }
            };
            let installed = install_module::install(&from, &dir)?;
            println!("installed {}", installed.display());
            Ok(())
        }
        Command::Keygen { out } => {
            let key = MasterKey::generate();
            if out.table() {
                println!("{key}");
                return Ok(());
            }
            out.print(&serde_json::json!({ "master_key": key.to_string() }))
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
    // An empty variable is no token: the file, if any, gives it.
    let given = conn.admin_token.as_ref().filter(|t| !t.is_empty());
    let token = match (given, &conn.admin_token_file) {
        (Some(token), _) => Zeroizing::new(token.clone()),
        (None, Some(file)) => read_token(file)?,
        (None, None) => {
            return Err(anyhow!(
                "no admin token: set LATCHKEY_ADMIN_TOKEN (or LATCHKEY_ADMIN_TOKEN_FILE), or pass --admin-token"
            ));
        }
    };
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.as_str())
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
            if crate::base::jwt::looks_like(key.as_bytes()) {
                return Err(anyhow!(
                    "credential {name:?}: keys[{i}]: this looks like a JWT, which latchkey reads as a workload's token; trust its issuer with `identity`, or use another key"
                ));
            }
            if !crate::dataplane::keys::strong_enough(key.as_bytes()) {
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

/// Unix seconds as RFC 3339, the form every printed time takes.
fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A token from a file, as a mounted Secret holds it: surrounding whitespace (the
/// trailing newline most tools write) is not part of it.
fn read_token(file: &Path) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(file)
            .with_context(|| format!("reading the admin token from {}", file.display()))?,
    );
    let token = text.trim();
    if token.is_empty() {
        return Err(anyhow!("{} holds no admin token", file.display()));
    }
    Ok(Zeroizing::new(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_command_flag_and_argument_says_what_it_is() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if !matches!(id, "help" | "version") && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "latchkey", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
