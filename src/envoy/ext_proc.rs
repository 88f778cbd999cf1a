//! The ext_proc stream loop: receive, dispatch by phase, send. Decisions live in
//! `pipeline`; conversions in `envoy`. One stream carries one HTTP request.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Status, Streaming};
use zeroize::Zeroizing;

use crate::base::clock::now_unix_ms;
use crate::base::money;
use crate::base::trace::TraceParent;
use crate::dataplane::admission::{Asked, conclude};
use crate::dataplane::denial::Denial;
use crate::dataplane::mint;
use crate::dataplane::pipeline::{Charge, Decision, Judgement, Outcome, RequestView};
use crate::dataplane::redact::Guard;
use crate::dataplane::rules::{Body, is_json_media_type};
use crate::dataplane::shared::Shared;
use crate::dataplane::snapshot::CostSpec;
use crate::dataplane::spend::Settlement;
use crate::dataplane::usage::Meter;
use crate::envoy::convert;
use crate::envoy::convert::ResponseRead;
use crate::telemetry::audit::{Event, Llm};

/// The most request body latchkey reads to judge it; larger bodies are refused (413).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// The most body a request for latchkey itself may have.
const MAX_OWN_BODY: usize = 4096;

/// The most response body Envoy buffers for a price (its default buffer limit).
const MAX_PRICED_BODY: usize = 1 << 20;

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
            meter: None,
            guarded: None,
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
    /// A token-priced answer's usage, read as it passes.
    meter: Option<Meter>,
    /// A guarded proxy's response checks, until its response has passed them.
    guarded: Option<Guarded>,
}

struct Guarded {
    guard: Arc<Guard>,
    proxy: Arc<str>,
    /// The credential fetched for this request (OAuth2), scrubbed like the secret.
    token: Option<Zeroizing<Vec<u8>>>,
}

impl Drop for Exchange {
    /// A request whose response was never judged (the caller hung up, the upstream
    /// reset mid-body) may still have cost the vendor's price: it is charged as a
    /// response that cannot be priced.
    fn drop(&mut self) {
        if let Some(charge) = self.pending.take() {
            let shared = self.shared.clone();
            let request_id = std::mem::take(&mut self.request_id);
            let settlement = unpriced(&shared, &charge, "no response was read");
            tokio::spawn(async move {
                settle_now(&shared, &request_id, charge, settlement, None).await
            });
        }
    }
}

/// What a response that cannot be priced is charged: its whole reservation or, where
/// nothing was reserved (no `max_usd_per_request`), its accounts are closed.
fn unpriced(shared: &Shared, charge: &Charge, why: &str) -> Settlement {
    let (settlement, outcome) = if charge.reserved > 0 {
        (Settlement::Charge(charge.reserved), "unpriced")
    } else {
        (Settlement::Close, "closed")
    };
    tracing::warn!(proxy = %charge.proxy, key_id = %charge.key_id, why, ?settlement,
        "a priced response could not be priced");
    shared
        .metrics
        .record_pricing_exception(&charge.proxy, outcome);
    settlement
}

/// Ends a reservation (with the tokens an LLM answer reported, if any) on a task of its
/// own that this request waits for: the cost is still recorded before latchkey answers
/// Envoy, and if Envoy resets the stream meanwhile (a message timeout while Redis is
/// slow), the settlement is not dropped halfway, which would hold one of the key's
/// in-flight places for good.
async fn settle(
    shared: &Arc<Shared>,
    request_id: &str,
    charge: Charge,
    settlement: Settlement,
    llm: Option<Llm>,
) {
    let shared = shared.clone();
    let request_id = request_id.to_owned();
    let settling =
        tokio::spawn(
            async move { settle_now(&shared, &request_id, charge, settlement, llm).await },
        );
    if let Err(e) = settling.await {
        tracing::error!(error = %e, "settling a charge failed");
    }
}

