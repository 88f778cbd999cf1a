//! `latchkey serve`: the ext_proc server, the admin server and the HTTP endpoints, wired
//! to one policy snapshot, with a clean shutdown on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use zeroize::Zeroizing;

use crate::admin::{AdminAuth, AdminService};
use crate::budget::{Budgets, LocalBudgets, RedisBudgets, SystemClock, redis_connection};
use crate::crypto::MasterKey;
use crate::ext_proc::ExtProc;
use crate::http::{HttpState, router};
use crate::pb::admin_server::AdminServer;
use crate::policy::Policy;
use crate::spend::{LocalSpend, RedisSpend, Spend};
use crate::state::Shared;
use crate::state::SpendLog;
use crate::store::Store;

pub struct ServeConfig {
    pub database_url: String,
    pub master_key: Option<Zeroizing<String>>,
    pub master_key_file: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub admin_token: Option<Zeroizing<String>>,
    pub redis_url: Option<String>,
}

pub fn load_master_key(
    key: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<MasterKey> {
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

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let master = Arc::new(load_master_key(
        cfg.master_key.as_deref().map(String::as_str),
        cfg.master_key_file.as_deref(),
    )?);
    let store = Store::open(&cfg.database_url)
        .await
        .with_context(|| format!("opening the store {}", cfg.database_url))?;
    let policy = Policy::compile(&store.load().await?, &master).context("loading the policy")?;
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
    let spend_log = SpendLog::start(store.clone());
    let shared = Arc::new(Shared::new(policy, budgets, spend, spend_log));
    let ready = Arc::new(AtomicBool::new(false));

    let grpc = bind(cfg.grpc_addr, "ext_proc").await?;
    let admin = bind(cfg.admin_addr, "admin").await?;
    let http = bind(cfg.http_addr, "health and metrics").await?;
    let (stop, stop_rx) = watch::channel(false);

    let ext_proc = Server::builder()
        .add_service(ExternalProcessorServer::new(ExtProc::new(shared.clone())))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let admin_service = AdminService::new(shared.clone(), store, master);
    let admin_auth = AdminAuth::new(cfg.admin_token.as_deref().map(String::as_str));
    if cfg.admin_token.is_none() {
        tracing::warn!("LATCHKEY_ADMIN_TOKEN is not set: the admin API refuses every call");
    }
    let admin_server = Server::builder()
        .add_service(AdminServer::with_interceptor(admin_service, admin_auth))
        .serve_with_incoming_shutdown(TcpIncoming::from(admin), stopped(stop_rx.clone()));
    let http_server = axum::serve(
        http,
        router(HttpState {
            shared: shared.clone(),
            ready: ready.clone(),
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
    ready.store(true, Ordering::Release);
    tracing::info!(
        grpc = %cfg.grpc_addr,
        admin = %cfg.admin_addr,
        http = %cfg.http_addr,
        "latchkey serving"
    );

    shutdown_signal().await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::Release);
    let _ = stop.send(true);
    servers.await.context("server task")?
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
