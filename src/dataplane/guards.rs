//! Runaway guards: the duplicate side-effect guard's fingerprint of a request, and the
//! `Idempotency-Key` derived from it. A request is "the same" when the same caller sends
//! the same method, path, query, `Idempotency-Key` and body to the same proxy: a
//! different `Idempotency-Key` makes it another request, as vendors read it.

use sha2::{Digest, Sha256};

use crate::dataplane::request::RequestView;
use crate::dataplane::route::Route;

/// A guarded request's fingerprint, and how long a repeat of it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duplicate {
    pub fingerprint: [u8; 32],
    pub window_ms: u64,
}

/// The values of `name`, in order, joined: a header sent twice is not the same request as
/// one sent once.
fn values<'a>(req: &'a RequestView<'_>, name: &str) -> Vec<&'a [u8]> {
    (req.headers.iter())
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
        .collect()
}

/// Whether the agent sent an `Idempotency-Key` of its own.
pub fn has_idempotency_key(req: &RequestView<'_>) -> bool {
    !values(req, "idempotency-key").is_empty()
}

/// Headers that change from one sending of a request to the next without changing what
/// it asks (tracing, transport, the proxy key's carriers): left out of an approval's
/// fingerprint, which holds every other header.
const INCIDENTAL: [&str; 22] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "user-agent",
    "date",
    "content-length",
    "connection",
    "keep-alive",
    "te",
    "accept",
    "accept-encoding",
    "accept-language",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-latchkey-key",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-real-ip",
];

/// What makes a request the same as another: proxy, caller (key id or credential),
/// method, path, query, `Idempotency-Key` and the body's hash, each length-prefixed so no
/// two different requests frame into the same bytes. With `all_headers` (an approval,
/// which a person gave for exactly what they saw), every header but the incidental ones
/// too: an agent cannot swap `Stripe-Account` after the fact.
pub fn fingerprint(
    proxy: &str,
    caller: &str,
    req: &RequestView<'_>,
    route: &Route<'_>,
    body: &[u8],
    all_headers: bool,
) -> [u8; 32] {
    let mut hash = Sha256::new();
    let body_hash = Sha256::digest(body);
    let method = req.method.to_ascii_uppercase();
    let keys = values(req, "idempotency-key");
    let parts: [&[u8]; 6] = [
        proxy.as_bytes(),
        caller.as_bytes(),
        method.as_bytes(),
        route.path.as_bytes(),
        route.query.unwrap_or_default().as_bytes(),
        &body_hash,
    ];
    let mut others: Vec<(String, &[u8])> = Vec::new();
    if all_headers {
        others = (req.headers.iter())
            .map(|(n, v)| (n.to_ascii_lowercase(), *v))
            .filter(|(n, _)| {
                !n.starts_with(':')
                    && !n.starts_with("x-envoy-")
                    && n != "idempotency-key"
                    && !INCIDENTAL.contains(&n.as_str())
            })
            .collect();
        // Sorted by name, each name's values in the order sent.
        others.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let named = others.iter().flat_map(|(n, v)| [n.as_bytes(), *v]);
    for part in parts.into_iter().chain(keys).chain(named) {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

/// The `Idempotency-Key` latchkey gives a request that has none: the same request in the
/// same `window_ms` slot gets the same key, so the vendor deduplicates retries that reach
/// it, and a deliberate repeat after the window is a new charge, not a replayed answer.
pub fn idempotency_key(fingerprint: &[u8; 32], now_ms: i64, window_ms: u64) -> Vec<u8> {
    let slot = now_ms.max(0) as u64 / window_ms.max(1);
    let mut hash = Sha256::new();
    hash.update(fingerprint);
    hash.update(slot.to_be_bytes());
    let hex: String = hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("lk_{hex}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::route::route;

    fn print(method: &str, path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> [u8; 32] {
        let req = RequestView {
            method,
            path,
            headers,
            body: Some(body),
        };
        fingerprint("stripe", "key_1", &req, &route(path).unwrap(), body, false)
    }

    #[test]
    fn the_same_request_is_the_same_and_any_difference_is_not() {
        let base = print("POST", "/stripe/v1/charges", &[], b"amount=100");
        assert_eq!(
            base,
            print("post", "/stripe/v1/charges", &[], b"amount=100")
        );
        let others = [
            print("PATCH", "/stripe/v1/charges", &[], b"amount=100"),
            print("POST", "/stripe/v1/refunds", &[], b"amount=100"),
            print("POST", "/stripe/v1/charges?x=1", &[], b"amount=100"),
            print("POST", "/stripe/v1/charges", &[], b"amount=101"),
            print(
                "POST",
                "/stripe/v1/charges",
                &[("idempotency-key", b"a")],
                b"amount=100",
            ),
            print(
                "POST",
                "/stripe/v1/charges",
                &[("idempotency-key", b"a"), ("idempotency-key", b"a")],
                b"amount=100",
            ),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(base, *other, "{i}");
        }
        assert_ne!(others[4], others[5], "a key sent twice differs from once");
        assert_eq!(idempotency_key(&base, 0, 60_000).len(), 35);
        assert_eq!(
            idempotency_key(&base, 1, 60_000),
            idempotency_key(&base, 59_999, 60_000)
        );
        assert_ne!(
            idempotency_key(&base, 0, 60_000),
            idempotency_key(&base, 60_000, 60_000)
        );

        // An approval's fingerprint also holds the headers that change what is asked.
        let with = |headers: &[(&str, &[u8])]| {
            let path = "/stripe/v1/refunds";
            let req = RequestView {
                method: "POST",
                path,
                headers,
                body: Some(b"a=1"),
            };
            fingerprint("stripe", "key_1", &req, &route(path).unwrap(), b"a=1", true)
        };
        let approved = with(&[("stripe-account", b"acct_1"), ("x-request-id", b"r1")]);
        assert_eq!(
            approved,
            with(&[("x-request-id", b"r2"), ("stripe-account", b"acct_1")])
        );
        assert_ne!(
            approved,
            with(&[("stripe-account", b"acct_2"), ("x-request-id", b"r1")])
        );
        assert_ne!(approved, with(&[("x-request-id", b"r1")]));
    }
}
