//! Response safety: an upstream that echoes the injected secret has it replaced before
//! the agent sees it (headers and body), and a proxy's `redact` fields are blanked in
//! JSON responses. Proxies that ask for neither never stream responses through latchkey.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::common::{Mode, Stack, client, denial};

const AGENT_KEY: &str = "lk_echoAgentKEY00000000000001";
const SECRET: &str = "sk_live_ECHOED_secret_0123456789";
const TOKEN_SECRET: &str = "oauth-client-SECRET-0123";

/// What the echoing upstream received, and how big a body it answers with.
#[derive(Default)]
struct Echo {
    accept_encoding: Mutex<Vec<Option<String>>>,
    big: Mutex<bool>,
    /// Answer `content-encoding: gzip` whatever was asked.
    compressed: Mutex<bool>,
    /// Answer JSON behind a byte-order mark, which a JSON parser refuses.
    bom: Mutex<bool>,
}

/// An upstream that repeats the credential it received, in headers and body, beside
/// personal data a proxy may redact.
async fn echo(State(echo): State<Arc<Echo>>, headers: HeaderMap) -> Response {
    let get = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    echo.accept_encoding
        .lock()
        .unwrap()
        .push(get("accept-encoding"));
    let auth = get("authorization").unwrap_or_default();
    let secret = auth.trim_start_matches("Bearer ").to_owned();
    if *echo.compressed.lock().unwrap() {
        let headers = [
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ];
        return (StatusCode::OK, headers, format!("\u{1f}\u{8b}{secret}")).into_response();
    }
    if *echo.bom.lock().unwrap() {
        let body = "\u{feff}{\"user\":{\"email\":\"ann@example.com\"}}";
        return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    }
    if *echo.big.lock().unwrap() {
        let body = format!(
            "{{\"pad\":\"{}\",\"key\":\"{secret}\"}}",
            "x".repeat(3 << 20)
        );
        return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    }
    let body = serde_json::json!({
        "debug": { "authorization": auth, "note": format!("your key {secret} is wrong") },
        "user": { "name": "Ann", "email": "ann@example.com", "phone": "555-0100" },
        "items": [ { "id": 1, "email": "bob@example.com" } ],
    });
    let mut response = (
        StatusCode::UNAUTHORIZED,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    let h = response.headers_mut();
    h.insert("x-debug-key", secret.parse().unwrap());
    h.append("set-cookie", "a=1".parse().unwrap());
    h.append("set-cookie", format!("k={secret}").parse().unwrap());
    response
}

async fn start_echo() -> (Arc<Echo>, String) {
    let state = Arc::new(Echo::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(echo).with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, url)
}

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-key, type: target, auth: bearer, secret: {{ env: SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: scrubbed
    target: vendor
    target_credential: vendor-key
    proxy_credentials: [agent]
    default_effect: allow
    response: {{ scrub_credential: true }}
  - name: redacted
    target: vendor
    target_credential: vendor-key
    proxy_credentials: [agent]
    default_effect: allow
    response: {{ scrub_credential: true, redact: ["/user/phone", "email"] }}
  - {{ name: plain, target: vendor, target_credential: vendor-key, proxy_credentials: [agent], default_effect: allow }}
"#
    )
}

/// A GET through Envoy with the agent's key.
async fn get(stack: &Stack, path: &str) -> reqwest::Response {
    client()
        .get(stack.url(path))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap()
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("SECRET", SECRET), ("AGENT_KEY", AGENT_KEY)]
}

#[tokio::test]
async fn an_echoed_secret_is_scrubbed_from_headers_and_body() {
    let (upstream, url) = start_echo().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&url), &env());
    let http = client();
    let response = http
        .get(stack.url("/scrubbed/v1/me"))
        .bearer_auth(AGENT_KEY)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "the upstream's own status passes");
    let headers = format!("{:?}", response.headers());
    assert_eq!(response.headers()["x-debug-key"], "[REDACTED]");
    let cookies: Vec<_> = response.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "k=[REDACTED]"]);
    let body = response.text().await.unwrap();
    assert!(
        !headers.contains(SECRET) && !body.contains(SECRET),
        "{headers}\n{body}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["debug"]["authorization"], "Bearer [REDACTED]");
    assert_eq!(json["debug"]["note"], "your key [REDACTED] is wrong");
    assert_eq!(
        json["user"]["email"], "ann@example.com",
        "not redacted here"
    );
    // Asked for uncompressed: a compressed body could not be checked.
    assert_eq!(
        *upstream.accept_encoding.lock().unwrap(),
        [Some("identity".to_owned())]
    );

    let m = stack.metrics().await;
    assert!(
        m.contains("latchkey_credential_echoes_total{proxy=\"scrubbed\"} 4"),
        "{m}"
    );
    assert!(!m.contains(SECRET));
    let log = stack.log("latchkey");
    assert!(log.contains("echoed the credential"), "{log}");
    assert!(!log.contains(SECRET));

    // A proxy without `response` streams nothing through latchkey: the answer arrives
    // as the upstream sent it (and compressed if the client asked).
    let plain = http
        .get(stack.url("/plain/v1/me"))
        .bearer_auth(AGENT_KEY)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.headers()["x-debug-key"], SECRET);
    assert_eq!(
        upstream
            .accept_encoding
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .as_deref(),
        Some("gzip")
    );
}

