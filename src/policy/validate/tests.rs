use super::*;

const EXAMPLE: &str = r#"
targets:
  - name: stripe
    url: https://api.stripe.com
credentials:
  - name: stripe-production
    type: target
    auth: bearer
    secret: { env: STRIPE_SECRET }
  - name: agent-billing
    type: proxy
    keys:
      - { env: AGENT_BILLING_KEY }
proxies:
  - name: stripe-billing
    target: stripe
    target_credential: stripe-production
    proxy_credentials: [agent-billing]
    default_effect: deny
    limits: { requests_per_minute: 100, requests_per_day: 1000 }
    cost: { response_json: "/amount", usd_per_unit: 0.01 }
rules:
  - credential: agent-billing
    effect: allow
    methods: [GET, POST]
    path: "^/v1/(charges|refunds)"
    priority: 10
    notes: "Billing agent: charges and refunds only"
"#;

fn err(text: &str) -> String {
    PolicyFile::parse(text).unwrap_err().to_string()
}

#[test]
fn the_design_example_parses() {
    let f = PolicyFile::parse(EXAMPLE).unwrap();
    assert_eq!(f.proxies[0].default_effect, Effect::Deny);
    assert_eq!(f.rules[0].priority, 10);
    assert_eq!(f.rules[0].id(), f.rules[0].clone().id());
    assert!(f.rules[0].id().starts_with("rule_"));
}

#[test]
fn unknown_fields_name_the_line() {
    let e = err(&EXAMPLE.replace("    priority: 10", "    priority: 10\n    prio: 3"));
    assert!(
        e.contains("unknown field `prio`") && e.contains("line"),
        "{e}"
    );
}

#[test]
fn semantic_errors_name_the_item() {
    let e = err(&EXAMPLE.replace("(charges|refunds)", "(charges"));
    assert!(e.contains("rules[0]") && e.contains("invalid regex"), "{e}");
    let e = err(&EXAMPLE.replace("target: stripe\n", "target: strype\n"));
    assert!(
        e.contains("proxy \"stripe-billing\"") && e.contains("\"strype\""),
        "{e}"
    );
    let e = err(&EXAMPLE.replace("[agent-billing]", "[agent-x]"));
    assert!(e.contains("\"agent-x\" is not defined"), "{e}");
    let e = err(&EXAMPLE.replace("- credential: agent-billing", "- credential: nobody"));
    assert!(e.contains("rules[0]") && e.contains("\"nobody\""), "{e}");
    let e = err(&EXAMPLE.replace("https://api.stripe.com", "ftp://x"));
    assert!(e.contains("target \"stripe\"") && e.contains("url"), "{e}");
    let e = err(&EXAMPLE.replace("auth: bearer", "auth: header"));
    assert!(e.contains("`header` is required"), "{e}");
    let e = err(&EXAMPLE.replace("{ env: STRIPE_SECRET }", "{ env: A, value: b }"));
    assert!(e.contains("exactly one"), "{e}");
    let e = err(&EXAMPLE.replace("name: stripe-billing", "name: a/b"));
    assert!(e.contains("name must be"), "{e}");
}

#[test]
fn secrets_the_server_reads_are_named_and_checked() {
    let with = |secret: &str| EXAMPLE.replace("{ env: STRIPE_SECRET }", secret);
    let f = PolicyFile::parse(&with("{ mounted: /var/run/secrets/stripe/key }")).unwrap();
    assert_eq!(
        f.server_sources(),
        [ServerSource::Mounted("/var/run/secrets/stripe/key".into())]
    );
    assert_eq!(f.target_secrets().count(), 0, "the client resolves none");
    let f = PolicyFile::parse(&with(
        "{ aws_secrets_manager: { id: prod/stripe, field: key, refresh: 30s } }",
    ))
    .unwrap();
    assert!(matches!(&f.server_sources()[..], [ServerSource::Aws(a)] if a.id == "prod/stripe"));
    for (secret, why) in [
        ("{ mounted: stripe/key }", "absolute path"),
        ("{ mounted: /a, env: B }", "exactly one"),
        ("{ aws_secrets_manager: { id: \"\" } }", "name or ARN"),
        (
            "{ aws_secrets_manager: { id: a, refresh: 10ms } }",
            "under 1s",
        ),
        (
            "{ aws_secrets_manager: { id: a, region: \"us east\" } }",
            "not an AWS region",
        ),
    ] {
        let e = err(&with(secret));
        assert!(e.contains(why), "{secret}: {e}");
    }
    let e = err(&EXAMPLE.replace(
        "{ env: AGENT_BILLING_KEY }",
        "{ mounted: /var/run/secrets/agent }",
    ));
    assert!(e.contains("a proxy key is given by"), "{e}");
}

