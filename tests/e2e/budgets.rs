//! Run keys, rate limits and spend caps through real Envoy.

use crate::common::{self, Stack, Upstream, client, denial, json, unique};

const AGENT_KEY: &str = "lk_budgetAgentKEY000000000001";

fn policy(upstream: &str, limits: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: sk_budget_secret }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
  - {{ name: other, type: target, auth: bearer, secret: {{ value: x-other-secret-000 }} }}
proxies:
  - name: api
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: allow
{limits}
"#
    )
}

#[tokio::test]
async fn run_keys_issue_expire_and_revoke_one_at_a_time() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url(), ""), &[("AGENT_KEY", AGENT_KEY)]);
    let http = client();
    let call = |key: String| http.get(stack.url("/api/v1/x")).bearer_auth(key).send();

    let a = json(&stack.cli(
        &[
            "key",
            "issue",
            "--credential",
            "agent",
            "--label",
            "run-42",
            "--spend-cap-usd",
            "200",
            "--json",
        ],
        &[],
    ));
    for field in [
        "id",
        "key",
        "credential",
        "expires_at",
        "spend_cap_usd",
        "label",
    ] {
        assert!(a.get(field).is_some(), "{field} missing: {a}");
    }
    assert_eq!(a["credential"], "agent");
    assert_eq!(a["label"], "run-42");
    assert_eq!(a["spend_cap_usd"], 200.0);
    assert!(a["expires_at"].is_null());
    let key_a = a["key"].as_str().unwrap().to_owned();
    assert!(key_a.starts_with("lk_") && key_a.len() >= 25, "{key_a}");

    let b = json(&stack.cli(
        &[
            "key",
            "issue",
            "--credential",
            "agent",
            "--ttl",
            "2h",
            "--json",
        ],
        &[],
    ));
    let key_b = b["key"].as_str().unwrap().to_owned();
    assert!(b["expires_at"].as_str().unwrap().ends_with('Z'), "{b}");
    let short = json(&stack.cli(
        &[
            "key",
            "issue",
            "--credential",
            "agent",
            "--ttl",
            "1s",
            "--json",
        ],
        &[],
    ));
    let key_short = short["key"].as_str().unwrap().to_owned();

    for key in [&key_a, &key_b, &key_short] {
        assert_eq!(call(key.clone()).await.unwrap().status(), 200);
    }
    for seen in upstream.take() {
        assert_eq!(
            seen.header("authorization"),
            Some("Bearer sk_budget_secret")
        );
    }

    // Revoking one key stops it on the very next request; its siblings keep working.
    let out = stack.cli(&["key", "revoke", a["id"].as_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, kind, _) = denial(call(key_a.clone()).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "revoked_key"));
    assert_eq!(call(key_b.clone()).await.unwrap().status(), 200);
    assert_eq!(call(AGENT_KEY.to_owned()).await.unwrap().status(), 200);

    // The one-second key expires.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, kind, _) = denial(call(key_short.clone()).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "expired_key"));
    assert_eq!(call(key_b.clone()).await.unwrap().status(), 200);

    // The list shows ids, labels, states; never a key.
    let out = stack.cli(&["key", "list", "--json"], &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for key in [&key_a, &key_b, &key_short, &AGENT_KEY.to_owned()] {
        assert!(!text.contains(key.as_str()), "key list shows a key");
    }
    let list = json(&out);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{list}");
    let status_of = |id: &serde_json::Value| {
        rows.iter().find(|r| r["id"] == *id).unwrap()["status"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(status_of(&a["id"]), "revoked");
    assert_eq!(status_of(&b["id"]), "active");
    assert_eq!(status_of(&short["id"]), "expired");
    assert!(rows.iter().any(|r| r["source"] == "policy"));

    // Revoking twice is fine; unknown ids and credentials are errors that say so.
    let out = stack.cli(&["key", "revoke", a["id"].as_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already revoked"));
    let out = stack.cli(&["key", "revoke", "key_nope"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key with id"));
    let out = stack.cli(&["key", "issue", "--credential", "other"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no proxy credential named \"other\""));

    // A re-apply of the policy keeps issued keys and their revocations.
    assert_eq!(
        stack
            .apply(&policy(&upstream.url(), ""), &[("AGENT_KEY", AGENT_KEY)])
            .trim(),
        "no changes"
    );
    assert_eq!(call(key_b).await.unwrap().status(), 200);
    assert_eq!(denial(call(key_a).await.unwrap()).await.1, "revoked_key");
}

fn limited_policy(upstream: &str, proxy: &str, credential: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: sk_budget_secret }} }}
  - name: {credential}
    type: proxy
    keys: [{{ env: AGENT_KEY }}]
    limits: {{ requests_per_minute: 5 }}
proxies:
  - name: {proxy}
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [{credential}]
    default_effect: allow
    limits: {{ requests_per_minute: 3, requests_per_day: 1000 }}
  - name: {proxy}-free
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [{credential}]
    default_effect: allow
"#
    )
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_count_per_proxy_and_credential() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let proxy = unique("limited");
    stack.apply(
        &limited_policy(&upstream.url(), &proxy, "agent"),
        &[("AGENT_KEY", AGENT_KEY)],
    );
    let http = client();
    let call = |p: String| {
        http.get(stack.url(&format!("/{p}/v1/x")))
            .bearer_auth(AGENT_KEY)
            .send()
    };

    for remaining in ["2", "1", "0"] {
        let r = call(proxy.clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit"], "3");
        assert_eq!(r.headers()["x-ratelimit-remaining"], remaining);
    }
    let r = call(proxy.clone()).await.unwrap();
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (19..=20).contains(&retry_after),
        "one request every 20 s: {retry_after}"
    );
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let (status, kind, _) = denial(r).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
    assert_eq!(upstream.take().len(), 3, "the refused request never left");

    // The credential's own limit (5 a minute) spans its proxies: 3 used, 2 left.
    for _ in 0..2 {
        let r = call(format!("{proxy}-free")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit"], "5");
    }
    let (status, kind, _) = denial(call(format!("{proxy}-free")).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
}

/// An upstream (or a target an agent controls) that sends rate-limit figures of its own
/// does not get them past latchkey's: the agent sees one value of each, latchkey's.
#[tokio::test]
async fn an_upstreams_own_rate_headers_are_replaced_not_added_to() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        (
            [
                ("x-ratelimit-limit", "999999"),
                ("x-ratelimit-remaining", "999999"),
            ],
            "{}",
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let stack = Stack::start().await;
    let proxy = unique("echoed");
    stack.apply(
        &limited_policy(&format!("http://{addr}"), &proxy, "agent"),
        &[("AGENT_KEY", AGENT_KEY)],
    );
    let r = client()
        .get(stack.url(&format!("/{proxy}/v1/x")))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all = |name| {
        (r.headers().get_all(name).iter())
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("x-ratelimit-limit"), ["3"]);
    assert_eq!(all("x-ratelimit-remaining"), ["2"]);
}

#[tokio::test]
async fn unlimited_proxies_carry_no_rate_headers() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url(), ""), &[("AGENT_KEY", AGENT_KEY)]);
    let r = client()
        .get(stack.url("/api/x"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("x-ratelimit-limit").is_none(),
        "{:?}",
        r.headers()
    );
}

#[tokio::test]
async fn two_replicas_share_one_limit_in_redis() {
    let upstream = Upstream::start().await;
    let redis = [("LATCHKEY_REDIS_URL", "redis://127.0.0.1:6379")];
    let a = Stack::start_configured(|c| c, &redis).await;
    let b = Stack::start_configured(|c| c, &redis).await;
    let proxy = unique("shared");
    let credential = unique("agent");
    for stack in [&a, &b] {
        stack.apply(
            &limited_policy(&upstream.url(), &proxy, &credential),
            &[("AGENT_KEY", AGENT_KEY)],
        );
    }
    let http = client();
    let mut admitted = 0;
    for i in 0..12 {
        let stack = if i % 2 == 0 { &a } else { &b };
        let r = http
            .get(stack.url(&format!("/{proxy}/x")))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(admitted, 3, "the limit holds across both replicas");
    assert_eq!(upstream.take().len(), 3);
}

#[tokio::test]
async fn an_unreachable_redis_fails_closed_and_recovers() {
    let port = crate::common::free_port();
    let start_redis = || {
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server")
    };
    let url = format!("redis://127.0.0.1:{port}");
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(|c| c, &[("LATCHKEY_REDIS_URL", &url)]).await;
    let proxy = unique("flaky");
    stack.apply(
        &limited_policy(&upstream.url(), &proxy, "agent"),
        &[("AGENT_KEY", AGENT_KEY)],
    );
    let http = client();
    let call = |p: String| {
        http.get(stack.url(&format!("/{p}/x")))
            .bearer_auth(AGENT_KEY)
            .send()
    };

    // Redis down: limited requests are refused with a clear 503 and a log line.
    let (status, kind, body) = denial(call(proxy.clone()).await.unwrap()).await;
    assert_eq!(
        (status, kind.as_str()),
        (503, "budget_unavailable"),
        "{body}"
    );
    assert!(upstream.take().is_empty());
    assert!(stack.log("latchkey").contains("refusing a limited request"));

    // Redis back: latchkey reconnects by itself.
    let mut redis = start_redis();
    let mut recovered = false;
    for _ in 0..100 {
        if call(proxy.clone()).await.unwrap().status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(recovered, "latchkey did not recover once Redis was back");
}

fn priced_policy(upstream: &str, cost: &str, credential_limits: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: sk_budget_secret }} }}
  - name: agent
    type: proxy
    keys: [{{ env: AGENT_KEY }}]
{credential_limits}
proxies:
  - name: paid
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: allow
    cost: {cost}