#[tokio::test]
async fn configured_fields_are_redacted_from_json() {
    let (upstream, url) = start_echo().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&url), &env());
    let response = get(&stack, "/redacted/v1/me").await;
    let body = response.text().await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["user"]["phone"], "[REDACTED]");
    assert_eq!(json["user"]["email"], "[REDACTED]");
    assert_eq!(json["items"][0]["email"], "[REDACTED]");
    assert_eq!(json["user"]["name"], "Ann");
    assert_eq!(json["items"][0]["id"], 1);
    assert!(!body.contains(SECRET));
    let m = stack.metrics().await;
    assert!(
        m.contains("latchkey_redacted_fields_total{proxy=\"redacted\"} 3"),
        "{m}"
    );
    // JSON that cannot be parsed to redact is refused, not passed on unchecked.
    *upstream.bom.lock().unwrap() = true;
    let (status, kind, body) = denial(get(&stack, "/redacted/v1/me").await).await;
    assert_eq!((status, kind.as_str()), (502, "response_unreadable"));
    assert!(!body.to_string().contains("ann@example.com"));

    // The settings survive export and apply.
    let yaml = String::from_utf8(stack.cli(&["export"], &[]).stdout).unwrap();
    assert!(
        yaml.contains("scrub_credential: true") && yaml.contains("/user/phone"),
        "{yaml}"
    );
    let again = stack.apply(&yaml, &env());
    assert!(again.contains("no changes"), "{again}");
}

#[tokio::test]
async fn a_response_too_large_to_check_never_reaches_the_agent() {
    let (upstream, url) = start_echo().await;
    *upstream.big.lock().unwrap() = true;
    let stack = Stack::start().await;
    stack.apply(&policy(&url), &env());
    let response = get(&stack, "/scrubbed/v1/export").await;
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    assert!(status >= 500, "status {status}");
    assert!(!String::from_utf8_lossy(&body).contains(SECRET));

    // A compressed answer, though none was asked for, cannot be checked: refused.
    *upstream.big.lock().unwrap() = false;
    *upstream.compressed.lock().unwrap() = true;
    let (status, kind, body) = denial(get(&stack, "/scrubbed/v1/export").await).await;
    assert_eq!((status, kind.as_str()), (502, "response_unreadable"));
    assert!(!body.to_string().contains(SECRET));
}

#[tokio::test]
async fn oauth2_tokens_are_scrubbed_too() {
    // The token endpoint hands out a token; the upstream echoes it back.
    let (_upstream, url) = start_echo().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_url = format!("http://{}/token", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(|| async {
            r#"{"access_token":"tok-ECHOED-0123456789","token_type":"Bearer","expires_in":3600}"#
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let stack = Stack::start().await;
    stack.apply(
        &format!(
            r#"
targets:
  - {{ name: vendor, url: "{url}" }}
credentials:
  - name: vendor-oauth
    type: target
    auth: oauth2_client_credentials
    token_url: "{token_url}"
    client_id: app
    secret: {{ env: TOKEN_SECRET }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: api
    target: vendor
    target_credential: vendor-oauth
    proxy_credentials: [agent]
    default_effect: allow
    response: {{ scrub_credential: true }}
"#
        ),
        &[("TOKEN_SECRET", TOKEN_SECRET), ("AGENT_KEY", AGENT_KEY)],
    );
    let response = get(&stack, "/api/v1/me").await;
    assert_eq!(response.headers()["x-debug-key"], "[REDACTED]");
    let body = response.text().await.unwrap();
    assert!(!body.contains("tok-ECHOED"), "{body}");
    assert!(body.contains("Bearer [REDACTED]"), "{body}");
}

#[tokio::test]
async fn guarded_proxies_need_ext_proc_and_a_scrubbable_secret() {
    let (_upstream, url) = start_echo().await;
    let stack = Stack::start_in(Mode::ExtAuthz).await;
    let out = stack.try_apply(&policy(&url), &env());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scrubbed or redacted") && err.contains("ext_proc"),
        "{err}"
    );

    let stack = Stack::start().await;
    let out = stack.try_apply(
        &policy(&url),
        &[("SECRET", "short"), ("AGENT_KEY", AGENT_KEY)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("response") && err.contains("at least 8 bytes"),
        "{err}"
    );
    let out = stack.try_apply(
        &policy(&url).replace("redact: [\"/user/phone\", \"email\"]", "redact: [\"\"]"),
        &env(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("redact"));
    // Nothing was applied: neither the key nor the proxy exists.
    let (status, kind, _) = denial(get(&stack, "/plain/v1/me").await).await;
    assert_eq!((status, kind.as_str()), (401, "invalid_key"));
}
