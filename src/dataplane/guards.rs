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

/// What makes a request the same as another: proxy, caller (key id or credential),
/// method, path, query, `Idempotency-Key` and the body's hash, each length-prefixed so no
/// two different requests frame into the same bytes.
pub fn fingerprint(
    proxy: &str,
    caller: &str,
    req: &RequestView<'_>,
    route: &Route<'_>,
    body: &[u8],
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
    for part in parts.into_iter().chain(keys) {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

/// The `Idempotency-Key` latchkey gives a request that has none: the same request gets
/// the same key, so the vendor deduplicates retries that reach it.
pub fn idempotency_key(fingerprint: &[u8; 32]) -> Vec<u8> {
    let hex: String = fingerprint[..16]
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
        fingerprint("stripe", "key_1", &req, &route(path).unwrap(), body)
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
        assert_eq!(idempotency_key(&base).len(), 35);
    }
}
