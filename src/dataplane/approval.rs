//! Human approval (a rule with `effect: approve`): the request is held for a person. What
//! the data plane asks of the approval desk, and what the desk answers; the desk itself
//! (the store, the admin API) is the control plane's. A person sees the method, path, key
//! and a summary of the body that names its fields, never their values.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A request held by an approve rule, as the desk records it.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The same request (caller, method, path, query, body) has the same fingerprint:
    /// an approval lets exactly that request through, once.
    pub fingerprint: [u8; 32],
    pub proxy: Arc<str>,
    pub credential: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub run_label: Option<Arc<str>>,
    pub rule_id: Arc<str>,
    pub method: String,
    pub path: String,
    pub body_summary: String,
    /// Where the proxy posts requests for approval.
    pub webhooks: Arc<[crate::policy::Webhook]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Approved, and now used: the request goes.
    Approved,
    /// Waiting for a person (new or as before), under this id.
    Pending(String),
    /// A person denied it, under this id.
    Denied(String),
    /// Too many of this caller's requests already wait: refused without a new one.
    Backlogged(u32),
}

pub type Asked<'a> = Pin<Box<dyn Future<Output = Result<Answer, String>> + Send + 'a>>;

/// Where held requests go and approvals come from.
pub trait Desk: Send + Sync {
    fn ask<'a>(&'a self, ask: &'a Ask, now_ms: i64) -> Asked<'a>;
}

/// The body as a person may see it: its size and, for a JSON object or a form, its
/// field names (sorted, at most 32); never a value.
pub fn summary(body: &[u8], content_type: Option<&[u8]>) -> String {
    let json = content_type.is_none_or(crate::dataplane::usage::is_json_media_type);
    let mut fields: Vec<String> = if json {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    } else {
        form_urlencoded::parse(body)
            .map(|(k, _)| k.into_owned())
            .collect()
    };
    fields.sort();
    fields.dedup();
    fields.truncate(32);
    // The agent chose these names: nothing that could steer a terminal or pass for text
    // of latchkey's.
    for f in &mut fields {
        *f = (f.chars().take(64))
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '?'
                }
            })
            .collect();
    }
    match fields.is_empty() {
        true => format!("{} bytes", body.len()),
        false => format!("{} bytes; fields: {}", body.len(), fields.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_names_fields_never_values() {
        let json = br#"{"amount": 5000, "card": "4242424242424242", "currency": "usd"}"#;
        let s = summary(json, Some(b"application/json"));
        assert_eq!(
            s,
            format!("{} bytes; fields: amount, card, currency", json.len())
        );
        assert!(!s.contains("4242"));
        let form = summary(
            b"amount=5000&password=hunter2",
            Some(b"application/x-www-form-urlencoded"),
        );
        assert!(form.ends_with("fields: amount, password") && !form.contains("hunter2"));
        assert_eq!(summary(b"", None), "0 bytes");
        assert_eq!(summary(b"[1,2]", None), "5 bytes");
    }
}
