//! Envoy configurations beside the shipped one: latchkey's channel on plain h2 or a Unix
//! socket, and a second Envoy a test plays as another proxy.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// An edit of a shipped Envoy config that cuts out its HTTP filter `name`: the filters
/// from it up to `next` (the filter after it).
pub fn without_filter(name: &str, next: &str) -> impl FnOnce(String) -> String {
    let line = |what: &str| format!("                  - name: {what}\n");
    let (name, next) = (line(name), line(next));
    move |config| {
        let at = |line: &str, from: usize| {
            from + config[from..]
                .find(line)
                .unwrap_or_else(|| panic!("no filter {line}"))
        };
        let start = at(&name, 0);
        let end = at(&next, start);
        format!("{}{}", &config[..start], &config[end..])
    }
}

/// A request naming Envoy's cluster and the vendor's address itself, with nothing in
/// Envoy to judge it: answered 500, not to be retried, and the vendor sees nothing.
pub async fn goes_nowhere(stack: &Stack, upstream: &Upstream) {
    let vendor = upstream.url().trim_start_matches("http://").to_owned();
    let steered = client()
        .get(stack.url("/v1/items"))
        .header("host", &vendor)
        .header("x-latchkey-cluster", "latchkey_plain")
        .send()
        .await
        .unwrap();
    assert_eq!(steered.status(), 500);
    assert_eq!(steered.headers()["x-should-retry"], "false");
    let body: serde_json::Value = steered.json().await.unwrap();
    assert_eq!(body["error"]["type"], "internal", "{body}");
    assert!(upstream.take().is_empty());
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
