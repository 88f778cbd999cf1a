//! What latchkey tells about its work, off the request path: the audit (events queued to
//! one writer that batches them into the store), OpenTelemetry export of the same
//! events, and the Prometheus metrics.

pub mod audit;
pub mod events;
pub mod metrics;
pub mod otel;
pub mod otlp;
