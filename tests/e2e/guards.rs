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
    let log = stack.cli(
        &["requests", "--decision", "duplicate_request", "-o", "json"],
        &[],
    );
    assert_eq!(crate::common::json(&log).as_array().unwrap().len(), 5);

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
