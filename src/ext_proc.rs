//! The ext_proc stream loop: receive, dispatch by phase, send. Decisions live in
//! `pipeline`; conversions in `envoy`.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, HttpHeaders, ProcessingRequest, ProcessingResponse,
    TrailersResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Status, Streaming};

use crate::envoy;
use crate::pipeline::{RequestView, decide};
use crate::state::Shared;

pub struct ExtProc {
    shared: Arc<Shared>,
}

impl ExtProc {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, Status> {
        let shared = self.shared.clone();
        let responses = request
            .into_inner()
            .map(move |message| message.map(|m| handle(&shared, m)));
        Ok(tonic::Response::new(Box::pin(responses)))
    }
}

fn handle(shared: &Shared, message: ProcessingRequest) -> ProcessingResponse {
    match message.request {
        Some(Phase::RequestHeaders(headers)) => request_headers(shared, &headers),
        Some(Phase::ResponseHeaders(_)) => {
            envoy::pass(Response::ResponseHeaders(HeadersResponse::default()))
        }
        Some(Phase::RequestBody(_)) => envoy::pass(Response::RequestBody(BodyResponse::default())),
        Some(Phase::ResponseBody(_)) => {
            envoy::pass(Response::ResponseBody(BodyResponse::default()))
        }
        Some(Phase::RequestTrailers(_)) => {
            envoy::pass(Response::RequestTrailers(TrailersResponse::default()))
        }
        Some(Phase::ResponseTrailers(_)) => {
            envoy::pass(Response::ResponseTrailers(TrailersResponse::default()))
        }
        None => ProcessingResponse::default(),
    }
}

fn request_headers(shared: &Shared, headers: &HttpHeaders) -> ProcessingResponse {
    let pairs = envoy::header_pairs(headers.headers.as_ref());
    let text = |name| {
        envoy::header_value(&pairs, name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or_default()
    };
    let view = RequestView {
        method: text(":method"),
        path: text(":path"),
        headers: &pairs,
    };
    let request_id = text("x-request-id");
    let policy = shared.policy.load();
    let decision = decide(&policy, &view, crate::state::now_unix());
    shared.metrics.record(&decision);
    match decision.outcome {
        Ok(forward) => envoy::allow(forward),
        Err(denial) => {
            tracing::info!(
                request_id,
                proxy = decision.subject.proxy.as_deref(),
                credential = decision.subject.credential.as_deref(),
                decision = denial.kind(),
                "request denied"
            );
            envoy::deny(&denial, request_id)
        }
    }
}
