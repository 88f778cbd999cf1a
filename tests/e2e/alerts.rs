//! Anomaly alerts: a burst on one key departs from its baseline, an alert is stored and
//! posted to the proxy's webhooks (JSON and Slack-style; a dead one ends in the
//! dead-letter log), and with quarantine on the key is refused on both replicas until a
//! person releases it.

use std::time::{Duration, Instant};

use crate::common::{Upstream, client, denial, issue_key, json};
use crate::scale_out::pair;

pub fn policy(upstream: &str, json_hook: &str, slack_hook: &str, dead_hook: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: sk_watched_secret }} }}
  - {{ name: agent, type: proxy }}
proxies:
  - name: watched
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: allow
    guards:
      alerts:
        window: 1m
        requests: {{ factor: 5, min: 10 }}
        quarantine: true
      webhooks:
        - {{ url: "{json_hook}/hooks/ops/SECRET_PATH", format: json }}
        - {{ url: "{slack_hook}/services/T0/B0/SLACK_SECRET", format: slack }}
        - {{ url: "{dead_hook}/never" }}
"#
    )
}

/// `latchkey check` of a GET on the watched proxy.
const CHECK: [&str; 7] = [
    "check",
    "--proxy",
    "watched",
    "--method",
    "GET",
    "--path",
    "/v1/items",
];

