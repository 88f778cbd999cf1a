//! The end-to-end harness: a real `latchkey serve`, the real Envoy with the shipped
//! config (ports rewritten), and an in-test upstream that records what reached it.
//! When a test fails, the logs of latchkey and Envoy are printed.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn latchkey_bin() -> &'static str {
    env!("CARGO_BIN_EXE_latchkey")
}

pub fn envoy_bin() -> PathBuf {
    std::env::var_os("LATCHKEY_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

/// A port no other test of this run was given, below the kernel's ephemeral range (so
/// no outgoing connection takes it between our check and the server's bind).
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 500) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, exactly as received.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Everything the upstream received, as one string to search for leaks.
    pub fn dump(&self) -> String {
        format!(
            "{} {}\n{:?}\n{}",
            self.method,
            self.uri,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// A plain-HTTP upstream on 127.0.0.1 that records every request and answers 200 JSON.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn record(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        uri: uri.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        "{\"ok\":true,\"units\":3}",
    )
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(record)
            .with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, seen }
    }

    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Which Envoy filter asks latchkey: the shipped config for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ExtProc,
    ExtAuthz,
}

impl Mode {
    fn envoy_config(self) -> &'static str {
        match self {
            Mode::ExtProc => "envoy/envoy.yaml",
            Mode::ExtAuthz => "envoy/envoy-ext-authz.yaml",
        }
    }
}

