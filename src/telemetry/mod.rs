//! What latchkey tells about its work, off the request path: the audit (events queued to
//! one writer that batches them into the store), OpenTelemetry export of the same
//! events, the Prometheus metrics, and the tap the anomaly alerts read.

pub mod audit;
pub mod events;
pub mod metrics;
pub mod otel;
pub mod otlp;
pub mod tap;
