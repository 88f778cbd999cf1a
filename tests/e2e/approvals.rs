//! Human approval: a rule with `effect: approve` holds a request for a person; an
//! approval lets exactly that request through, once; a denial keeps it refused.

use crate::common::{Stack, Upstream, client, denial, json};

const AGENT_KEY: &str = "lk_approvalAgentKEY00000001";

fn policy(upstream: &str, hook: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: stripe, url: "{upstream}" }}
credentials:
  - {{ name: stripe-key, type: target, auth: bearer, secret: {{ value: sk_approved }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - name: stripe
    target: stripe
    target_credential: stripe-key
    proxy_credentials: [agent]
    default_effect: allow
    guards: {{ webhooks: [{{ url: "{hook}/approvals/T0/SECRET", format: json }}] }}
rules:
  - {{ id: refunds-need-a-person, proxy: stripe, effect: approve, methods: [POST], path: "^/v1/refunds" }}
"#
    )
}

/// A refund of `amount`: its status and its JSON error, if refused.
async fn refund(stack: &Stack, amount: u32) -> (u16, serde_json::Value) {
    let response = client()
        .post(stack.url("/stripe/v1/refunds"))
        .bearer_auth(AGENT_KEY)
        .json(&serde_json::json!({ "amount": amount, "charge": "ch_secret_123" }))
        .send()
        .await
        .unwrap();
    if response.status() == 200 {
        return (200, serde_json::Value::Null);
    }
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (status, _, body) = denial(response).await;
    (status, body)
}

#[tokio::test]
async fn an_approved_request_passes_exactly_once() {
    let upstream = Upstream::start().await;
    let hook = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url(), &hook.url()), &[]);

    // Held: 403 approval_required with the approval's id; asking again is the same one.
    let (status, held) = refund(&stack, 5000).await;
    assert_eq!(status, 403);
    assert_eq!(held["error"]["type"], "approval_required");
    assert_eq!(held["error"]["rule_id"], "refunds-need-a-person");
    let id = held["error"]["approval_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{held}");
    assert_eq!(
        refund(&stack, 5000).await.1["error"]["approval_id"],
        id.as_str()
    );
    assert!(upstream.take().is_empty(), "nothing reached the vendor");

    // The proxy's webhook hears of it once, with what an approver sees and no body value.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while hook.count() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let posted = hook.take();
    assert_eq!(posted.len(), 1, "one post per approval asked");
    assert_eq!(posted[0].uri, "/approvals/T0/SECRET");
    let event: serde_json::Value = serde_json::from_slice(&posted[0].body).unwrap();
    assert_eq!(event["type"], "latchkey.approval");
    assert_eq!(event["approval"]["id"], id.as_str());
    assert_eq!(event["approval"]["path"], "/v1/refunds");
    assert_eq!(event["approval"]["method"], "POST");
    assert!(
        !posted[0].dump().contains("ch_secret_123") && !posted[0].dump().contains("sk_approved")
    );

    // What a person sees: method, path, key and the body's fields, never their values.
    let listed = json(&stack.cli(&["approvals", "list", "-o", "json"], &[]));
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["method"], "POST");
    assert_eq!(listed[0]["path"], "/v1/refunds");
    assert!(
        listed[0]["body"]
            .as_str()
            .unwrap()
            .ends_with("fields: amount, charge")
    );
    let all = listed[0].to_string();
    assert!(!all.contains("5000") && !all.contains("ch_secret") && !all.contains(AGENT_KEY));

    // A viewer may look, not decide.
    let viewer = json(&stack.cli(
        &[
            "token", "create", "--name", "auditor", "--role", "viewer", "-o", "json",
        ],
        &[],
    ));
    let viewer = viewer["token"].as_str().unwrap();
    let out = stack.cli(
        &["approvals", "approve", &id],
        &[("LATCHKEY_ADMIN_TOKEN", viewer)],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("viewer"));

    let decided = json(&stack.cli(&["approvals", "approve", &id, "-o", "json"], &[]));
    assert_eq!(decided["status"], "approved");
    assert_eq!(decided["decided_by"], "LATCHKEY_ADMIN_TOKEN");

    // Another amount is another request: held under a new approval.
    let (status, other) = refund(&stack, 9999).await;
    assert_eq!(status, 403);
    let other_id = other["error"]["approval_id"].as_str().unwrap().to_owned();
    assert_ne!(other_id, id);

    // The approved body on another account is not what the person approved.
    let swapped = client()
        .post(stack.url("/stripe/v1/refunds"))
        .bearer_auth(AGENT_KEY)
        .header("stripe-account", "acct_someone_else")
        .json(&serde_json::json!({ "amount": 5000, "charge": "ch_secret_123" }))
        .send()
        .await
        .unwrap();
    let (status, swapped) = {
        let (status, _, body) = denial(swapped).await;
        (status, body)
    };
    assert_eq!(status, 403);
    assert_ne!(swapped["error"]["approval_id"], id.as_str());

    // The approved one passes, once, with the real credential.
    assert_eq!(refund(&stack, 5000).await.0, 200);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk_approved"));
    let (status, again) = refund(&stack, 5000).await;
    assert_eq!(status, 403);
    assert_ne!(
        again["error"]["approval_id"],
        id.as_str(),
        "used: a new approval is asked"
    );

    // Denied: the same request stays refused, naming the denial.
    stack.cli(&["approvals", "deny", &other_id], &[]);
    let (status, refused) = refund(&stack, 9999).await;
    assert_eq!(status, 403);
    assert_eq!(refused["error"]["type"], "rule_denied");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("denied approval {other_id}"))
    );
    let out = stack.cli(&["approvals", "approve", &other_id], &[]);
    assert!(!out.status.success(), "decided once");

    let statuses: Vec<String> =
        json(&stack.cli(&["approvals", "list", "--all", "-o", "json"], &[]))
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["status"].as_str().unwrap().to_owned())
            .collect();
    assert_eq!(statuses, ["pending", "pending", "denied", "used"]);
    // Audited like any refusal (the writer batches: give it a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let args = ["requests", "--decision", "approval_required", "-o", "json"];
        let held = json(&stack.cli(&args, &[])).as_array().unwrap().len();
        if held == 5 || std::time::Instant::now() > deadline {
            assert_eq!(held, 5);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
