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