/// The settlement itself: the accounts, then the audit's record of the cost.
async fn settle_now(
    shared: &Shared,
    request_id: &str,
    charge: Charge,
    settlement: Settlement,
    llm: Option<Llm>,
) {
    if let Settlement::Charge(actual) = settlement
        && charge.reserved > 0
        && actual > charge.reserved
    {
        tracing::warn!(proxy = %charge.proxy, key_id = %charge.key_id, actual,
            reserved = charge.reserved, "a response cost more than was reserved; charged in full");
        shared
            .metrics
            .record_pricing_exception(&charge.proxy, "over_reservation");
    }
    let tokens = llm.as_ref().map_or(0, |l| l.usage.total());
    let micros = match shared
        .spend
        .settle(&charge.accounts, charge.reserved, settlement, tokens)
        .await
    {
        Ok(micros) => micros,
        Err(e) => {
            tracing::error!(error = %e, key_id = %charge.key_id, "could not settle a charge");
            return;
        }
    };
    if let Some(llm) = &llm {
        shared.metrics.record_llm(&charge.proxy, llm, micros);
    }
    if micros > 0 || llm.is_some() {
        shared
            .audit
            .record(Event::Charged {
                request_id: request_id.to_owned(),
                started_ms: charge.decided_ms,
                key_id: charge.key_id,
                micros,
                llm,
                trace: charge.trace,
            })
            .await;
    }
}

/// Whether a response has a body latchkey can read as it is: not none, not compressed.
fn unencoded_body(pairs: &[(&str, &[u8])], end_of_stream: bool) -> Result<(), &'static str> {
    let encoding = convert::header_value(pairs, "content-encoding").unwrap_or_default();
    if end_of_stream {
        Err("the response has no body")
    } else if !encoding.is_empty() && !encoding.eq_ignore_ascii_case(b"identity") {
        Err("the response is compressed")
    } else {
        Ok(())
    }
}

/// Why a response's headers show its body cannot be priced at a JSON pointer, if they do.
fn unreadable_body(pairs: &[(&str, &[u8])], end_of_stream: bool) -> Option<&'static str> {
    let header = |name| convert::header_value(pairs, name).unwrap_or_default();
    let too_large = std::str::from_utf8(header("content-length"))
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_PRICED_BODY);
    if let Err(why) = unencoded_body(pairs, end_of_stream) {
        Some(why)
    } else if !is_json_media_type(header("content-type")) {
        Some("the response is not JSON (a stream?)")
    } else if too_large {
        Some("the response is larger than the buffer")
    } else {
        None
    }
}

/// How much of the response this request's price and guard need to see.
fn reads(charge: Option<&Charge>, guarded: bool) -> ResponseRead {
    let priced = match charge.map(|c| &*c.cost) {
        None => ResponseRead::Nothing,
        Some(CostSpec::PerRequest(_)) => ResponseRead::Status,
        Some(CostSpec::ResponseJson { .. }) => ResponseRead::BodyStart,
        Some(CostSpec::Tokens { .. }) => ResponseRead::Stream,
    };
    if guarded {
        ResponseRead::WholeBody
    } else {
        priced
    }
}

struct HeldHeaders {
    headers: Vec<(String, Vec<u8>)>,
    /// For latchkey itself (`mint`), not for a proxy.
    own: bool,
}

impl HeldHeaders {
    fn of(pairs: &[(&str, &[u8])], own: bool) -> Self {
        let headers = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect();
        Self { headers, own }
    }
}

impl Exchange {
    async fn handle(&mut self, message: ProcessingRequest) -> ProcessingResponse {
        match message.request {
            Some(Phase::RequestHeaders(headers)) => self.request_headers(&headers).await,
            Some(Phase::RequestBody(body)) => self.request_body(&body).await,
            Some(Phase::ResponseHeaders(headers)) => self.response_headers(&headers).await,
            Some(Phase::ResponseBody(body)) => self.response_body(&body).await,
            Some(Phase::RequestTrailers(_)) => {
                convert::pass(Response::RequestTrailers(TrailersResponse::default()))
            }
            Some(Phase::ResponseTrailers(_)) => {
                convert::pass(Response::ResponseTrailers(TrailersResponse::default()))
            }
            None => ProcessingResponse::default(),
        }
    }

