//! Every way a request can be refused, and the one place each maps to the wire.

use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the request is not acceptable: {0}")]
    InvalidRequest(&'static str),
    #[error("no proxy is named {0:?}")]
    UnknownProxy(String),
    #[error(
        "no proxy key: send it as `Authorization: Bearer`, `x-api-key`, `Proxy-Authorization`, `x-latchkey-key` or the Basic auth password"
    )]
    MissingKey,
    #[error("the proxy key is not valid ({0})")]
    InvalidKey(&'static str),
    #[error("the proxy key has expired")]
    ExpiredKey,
    #[error("the proxy key has been revoked")]
    RevokedKey,
    #[error(
        "this key is quarantined: an anomaly alert stopped it until a person releases it (`latchkey key release {0}`)"
    )]
    Quarantined(Arc<str>),
    #[error("this key's credential may not use proxy {0:?}")]
    NotBound(Arc<str>),
    #[error("denied by rule {id}{}", notes.as_deref().map(|n| format!(": {n}")).unwrap_or_default())]
    RuleDenied {
        id: Arc<str>,
        notes: Option<Arc<str>>,
    },
    #[error("denied by proxy {0:?}: no rule allows this request")]
    DefaultDenied(Arc<str>),
    #[error("rule {id} judges the request body and cannot judge this one: {why}")]
    BodyUnjudgeable { id: Arc<str>, why: &'static str },
    #[error("the request body is larger than the {0} bytes latchkey reads to judge it")]
    BodyTooLarge(usize),
    #[error("rate limit of {limit} requests reached; retry in {retry_after_s} s")]
    RateLimited { limit: u32, retry_after_s: u64 },
    #[error("the budget store is unreachable, so limited requests are refused")]
    BudgetUnavailable,
    #[error("{what} is reached")]
    SpendCapExceeded { what: String, retry_after_s: u64 },
    #[error("{what} of LLM tokens is used up; retry in {retry_after_s} s")]
    TokensSpent { what: String, retry_after_s: u64 },
    #[error("{0} requests of this spend-capped key are already in flight; retry in 1 s")]
    TooManyInFlight(u64),
    #[error("the upstream credential of proxy {0:?} could not be obtained; retry later")]
    CredentialUnavailable(Arc<str>),
    #[error(
        "proxy {proxy:?} needs Envoy's ext_proc filter ({why}); this request came through ext_authz"
    )]
    NeedsExtProc { proxy: Arc<str>, why: &'static str },
    #[error("the upstream's response could not be checked before it reached you ({0})")]
    ResponseUnreadable(&'static str),
    #[error(
        "the same request was sent {window_s} s ago or less; send it with a new Idempotency-Key if it is meant to happen again"
    )]
    DuplicateRequest { window_s: u64 },
    #[error(
        "rule {rule} holds this request for a person: approval {id} (`latchkey approvals approve {id}`); send the same request again once it is approved"
    )]
    ApprovalRequired { id: Arc<str>, rule: Arc<str> },
    #[error("{0} of this caller's requests already wait for approval; retry in 60 s")]
    ApprovalsBacklogged(u32),
}

/// What a request came to, by name: the audit's `decision`, the metrics' label, the
/// `x-latchkey-decision` header and a denial's JSON `type`. A closed list (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Allow,
    InvalidRequest,
    UnknownProxy,
    MissingKey,
    InvalidKey,
    ExpiredKey,
    RevokedKey,
    Quarantined,
    NotBound,
    RuleDenied,
    BodyTooLarge,
    RateLimited,
    SpendCapExceeded,
    BudgetUnavailable,
    NeedsExtProc,
    CredentialUnavailable,
    ResponseUnreadable,
    DuplicateRequest,
    ApprovalRequired,
}

impl Kind {
    pub const ALL: [Kind; 19] = [
        Kind::Allow,
        Kind::InvalidRequest,
        Kind::UnknownProxy,
        Kind::MissingKey,
        Kind::InvalidKey,
        Kind::ExpiredKey,
        Kind::RevokedKey,
        Kind::Quarantined,
        Kind::NotBound,
        Kind::RuleDenied,
        Kind::BodyTooLarge,
        Kind::RateLimited,
        Kind::SpendCapExceeded,
        Kind::BudgetUnavailable,
        Kind::NeedsExtProc,
        Kind::CredentialUnavailable,
        Kind::ResponseUnreadable,
        Kind::DuplicateRequest,
        Kind::ApprovalRequired,
    ];

