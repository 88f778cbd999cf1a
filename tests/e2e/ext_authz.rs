//! ext_authz mode: what only headers can enforce is enforced; what needs more is refused
//! at apply time, or failed closed if it ever reaches a Check.

use crate::common::{Mode, Stack, Upstream, client, denial};

const AGENT_KEY: &str = "lk_authzAgentKEY000000000001";
const SECRET: &str = "sk_authz_secret_value_123";

fn policy(upstream: &str, proxy_extra: &str, rules: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ env: SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: api
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: allow
{proxy_extra}
rules:
{rules}
"#
    )
}

const BODY_RULE: &str = r#"  - proxy: api
    effect: deny
    methods: [POST]
    body:
      - { pointer: /amount, gt: 100 }"#;

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("SECRET", SECRET), ("AGENT_KEY", AGENT_KEY)]
}

#[tokio::test]
async fn apply_refuses_what_ext_authz_cannot_enforce() {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(Mode::ExtAuthz).await;
    for (extra, rules, why) in [
        ("", BODY_RULE, "read the request body"),
        (
            "    cost: { per_request_usd: 0.01 }",
            "  []",
            "cost read from responses",
        ),
    ] {
        let out = stack.try_apply(&policy(&upstream.url(), extra, rules), &env());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("\"api\"") && err.contains(why) && err.contains("ext_proc"),
            "{err}"
        );
    }
    // Nothing was applied: neither the key nor the proxy exists.
    let (status, kind, _) = denial(
        client()
            .get(stack.url("/api/v1/x"))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (401, "invalid_key"));
    assert!(upstream.take().is_empty());
}

#[tokio::test]
async fn a_body_rule_reached_through_ext_authz_fails_closed() {
    // latchkey in ext_proc mode (so the policy applies) behind an ext_authz Envoy: the
    // mismatch is refused per request, never forwarded unjudged.
    let upstream = Upstream::start().await;
    let stack = Stack::start_full(Mode::ExtAuthz, |c| c, &[]).await;
    stack.apply(&policy(&upstream.url(), "", BODY_RULE), &env());
    let http = client();
    let (status, kind, body) = denial(
        http.post(stack.url("/api/v1/refunds"))
            .bearer_auth(AGENT_KEY)
            .header("content-type", "application/json")
            .body(r#"{"amount": 5}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (500, "needs_ext_proc"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("read the request body")
    );
    assert!(upstream.take().is_empty());
    // A bodiless GET does not meet the body rule and goes through.
    let ok = http
        .get(stack.url("/api/v1/refunds"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        upstream.take()[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
}

#[tokio::test]
async fn rate_limits_and_audit_work_through_ext_authz() {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(Mode::ExtAuthz).await;
    stack.apply(
        &policy(
            &upstream.url(),
            "    limits: { requests_per_minute: 2 }",
            "  []",
        ),
        &env(),
    );
    let http = client();
    let call = || {
        http.get(stack.url("/api/v1/x"))
            .bearer_auth(AGENT_KEY)
            .send()
    };
    let first = call().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit"], "2");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "1");
    assert_eq!(call().await.unwrap().status(), 200);
    let response = call().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, kind, _) = denial(response).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
    assert_eq!(upstream.take().len(), 2);

    // The audit has all three, completed by Envoy's access log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let out = stack.cli(&["requests", "--json"], &[]);
        let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let complete = records.len() == 3
            && records.iter().all(|r| r["latency_ms"].is_number())
            && records
                .iter()
                .filter(|r| r["upstream_status"] == 200)
                .count()
                == 2
            && records[0]["decision"] == "rate_limited";
        if complete {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{records:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
