//! Step 5, mutate: what the upstream receives. Every header that carried the proxy key
//! and every header a client could route or re-interpret the request with is removed;
//! the real credential is injected; the request is pointed at the target.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::dataplane::credentials::sigv4;
use crate::dataplane::names::CARRIERS;
use crate::dataplane::request::RequestView;
use crate::dataplane::route::Route;
use crate::dataplane::snapshot::{Injection, Proxy};

/// The header latchkey sets to pick Envoy's cluster (TLS or plain) for the target.
pub const CLUSTER_HEADER: &str = "x-latchkey-cluster";

/// Headers some upstream frameworks honour to change the path or method they act on;
/// left in place they would let a client slip past the rules.
const REINTERPRETING: [&str; 8] = [
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-host",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Header mutations for an allowed request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forward {
    /// Set, replacing every value the request had (so a client's copies go too).
    pub set: Vec<(Cow<'static, str>, Vec<u8>)>,
    /// Removed. A name may be here and set later (an OAuth2 token, once fetched): what
    /// Envoy is told is `removals`.
    pub remove: Vec<String>,
    /// The request body to send instead of the agent's (token-priced streams ask for
    /// their usage); only where the body was read.
    pub body: Option<Vec<u8>>,
}

impl Forward {
    /// The removals no set covers: one header operation fewer in Envoy per covered
    /// name, and no question of whether Envoy removes before or after it sets.
    pub fn removals(&self) -> impl Iterator<Item = &str> {
        (self.remove.iter())
            .map(String::as_str)
            .filter(|r| !self.set.iter().any(|(name, _)| name == r))
    }

    /// Takes the target's cluster out of the headers set, for a caller that tells Envoy
    /// another way (the in-process module, in its dynamic metadata). A client's own
    /// [`CLUSTER_HEADER`] is among the removals then.
    pub fn take_cluster(&mut self) -> Option<Vec<u8>> {
        let at = self
            .set
            .iter()
            .position(|(name, _)| name == CLUSTER_HEADER)?;
        Some(self.set.remove(at).1)
    }
}

/// Names compared with `_` read as `-`: CGI, WSGI, Rack and PHP hand `x_http_method`
/// and `x-http-method` to the application as one variable. (The shipped Envoy configs
/// refuse such names outright; this holds without them.)
fn stripped(name: &str) -> bool {
    let name: Cow<'_, str> = if name.contains('_') {
        Cow::Owned(name.replace('_', "-"))
    } else {
        Cow::Borrowed(name)
    };
    CARRIERS.contains(&&*name)
        || name.starts_with("x-latchkey-")
        || name.starts_with("x-envoy-")
        || REINTERPRETING.contains(&&*name)
}

/// Headers latchkey sets on a signed AWS request; a client's own never reach AWS.
const SIGV4_HEADERS: [&str; 4] = [
    "authorization",
    "x-amz-content-sha256",
    "x-amz-date",
    "x-amz-security-token",
];

