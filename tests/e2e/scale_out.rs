//! Two `latchkey serve` replicas on one PostgreSQL database and one Redis, behind one
//! Envoy that balances its ext_proc calls across both.

use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::{PgDatabase, Stack, Upstream, client, free_port, unique};

const AGENT_KEY: &str = "lk_scaleAgentKEY000000000001";
const SECRET: &str = "sk_scale_secret_value_999";

pub(crate) struct Pair {
    pub stack: Stack,
    b: Child,
    pub b_admin: u16,
    pub b_http: u16,
    _db: PgDatabase,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.b.kill();
        let _ = self.b.wait();
    }
}

/// Replica A is the stack's own; B gets its own ports, and Envoy's latchkey cluster
/// gets B as a second endpoint.
pub(crate) async fn pair() -> Pair {
    let db = PgDatabase::create().await;
    let b_ports = [free_port(), free_port(), free_port()];
    let b_grpc = b_ports[0];
    let stack = Stack::start_full(
        crate::common::Mode::ExtProc,
        move |config| {
            let endpoint = "              - endpoint:\n                  address:\n                    socket_address: { address: 127.0.0.1, port_value: ";
            let start = config.find(endpoint).expect("the latchkey endpoint");
            let line_end = start + config[start..].find("}\n").unwrap() + 2;
            let a = config[start..line_end].to_owned();
            let b = a.replace(
                &a[endpoint.len()..a.len() - 3],
                &b_grpc.to_string(),
            );
            format!("{}{a}{b}{}", &config[..start], &config[line_end..])
        },
        &[
            ("LATCHKEY_DATABASE_URL", db.url.as_str()),
            ("LATCHKEY_REDIS_URL", "redis://127.0.0.1:6379"),
        ],
    )
    .await;
    let b = stack.spawn_replica("latchkey-b", b_ports).await;
    // Envoy health-checks its endpoints every second: wait until it sends B requests.
    let clusters = format!("http://127.0.0.1:{}/clusters", stack.envoy_admin_port);
    let healthy = format!("latchkey::127.0.0.1:{b_grpc}::health_flags::healthy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client()
        .get(&clusters)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains(&healthy)
    {
        assert!(
            Instant::now() < deadline,
            "Envoy never found B healthy: {}",
            client()
                .get(&clusters)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("latchkey::"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Pair {
        stack,
        b,
        b_admin: b_ports[1],
        b_http: b_ports[2],
        _db: db,
    }
}

fn policy(upstream: &str, proxy: &str, limit: u32) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ env: SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: {proxy}
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: allow
    limits: {{ requests_per_minute: {limit} }}
"#
    )
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("SECRET", SECRET), ("AGENT_KEY", AGENT_KEY)]
}

/// `latchkey check` against one replica's admin API: its own live policy.
fn check_on(stack: &Stack, admin_port: u16, proxy: &str, key: &str) -> serde_json::Value {
    let out = stack.cli(
        &[
            "check", "--proxy", proxy, "--method", "GET", "--path", "/v1/x", "--key", key, "--json",
        ],
        &[("LATCHKEY_ADMIN_ADDR", &format!("127.0.0.1:{admin_port}"))],
    );
    // 0 allowed, 1 denied (§8); 2 would be an error.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until the replica on `admin_port` refuses `key` as revoked; fails after a
/// second. Returns how long it took.
async fn revoked_within_a_second(
    stack: &Stack,
    admin_port: u16,
    proxy: &str,
    key: &str,
) -> Duration {
    let revoked_at = Instant::now();
    loop {
        let verdict = check_on(stack, admin_port, proxy, key);
        if verdict["decision"] == "revoked_key" {
            return revoked_at.elapsed();
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "the other replica still says {verdict}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_change_on_one_replica_is_enforced_by_the_other_within_a_second() {
    let upstream = Upstream::start().await;
    let pair = pair().await;
    let proxy = unique("api");
    // Applied through A only.
    pair.stack
        .apply(&policy(&upstream.url(), &proxy, 1000), &env());
    let issued = pair
        .stack
        .cli(&["key", "issue", "--credential", "agent", "--json"], &[]);
    let issued: serde_json::Value = serde_json::from_slice(&issued.stdout).unwrap();
    let key = issued["key"].as_str().unwrap();

    // B knows the proxy and the new key.
    let deadline = Instant::now() + Duration::from_secs(1);
    while check_on(&pair.stack, pair.b_admin, &proxy, key)["allowed"] != true {
        assert!(Instant::now() < deadline, "B never took in A's apply");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Revoke on A: B refuses within a second.
    let revoke = pair
        .stack
        .cli(&["key", "revoke", issued["id"].as_str().unwrap()], &[]);
    assert!(revoke.status.success());
    let took = revoked_within_a_second(&pair.stack, pair.b_admin, &proxy, key).await;
    eprintln!("revocation reached replica B in {took:?}");

    // Through Envoy (either replica), the revoked key gets nowhere.
    for _ in 0..6 {
        let r = client()
            .get(pair.stack.url(&format!("/{proxy}/v1/x")))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    assert!(upstream.take().is_empty());
}

#[tokio::test]
async fn the_rate_limit_holds_across_both_replicas_and_one_dying_changes_nothing_unsafe() {
    let upstream = Upstream::start().await;
    let mut pair = pair().await;
    let proxy = unique("limited");
    pair.stack
        .apply(&policy(&upstream.url(), &proxy, 10), &env());
    let http = client();
    let url = pair.stack.url(&format!("/{proxy}/v1/x"));
    let mut admitted = 0;
    for _ in 0..30 {
        match http
            .get(&url)
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
        {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(admitted, 10, "one limit across both replicas");
    // Envoy spread them: both replicas decided some.
    for port in [pair.stack.http_port, pair.b_http] {
        let metrics = http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(&format!("proxy=\"{proxy}\"")),
            "a replica decided nothing: {metrics}"
        );
    }
    upstream.take();

    // The duplicate guard holds across replicas too: identical POSTs, spread over A and
    // B, reach the vendor once.
    let proxy = unique("guarded");
    let guarded = policy(&upstream.url(), &proxy, 1000).replace(
        "    default_effect: allow\n",
        "    default_effect: allow\n    guards: { duplicate_window: 60s }\n",
    );
    pair.stack.apply(&guarded, &env());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = pair.stack.url(&format!("/{proxy}/v1/charges"));
    let mut forwarded = 0;
    for _ in 0..6 {
        let status = (http.post(&url).bearer_auth(AGENT_KEY))
            .body(format!("charge for {proxy}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        match status {
            200 => forwarded += 1,
            409 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(forwarded, 1, "one of six identical POSTs");
    assert_eq!(upstream.take().len(), 1);

    // Load on a fresh proxy, and B killed in the middle of it.
    let proxy = unique("busy");
    pair.stack
        .apply(&policy(&upstream.url(), &proxy, 100_000), &env());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = pair.stack.url(&format!("/{proxy}/v1/x"));
    let mut statuses = Vec::new();
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(5) {
        if !killed && started.elapsed() > Duration::from_secs(1) {
            pair.b.kill().unwrap();
            pair.b.wait().unwrap();
            killed = true;
        }
        let status = http
            .get(&url)
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        statuses.push((started.elapsed(), status));
    }
    // Nothing reached the upstream without latchkey's credential swap.
    for seen in upstream.take() {
        assert_eq!(
            seen.all("authorization"),
            [format!("Bearer {SECRET}")],
            "forwarded unchecked"
        );
        assert!(!seen.dump().contains(AGENT_KEY));
    }
    let failed = statuses.iter().filter(|(_, s)| *s != 200).count();
    eprintln!(
        "{} requests, {failed} failed while replica B died",
        statuses.len()
    );
    // Within a couple of health-check intervals Envoy serves through A alone.
    let settled: Vec<u16> = statuses
        .iter()
        .filter(|(t, _)| *t > Duration::from_millis(3500))
        .map(|(_, s)| *s)
        .collect();
    assert!(!settled.is_empty());
    assert!(
        settled.iter().all(|s| *s == 200),
        "after the failover: {settled:?}"
    );
    for (_, s) in &statuses {
        assert!(*s == 200 || *s >= 500, "only fail-closed errors: {s}");
    }
}

/// Replica B runs with another master key: once A seals a secret, B cannot compile the
/// store's policy. Revocations must reach B all the same, and B must say it is stale.
#[tokio::test]
async fn a_replica_that_cannot_compile_still_refuses_a_revoked_key_within_a_second() {
    let upstream = Upstream::start().await;
    let db = PgDatabase::create().await;
    let stack = Stack::start_configured(|c| c, &[("LATCHKEY_DATABASE_URL", db.url.as_str())]).await;
    // Keys only: nothing sealed yet, so B compiles this.
    stack.apply(
        "credentials:\n  - { name: agent, type: proxy, keys: [{ env: AGENT_KEY }] }\n",
        &env(),
    );
    let other_master = String::from_utf8(
        std::process::Command::new(crate::common::latchkey_bin())
            .arg("keygen")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let [b_grpc, b_admin, b_http] = [free_port(), free_port(), free_port()];
    let mut b = stack
        .spawn_replica_with(
            "latchkey-b",
            [b_grpc, b_admin, b_http],
            &[("LATCHKEY_MASTER_KEY", other_master.trim())],
        )
        .await;
    let issued =
        crate::common::json(&stack.cli(&["key", "issue", "--credential", "agent", "--json"], &[]));
    let key = issued["key"].as_str().unwrap();
    let proxy = unique("api");
    let deadline = Instant::now() + Duration::from_secs(2);
    // B knows the key (the proxy does not exist yet: a valid key learns that).
    while check_on(&stack, b_admin, &proxy, key)["decision"] != "unknown_proxy" {
        assert!(Instant::now() < deadline, "B never took in the new key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A seals a secret under its master key: B's compiles fail from here on.
    stack.apply(&policy(&upstream.url(), &proxy, 1000), &env());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stack
            .log("latchkey-b")
            .contains("could not reload the policy")
    );

    assert!(
        stack
            .cli(&["key", "revoke", issued["id"].as_str().unwrap()], &[])
            .status
            .success()
    );
    revoked_within_a_second(&stack, b_admin, &proxy, key).await;
    // Stale after repeated failures: B tells the load balancer so.
    let readyz = format!("http://127.0.0.1:{b_http}/readyz");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client().get(&readyz).send().await.unwrap();
        if r.status() == 503 {
            assert!(r.text().await.unwrap().contains("policy"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B stayed ready with a stale policy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = client()
        .get(format!("http://127.0.0.1:{b_http}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("latchkey_policy_reload_failures_total 0"),
        "{metrics}"
    );
    let _ = b.kill();
    let _ = b.wait();
}

/// A spend cap is a ceiling across replicas: reservations are taken in Redis before
/// forwarding, whichever replica decides.
#[tokio::test]
async fn a_spend_cap_is_a_ceiling_across_both_replicas() {
    let upstream = Upstream::start().await;
    let pair = pair().await;
    let proxy = unique("paid");
    // The upstream answers {"units": 3}: 0.30 a call, 0.30 reserved.
    let file = policy(&upstream.url(), &proxy, 1000).replace(
        "    limits: { requests_per_minute: 1000 }",
        "    limits: { requests_per_minute: 1000 }\n    cost: { response_json: /units, usd_per_unit: 0.1, max_usd_per_request: 0.3 }",
    );
    pair.stack.apply(&file, &env());
    let issued = crate::common::json(&pair.stack.cli(
        &[
            "key",
            "issue",
            "--credential",
            "agent",
            "--spend-cap-usd",
            "1",
            "--json",
        ],
        &[],
    ));
    let key = issued["key"].as_str().unwrap().to_owned();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let request = client()
            .get(pair.stack.url(&format!("/{proxy}/v1/x")))
            .bearer_auth(&key)
            .send();
        set.spawn(async move { request.await.unwrap().status().as_u16() });
    }
    let mut admitted = 0;
    while let Some(status) = set.join_next().await {
        match status.unwrap() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(admitted, 3, "0.90 of 1.00, never more");
    assert_eq!(upstream.take().len(), 3);
}
