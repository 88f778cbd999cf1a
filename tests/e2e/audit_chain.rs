//! The tamper-evident audit through the real stack, on SQLite and PostgreSQL: requests
//! through Envoy are chained as they are recorded; `latchkey audit verify` exits 0 on the
//! untouched log and 1, naming the record, when a row is edited, deleted or inserted in
//! the database directly; and `requests -o json` carries what an outside system needs to
//! recompute each record's hash itself.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sqlx::AnyPool;

use crate::common::{PgDatabase, Stack, Upstream, client, json};

const AGENT_KEY: &str = "lk_chainAgentKEY000000001";

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: shop, url: "{upstream}" }}
credentials:
  - {{ name: shop-key, type: target, auth: bearer, secret: {{ value: sk_chained }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - {{ name: shop, target: shop, target_credential: shop-key, proxy_credentials: [agent], default_effect: deny }}
rules:
  - {{ id: items, credential: agent, effect: allow, methods: [GET], path: "^/v1/items", priority: 10 }}
"#
    )
}

#[tokio::test]
async fn audit_verify_names_what_was_changed_behind_latchkeys_back_sqlite() {
    let stack = Stack::start().await;
    let url = format!("sqlite://{}", stack.db_path().display());
    tampering(&stack, &url).await;
}

#[tokio::test]
async fn audit_verify_names_what_was_changed_behind_latchkeys_back_postgres() {
    let db = PgDatabase::create().await;
    let stack = Stack::start_configured(|c| c, &[("LATCHKEY_DATABASE_URL", db.url.as_str())]).await;
    tampering(&stack, &db.url).await;
}

/// `audit verify`: its exit code and what it printed.
fn verify(stack: &Stack) -> (i32, String) {
    let out = stack.cli(&["audit", "verify"], &[]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

async fn tampering(stack: &Stack, db_url: &str) {
    let upstream = Upstream::start().await;
    stack.apply(&policy(&upstream.url()), &[]);
    for path in [
        "/v1/items/1",
        "/v1/items/2",
        "/v1/items",
        "/v1/admin",
        "/v1/items/3",
    ] {
        client()
            .get(stack.url(&format!("/shop{path}")))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap();
    }
    let records = wait_for_completed(stack, 5).await;
    let (code, text) = verify(stack);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("intact"), "{text}");
    let report = json(&stack.cli(&["audit", "verify", "-o", "json"], &[]));
    assert_eq!(report["intact"], true, "{report}");
    assert!(report["records"].as_u64().unwrap() >= 5, "{report}");

    // An outside system recomputes each exported record's hash from its fields.
    for r in records.as_array().unwrap() {
        assert_eq!(recomputed(r), r["hash"].as_str().unwrap(), "{r}");
    }

    sqlx::any::install_default_drivers();
    let db = AnyPool::connect(db_url).await.unwrap();
    let victim = records[1]["request_id"].as_str().unwrap().to_owned();
    // Edited: the vendor's answer rewritten.
    let original = records[1]["upstream_status"].as_i64();
    let set = |status: Option<i64>| {
        sqlx::query("UPDATE requests SET upstream_status = $1 WHERE request_id = $2")
            .bind(status)
            .bind(victim.clone())
    };
    set(Some(500)).execute(&db).await.unwrap();
    let (code, text) = verify(stack);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&victim) && text.contains("edited"), "{text}");
    set(original).execute(&db).await.unwrap();
    assert_eq!(verify(stack).0, 0, "the edit undone");

    // Inserted: a record that never went through latchkey.
    sqlx::query(
        "INSERT INTO requests (request_id, time_ms, method, path, decision)
         VALUES ('forged-record', 1790000000000, 'GET', '/v1/items', 'allow')",
    )
    .execute(&db)
    .await
    .unwrap();
    let (code, text) = verify(stack);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("forged-record"), "{text}");
    sqlx::query("DELETE FROM requests WHERE request_id = 'forged-record'")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(verify(stack).0, 0, "the forged record removed");

    // Deleted: the record, as if that call never happened.
    let (chain, pos) = (
        records[1]["chain"].as_str().unwrap().to_owned(),
        records[1]["chain_position"].as_i64().unwrap(),
    );
    sqlx::query("DELETE FROM requests WHERE request_id = $1")
        .bind(victim.clone())
        .execute(&db)
        .await
        .unwrap();
    let (code, text) = verify(stack);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("chain {chain} position {pos}")) && text.contains("deleted"),
        "{text}"
    );
    db.close().await;
}

/// The newest `n` records, once each is completed.
async fn wait_for_completed(stack: &Stack, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = json(&stack.cli(&["requests", "-o", "json"], &[]));
        let list = records.as_array().unwrap();
        if list.len() >= n && list.iter().all(|r| r["completed"] == true) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "records not completed: {records}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A record's hash as docs/audit.md says to compute it from the export.
fn recomputed(r: &serde_json::Value) -> String {
    let time_ms = humantime::parse_rfc3339(r["time"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let scaled = |v: &serde_json::Value, by: f64| v.as_f64().map(|f| (f * by).round() as i64);
    let content = serde_json::json!([
        r["request_id"],
        time_ms,
        r["proxy"],
        r["target"],
        r["credential"],
        r["key_id"],
        r["run_label"],
        r["method"],
        r["path"],
        r["status"],
        r["upstream_status"],
        r["decision"],
        r["rule_id"],
        scaled(&r["latency_ms"], 1e3),
        scaled(&r["cost_usd"], 1e6),
        r["bytes_in"],
        r["bytes_out"],
        r["retries"],
        i64::from(r["completed"] == true),
        r["model"],
        r["input_tokens"],
        r["output_tokens"],
        r["cached_tokens"],
        r["facts"],
        r["supersedes"],
    ]);
    let text = format!(
        "{}\n{}\n{}\n{}",
        r["prev_hash"].as_str().unwrap(),
        r["chain"].as_str().unwrap(),
        r["chain_position"],
        content
    );
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
