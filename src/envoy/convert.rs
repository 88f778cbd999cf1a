//! Envoy's protobuf in, plain pipeline types out, and back.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, body_mutation, processing_response::Response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use envoy_types::pb::google::rpc;

use crate::dataplane::denial::Denial;
use crate::dataplane::mcp::Call;
use crate::dataplane::mutate::{CLUSTER_HEADER, Forward};
use crate::dataplane::pipeline::Shown;

/// Borrowed `(name, value)` pairs of an Envoy header map. Envoy sends `raw_value`; older
/// versions sent `value`.
pub fn header_pairs(map: Option<&HeaderMap>) -> Vec<(&str, &[u8])> {
    map.map(|m| m.headers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|h| {
            let value = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                h.raw_value.as_slice()
            };
            (h.key.as_str(), value)
        })
        .collect()
}

pub fn header_value<'a>(headers: &[(&str, &'a [u8])], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// A header's value as text; empty if absent or not UTF-8.
pub fn header_text<'a>(headers: &[(&str, &'a [u8])], name: &str) -> &'a str {
    header_value(headers, name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default()
}

/// Envoy's `x-request-id`, the audit's join key; one of latchkey's own if it sent none
/// (or an unreasonable one).
pub fn request_id(headers: &[(&str, &[u8])]) -> String {
    match header_value(headers, "x-request-id") {
        Some(id) if !id.is_empty() && id.len() <= 128 => String::from_utf8_lossy(id).into_owned(),
        _ => crate::base::crypto::random_id("req"),
    }
}

