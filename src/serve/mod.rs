//! `latchkey serve`: the ext_proc server, the admin server and the HTTP endpoints, wired
//! to one policy snapshot, with a clean shutdown on SIGTERM or Ctrl-C.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use futures_util::future::Either;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use zeroize::Zeroizing;

use crate::access_log_pb::access_log_service_server::AccessLogServiceServer;
use crate::base::clock::now_unix_ms;
use crate::base::crypto::{AuditSigner, MasterKey};
use crate::control::admin::AdminService;
use crate::control::alerts::Alerting;
use crate::control::alerts::webhook::Poster;
use crate::control::approvals::StoreDesk;
use crate::control::health::{HttpState, router};
use crate::control::secrets::SecretWatch;
use crate::control::sync::PolicySync;
use crate::control::tokens::{AdminAuth, Tokens};
use crate::dataplane::budget::{
    Budgets, LocalBudgets, RedisBudgets, SystemClock, redis_connection,
};
use crate::dataplane::shared::Shared;
use crate::dataplane::snapshot::Policy;
use crate::dataplane::spend::{self, Account, LocalSpend, RedisSpend, Spend};
use crate::envoy::access_log::AccessLog;
use crate::envoy::channel::{self, Guard, bind_unix};
use crate::envoy::ext_authz::ExtAuthz;
use crate::envoy::ext_proc::ExtProc;
use crate::pb::admin_server::AdminServer;
use crate::policy::Period;
use crate::store::{Store, StoreError, requests};
use crate::telemetry::audit::{AuditLog, Outlets};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otlp::{Otlp, OtlpConfig};
use crate::telemetry::tap::Tap;

mod lanes;
mod module;

pub struct ServeConfig {
    pub database_url: String,
    pub master_key: Option<Zeroizing<String>>,
    pub master_key_file: Option<PathBuf>,
    pub previous_master_keys: Option<Zeroizing<String>>,
    pub grpc_addr: GrpcAddr,
    /// Who may use the data-plane port when it is TCP (a Unix socket's permissions
    /// guard it otherwise).
    pub grpc_guard: Guard,
    pub admin_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_token: Option<Zeroizing<String>>,
    pub redis_url: Option<String>,
    /// Request-log records older than this many days are deleted; 0 keeps them all.
    pub audit_retention_days: u32,
    /// Where Envoy's in-process module is fed, if it runs.
    pub module_socket: Option<PathBuf>,
    pub mode: Mode,
    pub admin_tls: Option<AdminTls>,
}

/// TLS on the admin listener (PEM files); with a client CA, callers must also present a
/// certificate it signed (mTLS) besides their bearer token.
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl AdminTls {
    fn server_config(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("reading the admin TLS {what} {}", path.display()))
        };
        let identity = tonic::transport::Identity::from_pem(
            read(&self.cert, "certificate")?,
            read(&self.key, "key")?,
        );
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(
                ca,
                "client CA",
            )?));
        }
        Ok(config)
    }
}

/// Which Envoy filter the deployment puts in front of latchkey. Both APIs are always
/// served; `ExtAuthz` also refuses policies that ext_authz alone cannot enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    #[value(name = "ext_proc", alias = "ext-proc")]
    ExtProc,
    #[value(name = "ext_authz", alias = "ext-authz")]
    ExtAuthz,
}

/// The master key, and the previous ones it replaced (`LATCHKEY_MASTER_KEY_PREVIOUS`:
/// comma-separated), which only open what they sealed until `latchkey rekey`.
pub fn load_master_keys(
    key: Option<&str>,
    file: Option<&std::path::Path>,
    previous: Option<&str>,
) -> anyhow::Result<MasterKey> {
    let previous = previous
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| MasterKey::parse(k).context("LATCHKEY_MASTER_KEY_PREVIOUS"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(load_master_key(key, file)?.with_previous(previous))
}

fn load_master_key(key: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<MasterKey> {
    let text = match (key, file) {
        (Some(_), Some(_)) => {
            bail!("set LATCHKEY_MASTER_KEY or LATCHKEY_MASTER_KEY_FILE, not both")
        }
        (Some(k), None) => Zeroizing::new(k.to_owned()),
        (None, Some(path)) => Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading master key file {}", path.display()))?,
        ),
        (None, None) => bail!(
            "no master key: set LATCHKEY_MASTER_KEY or LATCHKEY_MASTER_KEY_FILE (make one with `latchkey keygen`)"
        ),
    };
    Ok(MasterKey::parse(&text)?)
}

/// Where Envoy reaches latchkey: a TCP address, or `unix:/path` for a Unix domain socket
/// when Envoy runs beside latchkey (one kernel hop less per message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for GrpcAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => {
                Err("unix: needs a socket path, e.g. unix:/run/latchkey/ext_proc.sock".into())
            }
            Some(path) => Ok(GrpcAddr::Unix(PathBuf::from(path))),
            None => s
                .parse()
                .map(GrpcAddr::Tcp)
                .map_err(|e| format!("{s:?}: {e} (host:port, or unix:/path)")),
        }
    }
}

