//! The vendor SDKs agents use, each as the README shows it, through Envoy: the Azure
//! OpenAI client (`api-key`), Google's Gemini client (`x-goog-api-key`) and boto3 without
//! AWS credentials (latchkey signs). The in-test vendor records what each received.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};

use crate::common::{self, Stack};

const AGENT_KEY: &str = "lk_sdkAgentKEY000000000000001";

type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// Answers each vendor's call in its shape, and records it.
async fn vendor() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, _: Bytes| {
        let record = record.clone();
        async move {
            let path = uri.path().to_owned();
            record.lock().unwrap().push((uri.to_string(), headers));
            let body = if path.ends_with("/chat/completions") {
                r#"{"id":"c1","object":"chat.completion","created":1,"model":"gpt-test","choices":[{"index":0,"message":{"role":"assistant","content":"hello from azure"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#
            } else if path.ends_with(":generateContent") {
                r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"hello from gemini"}]},"finishReason":"STOP"}]}"#
            } else {
                r#"{"TableNames":["agents"]}"#
            };
            ([("content-type", "application/json")], body)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn policy(vendor: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{vendor}" }}
credentials:
  - {{ name: azure-key, type: target, auth: header, header: api-key, secret: {{ value: azure-REAL-key }} }}
  - {{ name: gemini-key, type: target, auth: header, header: x-goog-api-key, secret: {{ value: gemini-REAL-key }} }}
  - name: aws
    type: target
    auth: aws_sigv4
    access_key_id: AKIDLATCHKEY
    region: us-east-1
    service: dynamodb
    secret: {{ value: aws-REAL-secret }}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - {{ name: azure, target: vendor, target_credential: azure-key, proxy_credentials: [agent], default_effect: allow }}
  - {{ name: gemini, target: vendor, target_credential: gemini-key, proxy_credentials: [agent], default_effect: allow }}
  - {{ name: aws, target: vendor, target_credential: aws, proxy_credentials: [agent], default_effect: allow }}
"#
    )
}

#[tokio::test]
async fn azure_openai_gemini_and_boto3_work_as_the_readme_shows() {
    let (url, seen) = vendor().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&url), &[]);
    let python = common::python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/sdks/agent.py");
    let base = stack.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([base.as_str(), AGENT_KEY])
            .output()
            .expect("the venv's python")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["azure"], "hello from azure");
    assert_eq!(got["gemini"], "hello from gemini");
    assert_eq!(got["aws"], serde_json::json!(["agents"]));

    let seen = seen.lock().unwrap().clone();
    let [(azure_uri, azure), (gemini_uri, gemini), (aws_uri, aws)] = &seen[..] else {
        panic!("three calls: {seen:?}")
    };
    assert!(azure_uri.starts_with("/openai/deployments/gpt-test/chat/completions?api-version="));
    assert_eq!(azure["api-key"], "azure-REAL-key");
    assert!(
        gemini_uri.contains("/models/gemini-test:generateContent"),
        "{gemini_uri}"
    );
    assert_eq!(gemini["x-goog-api-key"], "gemini-REAL-key");
    assert_eq!(aws_uri, "/");
    let signature = aws["authorization"].to_str().unwrap();
    assert!(
        signature.starts_with("AWS4-HMAC-SHA256 Credential=AKIDLATCHKEY/"),
        "{signature}"
    );
    for headers in [azure, gemini, aws] {
        let all = format!("{headers:?}");
        assert!(
            !all.contains(AGENT_KEY),
            "the proxy key reached the vendor: {all}"
        );
    }
}