/// ext_proc reads mutations from `raw_value` only: a header given in `value` alone is
/// silently dropped.
fn set_header(key: &str, value: Vec<u8>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// ext_authz reads `value`, ext_proc `raw_value`: set both, so either works.
fn set_header_text(key: &str, value: Vec<u8>) -> HeaderValueOption {
    let mut option = set_header(key, value);
    if let Some(h) = option.header.as_mut() {
        h.value = String::from_utf8_lossy(&h.raw_value).into_owned();
    }
    option
}

/// ext_authz's yes: the same mutations as ext_proc's, and the rate-limit figures as
/// response headers (ext_authz's metadata lands in another namespace).
pub fn check_allow(forward: Forward, shown: Shown) -> CheckResponse {
    // ext_authz removes after it sets: a name both set and removed would be lost.
    let remove = forward.removals().map(str::to_owned).collect();
    CheckResponse {
        status: Some(rpc::Status::default()),
        http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
            headers: forward
                .set
                .into_iter()
                .map(|(k, v)| set_header_text(&k, v))
                .collect(),
            headers_to_remove: remove,
            response_headers_to_add: shown
                .headers()
                .into_iter()
                .map(|(name, value)| set_header_text(name, value.into_bytes()))
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// ext_authz's no: the same status, headers and JSON body as ext_proc's denial.
pub fn check_deny(denial: &Denial, request_id: &str) -> CheckResponse {
    let headers = denial_headers(denial);
    let headers = headers.into_iter().map(|(k, v)| (k, v.into_bytes()));
    check_reply(denial.http_status(), headers, denial.body(request_id))
}

/// latchkey's own answer through ext_authz (a minted run key).
pub fn check_answer(status: u16, body: Vec<u8>) -> CheckResponse {
    let headers = [
        ("content-type", b"application/json".to_vec()),
        ("cache-control", b"no-store".to_vec()),
    ];
    check_reply(status, headers, body)
}

/// A reply Envoy sends in the upstream's place.
fn check_reply(
    status: u16,
    headers: impl IntoIterator<Item = (&'static str, Vec<u8>)>,
    body: Vec<u8>,
) -> CheckResponse {
    CheckResponse {
        // PERMISSION_DENIED: Envoy answers with the response below, not its own 403.
        status: Some(rpc::Status {
            code: tonic::Code::PermissionDenied as i32,
            ..Default::default()
        }),
        http_response: Some(check_response::HttpResponse::DeniedResponse(
            DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: (headers.into_iter())
                    .map(|(k, v)| set_header_text(k, v))
                    .collect(),
                body: String::from_utf8(body).expect("JSON is UTF-8"),
            },
        )),
        ..Default::default()
    }
}

/// Continue with the mutations, and have Envoy pick the route again: the cluster header
/// and authority changed. In the body phase the headers are still held, so the same
/// mutations apply. The answer marks the request allowed (`latchkey.allowed: "yes"` in
/// the dynamic metadata): the shipped configs route nothing else, so a request ext_proc
/// let pass unanswered (a processor that closed its stream early) goes nowhere.
pub fn allow(
    forward: Forward,
    in_body_phase: bool,
    shown: Shown,
    reads: ResponseRead,
) -> ProcessingResponse {
    let remove_headers = forward.removals().map(str::to_owned).collect();
    let body = forward.body.filter(|_| in_body_phase);
    let mut mutation = HeaderMutation {
        set_headers: forward
            .set
            .into_iter()
            .map(|(k, v)| set_header(&k, v))
            .collect(),
        remove_headers,
    };
    if body.is_some() {
        // The body changes length: Envoy refuses a mutated body that disagrees with the
        // content-length, so the request goes on without one (chunked).
        mutation.remove_headers.push("content-length".to_owned());
    }
    let common = Some(CommonResponse {
        header_mutation: Some(mutation),
        // A new body goes with the body phase only.
        body_mutation: body.map(|body| BodyMutation {
            mutation: Some(body_mutation::Mutation::Body(body)),
        }),
        clear_route_cache: true,
        ..Default::default()
    });
    let response = if in_body_phase {
        Response::RequestBody(BodyResponse { response: common })
    } else {
        Response::RequestHeaders(HeadersResponse { response: common })
    };
    ProcessingResponse {
        response: Some(response),
        dynamic_metadata: Some(metadata(shown)),
        // The mode can change only in answer to the request headers; a request that
        // went through the body phase got its response modes then.
        mode_override: (!in_body_phase && reads != ResponseRead::Nothing)
            .then(|| mode(BodySendMode::None, reads)),
        ..Default::default()
    }
}

/// How much of the response latchkey reads; the most any need of a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ResponseRead {
    #[default]
    Nothing,
    /// The status: a fixed price is charged on success.
    Status,
    /// As much of the body as Envoy buffers: where a price is read.
    BodyStart,
    /// Every chunk as it passes, none held back: where token usage is read.
    Stream,
    /// The whole body, held back until checked: scrubbing and redaction.
    WholeBody,
}

/// A full processing mode: every field set, since a field left at DEFAULT would mean
/// Envoy's default (SEND for response headers), not "as configured".
fn mode(request_body: BodySendMode, reads: ResponseRead) -> ProcessingMode {
    ProcessingMode {
        request_header_mode: HeaderSendMode::Send as i32,
        response_header_mode: if reads == ResponseRead::Nothing {
            HeaderSendMode::Skip
        } else {
            HeaderSendMode::Send
        } as i32,
        request_body_mode: request_body as i32,
        response_body_mode: match reads {
            ResponseRead::Nothing | ResponseRead::Status => BodySendMode::None,
            ResponseRead::BodyStart => BodySendMode::BufferedPartial,
            ResponseRead::Stream => BodySendMode::Streamed,
            ResponseRead::WholeBody => BodySendMode::Buffered,
        } as i32,
        request_trailer_mode: HeaderSendMode::Skip as i32,
        response_trailer_mode: HeaderSendMode::Skip as i32,
    }
}

/// The mark that the request is allowed, and the figures shown to the agent, as dynamic
/// metadata in the `latchkey` namespace: Envoy routes by the first, and its route adds
/// the others to the response as headers, with no extra round trip.
fn metadata(shown: Shown) -> Struct {
    let text = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let allowed = ("allowed".to_owned(), "yes".to_owned());
    let fields = (shown.metadata().into_iter().chain([allowed]))
        .map(|(key, value)| (key, text(value)))
        .collect();
    Struct {
        fields: [(
            "latchkey".to_owned(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields })),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// Hold the headers and send the request body (buffered, up to Envoy's buffer limit):
/// a rule that judges the body decides. Only requests that reach such a rule pay this.
/// The cluster the request would go to is set now: when the body arrives after this
/// answer, Envoy may pick a route before it applies the body phase's answer. That answer
/// (nothing is forwarded without it) carries the allowed mark and clears the route
/// cache, so the route is picked again with the mark
/// (`containment::a_body_that_arrives_after_the_headers_is_judged_and_routed`).
pub fn need_body(reads: ResponseRead, cluster: Option<&'static str>) -> ProcessingResponse {
    let response = cluster.map(|cluster| CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers: vec![set_header(CLUSTER_HEADER, cluster.as_bytes().to_vec())],
            remove_headers: Vec::new(),
        }),
        clear_route_cache: true,
        ..Default::default()
    });
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse { response })),
        mode_override: Some(mode(BodySendMode::BufferedPartial, reads)),
        ..Default::default()
    }
}

/// The JSON denial, answered by Envoy without contacting the upstream.
pub fn deny(denial: &Denial, request_id: &str) -> ProcessingResponse {
    deny_with(denial, denial.body(request_id))
}

/// The denial of an MCP message, as the JSON-RPC error its client raises.
pub fn deny_message(denial: &Denial, request_id: &str, call: &Call) -> ProcessingResponse {
    deny_with(denial, denial.rpc_body(request_id, call.id.as_ref()))
}