impl std::fmt::Display for GrpcAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrpcAddr::Tcp(addr) => addr.fmt(f),
            GrpcAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let master = Arc::new(load_master_keys(
        cfg.master_key.as_deref().map(String::as_str),
        cfg.master_key_file.as_deref(),
        cfg.previous_master_keys.as_deref().map(String::as_str),
    )?);
    let store = Store::open(&cfg.database_url)
        .await
        .with_context(|| format!("opening the store {}", cfg.database_url))?;
    let version = store.version().await?;
    let metrics = Metrics::default();
    // Secrets the policy has the server read (mounted files, AWS) are read before the
    // first compile; one that cannot be read refuses its requests, logged.
    let secrets = Arc::new(SecretWatch::from_env(metrics.secret_read_failures.clone()));
    let stored = store.load().await?;
    secrets.ensure(&stored).await;
    let policy =
        Policy::compile(&stored, &master, &secrets.current()).context("loading the policy")?;
    drop(stored);
    latchkey_sys::release_free_memory();
    if cfg.mode == Mode::ExtAuthz
        && let Some(obstacle) = policy.ext_authz_obstacle()
    {
        bail!("the stored policy cannot run in ext_authz mode: {obstacle}");
    }
    let (budgets, spend) = match &cfg.redis_url {
        Some(url) => {
            let connection =
                redis_connection(url).with_context(|| format!("budget store {url}"))?;
            (
                Budgets::Redis(RedisBudgets::new(connection.clone())),
                Spend::Redis(RedisSpend::new(connection)),
            )
        }
        None => (
            Budgets::Local(LocalBudgets::new(Arc::new(SystemClock))),
            Spend::Local(LocalSpend::default()),
        ),
    };
    if let Spend::Local(local) = &spend {
        seed_periods(&store, local, crate::base::clock::now_unix())
            .await
            .context("reading the current periods' spend from the audit")?;
    }
    let otlp_config = OtlpConfig::from_env(|k| std::env::var(k).ok())?;
    let otlp_endpoints = otlp_config.iter().flat_map(OtlpConfig::endpoints).collect();
    let otlp = otlp_config
        .map(|config| {
            tracing::info!(endpoints = ?config.shown(), "exporting to OTLP");
            Otlp::start(config, metrics.audit.otlp_dropped.clone())
        })
        .transpose()?;
    // The anomaly alerts read what the audit writer stored.
    let (tap, observed) = Tap::new(metrics.alerts.dropped.clone());
    let poster = Poster::new(store.clone(), metrics.alerts.dead_letters.clone());
    let outlets = Outlets {
        otlp,
        tap: Some(tap.clone()),
    };
    let (audit, audit_writer) = AuditLog::start(
        store.clone(),
        master.audit_signer().clone(),
        metrics.audit.clone(),
        outlets,
    );
    let desk = Arc::new(StoreDesk::new(store.clone(), poster.clone()));
    let shared =
        Arc::new(Shared::new(policy, budgets, spend, audit.clone(), metrics).with_desk(desk));
    shared.installed(version);
    // Every background task, owned here and stopped at shutdown.
    let mut background = tokio::task::JoinSet::new();
    if cfg.audit_retention_days > 0 {
        background.spawn(prune_forever(
            store.clone(),
            master.audit_signer().clone(),
            cfg.audit_retention_days,
        ));
    }
    let ready = Arc::new(AtomicBool::new(false));

    let grpc = match &cfg.grpc_addr {
        GrpcAddr::Tcp(addr) => Either::Left(bind(*addr, "ext_proc").await?),
        GrpcAddr::Unix(path) => Either::Right(bind_unix(path)?),
    };
    let grpc_tls = match (&cfg.grpc_addr, &cfg.grpc_guard) {
        (GrpcAddr::Unix(_), _) => None,
        (GrpcAddr::Tcp(_), Guard::Insecure) => {
            tracing::warn!(
                "the ext_proc port is plain TCP (LATCHKEY_GRPC_INSECURE): any process that \
                 reaches it can obtain upstream credentials"
            );
            None
        }
        (GrpcAddr::Tcp(_), guard) => guard.server_tls().context("ext_proc mutual TLS")?,
    };
    let admin = bind(cfg.admin_addr, "admin").await?;
    let http = bind(cfg.http_addr, "health and metrics").await?;
    let (stop, stop_rx) = watch::channel(false);

    // gRPC health (grpc.health.v1) on both gRPC ports: Envoy health-checks its latchkey
    // endpoints with it, and Kubernetes can probe it.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // ext_proc, ext_authz, the access log and gRPC health, on one lane per core.
    let data_plane = {
        let (shared, stopping, health) = (shared.clone(), stop_rx.clone(), health_service.clone());
        move || {
            // Envoy resets the ext_proc stream of every request its client hangs up on.
            // h2 closes a connection after 20 resets of streams not yet accepted (its
            // guard against rapid-reset floods), and with it every request in flight on
            // Envoy's connection: agents hanging up in a burst while `serve` is busy
            // would have others' requests refused. This port's one client is Envoy.
            let mut server = Server::builder()
                .http2_max_pending_accept_reset_streams(Some(channel::PENDING_RESETS_ALLOWED));
            if let Some(tls) = &grpc_tls {
                server = server.tls_config(tls.clone())?;
            }
            Ok(server
                .add_service(health.clone())
                .add_service(ExternalProcessorServer::new(ExtProc::new(shared.clone())))
                .add_service(AuthorizationServer::new(ExtAuthz::new(shared.clone())))
                .add_service(AccessLogServiceServer::new(AccessLog::new(
                    shared.clone(),
                    stopping.clone(),
                ))))
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (lanes, ext_proc): (_, Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>) =
        match grpc {
            Either::Left(tcp) => {
                let (lanes, dealing) = lanes::start(tcp, cores, data_plane, stop_rx.clone())?;
                (lanes, Box::pin(dealing))
            }
            Either::Right(unix) => {
                let (lanes, dealing) = lanes::start(unix, cores, data_plane, stop_rx.clone())?;
                (lanes, Box::pin(dealing))
            }
        };
    let tokens = Tokens::default();
    tokens
        .reload(&store)
        .await
        .context("loading admin tokens")?;
    let sync = Arc::new(PolicySync::new(
        shared.clone(),
        tokens.clone(),
        store.clone(),
        master.clone(),
        secrets,
        version,
    ));
    sync.report_to(health.clone());
    sync.spawn(&cfg.database_url, &mut background);
    let mut module_feed = None;
    if let Some(path) = &cfg.module_socket {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let listener =
            channel::bind_unix_as(path, 0o600).context("the in-process module's socket")?;
        let feed = module::Feed {
            shared: shared.clone(),
            store: store.clone(),
            master: master.clone(),
            sync: sync.clone(),
        };
        let serving = module::serve(listener, path.clone(), feed, stop_rx.clone());
        module_feed = Some(tokio::spawn(serving));
        tracing::info!(socket = %path.display(), "feeding Envoy's in-process module");
    }
    let minter = crate::control::keys::StoreMinter::new(store.clone(), sync.clone());
    let _ = shared.minter.set(Box::new(minter));
    Alerting::new(shared.clone(), store.clone(), sync.clone(), tap, poster)
        .spawn(observed, &mut background);
    let admin_service = AdminService::new(
        shared.clone(),
        store.clone(),
        master,
        sync,
        cfg.mode == Mode::ExtAuthz,
        otlp_endpoints,
    );
    let admin_auth = AdminAuth::new(cfg.admin_token.as_deref().map(String::as_str), tokens);
    if cfg.admin_token.is_none() {
        tracing::warn!(
            "LATCHKEY_ADMIN_TOKEN is not set: only tokens created earlier open the admin API"
        );
    }
    // gRPC reflection on the admin port: `grpcurl` lists and calls the admin API.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    let mut admin_builder = Server::builder();
    if let Some(tls) = &cfg.admin_tls {
        admin_builder = admin_builder
            .tls_config(tls.server_config()?)
            .context("admin TLS")?;
    }
    let admin_server = admin_builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            // Large policies (10,000s of proxies and keys) arrive in one Apply.
            tonic::service::interceptor::InterceptedService::new(
                AdminServer::new(admin_service)
                    .max_decoding_message_size(MAX_ADMIN_MESSAGE)
                    .max_encoding_message_size(MAX_ADMIN_MESSAGE),
                admin_auth,
            ),
        )
        .serve_with_incoming_shutdown(TcpIncoming::from(admin), stopped(stop_rx.clone()));
    let http_server = axum::serve(
        http,
        router(HttpState {
            shared: shared.clone(),
            ready: ready.clone(),
            store: store.clone(),
        }),
    )
    .with_graceful_shutdown(stopped(stop_rx));

    let servers = tokio::spawn(async move {
        let (a, b, c) = tokio::join!(ext_proc, admin_server, http_server);
        a.context("ext_proc server")?;
        b.context("admin server")?;
        c.context("http server")?;
        anyhow::Ok(())
    });
    let stop_signal = shutdown_signal();
    ready.store(true, Ordering::Release);
    tracing::info!(
        grpc = %cfg.grpc_addr,
        admin = %cfg.admin_addr,
        http = %cfg.http_addr,
        "latchkey serving"
    );

    stop_signal.await;
    tracing::info!("shutting down");
    // Say so first, so Envoy's health checks move new requests to other replicas while
    // this one still answers; then stop taking streams.
    ready.store(false, Ordering::Release);
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tokio::time::sleep(DRAIN_NOTICE).await;
    let _ = stop.send(true);
    // Open streams get a moment to finish; Envoy keeps its connections open otherwise.
    let served = match tokio::time::timeout(SHUTDOWN_GRACE, servers).await {
        Ok(joined) => joined.context("server task")?,
        Err(_) => {
            tracing::warn!("streams still open after {SHUTDOWN_GRACE:?}; closing them");
            Ok(())
        }
    };
    // The modules' queued records, before the audit is flushed.
    if let Some(feed) = module_feed {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, feed).await;
    }
    background.shutdown().await;
    audit_writer.finish().await;
    tracing::info!("audit flushed");
    drop(lanes);
    served
}

