//! The stack a test runs against: latchkey and the real Envoy, each on free ports,
//! with a fresh store; and its Envoy's mode (ext_proc or ext_authz).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Which Envoy filter asks latchkey: the shipped config for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ExtProc,
    ExtAuthz,
    /// latchkey's data plane inside Envoy, ext_proc after it for what it hands on.
    InProcess,
}

impl Mode {
    fn envoy_config(self) -> &'static str {
        match self {
            Mode::ExtProc => "envoy/envoy.yaml",
            Mode::ExtAuthz => "envoy/envoy-ext-authz.yaml",
            Mode::InProcess => "envoy/envoy-inprocess.yaml",
        }
    }

    /// ext_proc, or the in-process mode where `LATCHKEY_TEST_MODE=inprocess`: the suites
    /// that must decide alike in both run once in each (`make test`).
    pub fn default_for_tests() -> Self {
        match std::env::var("LATCHKEY_TEST_MODE").as_deref() {
            Ok("inprocess") => Mode::InProcess,
            _ => Mode::ExtProc,
        }
    }
}

/// Where `latchkey serve` feeds the in-process module, from the stack's directory (the
/// shipped envoy-inprocess.yaml names the same path).
pub const MODULE_SOCKET: &str = ".latchkey/module.sock";

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
            Mode::InProcess => Self::start_full(mode, |c| c, &[]).await,
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
        Self::start_full(Mode::default_for_tests(), edit_envoy, serve_env).await
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

    /// The running `latchkey serve`'s process id.
    pub fn latchkey_pid(&self) -> u32 {
        self.latchkey.as_ref().expect("latchkey runs").id()
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
        if self.mode == Mode::InProcess {
            cmd.env("LATCHKEY_MODULE_SOCKET", MODULE_SOCKET);
        }
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

    /// Stops Envoy as an orchestrator does (SIGTERM) and waits for it to exit.
    pub fn stop_envoy(&mut self) -> std::process::ExitStatus {
        let mut child = self.envoy.take().expect("envoy is running");
        let sent = Command::new("kill")
            .args(["-TERM".to_owned(), child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        child.wait().unwrap()
    }

    /// Stops Envoy (SIGTERM) and starts it again with the same config.
    pub async fn restart_envoy(&mut self) {
        self.stop_envoy();
        self.start_envoy(|config| config).await;
    }

    /// One of Envoy's counters. A name Envoy does not have fails the test, so a renamed
    /// counter cannot read as a reassuring 0.
    pub async fn envoy_counter(&self, name: &str) -> u64 {
        let url = format!(
            "http://127.0.0.1:{}/stats?filter=^{name}$",
            self.envoy_admin_port
        );
        let text = client()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("Envoy has no counter {name}"))
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
        // The module is built beside the binaries under test (`make module`).
        let child = Command::new(envoy_bin())
            .current_dir(self.dir.path())
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", modules_dir())
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

    /// latchkey's metrics once they show `line` (the in-process module's decisions
    /// reach them with its next batch, a few milliseconds on).
    pub async fn metrics_showing(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = self.metrics().await;
            if metrics.contains(line) || Instant::now() > deadline {
                assert!(metrics.contains(line), "no {line} in {metrics}");
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the audit holds `n` completed records (a status known), and no more:
    /// every record, newest first.
    pub async fn records_until(&self, n: usize) -> Vec<latchkey::store::requests::Entry> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let records = self.records().await;
            let complete = records.iter().filter(|r| r.status.is_some()).count();
            if complete >= n || Instant::now() > deadline {
                assert_eq!(complete, n, "{records:#?}");
                return records;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every record in the stack's audit, newest first.
    pub async fn records(&self) -> Vec<latchkey::store::requests::Entry> {
        use latchkey::store::requests::{Cursor, Filter, MAX_LIMIT, list};
        let url = format!("sqlite://{}", self.db_path().display());
        let store = latchkey::store::Store::open(&url).await.unwrap();
        // Page by page: a load test on a fast machine records more than one page holds.
        let mut records = Vec::new();
        loop {
            let before = records.last().map(Cursor::of);
            let page = list(&store, &Filter::default(), MAX_LIMIT, before)
                .await
                .unwrap();
            let full = page.len() == MAX_LIMIT as usize;
            records.extend(page);
            if !full {
                return records;
            }
        }
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
