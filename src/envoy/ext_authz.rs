//! Envoy's ext_authz (`envoy.service.auth.v3.Authorization/Check`): one call per request,
//! headers only, for setups that prefer it to ext_proc. The same pipeline decides; a
//! proxy that needs more than headers (rules on the body, a cost read from responses)
//! is refused here rather than half-enforced.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use crate::base::clock::now_unix_ms;
use crate::base::trace::TraceParent;
use crate::dataplane::admission::{Asked, conclude};
use crate::dataplane::denial::Denial;
use crate::dataplane::mint;
use crate::dataplane::pipeline::{Judgement, Outcome, RequestView, Subject};
use crate::dataplane::rules::Body;
use crate::dataplane::shared::Shared;
use crate::dataplane::snapshot::ExtProcOnly;
use crate::envoy::convert;

pub struct ExtAuthz {
    shared: Arc<Shared>,
}

impl ExtAuthz {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let check = request.into_inner();
        let http = check
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .ok_or_else(|| Status::invalid_argument("no HTTP request in the check"))?;
        // `header_map` (encode_raw_headers) keeps repeated headers apart; else the map.
        let pairs: Vec<(&str, &[u8])> = match &http.header_map {
            Some(map) => convert::header_pairs(Some(map)),
            None => http
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_bytes()))
                .collect(),
        };
        // `http.id` is Envoy's stream id; the access log joins on x-request-id.
        let request_id = convert::request_id(&pairs);
        let no_body = has_no_body(&pairs, &http.protocol);
        if mint::is_own(&http.path) {
            // A mint's body comes only with `with_request_body`; without it, only a
            // bodiless mint (the maxima) can be answered.
            let body = match (no_body, http.raw_body.is_empty() && http.body.is_empty()) {
                (true, _) => Ok(&[][..]),
                (false, false) if http.raw_body.is_empty() => Ok(http.body.as_bytes()),
                (false, false) => Ok(http.raw_body.as_slice()),
                (false, true) => Err(Denial::NeedsExtProc {
                    proxy: mint::RESERVED.into(),
                    why: "a mint's body is not sent to ext_authz",
                }),
            };
            let answer = match body {
                Ok(body) => {
                    let req = RequestView {
                        method: &http.method,
                        path: &http.path,
                        headers: &pairs,
                        body: Some(body),
                    };
                    self.shared.answer_own(&req).await
                }
                Err(denial) => Err(denial),
            };
            return Ok(Response::new(match answer {
                Ok(body) => convert::check_answer(201, body),
                Err(denial) => convert::check_deny(&denial, &request_id),
            }));
        }
        let view = RequestView {
            method: &http.method,
            path: &http.path,
            headers: &pairs,
            body: no_body.then_some(&[][..]),
        };
        let body = if no_body {
            Body::Empty
        } else {
            // Not sent to ext_authz: a rule (or signature) that would read it cannot.
            Body::Unread
        };
        // What only ext_proc can enforce is refused, never half-judged.
        let needs_ext_proc = |subject: &Subject, need: ExtProcOnly| {
            Outcome::Deny(Denial::NeedsExtProc {
                proxy: subject.proxy.clone().unwrap_or_default(),
                why: need.why(),
            })
        };
        let policy = self.shared.policy.load();
        let judgement = self
            .shared
            .decide(&policy, &view, &body, now_unix_ms())
            .await;
        let mut decision = match judgement {
            Judgement::NeedBody(mut found) => {
                found.charge = None;
                let signs = (found.subject.proxy.as_deref())
                    .and_then(|name| policy.proxy(name))
                    .is_some_and(|p| p.injection.signs_body());
                let need = if signs {
                    ExtProcOnly::SignsBody
                } else {
                    ExtProcOnly::ReadsBody
                };
                let outcome = needs_ext_proc(&found.subject, need);
                found.decided(outcome)
            }
            Judgement::Decided(mut decision) => {
                let need = match (&decision.outcome, &decision.charge, &decision.guard) {
                    (Outcome::Forward(_), Some(_), _) => Some(ExtProcOnly::PricedFromResponse),
                    (Outcome::Forward(_), _, Some(_)) => Some(ExtProcOnly::GuardsResponse),
                    _ => None,
                };
                if let Some(need) = need {
                    decision.charge = None;
                    decision.outcome = needs_ext_proc(&decision.subject, need);
                }
                decision
            }
        };
        drop(policy);
        let asked = Asked {
            request_id: &request_id,
            method: &http.method,
            path: &http.path,
            trace: (http.headers.get("traceparent")).and_then(|v| TraceParent::parse(v.as_bytes())),
        };
        conclude(&self.shared, &mut decision, &asked, started).await;
        Ok(Response::new(match decision.outcome {
            Outcome::Forward(forward) => convert::check_allow(forward, decision.shown),
            Outcome::Deny(denial) => convert::check_deny(&denial, &request_id),
        }))
    }
}

/// Whether the request certainly has no body. ext_authz does not say; HTTP/1.1 does:
/// without `content-length` or `transfer-encoding` there is none. HTTP/2 may end the
/// stream without either, so only an explicit zero length counts there.
fn has_no_body(pairs: &[(&str, &[u8])], protocol: &str) -> bool {
    let length = convert::header_value(pairs, "content-length");
    if length.is_some_and(|v| v.trim_ascii() == b"0") {
        return true;
    }
    protocol.starts_with("HTTP/1")
        && length.is_none()
        && convert::header_value(pairs, "transfer-encoding").is_none()
}

#[cfg(test)]
mod tests {
    use super::has_no_body;

    #[test]
    fn a_body_is_assumed_unless_the_request_rules_it_out() {
        assert!(has_no_body(&[], "HTTP/1.1"));
        assert!(has_no_body(&[("content-length", b"0")], "HTTP/2"));
        assert!(!has_no_body(&[], "HTTP/2"));
        assert!(!has_no_body(&[("content-length", b"12")], "HTTP/1.1"));
        assert!(!has_no_body(
            &[("transfer-encoding", b"chunked")],
            "HTTP/1.1"
        ));
    }
}
