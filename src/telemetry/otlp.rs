//! OTLP export, over gRPC or HTTP/protobuf (`OTEL_EXPORTER_OTLP_PROTOCOL`, per signal
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `…_LOGS_PROTOCOL`). On when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `…_LOGS_ENDPOINT`) is set; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_EXPORTER_OTLP_TIMEOUT` are honoured. An
//! `https://` endpoint is reached over TLS, trusting the system's roots and
//! `OTEL_EXPORTER_OTLP_CERTIFICATE`, with `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`/`_KEY`
//! for a collector that asks for a client certificate.
//!
//! Not the `opentelemetry-otlp` crate: it exports what its SDK's tracer records, while
//! these spans are made after the fact from audit batches, with ids derived from request
//! ids; the SDK would be a second pipeline to feed. The wire messages are the same
//! (`opentelemetry-proto`).
//!
//! Telemetry is allowed to be lossy where the audit is not: if the collector is slow or
//! gone, batches past a small queue are dropped and counted; the SQL audit is unaffected.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::telemetry::events::Event;
use crate::telemetry::otel::{attr, convert, scope, text};

/// Batches waiting for the collector; beyond this they are dropped (and counted).
const QUEUE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how to export, from the standard OTel environment.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Each signal's endpoint and protocol; with HTTP, the full URL (`…/v1/traces`).
    pub traces: Option<(String, Protocol)>,
    pub logs: Option<(String, Protocol)>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub resource: Vec<(String, String)>,
    /// For `https://` endpoints: a CA to trust besides the system's
    /// (`OTEL_EXPORTER_OTLP_CERTIFICATE`), and a client certificate and key for a
    /// collector that asks for one (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`/`_KEY`).
    pub ca: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl OtlpConfig {
    /// `Ok(None)` when no endpoint is set: OTLP export is off.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let protocol = |signal: &str| -> anyhow::Result<Protocol> {
            let name = format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL");
            match var(&name)
                .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
                .as_deref()
            {
                None | Some("grpc") => Ok(Protocol::Grpc),
                Some("http/protobuf") => Ok(Protocol::HttpProtobuf),
                Some(other) => {
                    bail!("{name}: {other:?} is not supported; use grpc or http/protobuf")
                }
            }
        };
        // A signal's own endpoint is used as given; the shared one is a base, to which
        // HTTP adds the signal's path (the OTLP exporter specification's rule).
        let signal = |name: &str, path: &str| -> anyhow::Result<Option<(String, Protocol)>> {
            let protocol = protocol(name)?;
            if let Some(own) = var(&format!("OTEL_EXPORTER_OTLP_{name}_ENDPOINT")) {
                return Ok(Some((own, protocol)));
            }
            Ok(var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| {
                let endpoint = match protocol {
                    Protocol::Grpc => base,
                    Protocol::HttpProtobuf => format!("{}{path}", base.trim_end_matches('/')),
                };
                (endpoint, protocol)
            }))
        };
        let traces = signal("TRACES", "/v1/traces")?;
        let logs = signal("LOGS", "/v1/logs")?;
        if traces.is_none() && logs.is_none() {
            return Ok(None);
        }
        let pairs = |text: Option<String>| -> Vec<(String, String)> {
            text.unwrap_or_default()
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| {
                    let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
                    (k.trim().to_owned(), v.into_owned())
                })
                .collect()
        };
        let mut resource = pairs(var("OTEL_RESOURCE_ATTRIBUTES"));
        let service = var("OTEL_SERVICE_NAME").unwrap_or_else(|| "latchkey".to_owned());
        resource.retain(|(k, _)| k != "service.name");
        resource.insert(0, ("service.name".to_owned(), service));
        let timeout = var("OTEL_EXPORTER_OTLP_TIMEOUT")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or(Duration::from_secs(10), Duration::from_millis);
        Ok(Some(Self {
            traces,
            logs,
            headers: pairs(var("OTEL_EXPORTER_OTLP_HEADERS")),
            timeout,
            resource,
            ca: var("OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from),
            client: var("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
                .zip(var("OTEL_EXPORTER_OTLP_CLIENT_KEY"))
                .map(|(cert, key)| (PathBuf::from(cert), PathBuf::from(key))),
        }))
    }

    /// The endpoints as they may be shown: without a user or password in them.
    pub fn shown(&self) -> Vec<String> {
        self.endpoints()
            .into_iter()
            .map(|e| match reqwest::Url::parse(&e) {
                Ok(mut url) => {
                    let _ = url.set_username("");
                    let _ = url.set_password(None);
                    url.to_string()
                }
                Err(_) => "(not a URL)".to_owned(),
            })
            .collect()
    }

    /// The endpoints, each once, for `doctor`.
    pub fn endpoints(&self) -> Vec<String> {
        let mut all: Vec<String> = (self.traces.iter().chain(&self.logs))
            .map(|(endpoint, _)| endpoint.clone())
            .collect();
        all.dedup();
        all
    }

    fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
    }

    /// gRPC's TLS for `https://` collectors: the system's roots, the configured CA, and
    /// the client certificate if one is set.
    fn grpc_tls(&self) -> anyhow::Result<ClientTlsConfig> {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(Self::read(
                ca,
                "OTLP CA certificate",
            )?));
        }
        if let Some((cert, key)) = &self.client {
            tls = tls.identity(Identity::from_pem(
                Self::read(cert, "OTLP client certificate")?,
                Self::read(key, "OTLP client key")?,
            ));
        }
        Ok(tls)
    }

    /// The HTTP client: the same roots, CA and client certificate, and the headers.
    fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &self.headers {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .with_context(|| format!("OTEL_EXPORTER_OTLP_HEADERS: bad name {k:?}"))?,
                reqwest::header::HeaderValue::from_str(v)
                    .with_context(|| format!("OTEL_EXPORTER_OTLP_HEADERS: bad value for {k:?}"))?,
            );
        }
        let mut client = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers);
        if let Some(ca) = &self.ca {
            client = client.add_root_certificate(
                reqwest::Certificate::from_pem(&Self::read(ca, "OTLP CA certificate")?)
                    .context("OTLP CA certificate")?,
            );
        }
        if let Some((cert, key)) = &self.client {
            let mut pem = Self::read(cert, "OTLP client certificate")?;
            pem.extend(Self::read(key, "OTLP client key")?);
            client = client.identity(
                reqwest::Identity::from_pem(&pem).context("OTLP client certificate and key")?,
            );
        }
        client.build().context("the OTLP HTTP client")
    }
}

