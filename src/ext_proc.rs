//! The ext_proc stream loop: receive, dispatch by phase, send. Decisions live in
//! `pipeline`; conversions in `envoy`. One stream carries one HTTP request.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
    TrailersResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Status, Streaming};

use crate::audit::Event;
use crate::denial::Denial;
use crate::envoy;
use crate::envoy::Priced;
use crate::pipeline::{Asked, Charge, Decision, Outcome, RequestView, conclude, decide};
use crate::policy::CostSpec;
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
            request_id: String::new(),
            held: None,
            pending: None,
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
    /// Envoy's `x-request-id` (or one of latchkey's own if it sent none): the audit's key.
    request_id: String,
    /// Request headers held while the body is on its way.
    held: Option<HeldHeaders>,
    /// A priced request's reservation, until its response is judged.
    pending: Option<Charge>,
}

impl Drop for Exchange {
    /// A request whose response never came (client gone, upstream reset) releases its
    /// reservation: it is charged nothing.
    fn drop(&mut self) {
        if let Some(charge) = self.pending.take() {
            let shared = self.shared.clone();
            let request_id = std::mem::take(&mut self.request_id);
            tokio::spawn(async move { settle(&shared, &request_id, charge, 0).await });
        }
    }
}

/// Ends a reservation, charging `actual` micro-dollars.
async fn settle(shared: &Shared, request_id: &str, charge: Charge, actual: u64) {
    if let Err(e) = shared
        .spend
        .settle(&charge.accounts, charge.reserved, actual)
        .await
    {
        tracing::error!(error = %e, key_id = %charge.key_id, "could not settle a charge");
    }
    if actual > 0 {
        shared
            .audit
            .record(Event::Charged {
                request_id: request_id.to_owned(),
                key_id: charge.key_id,
                micros: actual,
            })
            .await;
    }
}

fn text<'a>(pairs: &[(&str, &'a [u8])], name: &str) -> &'a str {
    envoy::header_value(pairs, name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default()
}

fn priced(charge: Option<&Charge>) -> Option<Priced> {
    charge.map(|c| match &*c.cost {
        CostSpec::PerRequest(_) => Priced::ByStatus,
        CostSpec::ResponseJson { .. } => Priced::ByBody,
    })
}

struct HeldHeaders {
    headers: Vec<(String, Vec<u8>)>,
}

impl Exchange {
    async fn handle(&mut self, message: ProcessingRequest) -> ProcessingResponse {
        match message.request {
            Some(Phase::RequestHeaders(headers)) => self.request_headers(&headers).await,
            Some(Phase::RequestBody(body)) => self.request_body(&body).await,
            Some(Phase::ResponseHeaders(headers)) => {
                self.response_headers(&headers).await;
                envoy::pass(Response::ResponseHeaders(HeadersResponse::default()))
            }
            Some(Phase::ResponseBody(body)) => {
                self.response_body(&body).await;
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
        let started = Instant::now();
        let pairs = envoy::header_pairs(headers.headers.as_ref());
        self.request_id = envoy::request_id(&pairs);
        let body = if headers.end_of_stream {
            Body::Empty
        } else {
            Body::Unread
        };
        let decision = self.decide(&pairs, &body);
        if let Outcome::NeedBody = decision.outcome {
            self.held = Some(HeldHeaders {
                headers: pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
                    .collect(),
            });
            return envoy::need_body(priced(decision.charge.as_ref()));
        }
        self.respond(&pairs, decision, started, false).await
    }

    async fn request_body(&mut self, chunk: &HttpBody) -> ProcessingResponse {
        let started = Instant::now();
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
        let decision = self.decide(&pairs, &body);
        self.respond(&pairs, decision, started, true).await
    }

    /// A priced request's response status: a failure is charged nothing, a fixed price
    /// is charged now, a price in the body waits for the body.
    async fn response_headers(&mut self, headers: &HttpHeaders) {
        let Some(charge) = self.pending.take() else {
            return;
        };
        let pairs = envoy::header_pairs(headers.headers.as_ref());
        let success = envoy::header_value(&pairs, ":status").is_some_and(|s| s.starts_with(b"2"));
        match (&*charge.cost, success) {
            (_, false) => settle(&self.shared, &self.request_id, charge, 0).await,
            (CostSpec::PerRequest(micros), true) => {
                let micros = *micros;
                settle(&self.shared, &self.request_id, charge, micros).await;
            }
            (CostSpec::ResponseJson { .. }, true) => self.pending = Some(charge),
        }
    }

    async fn response_body(&mut self, chunk: &HttpBody) {
        let Some(charge) = self.pending.take() else {
            return;
        };
        let price = if chunk.end_of_stream {
            charge.cost.price(&chunk.body)
        } else {
            None
        };
        if price.is_none() {
            tracing::warn!(key_id = %charge.key_id, "the response did not say what it cost");
        }
        settle(&self.shared, &self.request_id, charge, price.unwrap_or(0)).await;
    }

    fn decide(&self, pairs: &[(&str, &[u8])], body: &Body) -> Decision {
        let view = RequestView {
            method: text(pairs, ":method"),
            path: text(pairs, ":path"),
            headers: pairs,
        };
        let policy = self.shared.policy.load();
        decide(&policy, &view, body, now_unix())
    }

    async fn respond(
        &mut self,
        pairs: &[(&str, &[u8])],
        mut decision: Decision,
        started: Instant,
        in_body_phase: bool,
    ) -> ProcessingResponse {
        if let Outcome::NeedBody = decision.outcome {
            // Only with the body unread; here it has been read.
            decision.outcome = Outcome::Deny(Denial::BodyTooLarge(MAX_REQUEST_BODY));
        }
        let asked = Asked {
            request_id: &self.request_id,
            method: text(pairs, ":method"),
            path: text(pairs, ":path"),
        };
        conclude(&self.shared, &mut decision, &asked, started).await;
        let request_id = self.request_id.as_str();
        let denial = match decision.outcome {
            Outcome::Forward(forward) => {
                let priced = priced(decision.charge.as_ref());
                self.pending = decision.charge;
                return envoy::allow(forward, in_body_phase, decision.rate, priced);
            }
            Outcome::Deny(denial) => denial,
            Outcome::NeedBody => unreachable!("replaced above"),
        };
        envoy::deny(&denial, request_id)
    }
}