    async fn request_headers(&mut self, headers: &HttpHeaders) -> ProcessingResponse {
        let started = Instant::now();
        let pairs = convert::header_pairs(headers.headers.as_ref());
        self.request_id = convert::request_id(&pairs);
        if mint::is_own(convert::header_text(&pairs, ":path")) {
            if headers.end_of_stream {
                return self.own(&pairs, b"").await;
            }
            self.held = Some(HeldHeaders::of(&pairs, true));
            return convert::need_body(ResponseRead::Nothing, None);
        }
        let (body, raw) = if headers.end_of_stream {
            (Body::Empty, Some(&[][..]))
        } else {
            (Body::Unread, None)
        };
        let found = match self.decide(&pairs, &body, raw).await {
            Judgement::Decided(decision) => {
                return self.respond(&pairs, decision, started, false).await;
            }
            Judgement::NeedBody(found) => found,
        };
        self.held = Some(HeldHeaders::of(&pairs, false));
        let policy = self.shared.policy.load();
        let cluster = (found.subject.proxy.as_deref())
            .and_then(|name| policy.proxy(name))
            .map(|proxy| proxy.upstream.cluster);
        convert::need_body(reads(found.charge.as_ref(), found.guard.is_some()), cluster)
    }

    async fn request_body(&mut self, chunk: &HttpBody) -> ProcessingResponse {
        let started = Instant::now();
        let Some(held) = self.held.take() else {
            // A body latchkey did not ask for: nothing to judge.
            return convert::pass(Response::RequestBody(BodyResponse::default()));
        };
        let pairs: Vec<(&str, &[u8])> = held
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        if held.own {
            if !chunk.end_of_stream || chunk.body.len() > MAX_OWN_BODY {
                let denial = Denial::BodyTooLarge(MAX_OWN_BODY);
                return convert::deny(&denial, &self.request_id);
            }
            return self.own(&pairs, &chunk.body).await;
        }
        let (body, raw) = if !chunk.end_of_stream || chunk.body.len() > MAX_REQUEST_BODY {
            (Body::TooLarge(MAX_REQUEST_BODY), None)
        } else {
            let content_type = convert::header_value(&pairs, "content-type");
            (
                Body::parse(&chunk.body, content_type),
                Some(chunk.body.as_slice()),
            )
        };
        let decision = match self.decide(&pairs, &body, raw).await {
            Judgement::Decided(decision) => decision,
            // Asked for only with the body unread; here it has been read.
            Judgement::NeedBody(found) => {
                found.decided(Outcome::Deny(Denial::BodyTooLarge(MAX_REQUEST_BODY)))
            }
        };
        self.respond(&pairs, decision, started, true).await
    }

    async fn response_headers(&mut self, headers: &HttpHeaders) -> ProcessingResponse {
        let pairs = convert::header_pairs(headers.headers.as_ref());
        self.price_by_status(&pairs, headers.end_of_stream).await;
        let Some(guarded) = &self.guarded else {
            // Priced already, or never: the body streams past without latchkey.
            return convert::response_passes(self.pending.is_none());
        };
        let encoding = convert::header_value(&pairs, "content-encoding").unwrap_or(b"identity");
        if !encoding.eq_ignore_ascii_case(b"identity") && !headers.end_of_stream {
            // Asked for uncompressed; a compressed body cannot be checked, so it stops.
            tracing::warn!(proxy = %guarded.proxy, request_id = %self.request_id,
                "a guarded proxy's upstream answered compressed; refused");
            self.guarded = None;
            return convert::deny(
                &Denial::ResponseUnreadable("compressed by the upstream"),
                &self.request_id,
            );
        }
        let token = guarded.token.as_ref().map(|t| t.as_slice());
        let scrubbed: Vec<Option<(Vec<u8>, usize)>> = pairs
            .iter()
            .map(|(name, value)| {
                (!name.starts_with(':'))
                    .then(|| guarded.guard.scrub(value, token))
                    .flatten()
            })
            .collect();
        let echoes: usize = scrubbed.iter().flatten().map(|(_, n)| n).sum();
        // A header with an echo in any of its values is set again whole, in order.
        let echoed: HashSet<&str> = pairs
            .iter()
            .zip(&scrubbed)
            .filter(|(_, s)| s.is_some())
            .map(|((name, _), _)| *name)
            .collect();
        let mut replaced: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
        for ((name, value), scrubbed) in pairs.iter().zip(scrubbed) {
            if !echoed.contains(name) {
                continue;
            }
            let value = scrubbed.map_or_else(|| value.to_vec(), |(v, _)| v);
            match replaced.iter_mut().find(|(n, _)| n == name) {
                Some((_, values)) => values.push(value),
                None => replaced.push(((*name).to_owned(), vec![value])),
            }
        }
        if echoes > 0 {
            self.echoed(echoes, "response headers");
        }
        convert::response_headers(replaced, !headers.end_of_stream)
    }