#[test]
fn guards_are_checked() {
    let with = |guards: &str| {
        EXAMPLE.replace(
            "    target_credential: stripe-production\n",
            &format!("    target_credential: stripe-production\n    guards: {guards}\n"),
        )
    };
    PolicyFile::parse(&with(
            "{ duplicate_window: 60s, idempotency_key: true, retries: { max: 2, statuses: [429, 503] } }",
        ))
        .unwrap();
    for (guards, why) in [
        ("{ duplicate_window: 0s }", "from 1s to 24h"),
        ("{ duplicate_window: 25h }", "from 1s to 24h"),
        ("{ duplicate_window: 1500ms }", "whole seconds"),
        ("{ retries: { max: 9 } }", "max is 1 to 5"),
        ("{ retries: { max: 1, statuses: [500] } }", "not one of"),
        (
            "{ retries: { max: 1, statuses: [], connection_failures: false } }",
            "retry on what",
        ),
    ] {
        let e = err(&with(guards));
        assert!(e.contains(why), "{guards}: {e}");
    }
    let e = err(&EXAMPLE.replace("    default_effect: deny", "    default_effect: approve"));
    assert!(e.contains("`approve` goes on a rule"), "{e}");
}

#[test]
fn conditions_parse_and_bad_ones_are_named() {
    let with = |conditions: &str| {
        EXAMPLE.replace(
            "    priority: 10\n",
            &format!("    priority: 10\n{conditions}"),
        )
    };
    let f = PolicyFile::parse(&with(
            "    headers:\n      X-Env: \"^staging$\"\n      x-trace: { presence: must_not_exist }\n    query:\n      limit: { regex: \"^[0-9]+$\" }\n    body:\n      - { pointer: /amount, lte: 5000 }\n      - { pointer: /currency, regex: \"^usd$\" }\n",
        ))
        .unwrap();
    let r = &f.rules[0];
    assert_eq!(r.headers["X-Env"].regex(), Some("^staging$"));
    assert_eq!(
        r.headers["x-trace"].presence(),
        Some(Presence::MustNotExist)
    );
    assert_eq!(r.body[0].lte, Some(5000.0));
    assert_ne!(r.id(), PolicyFile::parse(EXAMPLE).unwrap().rules[0].id());

    for (conditions, expected) in [
        (
            "    body:\n      - { pointer: /amount, between: 3 }\n",
            "unknown field `between`",
        ),
        (
            "    body:\n      - { pointer: amount, lt: 3 }\n",
            "body[0]: pointer",
        ),
        (
            "    body:\n      - { pointer: /a }\n",
            "body[0]: give at least one",
        ),
        (
            "    body:\n      - { pointer: /a, lt: 1, regex: x }\n",
            "not both",
        ),
        (
            "    body:\n      - { pointer: /a, regex: \"(\" }\n",
            "body[0]: invalid regex",
        ),
        ("    headers:\n      \"bad name\": x\n", "not a header name"),
        ("    headers:\n      x-a: { presence: sometimes }\n", "x-a"),
        (
            "    query:\n      q: { regex: a, presence: must_not_exist }\n",
            "query: q",
        ),
        ("    query:\n      q: {}\n", "query: q: give"),
    ] {
        let e = err(&with(conditions));
        assert!(
            e.contains(expected) || e.contains("line"),
            "{conditions}: {e}"
        );
        if !expected.contains("unknown") && !expected.starts_with('x') {
            assert!(
                e.contains(expected) && e.contains("rules[0]"),
                "{conditions}: {e}"
            );
        }
    }
}

#[test]
fn huge_regexes_are_refused() {
    let e = err(&EXAMPLE.replace("^/v1/(charges|refunds)", "(?:[a-z]{500}){500}"));
    assert!(e.contains("rules[0]") && e.contains("regex"), "{e}");
}

