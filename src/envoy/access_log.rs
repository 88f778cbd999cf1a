//! Envoy's gRPC access-log service: Envoy streams every finished request here, off the
//! request path, and latchkey completes the request's audit record with what happened
//! (status, upstream status, latency, bytes, retries), joined by `x-request-id`.

use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use std::sync::Arc;

use crate::access_log_pb::access_log_service_server::AccessLogService;
use crate::access_log_pb::stream_access_logs_message::LogEntries;
use crate::access_log_pb::{
    Duration, HttpAccessLogEntry, StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use crate::dataplane::shared::Shared;
use crate::telemetry::audit::{Completed, Event};

pub struct AccessLog {
    shared: Arc<Shared>,
    /// Becomes true at shutdown: Envoy never ends its log stream, so latchkey does.
    stopping: watch::Receiver<bool>,
}

impl AccessLog {
    pub fn new(shared: Arc<Shared>, stopping: watch::Receiver<bool>) -> Self {
        Self { shared, stopping }
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLog {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let message = tokio::select! {
                message = stream.message() => message?,
                _ = stopping.wait_for(|stop| *stop) => None,
            };
            let Some(message) = message else { break };
            let Some(LogEntries::HttpLogs(logs)) = message.log_entries else {
                continue;
            };
            for entry in &logs.log_entry {
                if let Some(completed) = completion(entry) {
                    self.shared.metrics.record_response(completed.status);
                    // Envoy's retries count against the caller's rate budget: a
                    // retried call cannot amplify its load. Apart, so a slow budget
                    // store never holds the log stream up.
                    if completed.retries > 0 || self.shared.budgets.is_local() {
                        let (shared, id) = (self.shared.clone(), completed.request_id.clone());
                        let retries = completed.retries;
                        tokio::spawn(async move {
                            shared.budgets.charge_retries(&id, retries).await;
                        });
                    }
                    // Waits when the audit queue is full: Envoy buffers meanwhile.
                    self.shared.audit.record(Event::Completed(completed)).await;
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

fn millis(d: &Duration) -> f64 {
    d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6
}

/// What a finished request's log entry tells the audit; `None` without a request id.
pub fn completion(entry: &HttpAccessLogEntry) -> Option<Completed> {
    let request = entry.request.as_ref()?;
    if request.request_id.is_empty() {
        return None;
    }
    let common = entry.common_properties.as_ref();
    let response = entry.response.as_ref();
    // 0: the client went away before any response was sent.
    let status = response
        .and_then(|r| r.response_code)
        .and_then(|c| u16::try_from(c.value).ok())
        .filter(|c| *c > 0);
    // The status is the upstream's only if an upstream answered at all.
    let answered = common.is_some_and(|c| c.time_to_first_upstream_rx_byte.is_some());
    let latency_ms = common
        .and_then(|c| {
            c.time_to_last_downstream_tx_byte
                .as_ref()
                .or(c.duration.as_ref())
        })
        .map(millis);
    Some(Completed {
        request_id: request.request_id.clone(),
        status,
        upstream_status: status.filter(|_| answered),
        latency_ms,
        bytes_in: request.request_headers_bytes + request.request_body_bytes,
        bytes_out: response.map_or(0, |r| r.response_headers_bytes + r.response_body_bytes),
        retries: common.map_or(0, |c| c.upstream_request_attempt_count.saturating_sub(1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::data::accesslog::v3 as envoy;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::envoy::service::accesslog::v3 as envoy_service;
    use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
    use prost::Message;

    fn entry(code: u32, upstream_answered: bool) -> HttpAccessLogEntry {
        decode_one(full_entry(code, upstream_answered))
    }

    /// Envoy's whole entry, as Envoy sends it, read back through latchkey's slice of it.
    fn decode_one(full: envoy::HttpAccessLogEntry) -> HttpAccessLogEntry {
        let message = envoy_service::StreamAccessLogsMessage {
            log_entries: Some(
                envoy_service::stream_access_logs_message::LogEntries::HttpLogs(
                    envoy_service::stream_access_logs_message::HttpAccessLogEntries {
                        log_entry: vec![full],
                    },
                ),
            ),
            ..Default::default()
        };
        let read = StreamAccessLogsMessage::decode(message.encode_to_vec().as_slice()).unwrap();
        let Some(LogEntries::HttpLogs(mut logs)) = read.log_entries else {
            panic!("no HTTP logs in {read:?}");
        };
        logs.log_entry.pop().unwrap()
    }

    fn full_entry(code: u32, upstream_answered: bool) -> envoy::HttpAccessLogEntry {
        envoy::HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                time_to_first_upstream_rx_byte: upstream_answered.then_some(Duration {
                    seconds: 0,
                    nanos: 1_000_000,
                }),
                time_to_last_downstream_tx_byte: Some(Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                upstream_request_attempt_count: 2,
                // Fields latchkey does not read, skipped on the wire.
                downstream_remote_address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.7".into(),
                        ..Default::default()
                    })),
                }),
                upstream_cluster: "latchkey_tls".into(),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_id: "req-1".into(),
                request_headers_bytes: 100,
                request_body_bytes: 20,
                path: "/p0/v1/items".into(),
                user_agent: "agent".into(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: code }),
                response_headers_bytes: 50,
                response_body_bytes: 7,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_answered_request() {
        let c = completion(&entry(201, true)).unwrap();
        assert_eq!(c.status, Some(201));
        assert_eq!(c.upstream_status, Some(201));
        assert_eq!(c.latency_ms, Some(1500.0));
        assert_eq!((c.bytes_in, c.bytes_out, c.retries), (120, 57, 1));
    }

    #[test]
    fn a_local_reply_has_no_upstream_status() {
        let c = completion(&entry(503, false)).unwrap();
        assert_eq!(c.status, Some(503));
        assert_eq!(c.upstream_status, None);
    }

    #[test]
    fn a_client_that_left_has_no_status_and_no_id_is_no_completion() {
        assert_eq!(completion(&entry(0, false)).unwrap().status, None);
        let mut e = full_entry(200, true);
        e.request.as_mut().unwrap().request_id.clear();
        assert_eq!(completion(&decode_one(e)), None);
    }
}