    /// Logs and counts echoes of the credential, never the credential.
    fn echoed(&self, count: usize, place: &str) {
        let Some(guarded) = &self.guarded else {
            return;
        };
        tracing::warn!(proxy = %guarded.proxy, request_id = %self.request_id, count, place,
            "the upstream echoed the credential; scrubbed");
        self.shared
            .metrics
            .record_response_safety(&guarded.proxy, count, 0);
    }

    /// A priced request's response headers: a failure is charged nothing, a fixed price
    /// is charged now, a price in the body waits for the body — unless the headers
    /// already say it cannot be read there (compressed, not JSON, too large, no body).
    async fn price_by_status(&mut self, pairs: &[(&str, &[u8])], end_of_stream: bool) {
        let Some(charge) = self.pending.take() else {
            return;
        };
        let status = convert::header_value(pairs, ":status").unwrap_or_default();
        let success = status.starts_with(b"2");
        // Envoy's own 504 (its route timeout) or a 408: the vendor may have done the work
        // all the same, so the call is paid for. Other failures cost nothing.
        let timed_out = status == b"408"
            || (status == b"504"
                && convert::header_value(pairs, "x-envoy-upstream-service-time").is_none());
        let settlement = match (&*charge.cost, success) {
            (_, false) if timed_out => unpriced(&self.shared, &charge, "the call timed out"),
            (_, false) => Settlement::Charge(0),
            (CostSpec::PerRequest(micros), true) => Settlement::Charge(*micros),
            (CostSpec::ResponseJson { .. }, true) => match unreadable_body(pairs, end_of_stream) {
                Some(why) => unpriced(&self.shared, &charge, why),
                None => {
                    self.pending = Some(charge);
                    return;
                }
            },
            (CostSpec::Tokens { vendor, .. }, true) => {
                let meter = unencoded_body(pairs, end_of_stream).and_then(|()| {
                    let content_type = convert::header_value(pairs, "content-type");
                    Meter::for_content_type(*vendor, content_type.unwrap_or_default())
                        .ok_or("the answer is neither JSON nor an event stream")
                });
                match meter {
                    Ok(meter) => {
                        self.meter = Some(meter);
                        self.pending = Some(charge);
                        return;
                    }
                    Err(why) => unpriced(&self.shared, &charge, why),
                }
            }
        };
        settle(&self.shared, &self.request_id, charge, settlement, None).await;
    }

    async fn response_body(&mut self, chunk: &HttpBody) -> ProcessingResponse {
        match &mut self.meter {
            Some(meter) => {
                meter.feed(&chunk.body);
                if chunk.end_of_stream {
                    self.price_by_usage().await;
                }
            }
            None => self.price_by_body(chunk).await,
        }
        let Some(guarded) = &self.guarded else {
            return convert::pass(Response::ResponseBody(BodyResponse::default()));
        };
        let scrubbed = guarded
            .guard
            .scrub(&chunk.body, guarded.token.as_ref().map(|t| t.as_slice()));
        let (echoes, body) = match scrubbed {
            Some((body, n)) => (n, Some(body)),
            None => (0, None),
        };
        let Ok(redacted) = guarded.guard.redact(body.as_deref().unwrap_or(&chunk.body)) else {
            tracing::warn!(proxy = %guarded.proxy, request_id = %self.request_id,
                "a response to redact looks like JSON but does not parse; refused");
            return convert::deny(
                &Denial::ResponseUnreadable("JSON that could not be parsed to redact"),
                &self.request_id,
            );
        };
        let (fields, body) = match redacted {
            Some((body, n)) => (n, Some(body)),
            None => (0, body),
        };
        if echoes > 0 {
            self.echoed(echoes, "response body");
        }
        if fields > 0 {
            self.shared
                .metrics
                .record_response_safety(&guarded.proxy, 0, fields);
        }
        match body {
            Some(body) => convert::replace_body(body),
            None => convert::pass(Response::ResponseBody(BodyResponse::default())),
        }
    }