/// Where one signal goes.
enum Sink<C> {
    Grpc(C),
    Http {
        client: reqwest::Client,
        url: String,
    },
}

/// A collector's gRPC service for one signal.
trait Export<M> {
    async fn export_one(&mut self, request: tonic::Request<M>) -> Result<(), tonic::Status>;
}

impl Export<ExportTraceServiceRequest> for TraceServiceClient<Channel> {
    async fn export_one(
        &mut self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<(), tonic::Status> {
        self.export(request).await.map(drop)
    }
}

impl Export<ExportLogsServiceRequest> for LogsServiceClient<Channel> {
    async fn export_one(
        &mut self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<(), tonic::Status> {
        self.export(request).await.map(drop)
    }
}

impl<C> Sink<C> {
    /// Sends one batch of a signal, by gRPC (with the configured headers as metadata) or
    /// by HTTP.
    async fn send<M: Message>(&mut self, message: M, metadata: &MetadataMap) -> Result<(), String>
    where
        C: Export<M>,
    {
        match self {
            Sink::Grpc(client) => {
                let mut request = tonic::Request::new(message);
                *request.metadata_mut() = metadata.clone();
                client
                    .export_one(request)
                    .await
                    .map_err(|e| e.message().to_owned())
            }
            Sink::Http { client, url } => post(client, url, &message).await,
        }
    }
}

/// Sends one protobuf message by HTTP (`application/x-protobuf`, OTLP/HTTP).
async fn post(client: &reqwest::Client, url: &str, message: &impl Message) -> Result<(), String> {
    let response = client
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(message.encode_to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match response.status() {
        s if s.is_success() => Ok(()),
        s => Err(format!("the collector answered {s}")),
    }
}

/// The exporter: a queue in front of one task that sends each batch to the collector.
pub struct Otlp {
    tx: mpsc::Sender<Vec<Event>>,
    dropped: Counter,
    task: JoinHandle<()>,
}

impl Otlp {
    pub fn start(config: OtlpConfig, dropped: Counter) -> anyhow::Result<Self> {
        let tls = config.grpc_tls()?;
        let http = config.http_client()?;
        let channel = |e: &str| -> anyhow::Result<Channel> {
            let mut endpoint = Endpoint::from_shared(e.to_owned())
                .with_context(|| format!("OTLP endpoint {e:?}"))?
                .timeout(config.timeout);
            if e.starts_with("https://") {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .with_context(|| format!("OTLP endpoint {e:?}: TLS"))?;
            }
            Ok(endpoint.connect_lazy())
        };
        let sink = |signal: &Option<(String, Protocol)>| -> anyhow::Result<Option<Sink<Channel>>> {
            Ok(match signal {
                None => None,
                Some((e, Protocol::Grpc)) => Some(Sink::Grpc(channel(e)?)),
                Some((url, Protocol::HttpProtobuf)) => {
                    reqwest::Url::parse(url).with_context(|| format!("OTLP endpoint {url:?}"))?;
                    Some(Sink::Http {
                        client: http.clone(),
                        url: url.clone(),
                    })
                }
            })
        };
        let mut traces = sink(&config.traces)?.map(|s| match s {
            Sink::Grpc(channel) => Sink::Grpc(TraceServiceClient::new(channel)),
            Sink::Http { client, url } => Sink::Http { client, url },
        });
        let mut logs = sink(&config.logs)?.map(|s| match s {
            Sink::Grpc(channel) => Sink::Grpc(LogsServiceClient::new(channel)),
            Sink::Http { client, url } => Sink::Http { client, url },
        });
        let mut metadata = MetadataMap::new();
        for (k, v) in &config.headers {
            let key = MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .with_context(|| format!("OTEL_EXPORTER_OTLP_HEADERS: bad name {k:?}"))?;
            let value = MetadataValue::try_from(v.as_str())
                .with_context(|| format!("OTEL_EXPORTER_OTLP_HEADERS: bad value for {k:?}"))?;
            metadata.insert(key, value);
        }
        let resource = Resource {
            attributes: config
                .resource
                .iter()
                .map(|(k, v)| attr(k, text(v)))
                .collect(),
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel::<Vec<Event>>(QUEUE);
        let task = tokio::spawn(async move {
            while let Some(events) = rx.recv().await {
                let (spans, records) = convert(&events);
                if let Some(sink) = traces.as_mut().filter(|_| !spans.is_empty()) {
                    let message = ExportTraceServiceRequest {
                        resource_spans: vec![ResourceSpans {
                            resource: Some(resource.clone()),
                            scope_spans: vec![ScopeSpans {
                                scope: Some(scope()),
                                spans,
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                    };
                    let sent = sink.send(message, &metadata).await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "OTLP span export failed");
                    }
                }
                if let Some(sink) = logs.as_mut().filter(|_| !records.is_empty()) {
                    let message = ExportLogsServiceRequest {
                        resource_logs: vec![ResourceLogs {
                            resource: Some(resource.clone()),
                            scope_logs: vec![ScopeLogs {
                                scope: Some(scope()),
                                log_records: records,
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                    };
                    let sent = sink.send(message, &metadata).await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "OTLP log export failed");
                    }
                }
            }
        });
        Ok(Self { tx, dropped, task })
    }

    /// Hands a written batch over; never waits.
    pub fn offer(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if self.tx.try_send(events.to_vec()).is_err() {
            self.dropped.inc();
        }
    }

    /// Sends what is queued, then stops.
    pub async fn finish(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the OTLP exporter failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn configured_from_the_standard_variables() {
        assert_eq!(OtlpConfig::from_env(env(&[])).unwrap(), None);
        let c = OtlpConfig::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs:4317"),
            ("OTEL_SERVICE_NAME", "gateway"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,team=a%20b",
            ),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=t1"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            c.traces,
            Some(("http://collector:4317".into(), Protocol::Grpc))
        );
        assert_eq!(c.logs, Some(("http://logs:4317".into(), Protocol::Grpc)));
        assert_eq!(c.resource[0], ("service.name".into(), "gateway".into()));
        assert!(c.resource.contains(&("team".into(), "a b".into())));
        assert_eq!(c.headers, vec![("x-tenant".into(), "t1".into())]);
        assert_eq!(c.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn http_adds_each_signal_path_to_the_shared_endpoint_only() {
        let c = OtlpConfig::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                "http://logs:4318/custom",
            ),
        ]))
        .unwrap()
        .unwrap();
        let http = Protocol::HttpProtobuf;
        assert_eq!(
            c.traces,
            Some(("http://collector:4318/v1/traces".into(), http.clone()))
        );
        assert_eq!(c.logs, Some(("http://logs:4318/custom".into(), http)));
        let e = OtlpConfig::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }
}