/// latchkey + Envoy, each on its own free ports, with a fresh SQLite store.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub master_key: String,
    pub grpc_port: u16,
    pub admin_port: u16,
    pub http_port: u16,
    pub envoy_port: u16,
    pub envoy_admin_port: u16,
    /// Extra environment for `latchkey serve`.
    pub serve_env: Vec<(String, String)>,
    pub mode: Mode,
    latchkey: Option<Child>,
    envoy: Option<Child>,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(|config| config).await
    }

    /// Starts the stack, letting the test adjust the Envoy config text first.
    pub async fn start_with(edit_envoy: impl FnOnce(String) -> String) -> Self {
        Self::start_configured(edit_envoy, &[]).await
    }

    /// The stack with Envoy's ext_authz filter, and latchkey in ext_authz mode.
    pub async fn start_in(mode: Mode) -> Self {
        match mode {
            Mode::ExtProc => Self::start().await,
            Mode::ExtAuthz => {
                Self::start_full(mode, |c| c, &[("LATCHKEY_MODE", "ext_authz")]).await
            }
        }
    }

    /// Starts the stack with extra environment for `latchkey serve`.
    pub async fn start_configured(
        edit_envoy: impl FnOnce(String) -> String,
        serve_env: &[(&str, &str)],
    ) -> Self {
        Self::start_full(Mode::ExtProc, edit_envoy, serve_env).await
    }

    pub async fn start_full(
        mode: Mode,
        edit_envoy: impl FnOnce(String) -> String,
        serve_env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master_key = String::from_utf8(
            Command::new(latchkey_bin())
                .arg("keygen")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_owned();
        let mut stack = Self {
            dir,
            master_key,
            grpc_port: free_port(),
            admin_port: free_port(),
            http_port: free_port(),
            envoy_port: free_port(),
            envoy_admin_port: free_port(),
            serve_env: serve_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            mode,
            latchkey: None,
            envoy: None,
        };
        stack.start_latchkey().await;
        stack.start_envoy(edit_envoy).await;
        stack
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("latchkey.db")
    }

    /// `latchkey serve` as configured for this stack, not yet started.
    pub fn serve_command(&self) -> Command {
        let mut cmd = Command::new(latchkey_bin());
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "LATCHKEY_DATABASE_URL",
                format!("sqlite://{}", self.db_path().display()),
            )
            .env("LATCHKEY_MASTER_KEY", &self.master_key)
            .env("LATCHKEY_ADMIN_TOKEN", ADMIN_TOKEN)
            .env(
                "LATCHKEY_GRPC_ADDR",
                format!("127.0.0.1:{}", self.grpc_port),
            )
            .env(
                "LATCHKEY_ADMIN_ADDR",
                format!("127.0.0.1:{}", self.admin_port),
            )
            .env(
                "LATCHKEY_HTTP_ADDR",
                format!("127.0.0.1:{}", self.http_port),
            )
            .env("RUST_LOG", "info")
            // As from the repository root: the minted ext_proc certificates land in
            // .latchkey/tls/, where the shipped Envoy configs (run from here too) read them.
            .current_dir(self.dir.path());
        for (k, v) in &self.serve_env {
            cmd.env(k, v);
        }
        cmd
    }

    pub async fn start_latchkey(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("latchkey.log")).unwrap();
        let child = self
            .serve_command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.latchkey = Some(child);
        let url = format!("http://127.0.0.1:{}/readyz", self.http_port);
        self.wait_for(&url, "latchkey").await;
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the exit and returns its status.
    pub fn terminate_latchkey(&mut self) -> std::process::ExitStatus {
        self.signal_latchkey("TERM");
        self.wait_latchkey()
    }

    pub fn signal_latchkey(&self, signal: &str) {
        let child = self.latchkey.as_ref().expect("latchkey is running");
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    pub fn wait_latchkey(&mut self) -> std::process::ExitStatus {
        self.latchkey
            .take()
            .expect("latchkey is running")
            .wait()
            .unwrap()
    }

    /// Another `latchkey serve` sharing this stack's settings (store, master key, Redis),
    /// on the given gRPC, admin and HTTP ports; waits until it is ready.
    pub async fn spawn_replica(&self, name: &str, ports: [u16; 3]) -> Child {
        self.spawn_replica_with(name, ports, &[]).await
    }

    /// As [`Stack::spawn_replica`], with extra environment for that replica.
    pub async fn spawn_replica_with(
        &self,
        name: &str,
        ports: [u16; 3],
        env: &[(&str, &str)],
    ) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let [grpc, admin, http] = ports;
        let mut child = self
            .serve_command()
            .envs(env.iter().copied())
            .env("LATCHKEY_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("LATCHKEY_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
            .env("LATCHKEY_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{http}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{name} exited: {status}: {}", self.log(name));
            }
            assert!(Instant::now() < deadline, "{name} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child
    }

    /// The directory of the ext_proc channel's minted CA and certificates.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join(".latchkey/tls")
    }

    /// A gRPC channel to latchkey's data-plane port, holding Envoy's client certificate.
    pub async fn data_plane(&self) -> tonic::transport::Channel {
        let read = |f: &str| std::fs::read(self.tls_dir().join(f)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
            .identity(tonic::transport::Identity::from_pem(
                read("envoy.pem"),
                read("envoy.key"),
            ));
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn kill_latchkey(&mut self) {
        if let Some(mut child) = self.latchkey.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn start_envoy(&mut self, edit: impl FnOnce(String) -> String) {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(self.mode.envoy_config()),
        )
        .unwrap();
        let config = shipped
            .replace(
                "port_value: 10000",
                &format!("port_value: {}", self.envoy_port),
            )
            .replace(
                "port_value: 9901",
                &format!("port_value: {}", self.envoy_admin_port),
            )
            .replace(
                "port_value: 50051",
                &format!("port_value: {}", self.grpc_port),
            );
        let path = self.dir.path().join("envoy.yaml");
        std::fs::write(&path, edit(config)).unwrap();
        let log = std::fs::File::create(self.dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .current_dir(self.dir.path())
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                // `LATCHKEY_TEST_ENVOY_LOG=debug` shows what Envoy did when a test fails.
                &std::env::var("LATCHKEY_TEST_ENVOY_LOG").unwrap_or_else(|_| "info".into()),
                "-c",
            ])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting Envoy {}: {e}", envoy_bin().display()));
        self.envoy = Some(child);
        let url = format!("http://127.0.0.1:{}/ready", self.envoy_admin_port);
        self.wait_for(&url, "envoy").await;
    }

    async fn wait_for(&mut self, url: &str, what: &str) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(url).send().await
                && r.status().is_success()
            {
                return;
            }
            let exited = [&mut self.latchkey, &mut self.envoy]
                .into_iter()
                .flatten()
                .find_map(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.print_logs();
                panic!("{what} exited while starting: {status}");
            }
            assert!(Instant::now() < deadline, "{what} not ready at {url}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `latchkey` CLI against this stack's admin API.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(latchkey_bin());
        cmd.args(args)
            .env_clear()
            .env(
                "LATCHKEY_ADMIN_ADDR",
                format!("127.0.0.1:{}", self.admin_port),
            )
            .env("LATCHKEY_ADMIN_TOKEN", ADMIN_TOKEN);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// Applies a policy given as text; panics with the CLI's stderr if it fails.
    pub fn apply(&self, policy: &str, env: &[(&str, &str)]) -> String {
        let out = self.try_apply(policy, env);
        assert!(
            out.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn try_apply(&self, policy: &str, env: &[(&str, &str)]) -> Output {
        let path = self.dir.path().join(format!("policy-{}.yaml", free_port()));
        std::fs::write(&path, policy).unwrap();
        self.cli(&["apply", "-f", path.to_str().unwrap()], env)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.envoy_port)
    }

    /// latchkey's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://127.0.0.1:{}/metrics", self.http_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{which}.log"))).unwrap_or_default()
    }

    fn print_logs(&self) {
        for which in ["latchkey", "envoy"] {
            let log = self.log(which);
            let lines = std::env::var("LATCHKEY_TEST_LOG_LINES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(80);
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            eprintln!("----- {which} log (last lines) -----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for child in [self.latchkey.take(), self.envoy.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The shipped Envoy config with latchkey's cluster on plain h2, without its transport
/// socket (for a latchkey told `LATCHKEY_GRPC_INSECURE`, or on a Unix socket).
pub fn plain_channel(config: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    let mut removed = false;
    for line in config.lines() {
        if line == "      transport_socket:" && !removed {
            // The first cluster-level transport socket is latchkey's.
            removed = true;
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("        ") {
            continue;
        }
        skipping = false;
        out.push(line);
    }
    out.join("\n")
}

/// The shipped Envoy config with latchkey reached over the Unix socket `socket`: its
/// cluster's endpoint (the only address indented this deep) becomes the socket.
pub fn on_unix_socket(config: &str, socket: &Path) -> String {
    let pipe = format!("pipe: {{ path: {} }}", socket.display());
    plain_channel(config)
        .lines()
        .map(|line| match line.strip_prefix(&" ".repeat(20)) {
            Some(rest) if rest.starts_with("socket_address:") => {
                format!("{}{pipe}", " ".repeat(20))
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Another Envoy with the given config, for tests that play a second proxy; killed
/// when dropped.
pub struct ExtraEnvoy {
    child: Child,
}

impl ExtraEnvoy {
    pub async fn start(dir: &Path, name: &str, config: &str, admin_port: u16) -> Self {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(envoy_bin())
            .current_dir(dir)
            .args(["--disable-hot-restart", "--concurrency", "1", "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{admin_port}/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                panic!("{name} exited: {status}: {tail:?}");
            }
            assert!(Instant::now() < deadline, "{name} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child }
    }
}

impl Drop for ExtraEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Metric families whose series appear only once priced LLM calls were made.
pub const LLM_FAMILIES: [&str; 3] = [
    "latchkey_llm_tokens",
    "latchkey_spend_micro_usd",
    "latchkey_pricing_exceptions",
];

/// Every `latchkey_*` family the shipped Grafana dashboard charts that starts with one
/// of `prefixes`, checked against a `/metrics` text.
pub fn assert_dashboard_families(metrics: &str, prefixes: &[&str]) {
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json"),
    )
    .unwrap();
    let names = regex::Regex::new(r"latchkey_[a-z_]+").unwrap();
    let mut checked = 0;
    for name in names.find_iter(&dashboard).map(|m| m.as_str()) {
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "the dashboard charts {name}, which /metrics does not have"
        );
        checked += 1;
    }
    assert!(checked >= prefixes.len(), "{prefixes:?}");
}

/// A key of `credential` issued through the CLI with `flags`: its id and the key.
pub fn issue_key(stack: &Stack, credential: &str, flags: &[&str]) -> (String, String) {
    let mut args = vec!["key", "issue", "--credential", credential, "--json"];
    args.extend_from_slice(flags);
    let k = json(&stack.cli(&args, &[]));
    (
        k["id"].as_str().unwrap().to_owned(),
        k["key"].as_str().unwrap().to_owned(),
    )
}

/// A key's spend as the store has it (`key list`).
pub fn recorded_spend(stack: &Stack, id: &str) -> f64 {
    let list = json(&stack.cli(&["key", "list", "--json"], &[]));
    list.as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap()["spent_usd"]
        .as_f64()
        .unwrap()
}

/// A key's recorded spend once it has settled at `expected` (spend is written off the
/// request path), or what it was after 3 s.
pub async fn settled_spend(stack: &Stack, id: &str, expected: f64) -> f64 {
    let mut spent = f64::NAN;
    for _ in 0..60 {
        spent = recorded_spend(stack, id);
        if (spent - expected).abs() < 1e-9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    spent
}

/// A client that never follows redirects and never reuses a pool across tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The JSON a successful CLI command printed; panics with its stderr otherwise.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A name no other test or run uses (Redis keys outlive a run).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), free_port())
}

/// The parsed `{"error":{...}}` body of a denial, checked for its contract shape.
pub async fn denial(response: reqwest::Response) -> (u16, String, serde_json::Value) {
    let status = response.status().as_u16();
    let decision = response
        .headers()
        .get("x-latchkey-decision")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: serde_json::Value = response.json().await.expect("a JSON denial body");
    assert_eq!(content_type, "application/json");
    let error = &body["error"];
    assert!(error["type"].is_string(), "{body}");
    assert!(error["message"].is_string(), "{body}");
    assert!(error["request_id"].is_string(), "{body}");
    assert_eq!(
        error["type"].as_str().unwrap(),
        decision,
        "header and body agree"
    );
    (status, decision, body)
}

/// A fresh PostgreSQL database for one test, dropped when the guard goes.
pub struct PgDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let admin_url = std::env::var("LATCHKEY_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432");
        let name = format!("lk_e2e_{}_{}", std::process::id(), free_port());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_url.rsplit_once('/').unwrap().0;
        Self {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A test CA, a server certificate for `localhost` and a client certificate, signed by
/// it, as PEM files in `dir`: ca.pem, server.pem/.key, client.pem/.key.
pub fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=latchkey test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=platform-team",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "client.ext",
        "-out",
        "client.pem",
    ]);
}
