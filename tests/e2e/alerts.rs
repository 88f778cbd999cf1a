//! Anomaly alerts: a burst on one key departs from its baseline, an alert is stored and
//! posted to the proxy's webhooks (JSON and Slack-style; a dead one ends in the
//! dead-letter log), and with quarantine on the key is refused on both replicas until a
//! person releases it.

use std::time::{Duration, Instant};

use crate::common::{Upstream, client, denial, issue_key, json};
use crate::scale_out::pair;

fn policy(upstream: &str, json_hook: &str, slack_hook: &str, dead_hook: &str) -> String {
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
    let (_, calm_key) = issue_key(stack, "agent", &[]);

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
    wait_for(
        "both replicas refuse the key",
        async || {
            let check = |env: &[(&str, &str)]| {
                let out = stack.cli(
                    &[
                        "check",
                        "--proxy",
                        "watched",
                        "--method",
                        "GET",
                        "--path",
                        "/v1/items",
                        "--key",
                        &key,
                        "--json",
                    ],
                    env,
                );
                // Exit 1: denied (§8).
                let verdict: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                verdict["decision"] == "quarantined"
            };
            check(&[]) && check(&[("LATCHKEY_ADMIN_ADDR", &b_admin)])
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
    wait_for(
        "both replicas let the key through",
        async || {
            let mut ok = 0;
            for _ in 0..4 {
                ok += u32::from(get(key.clone()).await.status() == 200);
            }
            ok == 4
        },
        Duration::from_secs(1),
    )
    .await;
    println!("released on both replicas within {:?}", released.elapsed());
    let again = stack.cli(&["key", "release", &key_id, "-o", "json"], &[]);
    assert_eq!(json(&again)["released"], false);
}
