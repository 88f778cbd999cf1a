//! Response safety: what the agent must not see in an upstream's answer — the target
//! credential's secret, should the upstream echo it, and the JSON fields a proxy
//! redacts. Only proxies that ask for it have their responses pass through latchkey.

use std::collections::HashSet;

use memchr::memmem;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::policy::ResponseSafety;

/// What replaces a scrubbed secret or a redacted field.
pub const REDACTED: &str = "[REDACTED]";

/// Secrets shorter than this cannot be scrubbed: replacing every occurrence of a few
/// characters would mangle responses. Apply refuses a proxy that asks for it.
pub const MIN_SCRUBBED_LEN: usize = 8;

/// A proxy's response safety, compiled.
pub struct Guard {
    /// The credential's secret in every form an upstream could echo, longest first;
    /// empty unless the proxy scrubs.
    echoes: Vec<Zeroizing<Vec<u8>>>,
    scrub: bool,
    pointers: Vec<String>,
    names: HashSet<String>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("scrub", &self.scrub)
            .field("pointers", &self.pointers)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// `echoes`: the target credential's secret as the upstream could send it back.
    pub fn new(spec: &ResponseSafety, echoes: Vec<Zeroizing<Vec<u8>>>) -> Result<Self, String> {
        let mut echoes = if spec.scrub_credential {
            echoes
        } else {
            Vec::new()
        };
        if echoes.iter().any(|e| e.len() < MIN_SCRUBBED_LEN) {
            return Err(format!(
                "scrub_credential needs a secret of at least {MIN_SCRUBBED_LEN} bytes"
            ));
        }
        echoes.sort_by_key(|e| std::cmp::Reverse(e.len()));
        echoes.dedup();
        let (pointers, names) = spec
            .redact
            .iter()
            .cloned()
            .partition(|f| f.starts_with('/'));
        Ok(Self {
            echoes,
            scrub: spec.scrub_credential,
            pointers,
            names: names.into_iter().collect(),
        })
    }

    /// Whether a credential fetched per request (an OAuth2 token) is scrubbed too.
    pub fn scrubs(&self) -> bool {
        self.scrub
    }

    /// `bytes` with every echo of the secret (and of `token`, if given) replaced, and
    /// how many there were; `None` if there were none.
    pub fn scrub(&self, bytes: &[u8], token: Option<&[u8]>) -> Option<(Vec<u8>, usize)> {
        if !self.scrub {
            return None;
        }
        let mut out: Option<Vec<u8>> = None;
        let mut count = 0;
        let token = token.filter(|t| t.len() >= MIN_SCRUBBED_LEN);
        for needle in self.echoes.iter().map(|e| e.as_slice()).chain(token) {
            let current = out.as_deref().unwrap_or(bytes);
            if let Some((replaced, n)) = replace_all(current, needle) {
                out = Some(replaced);
                count += n;
            }
        }
        out.map(|o| (o, count))
    }

    /// The JSON body with the proxy's fields redacted, and how many were; `Ok(None)` if
    /// nothing was, or the body is not JSON (only JSON fields are named). A body that
    /// looks like JSON but does not parse is `Err`: it cannot be checked, so it stops.
    pub fn redact(&self, body: &[u8]) -> Result<Option<(Vec<u8>, usize)>, Unparsed> {
        if self.pointers.is_empty() && self.names.is_empty() {
            return Ok(None);
        }
        let mut json: Value = match serde_json::from_slice(body) {
            Ok(json) => json,
            Err(_) if looks_like_json(body) => return Err(Unparsed),
            Err(_) => return Ok(None),
        };
        let mut count = 0;
        for pointer in &self.pointers {
            if let Some(v) = json.pointer_mut(pointer) {
                *v = Value::from(REDACTED);
                count += 1;
            }
        }
        if !self.names.is_empty() {
            count += redact_names(&mut json, &self.names);
        }
        Ok((count > 0).then(|| (serde_json::to_vec(&json).expect("JSON serializes"), count)))
    }
}

/// A response body that looks like JSON and does not parse.
#[derive(Debug, PartialEq, Eq)]
pub struct Unparsed;

/// Starts (after a byte-order mark and white space) like a JSON object or array.
fn looks_like_json(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

fn redact_names(value: &mut Value, names: &HashSet<String>) -> usize {
    match value {
        Value::Object(map) => map
            .iter_mut()
            .map(|(k, v)| {
                if names.contains(k) {
                    *v = Value::from(REDACTED);
                    1
                } else {
                    redact_names(v, names)
                }
            })
            .sum(),
        Value::Array(items) => items.iter_mut().map(|v| redact_names(v, names)).sum(),
        _ => 0,
    }
}

fn replace_all(haystack: &[u8], needle: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut last = 0;
    let mut count = 0;
    for at in memmem::find_iter(haystack, needle) {
        out.extend_from_slice(&haystack[last..at]);
        out.extend_from_slice(REDACTED.as_bytes());
        last = at + needle.len();
        count += 1;
    }
    if count == 0 {
        return None;
    }
    out.extend_from_slice(&haystack[last..]);
    Some((out, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(scrub: bool, redact: &[&str]) -> Guard {
        let spec = ResponseSafety {
            scrub_credential: scrub,
            redact: redact.iter().map(|s| s.to_string()).collect(),
        };
        Guard::new(&spec, vec![Zeroizing::new(b"sk_live_SECRET".to_vec())]).unwrap()
    }

    #[test]
    fn echoes_are_replaced_wherever_they_are() {
        let g = guard(true, &[]);
        let (out, n) = g
            .scrub(
                b"key sk_live_SECRET and sk_live_SECRET; token tok-123456789",
                Some(b"tok-123456789"),
            )
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "key [REDACTED] and [REDACTED]; token [REDACTED]"
        );
        assert!(g.scrub(b"nothing here", None).is_none());
        assert!(
            guard(false, &["email"])
                .scrub(b"sk_live_SECRET", None)
                .is_none()
        );
    }

    #[test]
    fn fields_are_redacted_by_pointer_and_by_name_at_any_depth() {
        let g = guard(false, &["/owner/phone", "email"]);
        let body = br#"{"owner":{"phone":"555","name":"A"},"users":[{"email":"a@x"},{"email":"b@x","id":2}]}"#;
        let (out, n) = g.redact(body).unwrap().unwrap();
        assert_eq!(n, 3);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["owner"]["phone"], REDACTED);
        assert_eq!(v["owner"]["name"], "A");
        assert_eq!(v["users"][1]["email"], REDACTED);
        assert_eq!(v["users"][1]["id"], 2);
        assert_eq!(g.redact(b"not json"), Ok(None));
        assert_eq!(g.redact(br#"{"other":1}"#), Ok(None));
        // Looks like JSON, cannot be parsed: not passed on unchecked.
        assert_eq!(g.redact(b"\xEF\xBB\xBF{\"email\":\"a@x\"}"), Err(Unparsed));
        assert_eq!(
            g.redact(b"{\"email\":\"a@x\"}\n{\"email\":\"b@x\"}"),
            Err(Unparsed)
        );
    }

    #[test]
    fn a_short_secret_cannot_be_scrubbed() {
        let spec = ResponseSafety {
            scrub_credential: true,
            redact: vec![],
        };
        let err = Guard::new(&spec, vec![Zeroizing::new(b"abc".to_vec())]).unwrap_err();
        assert!(err.contains("at least 8 bytes"), "{err}");
    }
}
