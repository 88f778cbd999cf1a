//! Runaway guards: a looping agent's identical POSTs reach the vendor once; a new
//! `Idempotency-Key`, another body or another key is another request; the vendor gets an
//! `Idempotency-Key` derived from the request so it deduplicates too.

use crate::common::{Stack, Upstream, client, denial, issue_key};

const AGENT_KEY: &str = "lk_guardsAgentKEY0000000001";

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: stripe, url: "{upstream}" }}
credentials:
  - {{ name: stripe-key, type: target, auth: bearer, secret: {{ value: sk_guarded }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - name: stripe
    target: stripe
    target_credential: stripe-key
    proxy_credentials: [agent]
    default_effect: allow
    guards: {{ duplicate_window: 60s, idempotency_key: true }}
"#
    )
}

async fn post(
    stack: &Stack,
    key: &str,
    body: &str,
    idempotency: Option<&str>,
) -> reqwest::Response {
    let mut request = client()
        .post(stack.url("/stripe/v1/charges"))
        .bearer_auth(key)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(k) = idempotency {
        request = request.header("idempotency-key", k);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_loop_of_identical_posts_reaches_the_vendor_once() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &[]);

    // The loop: five identical charges, one forwarded.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = post(&stack, AGENT_KEY, "amount=100&currency=usd", None).await;
        statuses.push(response.status().as_u16());
        if response.status() == 409 {
            assert_eq!(response.headers()["x-should-retry"], "false");
            let (_, kind, body) = denial(response).await;
            assert_eq!(kind, "duplicate_request", "{body}");
        }
    }
    assert_eq!(statuses, [200, 409, 409, 409, 409]);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    let derived = seen[0].header("idempotency-key").unwrap().to_owned();
    assert!(
        derived.starts_with("lk_") && derived.len() == 35,
        "{derived}"
    );
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk_guarded"));

    // Meant to happen again: a new Idempotency-Key passes, and is the vendor's to see.
    for expected in [200, 409] {
        let charge = post(
            &stack,
            AGENT_KEY,
            "amount=100&currency=usd",
            Some("order-2"),
        );
        assert_eq!(charge.await.status(), expected);
    }
    // Another amount, another key of the same credential: other requests.
    assert_eq!(
        post(&stack, AGENT_KEY, "amount=101&currency=usd", None)
            .await
            .status(),
        200
    );
    let (_, other_key) = issue_key(&stack, "agent", &[]);
    assert_eq!(
        post(&stack, &other_key, "amount=100&currency=usd", None)
            .await
            .status(),
        200
    );
    let seen = upstream.take();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].header("idempotency-key"), Some("order-2"));
    assert_ne!(seen[1].header("idempotency-key"), Some(derived.as_str()));

    // Reads are not side effects: a repeated GET always passes.
    for _ in 0..3 {
        let r = client()
            .get(stack.url("/stripe/v1/charges"))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let metrics = stack.metrics().await;
    assert!(
        metrics
            .contains(r#"latchkey_decisions_total{proxy="stripe",decision="duplicate_request"} 5"#),
        "{metrics}"
    );
    // The audit writes a denial once Envoy's access log completes it (or after a second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = stack.cli(
            &["requests", "--decision", "duplicate_request", "-o", "json"],
            &[],
        );
        let recorded = crate::common::json(&log).as_array().unwrap().len();
        if recorded == 5 {
            break;
        }
        assert!(
            recorded < 5 && std::time::Instant::now() < deadline,
            "{recorded} duplicate_request records"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // `check` explains the guards.
    let out = stack.cli(
        &[
            "check",
            "--proxy",
            "stripe",
            "--method",
            "POST",
            "--path",
            "/v1/charges",
            "--credential",
            "agent",
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let explained = String::from_utf8_lossy(&out.stdout);
    assert!(
        explained.contains("guard: a repeat of this request") && explained.contains("within 60 s"),
        "{explained}"
    );
}

/// A vendor that fails each path's first two calls with 503, then answers 200; it
/// counts the calls per path.
async fn flaky() -> (
    String,
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
) {
    use axum::http::{StatusCode, Uri};
    let calls: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>> =
        Default::default();
    let seen = calls.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let seen = seen.clone();
        async move {
            let mut calls = seen.lock().unwrap();
            let n = calls.entry(uri.path().to_owned()).or_default();
            *n += 1;
            if *n <= 2 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

#[tokio::test]
async fn failures_are_retried_only_where_a_repeat_is_safe() {
    let (url, calls) = flaky().await;
    let stack = Stack::start().await;
    let file = policy(&url).replace(
        "guards: { duplicate_window: 60s, idempotency_key: true }",
        "guards: { retries: { max: 2 } }",
    );
    stack.apply(&file, &[]);
    let call = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut request = client()
            .request(method, stack.url(path))
            .bearer_auth(AGENT_KEY);
        if let Some(k) = key {
            request = request.header("idempotency-key", k);
        }
        request.send()
    };
    // A read: two 503s retried, the third call answers.
    assert_eq!(
        call(reqwest::Method::GET, "/stripe/v1/a", None)
            .await
            .unwrap()
            .status(),
        200
    );
    // A POST without a key is not safe to repeat: the agent gets the 503.
    assert_eq!(
        call(reqwest::Method::POST, "/stripe/v1/b", None)
            .await
            .unwrap()
            .status(),
        503
    );
    // An agent's own Idempotency-Key is not trusted unless the policy says the vendor
    // honours keys: still one call.
    let status = call(reqwest::Method::POST, "/stripe/v1/c", Some("k-1"))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 503);
    // It does (`idempotency_key: true`): a POST, keyed by latchkey, is retried.
    stack.apply(
        &file.replace("{ retries:", "{ idempotency_key: true, retries:"),
        &[],
    );
    let status = call(reqwest::Method::POST, "/stripe/v1/d", None)
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let calls = calls.lock().unwrap().clone();
    let counts = [
        calls["/v1/a"],
        calls["/v1/b"],
        calls["/v1/c"],
        calls["/v1/d"],
    ];
    assert_eq!(counts, [3, 1, 1, 3], "{calls:?}");

    // Each call is one audit record that counts its retries.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = crate::common::json(&stack.cli(&["requests", "-o", "json"], &[]));
        let retries: Vec<(String, u64)> = (log.as_array().unwrap().iter())
            .filter(|r| r["retries"].is_u64())
            .map(|r| {
                (
                    r["path"].as_str().unwrap().to_owned(),
                    r["retries"].as_u64().unwrap(),
                )
            })
            .collect();
        if retries.len() == 4 {
            let mut retries = retries;
            retries.sort();
            assert_eq!(
                retries,
                [
                    ("/v1/a".into(), 2),
                    ("/v1/b".into(), 0),
                    ("/v1/c".into(), 0),
                    ("/v1/d".into(), 2)
                ]
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Retries are requests too: each counts against the caller's rate budget, in this
/// process and in Redis, so a retried call cannot amplify load.
#[tokio::test]
async fn retries_count_against_the_rate_budget() {
    for redis in [false, true] {
        let (url, calls) = flaky().await;
        let env: &[(&str, &str)] = if redis {
            &[("LATCHKEY_REDIS_URL", "redis://127.0.0.1:6379")]
        } else {
            &[]
        };
        let stack = Stack::start_configured(|c| c, env).await;
        let proxy = crate::common::unique("retried");
        let file = policy(&url)
            .replace(
                "guards: { duplicate_window: 60s, idempotency_key: true }",
                "guards: { retries: { max: 2 } }\n    limits: { requests_per_minute: 6 }",
            )
            .replace("  - name: stripe\n", &format!("  - name: {proxy}\n"));
        stack.apply(&file, &[]);
        let get = |path: String| {
            let url = stack.url(&format!("/{proxy}{path}"));
            async move {
                client()
                    .get(url)
                    .bearer_auth(AGENT_KEY)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        // Two calls, each answered on its third attempt: 2 × 3 of the 6 a minute.
        assert_eq!(get("/v1/one".into()).await, 200, "redis: {redis}");
        assert_eq!(get("/v1/two".into()).await, 200, "redis: {redis}");
        assert_eq!(calls.lock().unwrap().values().sum::<u32>(), 6);
        // Once the access log tells latchkey of the retries, the budget is spent.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut n = 0;
        loop {
            n += 1;
            let status = get(format!("/v1/later-{n}")).await;
            if status == 429 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis: {redis}: still {status} after {n} more calls"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // Without retries counted, four more calls would have passed; at most one did
        // (its retries were not reported yet when the next came).
        assert!(n <= 2, "redis: {redis}: {n} calls until refused");
    }
}

/// A Redis of the test's own, so what reaches it is this test's alone.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = crate::common::free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (the Makefile installs it)");
        let redis = Self { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !redis.cli(&["PING"]).contains("PONG") {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        redis
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The commands clients send while `during` runs, by name, from `MONITOR` (whose
    /// lines name a script's own calls `lua`: those are not round trips).
    async fn round_trips(&self, during: impl std::future::Future<Output = ()>) -> Vec<String> {
        use std::io::BufRead;
        let mut monitor = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "MONITOR"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-cli");
        let stdout = monitor.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let next = || rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(next(), "OK");
        during.await;
        // A marker: everything before it has been seen.
        self.cli(&["ECHO", "latchkey-test-done"]);
        let mut out = Vec::new();
        loop {
            let line = next();
            if line.contains("latchkey-test-done") {
                break;
            }
            if line.contains("[0 lua]") {
                continue;
            }
            if let Some(name) = line.split('"').nth(1) {
                out.push(name.to_ascii_uppercase());
            }
        }
        let _ = monitor.kill();
        let _ = monitor.wait();
        out
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the guards cost where they are not used: a request on a proxy without guards
/// makes exactly the one budget call it made before them (the rate limit's script), and
/// a guarded POST one more (the duplicate guard's `SET NX`); alerts and the retries'
/// bookkeeping add none.
#[tokio::test]
async fn guards_add_no_round_trip_where_they_are_not_used() {
    let redis = PrivateRedis::start();
    let upstream = Upstream::start().await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let stack = Stack::start_configured(|c| c, &[("LATCHKEY_REDIS_URL", url.as_str())]).await;
    let plain = policy(&upstream.url())
        .replace(
            "    guards: { duplicate_window: 60s, idempotency_key: true }\n",
            "    limits: { requests_per_minute: 1000 }\n",
        )
        .replace("  - name: stripe\n", "  - name: plain\n");
    let guarded = policy(&upstream.url())
        .replace(
            "guards: { duplicate_window: 60s, idempotency_key: true }",
            "limits: { requests_per_minute: 1000 }\n    guards:\n      duplicate_window: 60s\n      \
             retries: { max: 2 }\n      alerts: { requests: { factor: 5, min: 500 } }",
        )
        .replace("  - name: stripe\n", "  - name: guarded\n");
    // One file, two proxies: the second file's proxy appended to the first's list.
    let proxies = guarded.split("proxies:\n").nth(1).unwrap();
    stack.apply(&format!("{plain}{proxies}"), &[]);
    let send = |method: reqwest::Method, path: String, body: String| {
        let request = client()
            .request(method, stack.url(&path))
            .bearer_auth(AGENT_KEY)
            .body(body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // The first call loads the budget script into Redis: not counted.
    assert_eq!(
        send(reqwest::Method::GET, "/plain/v1/warm".into(), String::new()).await,
        200
    );

    let plain_calls = redis
        .round_trips(async {
            for i in 0..20 {
                for method in [reqwest::Method::GET, reqwest::Method::POST] {
                    let status = send(method, format!("/plain/v1/items/{i}"), format!("n={i}"));
                    assert_eq!(status.await, 200);
                }
            }
        })
        .await;
    assert_eq!(
        plain_calls,
        vec!["EVALSHA".to_owned(); 40],
        "one budget call per request"
    );

    let guarded_calls = redis
        .round_trips(async {
            for i in 0..20 {
                let status = send(
                    reqwest::Method::POST,
                    "/guarded/v1/charges".into(),
                    format!("amount={i}"),
                );
                assert_eq!(status.await, 200, "guarded POST {i}");
                let status = send(
                    reqwest::Method::GET,
                    format!("/guarded/v1/charges/{i}"),
                    String::new(),
                );
                assert_eq!(status.await, 200, "guarded GET {i}");
            }
        })
        .await;
    let count = |name: &str| guarded_calls.iter().filter(|c| *c == name).count();
    // A POST: the duplicate guard's SET NX, then the budget script; a GET (retriable)
    // only the budget script, which remembers its limits for its retries itself.
    assert_eq!(
        (count("SET"), count("EVALSHA")),
        (20, 40),
        "{guarded_calls:?}"
    );
    assert_eq!(guarded_calls.len(), 60, "{guarded_calls:?}");
}
