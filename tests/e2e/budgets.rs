//! Run keys, rate limits and spend caps through real Envoy.

use crate::common::{Stack, Upstream, client, denial};

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

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
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
