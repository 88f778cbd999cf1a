//! The protobuf edge: Envoy's ext_proc messages in, plain pipeline types out, and back.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse,
    processing_response::Response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;

use crate::denial::Denial;
use crate::mutate::Forward;

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

/// Continue with the mutations, and have Envoy pick the route again: the cluster header
/// and authority changed.
pub fn allow(forward: Forward) -> ProcessingResponse {
    let mutation = HeaderMutation {
        set_headers: forward
            .set
            .into_iter()
            .map(|(k, v)| set_header(&k, v))
            .collect(),
        remove_headers: forward.remove,
    };
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(mutation),
                clear_route_cache: true,
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

/// The JSON denial, answered by Envoy without contacting the upstream.
pub fn deny(denial: &Denial, request_id: &str) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(denial.http_status()),
            }),
            headers: Some(HeaderMutation {
                set_headers: vec![
                    set_header("content-type", b"application/json".to_vec()),
                    set_header("x-latchkey-decision", denial.kind().as_bytes().to_vec()),
                ],
                remove_headers: Vec::new(),
            }),
            body: denial.body(request_id),
            details: format!("latchkey_{}", denial.kind()),
            ..Default::default()
        })),
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