"#
    )
}

/// Fires `n` requests at once with `key`; returns how many got each status.
async fn burst(stack: &Stack, key: &str, n: usize) -> std::collections::BTreeMap<u16, usize> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let request = client()
            .get(stack.url("/paid/v1/generate"))
            .bearer_auth(key)
            .send();
        set.spawn(async move { request.await.unwrap().status().as_u16() });
    }
    let mut counts = std::collections::BTreeMap::new();
    while let Some(status) = set.join_next().await {
        *counts.entry(status.unwrap()).or_default() += 1;
    }
    counts
}

const REDIS: [(&str, &str); 1] = [("LATCHKEY_REDIS_URL", "redis://127.0.0.1:6379")];

#[tokio::test]
async fn a_fixed_price_never_overshoots_the_cap_even_fifty_at_once() {
    fixed_price_cap(&[]).await;
}

#[tokio::test]
async fn a_fixed_price_never_overshoots_the_cap_in_redis_either() {
    fixed_price_cap(&REDIS).await;
}

async fn fixed_price_cap(serve_env: &[(&str, &str)]) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(|c| c, serve_env).await;
    stack.apply(
        &priced_policy(&upstream.url(), "{ per_request_usd: 0.1 }", ""),
        &[("AGENT_KEY", AGENT_KEY)],
    );
    let (id, key) = capped(&stack, "1");
    let counts = burst(&stack, &key, 50).await;
    assert_eq!(counts.get(&200), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&40), "{counts:?}");
    assert_eq!(upstream.take().len(), 10);
    let r = client()
        .get(stack.url("/paid/v1/generate"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("retry-after").is_some());
    let (status, kind, body) = denial(r).await;
    assert_eq!(
        (status, kind.as_str()),
        (429, "spend_cap_exceeded"),
        "{body}"
    );
    // The spend is on record, off the request path.
    let mut recorded = 0.0;
    for _ in 0..50 {
        recorded = common::recorded_spend(&stack, &id);
        if (recorded - 1.0).abs() < 1e-9 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!((recorded - 1.0).abs() < 1e-9, "spent {recorded}");
    // An uncapped sibling is unaffected and its spend is counted too.
    assert_eq!(
        client()
            .get(stack.url("/paid/v1/generate"))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_price_read_from_the_response_overshoots_by_at_most_the_requests_in_flight() {
    response_price_cap(&[]).await;
}

#[tokio::test]
async fn a_price_read_from_the_response_is_bounded_in_redis_too() {
    response_price_cap(&REDIS).await;
}

async fn response_price_cap(serve_env: &[(&str, &str)]) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(|c| c, serve_env).await;
    // The upstream answers {"ok":true,"units":3}: 0.30 USD a response.
    stack.apply(
        &priced_policy(
            &upstream.url(),
            "{ response_json: /units, usd_per_unit: 0.1 }",
            "",
        ),
        &[("AGENT_KEY", AGENT_KEY)],
    );
    let (id, key) = capped(&stack, "1");
    let counts = burst(&stack, &key, 50).await;
    let admitted = counts.get(&200).copied().unwrap_or(0);
    // Bound: the cap (1.00) plus MAX_IN_FLIGHT (8) responses of 0.30 in flight.
    assert!((4..=11).contains(&admitted), "{counts:?}");
    assert_eq!(upstream.take().len(), admitted);
    let (status, kind, _) = denial(
        client()
            .get(stack.url("/paid/v1/generate"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (429, "spend_cap_exceeded"));
    let mut recorded = 0.0;
    for _ in 0..50 {
        recorded = common::recorded_spend(&stack, &id);
        if (recorded - 0.3 * admitted as f64).abs() < 1e-6 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        (recorded - 0.3 * admitted as f64).abs() < 1e-6,
        "spent {recorded} for {admitted}"
    );
    assert!(recorded <= 1.0 + 8.0 * 0.3 + 1e-9);
}

#[tokio::test]
async fn a_credential_daily_cap_spans_its_keys() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(
        &priced_policy(
            &upstream.url(),
            "{ per_request_usd: 0.1 }",
            "    limits: { spend_usd_per_day: 0.25 }",
        ),
        &[("AGENT_KEY", AGENT_KEY)],
    );
    let (_, key) = capped(&stack, "100");
    let http = client();
    let call = |k: &str| {
        http.get(stack.url("/paid/v1/generate"))
            .bearer_auth(k.to_owned())
            .send()
    };
    assert_eq!(call(&key).await.unwrap().status(), 200);
    assert_eq!(call(AGENT_KEY).await.unwrap().status(), 200);
    let r = call(&key).await.unwrap();
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry_after));
    let (_, kind, body) = denial(r).await;
    assert_eq!(kind, "spend_cap_exceeded");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("daily"),
        "{body}"
    );
}

fn capped(stack: &Stack, cap: &str) -> (String, String) {
    common::issue_key(stack, "agent", &["--spend-cap-usd", cap])
}
