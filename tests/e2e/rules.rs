//! The rule language through real Envoy: body, header and query conditions.

use crate::common::{Stack, Upstream, client, denial};

const AGENT_KEY: &str = "lk_rulesAgentKEY00000000000001";
const SECRET: &str = "sk_rules_SECRET_value";

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: {SECRET} }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: pay
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: deny
rules:
  - proxy: pay
    effect: allow
    methods: [POST]
    path: "^/v1/refunds$"
    body:
      - {{ pointer: /amount, lte: 5000 }}
      - {{ pointer: /currency, regex: "^(usd|eur)$" }}
    notes: small refunds only
  - proxy: pay
    effect: allow
    methods: [GET]
    path: "^/v1/charges$"
    query:
      limit: "^[0-9]{{1,2}}$"
  - proxy: pay
    id: no-debug
    effect: deny
    headers:
      X-Debug: {{ presence: must_exist }}
    priority: 1
    notes: no debug switches
  - credential: agent
    effect: allow
    methods: [GET]
    path: "^/v1/customers$"
    headers:
      x-tenant: "^acme$"
"#
    )
}

#[tokio::test]
async fn body_header_and_query_rules_decide_through_envoy() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &[("AGENT_KEY", AGENT_KEY)]);
    let http = client();
    let post = |body: Vec<u8>| {
        http.post(stack.url("/pay/v1/refunds"))
            .header("x-api-key", AGENT_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    // Body: a small refund passes with its body intact and the credential swapped.
    let small = br#"{"amount": 1200, "currency": "usd", "charge": "ch_1"}"#.to_vec();
    let response = post(small.clone()).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, small);
    assert_eq!(seen[0].uri, "/v1/refunds");
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert!(seen[0].header("x-api-key").is_none());

    // Too much, the wrong currency, a string amount, no body, not JSON, too large.
    let refused: [(Vec<u8>, u16, &str, &str); 6] = [
        (
            br#"{"amount": 9000, "currency": "usd"}"#.to_vec(),
            403,
            "rule_denied",
            "no rule allows",
        ),
        (
            br#"{"amount": 10, "currency": "gbp"}"#.to_vec(),
            403,
            "rule_denied",
            "no rule allows",
        ),
        (
            br#"{"amount": "10", "currency": "usd"}"#.to_vec(),
            403,
            "rule_denied",
            "no rule allows",
        ),
        (Vec::new(), 403, "rule_denied", "no rule allows"),
        (
            b"amount=10&currency=usd".to_vec(),
            403,
            "rule_denied",
            "not JSON",
        ),
        (vec![b' '; 3 << 20], 413, "body_too_large", "larger than"),
    ];
    for (body, status, kind, message) in refused {
        let len = body.len();
        let (got_status, got_kind, json) = denial(post(body).await.unwrap()).await;
        assert_eq!(
            (got_status, got_kind.as_str()),
            (status, kind),
            "{len} bytes: {json}"
        );
        assert!(
            json["error"]["message"].as_str().unwrap().contains(message),
            "{json}"
        );
    }
    assert!(
        upstream.take().is_empty(),
        "a refused body reached the upstream"
    );

    // Query: every `limit` value must be one or two digits, and one must be there.
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut request = http.get(stack.url(path)).header("x-api-key", AGENT_KEY);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.send()
    };
    for (path, status) in [
        ("/pay/v1/charges?limit=10", 200),
        ("/pay/v1/charges?li%6Dit=7", 200),
        ("/pay/v1/charges?limit=1000", 403),
        ("/pay/v1/charges?limit=10&limit=1000", 403),
        ("/pay/v1/charges", 403),
    ] {
        assert_eq!(get(path, &[]).await.unwrap().status(), status, "{path}");
    }
    assert_eq!(upstream.take().len(), 2);

    // Headers: a tenant match allows; a debug header is denied first, whatever else.
    assert_eq!(
        get("/pay/v1/customers", &[("x-tenant", "acme")])
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get("/pay/v1/customers", &[("x-tenant", "other")])
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(get("/pay/v1/customers", &[]).await.unwrap().status(), 403);
    let (status, _, json) = denial(
        get(
            "/pay/v1/customers",
            &[("x-tenant", "acme"), ("x-debug", "1")],
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(json["error"]["rule_id"], "no-debug");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no debug switches")
    );
    assert_eq!(upstream.take().len(), 1);
}

#[tokio::test]
async fn check_explains_decisions_from_the_live_policy_without_calling_upstream() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &[("AGENT_KEY", AGENT_KEY)]);
    let body = stack.dir.path().join("refund.json");
    std::fs::write(&body, r#"{"amount": 9000, "currency": "usd"}"#).unwrap();
    let check = |args: &[&str]| {
        let mut all = vec!["check", "--proxy", "pay", "--json"];
        all.extend_from_slice(args);
        let out = stack.cli(&all, &[]);
        let v = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        // Exit 0 when allowed, 1 when denied.
        let expected = if v["allowed"] == true { 0 } else { 1 };
        assert_eq!(out.status.code(), Some(expected), "{v}");
        v
    };

    let small = stack.dir.path().join("small.json");
    std::fs::write(&small, r#"{"amount": 10, "currency": "eur"}"#).unwrap();
    let v = check(&[
        "--method",
        "POST",
        "--path",
        "/v1/refunds",
        "--credential",
        "agent",
        "--body",
        small.to_str().unwrap(),
    ]);
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["rule"]["notes"], "small refunds only", "{v}");
    assert_eq!(v["rule"]["priority"], 100, "{v}");
    assert_eq!(v["credential"], "agent");

    let v = check(&[
        "--method",
        "POST",
        "--path",
        "/v1/refunds",
        "--key",
        AGENT_KEY,
        "--body",
        body.to_str().unwrap(),
    ]);
    assert_eq!(
        (
            v["allowed"].clone(),
            v["decision"].clone(),
            v["status"].clone()
        ),
        (false.into(), "rule_denied".into(), 403.into()),
        "{v}"
    );
    assert!(v["rule"].is_null(), "the default decided: {v}");
    assert_eq!(v["default_effect"], "deny");

    let v = check(&[
        "--method",
        "GET",
        "--path",
        "/v1/customers",
        "--header",
        "x-debug: yes",
        "--header",
        "X-Tenant:acme",
    ]);
    assert_eq!(v["rule"]["id"], "no-debug", "{v}");
    let v = check(&[
        "--method",
        "GET",
        "--path",
        "/v1/charges",
        "--key",
        "lk_notAKeyAtAll0000000000",
    ]);
    assert_eq!(v["decision"], "invalid_key", "{v}");

    // The human form names the rule and the effect.
    let out = stack.cli(
        &[
            "check",
            "--proxy",
            "pay",
            "--method",
            "GET",
            "--path",
            "/v1/customers",
            "--credential",
            "agent",
            "--header",
            "x-tenant:acme",
        ],
        &[],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("decision: allow") && text.contains("priority 100"),
        "{text}"
    );

    // A credential that does not exist is an error, not a decision.
    let out = stack.cli(
        &[
            "check",
            "--proxy",
            "pay",
            "--method",
            "GET",
            "--path",
            "/",
            "--credential",
            "ghost",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "an error, not a denial");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no proxy credential named \"ghost\""));
    assert!(upstream.take().is_empty(), "check called the upstream");
}