/// The mutations for an allowed request at `now` (Unix seconds; what a signature dates).
pub fn forward(proxy: &Proxy, route: &Route<'_>, req: &RequestView<'_>, now: i64) -> Forward {
    let headers = req.headers;
    let upstream = &proxy.upstream;
    let mut path = String::with_capacity(
        upstream.base_path.len() + route.path.len() + route.query.map_or(0, str::len) + 64,
    );
    path.push_str(&upstream.base_path);
    path.push_str(&route.path);

    let mut remove: Vec<String> = Vec::new();
    for (name, _) in headers {
        if stripped(name) && !remove.iter().any(|r| r == name) {
            remove.push((*name).to_owned());
        }
    }
    // Room for what most requests get: a timeout, an encoding, the credential, the path,
    // the authority and the cluster (a signature adds more).
    let mut set: Vec<(Cow<'static, str>, Vec<u8>)> = Vec::with_capacity(6);
    if let Some(ms) = proxy.timeout_ms {
        // Envoy's router takes the call's timeout from this header (a client's own is
        // stripped above, with every other x-envoy-* header).
        set.push((
            Cow::Borrowed("x-envoy-upstream-rq-timeout-ms"),
            ms.to_string().into_bytes(),
        ));
    }
    if proxy.reads_response_body() {
        // A compressed response could not be scrubbed, redacted or priced: the upstream
        // is asked for the identity encoding, whatever the agent accepts.
        set.push((Cow::Borrowed("accept-encoding"), b"identity".to_vec()));
    }
    match &*proxy.injection {
        Injection::Header { name, value } => {
            // Set, so exactly one value reaches the upstream.
            set.push((Cow::Owned(name.clone()), value.expose().to_vec()));
            if let Some(q) = route.query {
                path.push('?');
                path.push_str(q);
            }
        }
        Injection::OAuth2(_) => {
            // The token is set once fetched (`pipeline::conclude`); whatever the client
            // sent goes.
            if !remove.iter().any(|r| r == "authorization") {
                remove.push("authorization".to_owned());
            }
            if let Some(q) = route.query {
                path.push('?');
                path.push_str(q);
            }
        }
        Injection::SigV4(signer) => {
            if let Some(q) = route.query {
                path.push('?');
                path.push_str(q);
            }
            for name in SIGV4_HEADERS {
                if !remove.iter().any(|r| r == name) {
                    remove.push(name.to_owned());
                }
            }
            // What S3 wants signed when present: the content's type and digest, and
            // every `x-amz-*` header the client sends.
            let signed: Vec<(&str, &str)> = headers
                .iter()
                .filter(|(name, _)| {
                    (matches!(*name, "content-type" | "content-md5") || name.starts_with("x-amz-"))
                        && !remove.iter().any(|r| r == name)
                })
                .filter_map(|(name, value)| Some((*name, std::str::from_utf8(value).ok()?)))
                .collect();
            let request = sigv4::Request {
                method: req.method,
                authority: &upstream.authority,
                path: &path,
                body: req.body,
                headers: &signed,
            };
            set.extend(
                signer
                    .sign(&request, now)
                    .into_iter()
                    .map(|(name, value)| (Cow::Borrowed(name), value)),
            );
        }
        Injection::Query { param, value } => {
            // A client-sent parameter of the same name must not ride along or win.
            let mut sep = '?';
            for pair in route.query.into_iter().flat_map(|q| q.split('&')) {
                let name = pair.split('=').next().unwrap_or_default();
                if percent_decode_str(name).eq(percent_decode_str(param)) {
                    continue;
                }
                path.push(sep);
                path.push_str(pair);
                sep = '&';
            }
            path.push(sep);
            path.push_str(param);
            path.push('=');
            path.push_str(std::str::from_utf8(value.expose()).expect("percent-encoded is ASCII"));
        }
        // Refused before it is forwarded (`pipeline`); were it not, no credential goes.
        Injection::Unavailable => {
            if let Some(q) = route.query {
                path.push('?');
                path.push_str(q);
            }
        }
    }
    set.push((Cow::Borrowed(":path"), path.into_bytes()));
    set.push((
        Cow::Borrowed(":authority"),
        upstream.authority.as_bytes().to_vec(),
    ));
    set.push((
        Cow::Borrowed(CLUSTER_HEADER),
        upstream.cluster.as_bytes().to_vec(),
    ));
    Forward {
        set,
        remove,
        body: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_lists_read_underscores_as_dashes() {
        for name in [
            "x_http_method_override",
            "x-http-method_override",
            "x_api_key",
            "x_latchkey_key",
            "x_envoy_original_path",
            "x_forwarded_host",
        ] {
            assert!(stripped(name), "{name}");
        }
        assert!(!stripped("x_request_id"));
        assert!(!stripped("content-type"));
    }

    #[test]
    fn a_cluster_taken_out_leaves_a_clients_own_to_be_removed() {
        let mut forward = Forward {
            set: vec![
                (Cow::Borrowed(":authority"), b"api.example.com".to_vec()),
                (Cow::Borrowed(CLUSTER_HEADER), b"latchkey_tls".to_vec()),
            ],
            remove: vec![CLUSTER_HEADER.into()],
            body: None,
        };
        assert_eq!(forward.removals().count(), 0);
        assert_eq!(
            forward.take_cluster().as_deref(),
            Some(&b"latchkey_tls"[..])
        );
        assert_eq!(forward.removals().collect::<Vec<_>>(), [CLUSTER_HEADER]);
        assert_eq!(forward.set.len(), 1);
        assert_eq!(forward.take_cluster(), None);
    }

    #[test]
    fn a_name_set_is_not_also_removed() {
        // As an OAuth2 proxy's is once its token is fetched: removed, then set.
        let forward = Forward {
            set: vec![(Cow::Borrowed("authorization"), b"Bearer t".to_vec())],
            remove: vec!["x-api-key".into(), "authorization".into()],
            body: None,
        };
        assert_eq!(forward.removals().collect::<Vec<_>>(), ["x-api-key"]);
    }
}