/// Between saying "not serving" and closing: a bit more than Envoy's health-check
/// interval (1 s in the shipped configs).
const DRAIN_NOTICE: std::time::Duration = std::time::Duration::from_millis(1500);

/// The largest admin request or answer (an Apply or an Export of a big policy).
pub const MAX_ADMIN_MESSAGE: usize = 64 << 20;

/// How long shutdown waits for open streams before it flushes the audit and exits.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Without Redis, spend and tokens are counted in memory: the current periods' accounts
/// start from what the audit recorded since each began, so a restart hands back no
/// day's, week's or month's cap (nor a minute's or day's token budget).
async fn seed_periods(store: &Store, spend: &LocalSpend, now: i64) -> Result<(), StoreError> {
    for period in [Period::Minute, Period::Day, Period::Week, Period::Month] {
        let mut by_credential: HashMap<String, (u64, u64)> = HashMap::new();
        let mut owners = Vec::new();
        for s in requests::spent_since(store, period.start(now).saturating_mul(1000)).await? {
            let sum = by_credential.entry(s.credential.clone()).or_default();
            sum.0 += s.micros;
            sum.1 += s.tokens;
            owners.push((spend::key_owner(&s.key_id), s.micros, s.tokens));
        }
        owners.extend(
            by_credential
                .into_iter()
                .map(|(name, (micros, tokens))| (spend::credential_owner(&name), micros, tokens)),
        );
        for (owner, micros, tokens) in owners {
            for (owner, spent) in [
                (owner.clone(), micros),
                (spend::tokens_owner(&owner), tokens),
            ] {
                if spent > 0 {
                    let (id, left) = Account::period_id(&owner, period, now);
                    spend.seed(id, spent, left + 60);
                }
            }
        }
    }
    Ok(())
}