/// What a replica's admin API (`env` names it) decides for `key` on the watched proxy:
/// `allow` or the denial's type (`check` exits 1 when denied, §8).
fn decision_of(stack: &crate::common::Stack, key: &str, env: &[(&str, &str)]) -> String {
    let out = stack.cli(&[&CHECK[..], &["--key", key, "--json"]].concat(), env);
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    verdict["decision"].as_str().unwrap_or_default().to_owned()
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_burst_alerts_and_quarantines_the_key_on_both_replicas_until_released() {
    let upstream = Upstream::start().await;
    let (json_hook, slack_hook) = (Upstream::start().await, Upstream::start().await);
    // A port nothing listens on: every post to it fails.
    let dead = format!("http://127.0.0.1:{}", crate::common::free_port());
    let pair = pair().await;
    let stack = &pair.stack;
    stack.apply(
        &policy(&upstream.url(), &json_hook.url(), &slack_hook.url(), &dead),
        &[],
    );
    let (key_id, key) = issue_key(stack, "agent", &["--label", "run-7"]);
    let (calm_id, calm_key) = issue_key(stack, "agent", &[]);

    let get = |key: String| {
        let url = stack.url("/watched/v1/items");
        async move { client().get(url).bearer_auth(key).send().await.unwrap() }
    };
    // A calm key: a few requests, no alert.
    for _ in 0..3 {
        assert_eq!(get(calm_key.clone()).await.status(), 200);
    }
    // The loop: requests as fast as they go, until the key is refused. Envoy spreads
    // them over both replicas; each counts its own share against the floor of 10.
    let started = Instant::now();
    let mut forwarded = 0;
    let refused = loop {
        let response = get(key.clone()).await;
        if response.status() == 200 {
            forwarded += 1;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never quarantined"
            );
            continue;
        }
        break response;
    };
    let (status, kind, body) = denial(refused).await;
    assert_eq!((status, kind.as_str()), (403, "quarantined"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&key_id));
    assert!(
        (10..=400).contains(&forwarded),
        "{forwarded} forwarded before the quarantine"
    );
    println!(
        "{forwarded} requests forwarded in {:?} before the quarantine",
        started.elapsed()
    );
    let quarantined_at = Instant::now();

    // Both replicas refuse it within a second, through Envoy and by their own admin API.
    let b_admin = format!("127.0.0.1:{}", pair.b_admin);
    let decided = |env: &[(&str, &str)]| decision_of(stack, &key, env);
    wait_for(
        "both replicas refuse the key",
        async || {
            decided(&[]) == "quarantined"
                && decided(&[("LATCHKEY_ADMIN_ADDR", &b_admin)]) == "quarantined"
        },
        Duration::from_secs(1),
    )
    .await;
    println!(
        "both replicas refused the key {:?} after the first refusal",
        quarantined_at.elapsed()
    );
    for _ in 0..6 {
        assert_eq!(get(key.clone()).await.status(), 403);
    }
    assert_eq!(
        get(calm_key.clone()).await.status(),
        200,
        "other keys go on"
    );

    // The webhooks: JSON with the alert, Slack-style text naming the release command.
    wait_for(
        "both webhooks posted",
        async || json_hook.count() > 0 && slack_hook.count() > 0,
        Duration::from_secs(5),
    )
    .await;
    // The proxy as a whole departed too (no quarantine there): find the key's alert.
    wait_for(
        "the key's alert posted",
        async || json_hook.count() >= 1 && slack_hook.count() >= 1,
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posted = json_hook.take();
    let events: Vec<serde_json::Value> = posted
        .iter()
        .map(|p| serde_json::from_slice(&p.body).unwrap())
        .collect();
    assert!(posted.iter().all(|p| p.uri == "/hooks/ops/SECRET_PATH"));
    let event = events
        .iter()
        .find(|e| e["alert"]["key_id"] == key_id.as_str())
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(event["type"], "latchkey.alert");
    assert_eq!(event["alert"]["kind"], "requests");
    assert_eq!(event["alert"]["run_label"], "run-7");
    assert_eq!(event["alert"]["quarantined"], true);
    assert!(
        event["alert"]["observed"].as_f64().unwrap() >= 10.0,
        "{event}"
    );
    let texts: Vec<String> = slack_hook
        .take()
        .iter()
        .map(|p| serde_json::from_slice::<serde_json::Value>(&p.body).unwrap()["text"].to_string())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains(&format!("latchkey key release {key_id}"))),
        "{texts:?}"
    );
    for p in posted {
        assert!(!p.dump().contains("sk_watched_secret") && !p.dump().contains(&key));
    }

    // `latchkey alerts` lists it; the dead hook's post ends in the dead-letter log,
    // naming the hook by host only.
    let listed = || json(&stack.cli(&["alerts", "-o", "json"], &[]));
    wait_for(
        "the dead hook's post is dead-lettered",
        async || {
            listed()
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["key_id"] == key_id.as_str() && a["delivery"] == "dead_letter")
        },
        Duration::from_secs(15),
    )
    .await;
    let alerts = listed();
    let ours: Vec<_> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["key_id"] == key_id.as_str())
        .collect();
    assert!(
        !ours.is_empty() && ours.len() <= 2,
        "one per replica at most: {alerts}"
    );
    assert!(
        ours.iter()
            .any(|a| a["quarantined"] == true && a["kind"] == "requests")
    );
    let letters = json(&stack.cli(&["alerts", "--dead-letters", "-o", "json"], &[]));
    let letter = (letters.as_array().unwrap().iter())
        .find(|l| l["payload"]["alert"]["key_id"] == key_id.as_str())
        .unwrap_or_else(|| panic!("{letters}"));
    assert_eq!(letter["webhook"], format!("{dead}/…"));
    assert_eq!(letter["attempts"], 4);
    assert_eq!(letter["payload"]["alert"]["key_id"], key_id.as_str());
    let table = stack.cli(&["alerts"], &[]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("quarantine"));
    let keys = json(&stack.cli(&["key", "list", "-o", "json"], &[]));
    let listed_key = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed_key["status"], "quarantined");
    // Counted by the replica (or both) that raised it.
    let b_metrics = format!("http://127.0.0.1:{}/metrics", pair.b_http);
    let b_metrics = client()
        .get(b_metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = stack.metrics().await + &b_metrics;
    assert!(
        metrics.contains(r#"latchkey_alerts_total{proxy="watched",kind="requests"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("latchkey_keys_quarantined_total 1"),
        "{metrics}"
    );

    // Released by an admin: both replicas let it through again.
    let out = stack.cli(&["key", "release", &key_id], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let released = Instant::now();
    // Asked of each replica's admin API: requests would feed the key's count, still
    // over the floor within this window, and a replica could quarantine it anew.
    wait_for(
        "both replicas let the key through",
        async || {
            decided(&[]) == "allow" && decided(&[("LATCHKEY_ADMIN_ADDR", &b_admin)]) == "allow"
        },
        Duration::from_secs(1),
    )
    .await;
    println!("released on both replicas within {:?}", released.elapsed());
    // (The burst is still within the window: a replica that had seen less of it may yet
    // quarantine the key again. A key never quarantined is not released.)
    let calm = stack.cli(&["key", "release", &calm_id, "-o", "json"], &[]);
    assert_eq!(json(&calm)["released"], false);
}

/// A key answers for what it does, not for limits it shares: an agent that floods the
/// proxy's limit is quarantined, and the other key its flood starved is not.
#[tokio::test]
async fn a_shared_limit_spent_by_one_key_quarantines_only_that_key() {
    let upstream = Upstream::start().await;
    let stack = crate::common::Stack::start().await;
    let file = policy(
        &upstream.url(),
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
    )
    .replace(
        "        requests: { factor: 5, min: 10 }\n",
        "        requests: { factor: 5, min: 10 }\n        denials: { factor: 2, min: 3 }\n",
    )
    .replace(
        "    default_effect: allow\n",
        "    default_effect: allow\n    limits: { requests_per_minute: 5 }\n",
    );
    stack.apply(&file, &[]);
    let (flooder_id, flooder) = issue_key(&stack, "agent", &[]);
    let (starved_id, starved) = issue_key(&stack, "agent", &[]);
    let get = |key: &str| {
        client()
            .get(stack.url("/watched/v1/items"))
            .bearer_auth(key)
            .send()
    };
    let mut flooder_statuses = Vec::new();
    for _ in 0..12 {
        flooder_statuses.push(get(&flooder).await.unwrap().status().as_u16());
    }
    assert!(flooder_statuses.contains(&429), "{flooder_statuses:?}");
    // The other key meets the spent limit, again and again.
    for _ in 0..8 {
        assert_eq!(get(&starved).await.unwrap().status(), 429);
    }
    let verdict = |key: &str| decision_of(&stack, key, &[]);
    wait_for(
        "the flooding key is quarantined",
        async || verdict(&flooder) == "quarantined",
        Duration::from_secs(3),
    )
    .await;
    // Time for any alert on the starved key to land, had one fired.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(verdict(&starved), "quarantined");
    let alerts = json(&stack.cli(&["alerts", "-o", "json"], &[]));
    let of = |id: &str| {
        (alerts.as_array().unwrap().iter())
            .filter(|a| a["key_id"] == id)
            .map(|a| a["kind"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(&flooder_id), ["requests"], "{alerts}");
    assert!(of(&starved_id).is_empty(), "{alerts}");
    // `check` says what watches the key.
    let explained = stack.cli(&[&CHECK[..], &["--key", &starved]].concat(), &[]);
    let explained = String::from_utf8_lossy(&explained.stdout);
    assert!(
        explained
            .contains("anomaly alerts over 60 s windows: requests over 5× baseline (at least 10)")
            && explained.contains("the key is quarantined (403 quarantined)"),
        "{explained}"
    );
    // A viewer reads the policy with webhook URLs by scheme and host only.
    let viewer = json(&stack.cli(
        &[
            "token", "create", "--name", "v", "--role", "viewer", "--json",
        ],
        &[],
    ));
    let viewer = viewer["token"].as_str().unwrap();
    let exported = stack.cli(&["export"], &[("LATCHKEY_ADMIN_TOKEN", viewer)]);
    let exported = String::from_utf8_lossy(&exported.stdout);
    assert!(exported.contains("watched"), "{exported}");
    assert!(!exported.contains("/never"), "{exported}");
    let whole = stack.cli(&["export"], &[]);
    assert!(String::from_utf8_lossy(&whole.stdout).contains("http://127.0.0.1:9/never"));
}
