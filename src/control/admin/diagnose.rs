//! `Diagnose`, for `latchkey doctor`: what this replica runs and what it reaches. Each
//! probe is bounded by a short timeout, so a dead dependency answers "unreachable"
//! rather than hanging the command.

use std::time::Duration;

use crate::pb::{DiagnoseResponse, Probe};

use super::AdminService;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl AdminService {
    pub(super) async fn diagnosis(&self, role: &str) -> DiagnoseResponse {
        let mut probes = Vec::new();
        let version = self.store.version().await;
        probes.push(probe(
            "store",
            version
                .as_ref()
                .map(|v| format!("{:?}, policy version {v}", self.store.backend())),
        ));
        probes.push(match self.shared.budgets.ping().await {
            None => ok(
                "redis",
                "not configured: budgets are counted in this process",
            ),
            Some(answer) => probe("redis", answer.map(|()| "answers PING".to_owned())),
        });
        if self.otlp_endpoints.is_empty() {
            probes.push(ok("otlp", "not configured (OTEL_EXPORTER_OTLP_ENDPOINT)"));
        }
        for endpoint in &self.otlp_endpoints {
            probes.push(probe("otlp", reach(endpoint).await));
        }
        let policy = self.shared.policy.load();
        let unreadable: Vec<String> = (policy.unavailable().iter())
            .map(|(credential, why)| format!("credential {credential:?}: {why}"))
            .collect();
        probes.push(if unreadable.is_empty() {
            ok("secrets", "every secret the server reads was read")
        } else {
            probe("secrets", Err(unreadable.join("; ")))
        });
        DiagnoseResponse {
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            role: role.to_owned(),
            mode: if self.ext_authz_only {
                "ext_authz"
            } else {
                "ext_proc"
            }
            .to_owned(),
            policy_version: version.unwrap_or_default(),
            policy_current: self.shared.policy_is_current(),
            probes,
        }
    }
}

fn ok(name: &str, detail: &str) -> Probe {
    probe(name, Ok::<_, String>(detail.to_owned()))
}

fn probe(name: &str, result: Result<String, impl std::fmt::Display>) -> Probe {
    let (ok, detail) = match result {
        Ok(detail) => (true, detail),
        Err(e) => (false, e.to_string()),
    };
    Probe {
        name: name.to_owned(),
        ok,
        detail,
    }
}

/// Whether a TCP connection to the endpoint's host and port opens (what a collector that
/// is down or firewalled fails); the endpoint is shown without any credentials it holds.
async fn reach(endpoint: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| format!("{endpoint:?}: {e}"))?;
    let host = url.host_str().ok_or("the endpoint has no host")?.to_owned();
    let port = url
        .port_or_known_default()
        .ok_or("the endpoint has no port")?;
    let shown = format!("{}://{host}:{port}", url.scheme());
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(format!("{shown} accepts connections")),
        Ok(Err(e)) => Err(format!("{shown}: {e}")),
        Err(_) => Err(format!("{shown}: no answer within 2 s")),
    }
}
