//! MCP servers as targets, through the real Envoy: the official `mcp` SDK's client as the
//! agent, against a server built with the same SDK. The server sees the real credential
//! on every request of the session; a tool a rule denies is refused with a JSON-RPC error
//! the SDK raises; per-tool limits and prices apply; a long tool result streams.

use std::time::{Duration, Instant};

use crate::common::{self, Stack, client, free_port};

const AGENT_KEY: &str = "lk_mcpAgentKEY00000000000001";
const SECRET: &str = "mcp_REAL_token_for_docs_9";

fn policy(server: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: docs-server, url: "{server}" }}
credentials:
  - {{ name: docs-token, type: target, auth: bearer, secret: {{ value: {SECRET} }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - name: docs
    target: docs-server
    target_credential: docs-token
    proxy_credentials: [agent]
    protocol: mcp
    default_effect: allow
    mcp:
      tools:
        - {{ name: "search_*", requests_per_minute: 3, price_usd: 0.01 }}
rules:
  - {{ proxy: docs, id: no-deletes, effect: deny, mcp: {{ tools: ["delete_*"] }}, notes: agents never delete }}
"#
    )
}

/// The in-test MCP server, and the log of what reached it.
struct Server {
    child: std::process::Child,
    log: std::path::PathBuf,
    url: String,
}

impl Server {
    async fn start(dir: &std::path::Path) -> Self {
        let port = free_port();
        let log = dir.join("mcp-server.log");
        let child = std::process::Command::new(common::python())
            .args([
                &script("server.py"),
                &port.to_string(),
                log.to_str().unwrap(),
            ])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the MCP server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            child,
            log,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn seen(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn script(name: &str) -> String {
    format!("{}/tests/e2e/mcp/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn the_mcp_sdk_works_through_latchkey_and_its_rules_hold() {
    let stack = Stack::start().await;
    let server = Server::start(stack.dir.path()).await;
    stack.apply(&policy(&server.url), &[]);
    let (run_id, run_key) = common::issue_key(&stack, "agent", &[]);

    let out = tokio::task::spawn_blocking({
        let url = stack.url("/docs/mcp");
        let key = run_key.clone();
        move || {
            std::process::Command::new(common::python())
                .args([&script("agent.py"), &url, &key])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(report["server"], "docs");
    assert_eq!(
        report["tools"],
        serde_json::json!(["big_report", "delete_all", "search_docs"])
    );
    assert_eq!(report["search"], "results for envoy");
    // The denied tool: a JSON-RPC error the SDK raised, naming the rule.
    let delete = &report["delete"];
    assert_eq!(delete["code"], -31403, "{report}");
    assert!(
        delete["message"].as_str().unwrap().contains("no-deletes"),
        "{report}"
    );
    assert_eq!(delete["data"]["type"], "rule_denied");
    // The long result streamed: its progress arrived as it was made, not all at the end.
    assert_eq!(report["report_bytes"], 8000 * 26);
    let at: Vec<f64> = serde_json::from_value(report["progress_at"].clone()).unwrap();
    assert_eq!(at.len(), 5, "{report}");
    assert!(at[4] - at[0] >= 0.6, "progress was held back: {at:?}");
    // Three searches a minute per caller: the fourth is refused, the session goes on.
    let searches = report["more_searches"].as_array().unwrap();
    assert_eq!(
        searches[..2],
        [serde_json::json!("ok"), serde_json::json!("ok")]
    );
    assert_eq!(searches[2]["code"], -31429, "{report}");
    assert_eq!(searches[2]["data"]["type"], "rate_limited");
    assert_eq!(report["after"], false);

    // The server saw the real credential on every request of the session (initialize,
    // notifications, lists, calls, the GET stream, the DELETE at the end) and never the
    // proxy key; it never saw the denied calls.
    let seen = server.seen();
    let rpc: Vec<&str> = seen.iter().filter_map(|s| s["rpc"].as_str()).collect();
    for method in [
        "initialize",
        "notifications/initialized",
        "tools/list",
        "tools/call",
    ] {
        assert!(
            rpc.contains(&method),
            "{method} never reached the server: {seen:?}"
        );
    }
    let methods: Vec<&str> = seen.iter().map(|s| s["method"].as_str().unwrap()).collect();
    assert!(methods.contains(&"GET"), "{methods:?}");
    assert!(methods.contains(&"DELETE"), "{methods:?}");
    for s in &seen {
        assert_eq!(s["authorization"], format!("Bearer {SECRET}"), "{s}");
    }
    assert_eq!(
        rpc.iter().filter(|m| **m == "tools/call").count(),
        1 + 1 + 2 + 1
    );

    // The audit shows method and tool; the priced searches were charged.
    let requests = common::json(&stack.cli(&["requests", "--limit", "100", "-o", "json"], &[]));
    let text = requests.to_string();
    assert!(!text.contains(&run_key) && !text.contains(SECRET));
    let rows = requests.as_array().unwrap();
    let tool_of = |r: &serde_json::Value| {
        let facts: serde_json::Value = match &r["facts"] {
            serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
            other => other.clone(),
        };
        facts["mcp"]["tool"].as_str().map(str::to_owned)
    };
    let denied: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| tool_of(r).as_deref() == Some("delete_all"))
        .collect();
    assert_eq!(denied.len(), 1, "{text}");
    assert_eq!(denied[0]["decision"], "rule_denied");
    let searches = rows
        .iter()
        .filter(|r| tool_of(r).as_deref() == Some("search_docs"))
        .count();
    assert_eq!(searches, 4, "{text}");
    // Three searches went through at $0.01 each; the refused one cost nothing.
    let spent = common::settled_spend(&stack, &run_id, 0.03).await;
    assert!((spent - 0.03).abs() < 1e-9, "{spent}");

    // Replay judges a draft's tool rules on the method and tool the audit kept.
    let draft = stack.dir.path().join("draft.yaml");
    let stricter = policy(&server.url).replace(
        "rules:\n",
        "rules:\n  - { proxy: docs, id: no-search, effect: deny, mcp: { tools: [\"search_*\"] } }\n",
    );
    std::fs::write(&draft, stricter).unwrap();
    let replayed = common::json(&stack.cli(
        &["replay", "-f", draft.to_str().unwrap(), "-o", "json"],
        &[],
    ));
    let changed = replayed["changed"].as_array().unwrap();
    let now_denied = changed
        .iter()
        .filter(|c| c["now"] == "rule_denied" && c["rule_id"] == "no-search")
        .count();
    // Four searches passed the rules (the fourth met the rate limit after them).
    assert_eq!(now_denied, 4, "{replayed}");
    assert!(
        changed.iter().all(|c| c["rule_id"] == "no-search"),
        "{replayed}"
    );
}

#[tokio::test]
async fn batches_and_mismatched_headers_are_refused_as_json_rpc_errors() {
    let stack = Stack::start().await;
    let server = Server::start(stack.dir.path()).await;
    stack.apply(&policy(&server.url), &[]);
    let post = |body: serde_json::Value, extra: &[(&str, &str)]| {
        let mut r = client()
            .post(stack.url("/docs/mcp"))
            .bearer_auth(AGENT_KEY)
            .header("accept", "application/json, text/event-stream")
            .json(&body);
        for (k, v) in extra {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 41, "method": "tools/call",
        "params": {"name": "delete_all", "arguments": {}}});
    for (body, extra, status, code) in [
        // A batch hides the call from one-message rules.
        (serde_json::json!([call.clone()]), vec![], 400, -31400),
        // The header says one tool, the body calls another.
        (
            serde_json::json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
                "params": {"name": "search_docs", "arguments": {"query": "x"}}}),
            vec![("mcp-name", "delete_all")],
            400,
            -31400,
        ),
        // `paramſ`: `params` again to Go's and .NET's JSON, where the later one wins.
        (
            serde_json::json!({"jsonrpc": "2.0", "id": 44, "method": "tools/call",
                "params": {"name": "search_docs"}, "param\u{17f}": {"name": "delete_all"}}),
            vec![],
            400,
            -31400,
        ),
        // The tool name in another case, or not a string.
        (
            serde_json::json!({"jsonrpc": "2.0", "id": 43, "method": "tools/call",
                "params": {"Name": "delete_all"}}),
            vec![],
            400,
            -31400,
        ),
        (call.clone(), vec![], 403, -31403),
    ] {
        let r = post(body.clone(), &extra).await.unwrap();
        assert_eq!(r.status(), status, "{body}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["jsonrpc"], "2.0");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        // A body that could not be read answers no id (`null`): MCP clients raise a
        // non-2xx JSON-RPC error as the answer to the request they sent.
        let readable = body.is_object() && body.get("param\u{17f}").is_none();
        let id = if readable {
            body["id"].clone()
        } else {
            serde_json::Value::Null
        };
        assert_eq!(
            answer["id"], id,
            "the refusal answers the request: {answer}"
        );
    }
    assert!(
        server.seen().iter().all(|s| s["rpc"] != "tools/call"),
        "no refused call reached the server"
    );
}
