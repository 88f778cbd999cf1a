//! The fast local upstream of `make bench`: answers every request with a small JSON body
//! and counts how many carried the expected credential (`Authorization: Bearer
//! sk_bench_secret`) and how many did not. `GET /__counts` answers `{"good":N,"bad":M}`
//! (and is not counted). Usage: `bench_upstream PORT`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, Uri};

const EXPECTED: &str = "Bearer sk_bench_secret";

#[derive(Default)]
struct Counts {
    good: AtomicU64,
    bad: AtomicU64,
}

async fn answer(State(counts): State<Arc<Counts>>, uri: Uri, headers: HeaderMap) -> String {
    if uri.path() == "/__counts" {
        return format!(
            r#"{{"good":{},"bad":{}}}"#,
            counts.good.load(Ordering::Relaxed),
            counts.bad.load(Ordering::Relaxed)
        );
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
    r#"{"ok":true}"#.to_owned()
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
