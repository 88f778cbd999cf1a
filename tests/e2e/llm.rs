//! LLM spend through real Envoy, with the official `openai` and `anthropic` Python SDKs
//! as the agent and an in-test vendor that streams its answers (a pause between events,
//! usage in the last ones, as the real APIs do).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Response, Uri};

use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::common::otlp::{Collector, attr, text};
use crate::common::{self, Stack};

const AGENT_KEY: &str = "lk_llmAGENTkey00000000000001";
/// Between two streamed events.
const PAUSE: Duration = Duration::from_millis(400);

/// What the vendor saw of each call: its path, `authorization`/`x-api-key`, and body.
type Calls = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

struct Vendor {
    url: String,
    calls: Calls,
}

/// OpenAI's usage for every answer: 1,000 prompt tokens (200 cached), 500 completion.
const OPENAI_USAGE: &str = r#"{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":200}}"#;

fn events(events: Vec<String>) -> Response<Body> {
    let stream = futures_util::stream::unfold((events, 0), |(events, i)| async move {
        let event = events.get(i)?.clone();
        if i > 0 {
            tokio::time::sleep(PAUSE).await;
        }
        Some((Ok::<_, std::io::Error>(event), (events, i + 1)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn json(body: String) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn answer(calls: Calls, uri: Uri, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let credential = ["authorization", "x-api-key"]
        .iter()
        .filter_map(|h| headers.get(*h))
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(",");
    calls
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), credential, request.clone()));
    let streamed = request["stream"] == true;
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    match uri.path() {
        "/v1/chat/completions" if streamed => {
            let chunk = |content: &str| {
                format!(
                    "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
                )
            };
            let mut out: Vec<String> = ["Hel", "lo ", "there"].map(chunk).into();
            // As OpenAI: usage only when asked for, in a last chunk without choices.
            if request["stream_options"]["include_usage"] == true && model != "no-usage" {
                out.push(format!(
                    "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"choices\":[],\"usage\":{OPENAI_USAGE}}}\n\n"
                ));
            }
            out.push("data: [DONE]\n\n".to_owned());
            events(out)
        }
        "/v1/chat/completions" => json(format!(
            r#"{{"id":"c1","object":"chat.completion","created":1,"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello there"}},"finish_reason":"stop"}}],"usage":{OPENAI_USAGE}}}"#
        )),
        "/v1/messages" if streamed => {
            let start = format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"m1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"{model}\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":1000,\"output_tokens\":1}}}}}}\n\n\
                 event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n"
            );
            let delta = |text: &str| {
                format!(
                    "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n"
                )
            };
            let end = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
                       event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":500}}\n\n\
                       event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
                .to_owned();
            events(vec![start + &delta("Hel"), delta("lo"), end])
        }
        "/v1/messages" => json(format!(
            r#"{{"id":"m1","type":"message","role":"assistant","model":"{model}","content":[{{"type":"text","text":"Hello"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":1000,"output_tokens":500}}}}"#
        )),
        _ => json("{}".to_owned()),
    }
}

impl Vendor {
    async fn start() -> Self {
        let calls: Calls = Arc::default();
        let state = calls.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            answer(state.clone(), uri, headers, body)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, calls }
    }

    fn take(&self) -> Vec<(String, String, serde_json::Value)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

fn policy(vendor: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{vendor}" }}
credentials:
  - {{ name: openai-key, type: target, auth: bearer, secret: {{ value: sk-openai-REAL }} }}
  - {{ name: anthropic-key, type: target, auth: header, header: x-api-key, secret: {{ value: sk-ant-REAL }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: openai
    target: vendor
    target_credential: openai-key
    proxy_credentials: [agent]
    default_effect: allow
    cost:
      tokens: openai
      usd_per_million:
        gpt-test: {{ input: 10, output: 30, cached_input: 5 }}
        "*": {{ input: 100, output: 100 }}
      max_usd_per_request: 0.05
  - name: anthropic
    target: vendor
    target_credential: anthropic-key
    proxy_credentials: [agent]
    default_effect: allow
    cost:
      tokens: anthropic
      usd_per_million:
        claude-test: {{ input: 3, output: 15 }}
      max_usd_per_request: 0.05
"#
    )
}

/// What the SDK received, from the Python client. It runs on a thread of its own: the
/// in-test vendor shares this test's runtime.
async fn sdk(stack: &Stack, key: &str, scenario: &str) -> serde_json::Value {
    let python = common::python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/llm/client.py");
    let args = [stack.url(""), key.to_owned(), scenario.to_owned()];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .expect("the venv's python")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{scenario}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// 800 × $10 + 200 × $5 + 500 × $30 per million.
const OPENAI_PRICE: f64 = 0.024;
/// 1,000 × $3 + 500 × $15 per million.
const ANTHROPIC_PRICE: f64 = 0.0105;

#[tokio::test]
async fn streamed_completions_are_charged_from_their_usage_up_to_the_cap() {
    let vendor = Vendor::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&vendor.url), &[("AGENT_KEY", AGENT_KEY)]);
    // Two calls of 0.024 fit; a third would reserve 0.05 on top of 0.048: over 0.09.
    let (id, key) = capped_key(&stack, "0.09");

    let first = sdk(&stack, &key, "openai-stream").await;
    let chunks = first["chunks"]
        .as_array()
        .unwrap_or_else(|| panic!("{first}"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    assert_eq!(text, "Hello there", "every chunk, intact: {first}");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 500);
    // Not held back: each chunk arrived as the vendor sent it, a pause apart. (Timed
    // between chunks, not from the script's start: the SDK's own start-up on a loaded
    // machine is no part of it.) Held until the next chunk came, the first two would
    // arrive together; held to the end, all would.
    let t = |i: usize| chunks[i]["t"].as_f64().unwrap();
    assert!(t(1) - t(0) > PAUSE.as_secs_f64() * 0.25, "{first}");
    assert!(t(2) - t(0) > PAUSE.as_secs_f64() * 1.5, "{first}");
    // The agent did not ask for usage; latchkey asked the vendor for it.
    let calls = vendor.take();
    assert_eq!(calls[0].2["stream_options"]["include_usage"], true);
    assert_eq!(calls[0].1, "Bearer sk-openai-REAL");
    assert!((common::settled_spend(&stack, &id, OPENAI_PRICE).await - OPENAI_PRICE).abs() < 1e-9);

    sdk(&stack, &key, "openai-stream").await;
    assert!(
        (common::settled_spend(&stack, &id, 2.0 * OPENAI_PRICE).await - 2.0 * OPENAI_PRICE).abs()
            < 1e-9
    );
    let refused = sdk(&stack, &key, "openai-stream").await;
    assert_eq!(refused["error_status"], 429, "{refused}");
    assert_eq!(refused["error"]["type"], "spend_cap_exceeded", "{refused}");
    vendor.take();

    // The request log and the metrics say what was used.
    let log = common::json(&stack.cli(&["requests", "--key", &id, "--json"], &[]));
    let charged: Vec<&serde_json::Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["decision"] == "allow")
        .collect();
    assert_eq!(charged.len(), 2, "{log}");
    for r in charged {
        assert_eq!(r["model"], "gpt-test", "{r}");
        assert_eq!(
            (
                r["input_tokens"].as_u64(),
                r["cached_tokens"].as_u64(),
                r["output_tokens"].as_u64()
            ),
            (Some(800), Some(200), Some(500)),
            "{r}"
        );
        assert!(
            (r["cost_usd"].as_f64().unwrap() - OPENAI_PRICE).abs() < 1e-9,
            "{r}"
        );
    }
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains(
            r#"latchkey_llm_tokens_total{proxy="openai",model="gpt-test",kind="output"} 1000"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("sk-openai-REAL"));
    common::assert_dashboard_families(&metrics, &common::LLM_FAMILIES[..2]);
    // Telemetry by model.
    let telemetry = common::json(&stack.cli(&["telemetry", "--key", &id, "--json"], &[]));
    let model = &telemetry[0]["models"]["gpt-test"];
    assert_eq!(model["requests"], 2, "{telemetry}");
    assert_eq!(model["output_tokens"], 1000, "{telemetry}");
    assert!((model["cost_usd"].as_f64().unwrap() - 2.0 * OPENAI_PRICE).abs() < 1e-9);
}

#[tokio::test]
async fn answers_without_usage_and_callers_that_leave_are_charged_the_reservation() {
    let vendor = Vendor::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&vendor.url), &[("AGENT_KEY", AGENT_KEY)]);
    let (id, key) = capped_key(&stack, "1");
    // The vendor streams no usage: the reservation (0.05) is charged.
    let out = sdk(&stack, &key, "openai-no-usage").await;
    assert_eq!(out["chunks"].as_array().unwrap().len(), 3, "{out}");
    assert!((common::settled_spend(&stack, &id, 0.05).await - 0.05).abs() < 1e-9);
    // The agent hangs up after the first chunk.
    let out = sdk(&stack, &key, "openai-hangup").await;
    assert_eq!(out["first"], "Hel", "{out}");
    assert!((common::settled_spend(&stack, &id, 0.10).await - 0.10).abs() < 1e-9);
    common::assert_dashboard_families(&stack.metrics().await, &common::LLM_FAMILIES[2..]);
    // A JSON answer is priced from its usage.
    let out = sdk(&stack, &key, "openai-json").await;
    assert_eq!(out["usage"]["prompt_tokens"], 1000, "{out}");
    assert!(
        (common::settled_spend(&stack, &id, 0.10 + OPENAI_PRICE).await - (0.10 + OPENAI_PRICE))
            .abs()
            < 1e-9
    );
}

#[tokio::test]
async fn anthropic_messages_are_charged_streamed_or_not() {
    let vendor = Vendor::start().await;
    let (collector, endpoint) = Collector::start().await;
    let stack =
        Stack::start_configured(|c| c, &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())]).await;
    stack.apply(&policy(&vendor.url), &[("AGENT_KEY", AGENT_KEY)]);
    let (id, key) = capped_key(&stack, "1");
    let streamed = sdk(&stack, &key, "anthropic-stream").await;
    let said: String = streamed["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    assert_eq!(said, "Hello", "{streamed}");
    assert_eq!(streamed["usage"]["output_tokens"], 500);
    assert!(
        (common::settled_spend(&stack, &id, ANTHROPIC_PRICE).await - ANTHROPIC_PRICE).abs() < 1e-9
    );
    let out = sdk(&stack, &key, "anthropic-json").await;
    assert_eq!(out["content"], "Hello", "{out}");
    assert!(
        (common::settled_spend(&stack, &id, 2.0 * ANTHROPIC_PRICE).await - 2.0 * ANTHROPIC_PRICE)
            .abs()
            < 1e-9
    );
    // The vendor got the real key in its own header, never the proxy key.
    for (path, credential, _) in vendor.take() {
        assert_eq!(
            (path.as_str(), credential.as_str()),
            ("/v1/messages", "sk-ant-REAL")
        );
    }
    // Each call is a GenAI client span inside its decision's trace.
    let deadline = Instant::now() + Duration::from_secs(10);
    let calls = loop {
        let spans = collector.spans();
        let calls: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "chat claude-test")
            .cloned()
            .collect();
        if calls.len() == 2 || Instant::now() > deadline {
            break (spans, calls);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (spans, calls) = calls;
    assert_eq!(calls.len(), 2, "{}", collector.dump());
    for call in &calls {
        assert_eq!(text(&call.attributes, "gen_ai.provider.name"), "anthropic");
        assert_eq!(
            text(&call.attributes, "gen_ai.request.model"),
            "claude-test"
        );
        assert_eq!(
            attr(&call.attributes, "gen_ai.usage.input_tokens"),
            Some(&Value::IntValue(1_000))
        );
        assert_eq!(
            attr(&call.attributes, "gen_ai.usage.output_tokens"),
            Some(&Value::IntValue(500))
        );
        let decision = spans
            .iter()
            .find(|s| s.span_id == call.parent_span_id)
            .expect("the decision's span");
        assert_eq!(decision.trace_id, call.trace_id);
        assert_eq!(text(&decision.attributes, "latchkey.decision"), "allow");
    }
}

/// One non-streamed chat completion through Envoy: the status and the denial type.
async fn chat(stack: &Stack, key: &str) -> (u16, String, Option<String>) {
    let response = common::client()
        .post(stack.url("/openai/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-test","messages":[]}"#)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let kind = body["error"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let message = body["error"]["message"].as_str().map(str::to_owned);
    (status, kind, message.or(retry_after))
}

#[tokio::test]
async fn token_budgets_and_period_caps_refuse_before_forwarding() {
    budgets_and_caps(&[], "agent").await;
}

#[tokio::test]
async fn token_budgets_and_period_caps_hold_in_redis_too() {
    // Redis outlives a run: a credential of this run's own.
    budgets_and_caps(
        &[("LATCHKEY_REDIS_URL", "redis://127.0.0.1:6379")],
        &common::unique("agent"),
    )
    .await;
}

async fn budgets_and_caps(serve_env: &[(&str, &str)], agent: &str) {
    let vendor = Vendor::start().await;
    let stack = Stack::start_configured(|c| c, serve_env).await;
    let file = policy(&vendor.url)
        .replace(
            "  - { name: agent, type: proxy, keys: [{ env: AGENT_KEY }] }",
            "  - { name: agent, type: proxy, keys: [{ env: AGENT_KEY }], limits: { spend_usd_per_month: 0.15 } }",
        )
        .replace("agent", agent);
    stack.apply(&file, &[("AGENT_KEY", AGENT_KEY)]);

    // 1,500 tokens a call: the second call starts under 2,000, the third does not.
    let a = common::issue_key(&stack, agent, &["--tokens-per-minute", "2000"]).1;
    assert_eq!(chat(&stack, &a).await.0, 200);
    assert_eq!(chat(&stack, &a).await.0, 200);
    let (status, kind, message) = chat(&stack, &a).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
    assert!(message.unwrap().contains("per-minute token budget"));

    // A daily cap: 0.05 reserved of 0.06 passes once; 0.024 spent + 0.05 does not.
    let (_, c) = common::issue_key(
        &stack,
        agent,
        &["--spend-cap-usd", "0.06", "--cap-period", "day"],
    );
    assert_eq!(chat(&stack, &c).await.0, 200);
    // 0.05 of 0.06 reserved: past 80 %, which the alerts watch. Nothing before was.
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains(r#"latchkey_spend_near_cap_total{proxy="openai"} 1"#),
        "{metrics}"
    );
    let (status, kind, message) = chat(&stack, &c).await;
    assert_eq!((status, kind.as_str()), (429, "spend_cap_exceeded"));
    assert!(message.unwrap().contains("this key's daily spend cap"));

    // A new key of the same credential (a rotation) starts with the month's spend so far:
    // 3 × 0.024 = 0.072; two more calls fit under 0.15 with their 0.05 reservation.
    let b = common::issue_key(&stack, agent, &[]).1;
    assert_eq!(chat(&stack, &b).await.0, 200);
    assert_eq!(chat(&stack, &b).await.0, 200);
    let (status, kind, message) = chat(&stack, &b).await;
    assert_eq!((status, kind.as_str()), (429, "spend_cap_exceeded"));
    assert!(
        message
            .unwrap()
            .contains("the credential's monthly spend cap")
    );
    assert_eq!(
        vendor.take().len(),
        5,
        "refused calls never reached the vendor"
    );
    let keys = common::json(&stack.cli(&["key", "list", "--json"], &[]));
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k["cap_period"] == "day" && k["spend_cap_usd"] == 0.06),
        "{keys}"
    );
}

/// A key of `agent` capped at `cap` USD: its id and the key.
fn capped_key(stack: &Stack, cap: &str) -> (String, String) {
    common::issue_key(stack, "agent", &["--spend-cap-usd", cap])
}
