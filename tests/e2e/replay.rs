//! Policy replay: a draft's rules judged on the recorded requests — the live policy
//! changes nothing, a stricter and a looser draft change exactly what they should, and
//! what the audit cannot settle (body, headers) is counted as unjudged.

use crate::common::{Stack, Upstream, client, json};

const AGENT_KEY: &str = "lk_replayAgentKEY000000001";

fn policy(upstream: &str, extra_rules: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: shop, url: "{upstream}" }}
credentials:
  - {{ name: shop-key, type: target, auth: bearer, secret: {{ value: sk_replayed }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - {{ name: shop, target: shop, target_credential: shop-key, proxy_credentials: [agent], default_effect: deny }}
rules:
  - {{ id: items, credential: agent, effect: allow, methods: [GET], path: "^/v1/items", priority: 10 }}
  - {{ id: refunds, credential: agent, effect: allow, methods: [POST], path: "^/v1/refunds", priority: 10 }}
{extra_rules}"#
    )
}

fn replay(stack: &Stack, dir: &std::path::Path, draft: &str) -> serde_json::Value {
    let path = dir.join("draft.yaml");
    std::fs::write(&path, draft).unwrap();
    json(&stack.cli(&["replay", "-f", path.to_str().unwrap(), "-o", "json"], &[]))
}

/// The request log once it holds `n` records.
async fn recorded(stack: &Stack, n: usize) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let records = json(&stack.cli(&["requests", "-o", "json"], &[]));
        if records.as_array().unwrap().len() == n {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {n} records: {records}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_draft_is_judged_on_the_recorded_requests() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let live = policy(&upstream.url(), "");
    stack.apply(&live, &[]);
    // A recorded day: 3 reads and 2 refunds allowed, 2 admin calls denied.
    let calls = [
        ("GET", "/v1/items/1", 200),
        ("GET", "/v1/items/2", 200),
        ("GET", "/v1/items", 200),
    ]
    .into_iter()
    .chain([("POST", "/v1/refunds", 200), ("POST", "/v1/refunds", 200)])
    .chain([("GET", "/v1/admin", 403), ("GET", "/v1/admin/users", 403)]);
    for (method, path, status) in calls {
        let response = client()
            .request(method.parse().unwrap(), stack.url(&format!("/shop{path}")))
            .bearer_auth(AGENT_KEY)
            .json(&serde_json::json!({ "amount": 5 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
    }
    recorded(&stack, 7).await;
    let dir = tempfile::tempdir().unwrap();

    // The live policy: every record judged, none decided differently.
    let same = replay(&stack, dir.path(), &live);
    assert_eq!(
        (same["judged"].as_u64(), same["unjudged"].as_u64()),
        (Some(7), Some(0)),
        "{same}"
    );
    assert_eq!(same["changed"], serde_json::json!([]), "{same}");

    // Stricter: refunds denied. Exactly the two refunds change, naming the rule.
    let stricter = policy(
        &upstream.url(),
        "  - { id: no-refunds, proxy: shop, effect: deny, methods: [POST], path: \"^/v1/refunds\", priority: 1 }\n",
    );
    let r = replay(&stack, dir.path(), &stricter);
    let changed = r["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 2, "{r}");
    for c in changed {
        assert_eq!(
            (c["method"].as_str(), c["path"].as_str()),
            (Some("POST"), Some("/v1/refunds"))
        );
        assert_eq!(
            (c["was"].as_str(), c["now"].as_str()),
            (Some("allow"), Some("rule_denied"))
        );
        assert_eq!(c["rule_id"], "no-refunds");
        assert!(c["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    }

    // Looser: admin reads allowed. Exactly the two denied ones change.
    let looser = policy(
        &upstream.url(),
        "  - { id: admin-reads, credential: agent, effect: allow, methods: [GET], path: \"^/v1/admin\" }\n",
    );
    let r = replay(&stack, dir.path(), &looser);
    let changed = r["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 2, "{r}");
    assert!(changed.iter().all(|c| c["was"] == "rule_denied"
        && c["now"] == "allow"
        && c["path"].as_str().unwrap().starts_with("/v1/admin")
        && c["rule_id"] == "admin-reads"));

    // A rule on the body or a header: the records it would read are not kept.
    let on_body = policy(
        &upstream.url(),
        "  - { id: big-refunds, proxy: shop, effect: deny, methods: [POST], path: \"^/v1/refunds\", priority: 1, body: [{ pointer: /amount, gt: 100 }] }\n",
    );
    let r = replay(&stack, dir.path(), &on_body);
    assert_eq!(
        (r["judged"].as_u64(), r["unjudged"].as_u64()),
        (Some(5), Some(2)),
        "{r}"
    );
    assert_eq!(
        r["unjudged_reasons"]["a rule judges the body, which the audit does not keep"],
        2
    );
    let on_header = policy(
        &upstream.url(),
        "  - { id: by-header, proxy: shop, effect: deny, headers: { x-danger: { presence: must_exist } } }\n",
    );
    let r = replay(&stack, dir.path(), &on_header);
    assert_eq!(
        (r["judged"].as_u64(), r["unjudged"].as_u64()),
        (Some(0), Some(7)),
        "{r}"
    );

    // For people: grouped by proxy, rule and change, with examples.
    std::fs::write(dir.path().join("draft.yaml"), &stricter).unwrap();
    let draft = dir.path().join("draft.yaml");
    let table = stack.cli(&["replay", "-f", draft.to_str().unwrap()], &[]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("7 judged, 0 unjudged, 2 would be decided differently"),
        "{table}"
    );
    assert!(
        table.contains(
            "2 on proxy shop: allow -> rule_denied (rule no-refunds), e.g. POST /v1/refunds"
        ),
        "{table}"
    );
    // `apply --diff --replay`: the items before and after, then the decisions.
    let out = stack.cli(
        &["apply", "-f", draft.to_str().unwrap(), "--diff", "--replay"],
        &[],
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("rule no-refunds: created") && out.contains("+ id: no-refunds"),
        "{out}"
    );
    assert!(out.contains("1 item would change"), "{out}");
    assert!(out.contains("2 would be decided differently"), "{out}");
    assert!(!out.contains("sk_replayed"), "{out}");
    // Nothing was applied: the live policy still allows refunds.
    let export = String::from_utf8_lossy(&stack.cli(&["export"], &[]).stdout).into_owned();
    assert!(!export.contains("no-refunds"), "{export}");
}

#[tokio::test]
async fn rules_on_headers_and_the_query_are_judged_on_what_the_audit_kept() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let gates = |env: &str, mode: &str| {
        format!(
            "  - {{ id: prod-gate, proxy: shop, effect: deny, methods: [POST], headers: {{ x-env: \"{env}\" }}, priority: 1 }}\n  - {{ id: live-gate, proxy: shop, effect: deny, methods: [GET], query: {{ mode: \"{mode}\" }}, priority: 1 }}\n"
        )
    };
    let live = policy(&upstream.url(), &gates("^prod$", "^live$"));
    stack.apply(&live, &[]);
    let calls = [
        ("POST", "/v1/refunds", Some("prod"), 403),
        ("POST", "/v1/refunds", Some("staging"), 200),
        ("GET", "/v1/items?mode=live", None, 403),
        ("GET", "/v1/items?mode=dry&other=1", None, 200),
    ];
    for (method, path, env, status) in calls {
        let mut request = client()
            .request(method.parse().unwrap(), stack.url(&format!("/shop{path}")))
            .bearer_auth(AGENT_KEY)
            .json(&serde_json::json!({ "amount": 5 }));
        if let Some(env) = env {
            request = request.header("x-env", env);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            status,
            "{method} {path}"
        );
    }
    let records = recorded(&stack, 4).await;
    // Kept: the values the rules read, and nothing else (never the key).
    let text = records.to_string();
    assert!(
        !text.contains(AGENT_KEY) && !text.contains("other"),
        "{text}"
    );
    assert!(
        records.as_array().unwrap().iter().any(|r| r["facts"]
            .as_str()
            .is_some_and(|f| f.contains(r#""x-env":["staging"]"#))),
        "{records}"
    );
    let dir = tempfile::tempdir().unwrap();
    let same = replay(&stack, dir.path(), &live);
    assert_eq!(
        (same["judged"].as_u64(), same["changed_total"].as_u64()),
        (Some(4), Some(0)),
        "{same}"
    );
    // Stricter on both: the staging refund and the dry run change, judged on the kept
    // header and query values.
    let stricter = policy(&upstream.url(), &gates("^(prod|staging)$", "^(live|dry)$"));
    let r = replay(&stack, dir.path(), &stricter);
    let mut changed: Vec<(String, String)> = (r["changed"].as_array().unwrap().iter())
        .map(|c| {
            (
                c["rule_id"].as_str().unwrap().to_owned(),
                c["now"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        [
            ("live-gate".to_owned(), "rule_denied".to_owned()),
            ("prod-gate".to_owned(), "rule_denied".to_owned())
        ],
        "{r}"
    );
    // A rule on a header no rule read then: not kept, so not judged.
    let unkept = policy(
        &upstream.url(),
        "  - { id: by-header, proxy: shop, effect: deny, headers: { x-danger: { presence: must_exist } } }\n",
    );
    let r = replay(&stack, dir.path(), &unkept);
    assert_eq!(r["unjudged"].as_u64(), Some(4), "{r}");
    assert_eq!(
        r["unjudged_reasons"]["a rule reads a header or query parameter whose value the audit did not keep for the request"],
        4,
        "{r}"
    );
}

fn body_policy(upstream: &str, limit: u32, extra: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: shop, url: "{upstream}" }}
credentials:
  - {{ name: shop-key, type: target, auth: bearer, secret: {{ value: sk_replayed }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - {{ name: shop, target: shop, target_credential: shop-key, proxy_credentials: [agent], default_effect: deny, audit: {{ body_fields: true }} }}
rules:
  - {{ id: refunds, credential: agent, effect: allow, methods: [POST], path: "^/v1/refunds", priority: 10 }}
  - {{ id: big-refunds, proxy: shop, effect: deny, methods: [POST], path: "^/v1/refunds", priority: 1, body: [{{ pointer: /amount, gt: {limit} }}] }}
{extra}"#
    )
}

#[tokio::test]
async fn a_proxy_that_keeps_body_fields_gets_its_body_rules_judged() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let live = body_policy(&upstream.url(), 1000, "");
    stack.apply(&live, &[]);
    let bodies = [
        (serde_json::json!({ "amount": 50 }), 200),
        (serde_json::json!({ "amount": 500 }), 200),
        (
            serde_json::json!({ "amount": 500, "card_token": "tok_never_kept" }),
            200,
        ),
        (serde_json::json!({ "amount": 5000 }), 403),
    ];
    for (body, status) in &bodies {
        let response = client()
            .post(stack.url("/shop/v1/refunds"))
            .bearer_auth(AGENT_KEY)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), *status, "{body}");
    }
    let records = recorded(&stack, 4).await;
    let text = records.to_string();
    assert!(!text.contains("tok_never_kept"), "{text}");
    assert!(
        text.contains(r#"\"/amount\":{\"present\":true,\"value\":500}"#),
        "{text}"
    );
    // The export keeps the opt-in.
    let export = String::from_utf8_lossy(&stack.cli(&["export"], &[]).stdout).into_owned();
    assert!(export.contains("body_fields: true"), "{export}");

    let dir = tempfile::tempdir().unwrap();
    let same = replay(&stack, dir.path(), &live);
    assert_eq!(
        (same["judged"].as_u64(), same["changed_total"].as_u64()),
        (Some(4), Some(0)),
        "{same}"
    );
    // A lower limit: exactly the two refunds of 500 change.
    let r = replay(&stack, dir.path(), &body_policy(&upstream.url(), 100, ""));
    let changed = r["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 2, "{r}");
    assert!(
        changed.iter().all(|c| c["was"] == "allow"
            && c["now"] == "rule_denied"
            && c["rule_id"] == "big-refunds"),
        "{r}"
    );
    // A rule on a field that was not kept: not judged.
    let currency = "  - { id: currency-required, proxy: shop, effect: deny, methods: [POST], priority: 2, body: [{ pointer: /currency, presence: must_not_exist }] }\n";
    let r = replay(
        &stack,
        dir.path(),
        &body_policy(&upstream.url(), 1000, currency),
    );
    assert_eq!(r["unjudged"].as_u64(), Some(4), "{r}");
}