    /// A decision type as recorded (`as_str`), back.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// When in a request's life it is decided: before the key is known, on the key,
    /// by the rules, or after them (budgets, guards, the upstream credential).
    pub fn stage(self) -> Stage {
        match self {
            Kind::InvalidRequest | Kind::UnknownProxy => Stage::Path,
            Kind::MissingKey
            | Kind::InvalidKey
            | Kind::ExpiredKey
            | Kind::RevokedKey
            | Kind::Quarantined => Stage::Key,
            Kind::Allow | Kind::NotBound | Kind::RuleDenied | Kind::ApprovalRequired => {
                Stage::Rules
            }
            Kind::BodyTooLarge
            | Kind::RateLimited
            | Kind::SpendCapExceeded
            | Kind::BudgetUnavailable
            | Kind::NeedsExtProc
            | Kind::CredentialUnavailable
            | Kind::ResponseUnreadable
            | Kind::DuplicateRequest => Stage::After,
        }
    }

    /// A refusal of what the caller itself asked — its rules and scope, its repeats, its
    /// oversized or malformed requests — as opposed to limits, caps and outages it
    /// shares with other callers (which another agent could spend to blame it).
    pub fn caller_caused(self) -> bool {
        matches!(
            self,
            Kind::RuleDenied
                | Kind::NotBound
                | Kind::DuplicateRequest
                | Kind::ApprovalRequired
                | Kind::BodyTooLarge
                | Kind::InvalidRequest
        )
    }

    /// The kind named `name` (its [`Kind::as_str`]).
    pub fn named(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Allow => "allow",
            Kind::InvalidRequest => "invalid_request",
            Kind::UnknownProxy => "unknown_proxy",
            Kind::MissingKey => "missing_key",
            Kind::InvalidKey => "invalid_key",
            Kind::ExpiredKey => "expired_key",
            Kind::RevokedKey => "revoked_key",
            Kind::Quarantined => "quarantined",
            Kind::NotBound => "not_bound",
            Kind::RuleDenied => "rule_denied",
            Kind::BodyTooLarge => "body_too_large",
            Kind::RateLimited => "rate_limited",
            Kind::SpendCapExceeded => "spend_cap_exceeded",
            Kind::BudgetUnavailable => "budget_unavailable",
            Kind::NeedsExtProc => "needs_ext_proc",
            Kind::CredentialUnavailable => "credential_unavailable",
            Kind::ResponseUnreadable => "response_unreadable",
            Kind::DuplicateRequest => "duplicate_request",
            Kind::ApprovalRequired => "approval_required",
        }
    }
}

