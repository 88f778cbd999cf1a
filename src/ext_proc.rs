//! The ext_proc stream loop: receive, dispatch by phase, send. Decisions live in
//! `pipeline`; conversions in `envoy`. One stream carries one HTTP request.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
    TrailersResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Status, Streaming};

use crate::denial::Denial;
use crate::envoy;
use crate::pipeline::{Decision, Outcome, RequestView, admit, decide};
use crate::rules::Body;
use crate::state::{Shared, now_unix};

/// The most request body latchkey reads to judge it; larger bodies are refused (413).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

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
        let exchange = Exchange {
            shared: self.shared.clone(),
            held: None,
        };
        // Messages of one stream are answered in order, one at a time.
        let responses = futures_util::stream::unfold(
            (request.into_inner(), exchange),
            |(mut inbound, mut exchange)| async move {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let response = exchange.handle(message).await;
                        Some((Ok(response), (inbound, exchange)))
                    }
                    Ok(None) => None,
                    Err(status) => Some((Err(status), (inbound, exchange))),
                }
            },
        );
        Ok(tonic::Response::new(Box::pin(responses)))
    }
}

/// The state of one request across its phases.
struct Exchange {
    shared: Arc<Shared>,
    /// Request headers held while the body is on its way.
    held: Option<HeldHeaders>,
}

struct HeldHeaders {
    headers: Vec<(String, Vec<u8>)>,
}

impl Exchange {
    async fn handle(&mut self, message: ProcessingRequest) -> ProcessingResponse {
        match message.request {
            Some(Phase::RequestHeaders(headers)) => self.request_headers(&headers).await,
            Some(Phase::RequestBody(body)) => self.request_body(&body).await,
            Some(Phase::ResponseHeaders(_)) => {
                envoy::pass(Response::ResponseHeaders(HeadersResponse::default()))
            }
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

    async fn request_headers(&mut self, headers: &HttpHeaders) -> ProcessingResponse {
        let pairs = envoy::header_pairs(headers.headers.as_ref());
        let body = if headers.end_of_stream {
            Body::Empty
        } else {
            Body::Unread
        };
        let (decision, request_id) = self.decide(&pairs, &body);
        if let Outcome::NeedBody = decision.outcome {
            self.held = Some(HeldHeaders {
                headers: pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
                    .collect(),
            });
            return envoy::need_body();
        }
        self.respond(decision, &request_id, false).await
    }

    async fn request_body(&mut self, chunk: &HttpBody) -> ProcessingResponse {
        let Some(held) = self.held.take() else {
            // A body latchkey did not ask for: nothing to judge.
            return envoy::pass(Response::RequestBody(BodyResponse::default()));
        };
        let body = if !chunk.end_of_stream || chunk.body.len() > MAX_REQUEST_BODY {
            Body::TooLarge(MAX_REQUEST_BODY)
        } else {
            Body::parse(&chunk.body)
        };
        let pairs: Vec<(&str, &[u8])> = held
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let (decision, request_id) = self.decide(&pairs, &body);
        self.respond(decision, &request_id, true).await
    }

    fn decide(&self, pairs: &[(&str, &[u8])], body: &Body) -> (Decision, String) {
        let text = |name| {
            envoy::header_value(pairs, name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default()
        };
        let view = RequestView {
            method: text(":method"),
            path: text(":path"),
            headers: pairs,
        };
        let policy = self.shared.policy.load();
        let decision = decide(&policy, &view, body, now_unix());
        (decision, text("x-request-id").to_owned())
    }

    async fn respond(
        &self,
        mut decision: Decision,
        request_id: &str,
        in_body_phase: bool,
    ) -> ProcessingResponse {
        admit(&self.shared.budgets, &mut decision).await;
        self.shared.metrics.record(&decision);
        let denial = match decision.outcome {
            Outcome::Forward(forward) => {
                return envoy::allow(forward, in_body_phase, decision.rate);
            }
            Outcome::Deny(denial) => denial,
            // Only with the body unread; here it has been read.
            Outcome::NeedBody => Denial::BodyTooLarge(MAX_REQUEST_BODY),
        };
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
