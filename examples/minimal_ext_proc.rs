//! The floor of `make bench`: an ext_proc server that does the least any design must —
//! answer Envoy's request-headers message with one header mutation (the credential) plus
//! the routing a dynamic target needs, mark the request allowed (the shipped config
//! routes nothing else: `latchkey.allowed: "yes"` in the dynamic metadata), and clear
//! the route cache. No key check, no rules, no budgets, no audit. Usage:
//! `minimal_ext_proc PORT UPSTREAM_AUTHORITY`.

use std::pin::Pin;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use tokio_stream::Stream;
use tonic::{Request, Status, Streaming};

struct Minimal {
    authority: String,
}

fn set(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `{"latchkey": {"allowed": "yes"}}`, the mark the shipped config routes by.
fn allowed() -> Struct {
    let value = |kind| Value { kind: Some(kind) };
    let mark = Struct {
        fields: [(
            "allowed".to_owned(),
            value(Kind::StringValue("yes".to_owned())),
        )]
        .into(),
    };
    Struct {
        fields: [("latchkey".to_owned(), value(Kind::StructValue(mark)))].into(),
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Minimal {
    type ProcessStream = Out;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Out>, Status> {
        let authority = self.authority.clone();
        let responses = futures_util::stream::unfold(
            (request.into_inner(), authority),
            |(mut inbound, authority)| async move {
                match inbound.message().await {
                    Ok(Some(_)) => {
                        let mutation = HeaderMutation {
                            set_headers: vec![
                                set("authorization", "Bearer sk_bench_secret"),
                                set("x-latchkey-cluster", "latchkey_plain"),
                                set(":authority", &authority),
                            ],
                            remove_headers: Vec::new(),
                        };
                        let response = ProcessingResponse {
                            response: Some(Response::RequestHeaders(HeadersResponse {
                                response: Some(CommonResponse {
                                    header_mutation: Some(mutation),
                                    clear_route_cache: true,
                                    ..Default::default()
                                }),
                            })),
                            dynamic_metadata: Some(allowed()),
                            ..Default::default()
                        };
                        Some((Ok(response), (inbound, authority)))
                    }
                    Ok(None) => None,
                    Err(status) => Some((Err(status), (inbound, authority))),
                }
            },
        );
        Ok(tonic::Response::new(Box::pin(responses)))
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: minimal_ext_proc PORT AUTHORITY");
    let authority = args.next().expect("usage: minimal_ext_proc PORT AUTHORITY");
    // As `latchkey serve`: Envoy resets the stream of every request its client hangs up
    // on, and h2's default (20 pending) would close Envoy's connection at the end of a
    // load run, failing the requests in flight on it.
    let resets = latchkey::envoy::channel::PENDING_RESETS_ALLOWED;
    tonic::transport::Server::builder()
        .http2_max_pending_accept_reset_streams(Some(resets))
        .add_service(ExternalProcessorServer::new(Minimal { authority }))
        .serve(([127, 0, 0, 1], port).into())
        .await
        .expect("serving");
}