    async fn price_by_body(&mut self, chunk: &HttpBody) {
        let Some(charge) = self.pending.take() else {
            return;
        };
        let settlement = if !chunk.end_of_stream {
            // Envoy sends what it could buffer: the body is larger than that.
            unpriced(
                &self.shared,
                &charge,
                "the response is larger than the buffer",
            )
        } else {
            match charge.cost.price(&chunk.body) {
                Some(micros) => Settlement::Charge(micros),
                None => unpriced(&self.shared, &charge, "the response did not say its price"),
            }
        };
        settle(&self.shared, &self.request_id, charge, settlement, None).await;
    }

    /// A token-priced answer has ended: its usage, priced by the request's model.
    async fn price_by_usage(&mut self) {
        let (Some(charge), Some(meter)) = (self.pending.take(), self.meter.take()) else {
            return;
        };
        let CostSpec::Tokens { vendor, prices, .. } = &*charge.cost else {
            return;
        };
        let usage = meter.finish();
        let entry = prices.lookup(charge.model.as_deref());
        let settlement = match (usage, entry) {
            (Some(usage), Some((_, price))) => Settlement::Charge(money::price(&usage, price)),
            (Some(_), None) => unpriced(&self.shared, &charge, "no price for the model"),
            (None, _) => unpriced(&self.shared, &charge, "the answer did not report its usage"),
        };
        let llm = usage.map(|usage| Llm {
            model: charge.model.clone(),
            priced_as: entry.map(|(name, _)| Arc::from(name)),
            vendor: *vendor,
            usage,
        });
        settle(&self.shared, &self.request_id, charge, settlement, llm).await;
    }

    async fn decide(&self, pairs: &[(&str, &[u8])], body: &Body, raw: Option<&[u8]>) -> Judgement {
        let view = RequestView {
            method: convert::header_text(pairs, ":method"),
            path: convert::header_text(pairs, ":path"),
            headers: pairs,
            body: raw,
        };
        let policy = self.shared.policy.load_full();
        self.shared
            .decide(&policy, &view, body, now_unix_ms())
            .await
    }

    /// A request for latchkey itself: a run key minted with a workload token.
    async fn own(&self, pairs: &[(&str, &[u8])], body: &[u8]) -> ProcessingResponse {
        let req = RequestView {
            method: convert::header_text(pairs, ":method"),
            path: convert::header_text(pairs, ":path"),
            headers: pairs,
            body: Some(body),
        };
        match self.shared.answer_own(&req).await {
            Ok(answer) => convert::answer(201, answer),
            Err(denial) => {
                tracing::info!(request_id = %self.request_id, %denial, "run key not minted");
                convert::deny(&denial, &self.request_id)
            }
        }
    }

    async fn respond(
        &mut self,
        pairs: &[(&str, &[u8])],
        mut decision: Decision,
        started: Instant,
        in_body_phase: bool,
    ) -> ProcessingResponse {
        let asked = Asked {
            request_id: &self.request_id,
            method: convert::header_text(pairs, ":method"),
            path: convert::header_text(pairs, ":path"),
            trace: convert::header_value(pairs, "traceparent").and_then(TraceParent::parse),
        };
        conclude(&self.shared, &mut decision, &asked, started).await;
        let request_id = self.request_id.as_str();
        let reads = reads(decision.charge.as_ref(), decision.guard.is_some());
        let denial = match decision.outcome {
            Outcome::Forward(forward) => {
                self.pending = decision.charge;
                if let Some(guard) = decision.guard {
                    // An OAuth2 token is injected per request: scrubbed like a secret.
                    let token = (decision.token.is_some() && guard.scrubs())
                        .then(|| {
                            forward
                                .set
                                .iter()
                                .find(|(k, _)| k == "authorization")
                                .and_then(|(_, v)| v.strip_prefix(b"Bearer "))
                                .map(|t| Zeroizing::new(t.to_vec()))
                        })
                        .flatten();
                    self.guarded = Some(Guarded {
                        guard,
                        proxy: decision.subject.proxy.clone().unwrap_or_default(),
                        token,
                    });
                }
                return convert::allow(forward, in_body_phase, decision.shown, reads);
            }
            Outcome::Deny(denial) => denial,
        };
        match &decision.subject.mcp {
            Some(call) => convert::deny_message(&denial, request_id, call),
            None => convert::deny(&denial, request_id),
        }
    }
}

#[cfg(test)]
mod tests;