fn deny_with(denial: &Denial, body: Vec<u8>) -> ProcessingResponse {
    let headers = denial_headers(denial);
    let headers = headers.into_iter().map(|(k, v)| (k, v.into_bytes()));
    immediate(
        denial.http_status(),
        headers,
        body,
        format!("latchkey_{}", denial.kind()),
    )
}

/// An answer Envoy sends in the upstream's place, without contacting it.
fn immediate(
    status: u16,
    headers: impl IntoIterator<Item = (&'static str, Vec<u8>)>,
    body: Vec<u8>,
    details: String,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers: (headers.into_iter())
                    .map(|(k, v)| set_header(k, v))
                    .collect(),
                remove_headers: Vec::new(),
            }),
            body,
            details,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// latchkey's own answer to a request for latchkey (a minted run key): JSON, never
/// cached, never forwarded.
pub fn answer(status: u16, body: Vec<u8>) -> ProcessingResponse {
    let headers = [
        ("content-type", b"application/json".to_vec()),
        ("cache-control", b"no-store".to_vec()),
    ];
    immediate(status, headers, body, "latchkey_answered".into())
}

/// The headers every denial carries, whichever API answers it.
pub(crate) fn denial_headers(denial: &Denial) -> Vec<(&'static str, String)> {
    [
        Some(("content-type", "application/json".to_owned())),
        Some(("x-latchkey-decision", denial.kind().to_string())),
        denial.retry_after().map(|s| ("retry-after", s.to_string())),
        match denial {
            Denial::RateLimited { limit, .. } => Some(("x-ratelimit-limit", limit.to_string())),
            _ => None,
        },
        matches!(denial, Denial::RateLimited { .. })
            .then(|| ("x-ratelimit-remaining", "0".to_owned())),
        denial
            .permanent()
            .then(|| ("x-should-retry", "false".to_owned())),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The response headers, with echoed secrets replaced: each `(name, values)` replaces
/// every value of that header. `drop_length`: the body may change size.
pub fn response_headers(
    replaced: Vec<(String, Vec<Vec<u8>>)>,
    drop_length: bool,
) -> ProcessingResponse {
    let mut mutation = HeaderMutation::default();
    for (name, values) in replaced {
        for value in values {
            let mut option = set_header(&name, value);
            option.append_action = HeaderAppendAction::AppendIfExistsOrAdd as i32;
            // ext_proc reads the deprecated `append` flag, not `append_action`, here.
            #[allow(deprecated)]
            {
                option.append = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
            }
            mutation.set_headers.push(option);
        }
        mutation.remove_headers.push(name);
    }
    if drop_length {
        mutation.remove_headers.push("content-length".to_owned());
    }
    pass(Response::ResponseHeaders(HeadersResponse {
        response: Some(CommonResponse {
            header_mutation: Some(mutation),
            ..Default::default()
        }),
    }))
}

/// The response body, replaced.
pub fn replace_body(body: Vec<u8>) -> ProcessingResponse {
    pass(Response::ResponseBody(BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(body)),
            }),
            ..Default::default()
        }),
    }))
}

/// The response headers pass unchanged; with `body_done`, latchkey needs nothing more
/// of this response, so Envoy streams its body past (a stream is never held back).
pub fn response_passes(body_done: bool) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse::default())),
        mode_override: body_done.then(|| mode(BodySendMode::None, ResponseRead::Status)),
        ..Default::default()
    }
}

/// "Carry on unchanged" for a phase latchkey has nothing to do in.
pub fn pass(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `latchkey` namespace's strings in an answer's dynamic metadata.
    fn marks(response: &ProcessingResponse) -> Vec<(String, String)> {
        let Some(Kind::StructValue(ours)) = (response.dynamic_metadata.as_ref())
            .and_then(|m| m.fields.get("latchkey"))
            .and_then(|v| v.kind.clone())
        else {
            return Vec::new();
        };
        let mut out: Vec<_> = (ours.fields.into_iter())
            .filter_map(|(k, v)| match v.kind {
                Some(Kind::StringValue(s)) => Some((k, s)),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn an_allowed_request_is_marked_for_its_route() {
        let owned = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let shown = Shown {
            rate: Some((6, 5)),
            budget_left_usd: None,
        };
        let limited = allow(Forward::default(), false, shown, ResponseRead::Nothing);
        assert_eq!(
            marks(&limited),
            [
                owned("allowed", "yes"),
                owned("ratelimit_limit", "6"),
                owned("ratelimit_remaining", "5")
            ]
        );
        let plain = allow(
            Forward::default(),
            true,
            Shown::default(),
            ResponseRead::Nothing,
        );
        assert_eq!(marks(&plain), [owned("allowed", "yes")]);
    }
}
