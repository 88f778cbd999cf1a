//! `auth: oauth2_client_credentials` against a token endpoint served by the test: the
//! token is fetched once for many waiting requests, cached, refreshed before expiry, and
//! a failing endpoint means a clear refusal, never a request without a credential.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use crate::common::{Stack, Upstream, client, denial};

const AGENT_KEY: &str = "lk_oauthAgentKEY000000000001";
const CLIENT_SECRET: &str = "client-SECRET-value/+=";

#[derive(Default)]
struct Endpoint {
    fetches: AtomicU32,
    /// 0: answer 200 with a token.
    fail_with: AtomicU16,
    expires_in: AtomicU64,
    /// What each token request carried: (authorization header, form body).
    seen: Mutex<Vec<(Option<String>, String)>>,
}

async fn token(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    // Slow enough that concurrent requests pile up behind one fetch.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let n = ep.fetches.fetch_add(1, Ordering::SeqCst) + 1;
    ep.seen.lock().unwrap().push((
        headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
        body,
    ));
    match ep.fail_with.load(Ordering::SeqCst) {
        0 => (
            StatusCode::OK,
            format!(
                r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":{}}}"#,
                ep.expires_in.load(Ordering::SeqCst)
            ),
        ),
        code => (StatusCode::from_u16(code).unwrap(), "{}".into()),
    }
}

async fn start_endpoint() -> (Arc<Endpoint>, String) {
    let ep = Arc::new(Endpoint::default());
    ep.expires_in.store(3600, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/oauth/token", axum::routing::post(token))
        .with_state(ep.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (ep, url)
}

fn policy(upstream: &str, token_url: &str, extra: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - name: vendor-oauth
    type: target
    auth: oauth2_client_credentials
    token_url: "{token_url}"
    client_id: "agent app"
    scopes: [read, write]
    secret: {{ env: CLIENT_SECRET }}
{extra}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: api
    target: vendor
    target_credential: vendor-oauth
    proxy_credentials: [agent]
    default_effect: allow
"#
    )
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("CLIENT_SECRET", CLIENT_SECRET), ("AGENT_KEY", AGENT_KEY)]
}

async fn burst(stack: &Stack, n: usize) -> Vec<u16> {
    let http = client();
    let calls = (0..n).map(|_| {
        http.get(stack.url("/api/v1/things"))
            .bearer_auth(AGENT_KEY)
            .send()
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect()
}

#[tokio::test]
async fn one_fetch_serves_many_and_the_token_is_what_the_upstream_gets() {
    let (ep, token_url) = start_endpoint().await;
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url(), &token_url, ""), &env());

    assert!(burst(&stack, 20).await.iter().all(|s| *s == 200));
    assert_eq!(ep.fetches.load(Ordering::SeqCst), 1, "one fetch in flight");
    let seen = upstream.take();
    assert_eq!(seen.len(), 20);
    for s in &seen {
        assert_eq!(s.all("authorization"), ["Bearer tok-1"]);
        assert!(!s.dump().contains(AGENT_KEY) && !s.dump().contains(CLIENT_SECRET));
    }
    // The token request: client credentials by Basic (id and secret form-encoded
    // first, as RFC 6749 says), grant type and scopes in the form.
    let (auth, form) = ep.seen.lock().unwrap()[0].clone();
    use base64::Engine;
    let expected =
        base64::engine::general_purpose::STANDARD.encode("agent+app:client-SECRET-value%2F%2B%3D");
    assert_eq!(auth.as_deref(), Some(format!("Basic {expected}").as_str()));
    assert_eq!(form, "grant_type=client_credentials&scope=read+write");

    // A policy reload (issuing a run key) keeps the cached token.
    stack.cli(&["key", "issue", "--credential", "agent"], &[]);
    assert_eq!(burst(&stack, 3).await, [200, 200, 200]);
    assert_eq!(ep.fetches.load(Ordering::SeqCst), 1);
    for log in [stack.log("latchkey"), stack.log("envoy")] {
        assert!(!log.contains("tok-1") && !log.contains(CLIENT_SECRET));
    }
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    let (ep, token_url) = start_endpoint().await;
    ep.expires_in.store(4, Ordering::SeqCst);
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(
        &policy(
            &upstream.url(),
            &token_url,
            "    client_auth: body\n    token_params: { audience: \"https://api.vendor\" }",
        ),
        &env(),
    );
    assert_eq!(burst(&stack, 1).await, [200]);
    // Inside the last fifth of the token's life (3.2-4 s): still used, and replaced
    // meanwhile; then past its expiry, the replacement is what goes out.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    assert_eq!(burst(&stack, 1).await, [200]);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(burst(&stack, 1).await, [200]);
    let tokens: Vec<String> = upstream
        .take()
        .iter()
        .map(|s| s.header("authorization").unwrap().to_owned())
        .collect();
    assert_eq!(tokens, ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]);
    assert_eq!(ep.fetches.load(Ordering::SeqCst), 2);
    let (auth, form) = ep.seen.lock().unwrap()[0].clone();
    assert_eq!(auth, None, "client_auth: body");
    assert!(form.contains("client_id=agent+app"));
    assert!(form.contains("client_secret=client-SECRET-value%2F%2B%3D"));
    assert!(form.contains("audience=https%3A%2F%2Fapi.vendor"));
}

#[tokio::test]
async fn a_failing_token_endpoint_means_a_clear_refusal_and_nothing_forwarded() {
    let (ep, token_url) = start_endpoint().await;
    ep.fail_with.store(503, Ordering::SeqCst);
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url(), &token_url, ""), &env());
    let response = client()
        .get(stack.url("/api/v1/things"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, kind, _) = denial(response).await;
    assert_eq!((status, kind.as_str()), (503, "credential_unavailable"));
    assert!(
        ep.fetches.load(Ordering::SeqCst) >= 2,
        "retried with backoff"
    );
    assert!(upstream.take().is_empty());

    // A refusal (401) is not retried; the endpoint recovering is picked up.
    ep.fail_with.store(401, Ordering::SeqCst);
    let before = ep.fetches.load(Ordering::SeqCst);
    assert_eq!(burst(&stack, 1).await, [503]);
    assert_eq!(ep.fetches.load(Ordering::SeqCst), before + 1);
    ep.fail_with.store(0, Ordering::SeqCst);
    assert_eq!(burst(&stack, 1).await, [200]);
    assert_eq!(upstream.take().len(), 1);
}

#[tokio::test]
async fn oauth2_policies_are_validated() {
    let stack = Stack::start().await;
    for (extra, token_url, error) in [
        (
            "    token_params: { scope: x }",
            "http://t/x",
            "token_params",
        ),
        ("", "ftp://t/x", "token_url"),
    ] {
        let out = stack.try_apply(&policy("http://127.0.0.1:9", token_url, extra), &env());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(error) && err.contains("vendor-oauth"), "{err}");
    }
}
