//! A real OTLP receiver, over gRPC (the collector's own protobuf services, served here)
//! or HTTP/protobuf, that keeps what it is sent; and readers of span and log attributes.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};

#[derive(Clone, Default)]
pub struct Collector {
    pub traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    pub logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
    /// Over HTTP: each request's path and `x-tenant` header.
    pub posts: Arc<Mutex<Vec<Post>>>,
}

/// An OTLP/HTTP request's path and `x-tenant` header.
pub type Post = (String, Option<String>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.logs.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

impl Collector {
    pub async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(LogsServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (collector, format!("http://{addr}"))
    }

    /// OTLP/HTTP with protobuf bodies: `POST /v1/traces` and `/v1/logs`. Returns the base
    /// endpoint.
    pub async fn start_http() -> (Self, String) {
        use axum::body::Bytes;
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode, Uri};
        use prost::Message;

        async fn receive(
            State(collector): State<Collector>,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            if headers.get("content-type").map(|v| v.as_bytes()) != Some(b"application/x-protobuf")
            {
                return StatusCode::UNSUPPORTED_MEDIA_TYPE;
            }
            let tenant = headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            collector
                .posts
                .lock()
                .unwrap()
                .push((uri.path().to_owned(), tenant));
            match uri.path() {
                "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
                    Ok(m) => collector.traces.lock().unwrap().push(m),
                    Err(_) => return StatusCode::BAD_REQUEST,
                },
                "/v1/logs" => match ExportLogsServiceRequest::decode(body) {
                    Ok(m) => collector.logs.lock().unwrap().push(m),
                    Err(_) => return StatusCode::BAD_REQUEST,
                },
                _ => return StatusCode::NOT_FOUND,
            }
            StatusCode::OK
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state(collector.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (collector, format!("http://{addr}"))
    }

    /// The same over TLS, with the certificate and key (PEM) in `dir`: `server.pem` and
    /// `server.key`, for `localhost`.
    pub async fn start_tls(dir: &std::path::Path) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(dir.join("server.pem")).unwrap(),
            std::fs::read(dir.join("server.key")).unwrap(),
        );
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(LogsServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (collector, format!("https://localhost:{port}"))
    }

    pub fn spans(&self) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        self.traces
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    pub fn records(&self) -> Vec<opentelemetry_proto::tonic::logs::v1::LogRecord> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| s.log_records.clone())
            .collect()
    }

    pub fn dump(&self) -> String {
        format!(
            "{:?}\n{:?}",
            self.traces.lock().unwrap(),
            self.logs.lock().unwrap()
        )
    }
}

pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

pub fn text(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{key}: {other:?}"),
    }
}
