//! The plain HTTP endpoints: `/healthz` (the process answers), `/readyz` (a policy is
//! loaded and current, the gRPC servers are up and the store answers) and `/metrics` (Prometheus
//! text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::dataplane::shared::Shared;
use crate::store::Store;

#[derive(Clone)]
pub struct HttpState {
    pub shared: Arc<Shared>,
    pub ready: Arc<AtomicBool>,
    pub store: Store,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
    }
    if !state.shared.policy_is_current() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the policy cannot be reloaded from the store\n",
        );
    }
    // The request path never needs the store, but policy changes and the audit do.
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the store does not answer\n",
        ),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.shared.metrics.encode(state.shared.audit.queued()),
    )
}
