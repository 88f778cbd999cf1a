//! Envoy configurations beside the shipped one: latchkey's channel on plain h2 or a Unix
//! socket, and a second Envoy a test plays as another proxy.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

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