/// See [`Kind::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Path,
    Key,
    Rules,
    After,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Denial {
    pub fn kind(&self) -> Kind {
        match self {
            Denial::InvalidRequest(_) => Kind::InvalidRequest,
            Denial::UnknownProxy(_) => Kind::UnknownProxy,
            Denial::MissingKey => Kind::MissingKey,
            Denial::InvalidKey(_) => Kind::InvalidKey,
            Denial::ExpiredKey => Kind::ExpiredKey,
            Denial::RevokedKey => Kind::RevokedKey,
            Denial::Quarantined(_) => Kind::Quarantined,
            Denial::NotBound(_) => Kind::NotBound,
            Denial::RuleDenied { .. }
            | Denial::DefaultDenied(_)
            | Denial::BodyUnjudgeable { .. } => Kind::RuleDenied,
            Denial::BodyTooLarge(_) => Kind::BodyTooLarge,
            Denial::RateLimited { .. }
            | Denial::TooManyInFlight(_)
            | Denial::TokensSpent { .. } => Kind::RateLimited,
            Denial::SpendCapExceeded { .. } => Kind::SpendCapExceeded,
            Denial::BudgetUnavailable => Kind::BudgetUnavailable,
            Denial::NeedsExtProc { .. } => Kind::NeedsExtProc,
            Denial::CredentialUnavailable(_) => Kind::CredentialUnavailable,
            Denial::ResponseUnreadable(_) => Kind::ResponseUnreadable,
            Denial::DuplicateRequest { .. } => Kind::DuplicateRequest,
            Denial::ApprovalRequired { .. } => Kind::ApprovalRequired,
            Denial::ApprovalsBacklogged(_) => Kind::RateLimited,
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Denial::InvalidRequest(_) => 400,
            Denial::UnknownProxy(_) => 404,
            Denial::MissingKey
            | Denial::InvalidKey(_)
            | Denial::ExpiredKey
            | Denial::RevokedKey => 401,
            Denial::NotBound(_)
            | Denial::Quarantined(_)
            | Denial::RuleDenied { .. }
            | Denial::DefaultDenied(_)
            | Denial::BodyUnjudgeable { .. } => 403,
            Denial::BodyTooLarge(_) => 413,
            Denial::RateLimited { .. }
            | Denial::TooManyInFlight(_)
            | Denial::SpendCapExceeded { .. }
            | Denial::TokensSpent { .. } => 429,
            Denial::BudgetUnavailable => 503,
            Denial::NeedsExtProc { .. } => 500,
            Denial::CredentialUnavailable(_) => 503,
            Denial::ResponseUnreadable(_) => 502,
            Denial::DuplicateRequest { .. } => 409,
            Denial::ApprovalRequired { .. } => 403,
            Denial::ApprovalsBacklogged(_) => 429,
        }
    }

    /// Seconds until a request could pass, for `Retry-After`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Denial::RateLimited { retry_after_s, .. }
            | Denial::SpendCapExceeded { retry_after_s, .. }
            | Denial::TokensSpent { retry_after_s, .. } => Some(*retry_after_s),
            Denial::TooManyInFlight(_) => Some(1),
            Denial::CredentialUnavailable(_) => Some(5),
            // A person decides in minutes, not milliseconds.
            Denial::ApprovalRequired { .. } => Some(30),
            Denial::ApprovalsBacklogged(_) => Some(60),
            _ => None,
        }
    }

    /// Whether sending the same request again cannot help (the key, the rules or the
    /// spend cap stand in the way): such denials tell SDKs not to retry
    /// (`x-should-retry: false`), so a looping agent stops sooner.
    pub fn permanent(&self) -> bool {
        matches!(self.http_status(), 401 | 403)
            || matches!(
                self,
                Denial::SpendCapExceeded { .. } | Denial::DuplicateRequest { .. }
            )
    }

    /// The rule that decided, if one did.
    pub fn rule_id(&self) -> Option<&str> {
        match self {
            Denial::RuleDenied { id, .. }
            | Denial::BodyUnjudgeable { id, .. }
            | Denial::ApprovalRequired { rule: id, .. } => Some(id),
            _ => None,
        }
    }

    /// `{"error":{"type","message","request_id"}}`, the body every denial carries.
    pub fn body(&self, request_id: &str) -> Vec<u8> {
        let error = self.error(request_id);
        serde_json::to_vec(&serde_json::json!({ "error": error })).expect("JSON serializes")
    }

    /// The refusal of an MCP message: a JSON-RPC error answering its request `id` (`null`
    /// for a notification), which MCP clients raise with its message. The code is
    /// -31000 minus the HTTP status (-31403, -31429…): outside JSON-RPC's reserved range;
    /// `data` is the denial's usual `error` object.
    pub fn rpc_body(&self, request_id: &str, id: Option<&serde_json::Value>) -> Vec<u8> {
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": id.cloned().unwrap_or(serde_json::Value::Null),
            "error": {
                "code": -31000 - i64::from(self.http_status()),
                "message": self.to_string(),
                "data": self.error(request_id),
            },
        });
        serde_json::to_vec(&body).expect("JSON serializes")
    }

    fn error(&self, request_id: &str) -> serde_json::Value {
        let mut error = serde_json::json!({
            "type": self.kind().as_str(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        if let Some(id) = self.rule_id() {
            error["rule_id"] = id.into();
        }
        if let Denial::ApprovalRequired { id, .. } = self {
            error["approval_id"] = id.as_ref().into();
        }
        error
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_kind_parses_back_and_has_a_stage() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
            let _ = kind.stage();
        }
        assert_eq!(Kind::parse("nonsense"), None);
        // Refused before a key is known: no caller to blame.
        assert!(
            Kind::ALL
                .iter()
                .filter(|k| k.caller_caused())
                .all(|k| !matches!(k.stage(), Stage::Key))
        );
    }

    use super::*;

    #[test]
    fn bodies_are_the_contract_json() {
        let d = Denial::RuleDenied {
            id: "r1".into(),
            notes: Some("refunds only".into()),
        };
        let v: serde_json::Value = serde_json::from_slice(&d.body("req-1")).unwrap();
        assert_eq!(v["error"]["type"], "rule_denied");
        assert_eq!(v["error"]["request_id"], "req-1");
        assert_eq!(v["error"]["rule_id"], "r1");
        assert_eq!(v["error"]["message"], "denied by rule r1: refunds only");
        assert_eq!(d.http_status(), 403);
        let v: serde_json::Value =
            serde_json::from_slice(&Denial::UnknownProxy("a\"b".into()).body("x")).unwrap();
        assert_eq!(v["error"]["type"], "unknown_proxy");
    }
}
