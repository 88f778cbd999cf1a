//! The fast local upstream of `make bench`: answers every request with a small JSON body
//! and counts how many carried the expected credential (`Authorization: Bearer
//! sk_bench_secret`) and how many did not. `GET /__counts` answers `{"good":N,"bad":M}`
//! (and is not counted). A POST to a path ending in `/chat/completions` is answered as
//! an LLM vendor streams: a first event at once, then events `PAUSE` apart, the last one
//! with the call's usage. Usage: `bench_upstream PORT`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::response::{IntoResponse, Response};

const EXPECTED: &str = "Bearer sk_bench_secret";

/// Between one streamed event and the next.
const PAUSE: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Counts {
    good: AtomicU64,
    bad: AtomicU64,
}

async fn answer(
    State(counts): State<Arc<Counts>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if uri.path() == "/__counts" {
        let counted = format!(
            r#"{{"good":{},"bad":{}}}"#,
            counts.good.load(Ordering::Relaxed),
            counts.bad.load(Ordering::Relaxed)
        );
        return counted.into_response();
    }
    let injected = headers
        .get_all("authorization")
        .iter()
        .map(|v| v.as_bytes())
        .eq([EXPECTED.as_bytes()]);
    let carried_a_proxy_key = headers
        .iter()
        .any(|(_, v)| v.as_bytes().windows(3).any(|w| w == b"lk_"));
    if injected && !carried_a_proxy_key {
        counts.good.fetch_add(1, Ordering::Relaxed);
    } else {
        counts.bad.fetch_add(1, Ordering::Relaxed);
    }
    if method == Method::POST && uri.path().ends_with("/chat/completions") {
        return streamed();
    }
    r#"{"ok":true}"#.into_response()
}

/// A streamed chat completion: four events, the last with usage, then `[DONE]`.
fn streamed() -> Response {
    const EVENTS: [&str; 5] = [
        r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120}}"#,
        "[DONE]",
    ];
    let events = futures_util::stream::unfold(0, |i| async move {
        let event = EVENTS.get(i)?;
        if i > 0 {
            tokio::time::sleep(PAUSE).await;
        }
        Some((Ok::<_, std::io::Error>(format!("data: {event}\n\n")), i + 1))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: bench_upstream PORT");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("binding the upstream port");
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::new(Counts::default()));
    axum::serve(listener, app).await.expect("serving");
}