#[test]
fn target_urls() {
    let u = TargetUrl::parse("https://API.example.com/base/").unwrap();
    assert_eq!(
        u,
        TargetUrl {
            tls: true,
            authority: "api.example.com".into(),
            base_path: "/base".into()
        }
    );
    let u = TargetUrl::parse("http://127.0.0.1:8080").unwrap();
    assert_eq!(
        (u.tls, u.authority.as_str(), u.base_path.as_str()),
        (false, "127.0.0.1:8080", "")
    );
    for bad in [
        "api.example.com",
        "https://",
        "https://a b",
        "https://h:0",
        "https://h:99999",
        "https://h/a/../b",
        "https://h/a?x=1",
        "https://user@h",
    ] {
        assert!(TargetUrl::parse(bad).is_err(), "{bad}");
    }
}

const IDENTITY_AND_MCP: &str = r#"
targets:
  - { name: docs, url: "https://mcp.docs.example" }
credentials:
  - { name: docs-token, type: target, auth: bearer, secret: { env: DOCS } }
  - name: agents
    type: proxy
    identity:
      issuer: https://kubernetes.default.svc
      audience: latchkey
      jwks: { url: "https://kubernetes.default.svc/openid/v1/jwks" }
      subject: "system:serviceaccount:agents:*"
      claims: { "kubernetes.io/namespace": agents }
      max_ttl: 30m
      max_spend_cap_usd: 5
proxies:
  - name: docs
    target: docs
    target_credential: docs-token
    proxy_credentials: [agents]
    protocol: mcp
    mcp:
      tools:
        - { name: "search_*", requests_per_minute: 30, price_usd: 0.002 }
rules:
  - { proxy: docs, effect: deny, mcp: { tools: ["delete_*"] } }
  - { proxy: docs, effect: allow, mcp: { methods: [initialize, "notifications/*", tools/list] } }
"#;

/// The Kubernetes example's policy is one latchkey accepts.
#[test]
fn the_workload_identity_example_policy_parses() {
    let text = include_str!("../../../k8s/examples/workload-identity/policy.yaml");
    let file = PolicyFile::parse(text).unwrap();
    assert!(file.credentials.iter().any(|c| c.identity.is_some()));
}

#[test]
fn identities_and_mcp_proxies_parse_and_are_checked() {
    PolicyFile::parse(IDENTITY_AND_MCP).unwrap();
    for (from, to, why) in [
        (
            "jwks: { url: \"https://kubernetes.default.svc/openid/v1/jwks\" }",
            "jwks: { url: \"http://issuer.example/jwks\" }",
            "loopback",
        ),
        (
            "jwks: { url: \"https://kubernetes.default.svc/openid/v1/jwks\" }",
            "jwks: { url: \"https://a/\", file: /k }",
            "exactly one",
        ),
        ("max_ttl: 30m", "max_ttl: 30d", "1s to 7d"),
        (
            "max_spend_cap_usd: 5",
            "max_spend_cap_usd: -1",
            "non-negative",
        ),
        (
            "claims: { \"kubernetes.io/namespace\": agents }",
            "claims: { sub: x }",
            "own field",
        ),
        ("    protocol: mcp\n", "", "`mcp` needs `protocol: mcp`"),
        ("price_usd: 0.002", "price_usd: .nan", "non-negative"),
        (
            "requests_per_minute: 30, price_usd: 0.002",
            "requests_per_minute: 30, requests_per_day: 0",
            "at least 1",
        ),
        (
            "mcp: { tools: [\"delete_*\"] }",
            "mcp: { methods: [tools/list], tools: [x] }",
            "`tools/call` only",
        ),
        (
            "mcp: { tools: [\"delete_*\"] }",
            "mcp: {}",
            "name `methods`",
        ),
        (
            "  - name: docs\n    target: docs",
            "  - name: LatchKey\n    target: docs",
            "reserved",
        ),
    ] {
        let text = IDENTITY_AND_MCP.replace(from, to);
        assert_ne!(text, IDENTITY_AND_MCP, "{from}");
        let e = err(&text);
        assert!(e.contains(why), "{to}: {e}");
    }
    // A target credential has no identity.
    let text = IDENTITY_AND_MCP.replace(
        "secret: { env: DOCS } }",
        "secret: { env: DOCS }, identity: { issuer: i, audience: a, jwks: { file: f }, subject: s } }",
    );
    assert!(err(&text).contains("identity"), "{}", err(&text));
}
