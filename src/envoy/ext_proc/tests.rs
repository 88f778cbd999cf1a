//! The in-process tier: latchkey's ext_proc service over real gRPC, driven by a tonic
//! client the way Envoy drives it, with no Envoy.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, processing_request};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use super::*;
use crate::base::crypto::MasterKey;
use crate::dataplane::budget::{Budgets, LocalBudgets, SystemClock};
use crate::dataplane::snapshot::Policy;
use crate::dataplane::spend::{LocalSpend, Spend};
use crate::store::{Store, memory, testing};
use crate::telemetry::audit::AuditLog;
use crate::telemetry::metrics::Metrics;

fn headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).to_owned(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// One stream per request, as Envoy opens them: the answer to its headers.
async fn ask(
    client: &mut ExternalProcessorClient<tonic::transport::Channel>,
    pairs: &[(&str, &str)],
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(headers(pairs)).await.unwrap();
    let mut answers = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    answer.response.expect("a response")
}

#[tokio::test]
async fn requests_are_decided_and_audited_over_grpc_without_envoy() {
    let scratch = tempfile::tempdir().unwrap();
    let store = Store::open(&format!(
        "sqlite://{}",
        scratch.path().join("t.db").display()
    ))
    .await
    .unwrap();
    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let policy = Policy::compile(
        &memory::stored(testing::POLICY, &master).unwrap(),
        &master,
        &Default::default(),
    )
    .unwrap();
    let metrics = Metrics::default();
    let (audit, writer) = AuditLog::start(
        store.clone(),
        master.audit_signer().clone(),
        metrics.audit.clone(),
        crate::telemetry::audit::Outlets::default(),
    );
    let shared = Arc::new(Shared::new(
        policy,
        Budgets::Local(LocalBudgets::new(Arc::new(SystemClock))),
        Spend::Local(LocalSpend::default()),
        audit,
        metrics,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExternalProcessorServer::new(ExtProc::new(shared)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let allowed = ask(
        &mut client,
        &[
            (":method", "GET"),
            (":path", "/api/v1/things"),
            ("authorization", "Bearer lk_agentKEY0000000000000001"),
            ("x-request-id", "r-allowed"),
        ],
    )
    .await;
    let Response::RequestHeaders(allowed) = allowed else {
        panic!("{allowed:?}")
    };
    let set = allowed
        .response
        .and_then(|r| r.header_mutation)
        .map(|m| m.set_headers)
        .unwrap_or_default();
    let header = |name: &str| {
        set.iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
    };
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer sk_vendor_1234")
    );

    let denied = ask(
        &mut client,
        &[
            (":method", "DELETE"),
            (":path", "/api/v1/things"),
            ("authorization", "Bearer lk_agentKEY0000000000000001"),
            ("x-request-id", "r-denied"),
        ],
    )
    .await;
    let Response::ImmediateResponse(denied) = denied else {
        panic!("{denied:?}")
    };
    assert_eq!(denied.status.map(|s| s.code), Some(403));
    let body = String::from_utf8_lossy(&denied.body);
    assert!(
        body.contains("rule_denied") && !body.contains("sk_vendor"),
        "{body}"
    );

    writer.finish().await;
    let decisions: Vec<(String, String)> =
        sqlx::query_as("SELECT request_id, decision FROM requests ORDER BY request_id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        decisions,
        [
            ("r-allowed".to_owned(), "allow".to_owned()),
            ("r-denied".to_owned(), "rule_denied".to_owned())
        ]
    );
}