/// Deletes request-log records past retention, at start and then hourly.
async fn prune_forever(store: Store, signer: AuditSigner, days: u32) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        every.tick().await;
        let cutoff = now_unix_ms() - i64::from(days) * 86_400_000;
        match crate::store::requests::prune(&store, &signer, cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, days, "request log pruned"),
            Err(e) => tracing::error!(error = %e, "could not prune the request log"),
        }
    }
}

/// SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a SIGTERM that comes right after the replica says it is ready
/// still shuts it down cleanly.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::money::Usage;
    use crate::dataplane::spend::{Holder, Refusal, Unit};
    use crate::policy::Vendor;
    use crate::store::testing;
    use crate::telemetry::audit::{AuditCounters, Decided, Event, Llm};

    /// A restart without Redis starts this period's accounts where the audit left them;
    /// last period's spend is not counted.
    #[tokio::test]
    async fn a_restart_keeps_the_current_periods_spend() {
        for (label, _scratch, store) in testing::stores().await {
            let now = crate::base::clock::now_unix();
            let (log, writer) = AuditLog::start(
                store.clone(),
                AuditSigner::ephemeral(),
                AuditCounters::default(),
                crate::telemetry::audit::Outlets::default(),
            );
            for (id, time_ms, micros) in [
                ("today", now * 1000 - 1, 2_000_000),
                ("yesterday", (Period::Day.start(now) - 10) * 1000, 9_000_000),
            ] {
                log.record(Event::Decided(Decided {
                    request_id: id.into(),
                    time_ms,
                    key_id: Some("k1".into()),
                    credential: Some("agent".into()),
                    decision: "allow",
                    ..Decided::default()
                }))
                .await;
                log.record(Event::Charged {
                    request_id: id.into(),
                    started_ms: time_ms,
                    key_id: "k1".into(),
                    micros,
                    llm: Some(Llm {
                        model: None,
                        priced_as: None,
                        vendor: Vendor::OpenAi,
                        usage: Usage {
                            input: 700,
                            cached_input: 0,
                            output: 300,
                        },
                    }),
                    trace: None,
                })
                .await;
            }
            writer.finish().await;

            let seeded = || async {
                let local = LocalSpend::default();
                seed_periods(&store, &local, now).await.unwrap();
                Spend::Local(local)
            };
            let spend = seeded().await;
            let account = |owner: &str, period, cap, unit, holder| {
                let (id, left) = Account::period_id(owner, period, now);
                Account {
                    id,
                    cap_micros: Some(cap),
                    seed_micros: 0,
                    ttl_s: Some(left + 60),
                    unit,
                    holder,
                    period: Some(period),
                }
            };
            // $2 spent today of a $2.50 daily cap: a $1 reservation does not fit.
            let key_day = account("key:k1", Period::Day, 2_500_000, Unit::Micros, Holder::Key);
            assert_eq!(
                spend.reserve(&[key_day], 1_000_000).await.unwrap(),
                Err(Refusal::CapReached(0)),
                "{label}"
            );
            // The credential's month holds both days: $11 of $12, and $1.50 does not fit.
            let month = account(
                "credential:agent",
                Period::Month,
                12_000_000,
                Unit::Micros,
                Holder::Credential,
            );
            let refused = spend.reserve(&[month], 1_500_000).await.unwrap().is_err();
            // On the first day of a month, yesterday was last month's.
            let both_days = Period::Month.start(now) <= Period::Day.start(now) - 10;
            assert_eq!(refused, both_days, "{label}");
            // A token budget refuses once spent: 1,000 tokens today (yesterday's 1,000
            // not counted) spend a 1,000-token day, not a 1,500-token one.
            let tokens =
                |cap| account("tokens:key:k1", Period::Day, cap, Unit::Tokens, Holder::Key);
            assert!(
                spend.reserve(&[tokens(1_000)], 0).await.unwrap().is_err(),
                "{label}"
            );
            assert!(
                seeded()
                    .await
                    .reserve(&[tokens(1_500)], 0)
                    .await
                    .unwrap()
                    .is_ok(),
                "{label}"
            );
        }
    }

    #[test]
    fn grpc_addresses_are_tcp_or_a_unix_socket() {
        assert_eq!(
            "127.0.0.1:50051".parse::<GrpcAddr>().unwrap(),
            GrpcAddr::Tcp("127.0.0.1:50051".parse().unwrap())
        );
        let unix = "unix:/run/latchkey/ext_proc.sock"
            .parse::<GrpcAddr>()
            .unwrap();
        assert_eq!(unix, GrpcAddr::Unix("/run/latchkey/ext_proc.sock".into()));
        assert_eq!(unix.to_string(), "unix:/run/latchkey/ext_proc.sock");
        assert!(
            "unix:"
                .parse::<GrpcAddr>()
                .unwrap_err()
                .contains("socket path")
        );
        assert!(
            "localhost"
                .parse::<GrpcAddr>()
                .unwrap_err()
                .contains("unix:/path")
        );
    }
}
