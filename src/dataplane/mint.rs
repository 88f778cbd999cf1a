//! `POST /latchkey/v1/run-keys`: a workload trades its token for a run key of its own
//! proxy credential, with the TTL, label and spend cap it asks for, within the maxima
//! the credential's `identity` sets. Answered by latchkey, never forwarded; so no static
//! secret need sit where the agent runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::dataplane::budget::{Admission, Budgets, Limit, Rate};
use crate::dataplane::denial::Denial;
use crate::dataplane::identity::{Identities, Verified};
use crate::dataplane::keys;
use crate::dataplane::request::RequestView;
use crate::dataplane::snapshot::Policy;

/// Where the agent listener answers mints. `latchkey` is no proxy's name (validation
/// reserves it), so no proxy's traffic can land here.
pub const PATH: &str = "/latchkey/v1/run-keys";
/// Run keys one workload may mint a minute.
pub const MINTS_PER_MINUTE: u32 = 10;

/// The first path segment reserved for latchkey's own endpoints.
pub const RESERVED: &str = "latchkey";

/// Whether the request is for latchkey's own endpoints: the first path segment, in any
/// case, with or without a query.
pub fn is_own(path: &str) -> bool {
    let first = path.trim_start_matches('/').split(['/', '?']).next();
    first.is_some_and(|s| s.eq_ignore_ascii_case(RESERVED))
}

/// What the agent asks for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Asked {
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub spend_cap_usd: Option<f64>,
}

/// A run key to issue: what was asked, within the credential's maxima.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub credential: Arc<str>,
    pub subject: Arc<str>,
    pub label: Option<String>,
    pub ttl_seconds: u64,
    pub spend_cap_usd: Option<f64>,
}

/// A key issued: its id and the key itself, shown once.
pub struct Minted {
    pub id: String,
    pub key: Zeroizing<String>,
    pub expires_at_ms: i64,
}

pub type Minting<'a> = Pin<Box<dyn Future<Output = Result<Minted, String>> + Send + 'a>>;

/// Where run keys are issued (the store, and every replica's snapshot).
pub trait Minter: Send + Sync {
    fn mint<'a>(&'a self, grant: &'a Grant) -> Minting<'a>;
}

/// Validates the request: the method, the path, the body, the maxima.
pub fn grant(
    policy: &Policy,
    method: &str,
    path: &str,
    verified: &Verified,
    body: &[u8],
) -> Result<Grant, Denial> {
    if path.split('?').next() != Some(PATH) {
        return Err(Denial::UnknownProxy(RESERVED.into()));
    }
    if method != "POST" {
        return Err(Denial::InvalidRequest("run keys are minted with POST"));
    }
    let asked: Asked = if body.iter().all(u8::is_ascii_whitespace) {
        Asked::default()
    } else {
        serde_json::from_slice(body).map_err(|_| {
            Denial::InvalidRequest(
                "the body is a JSON object of ttl_seconds, label and spend_cap_usd",
            )
        })?
    };
    let trust = &policy.trusts()[verified.trust];
    let max_ttl_s = (trust.max_ttl_ms / 1000) as u64;
    let ttl_seconds = match asked.ttl_seconds {
        None => max_ttl_s,
        Some(0) => return Err(Denial::InvalidRequest("ttl_seconds must be positive")),
        Some(t) if t > max_ttl_s => {
            return Err(Denial::InvalidRequest(
                "ttl_seconds is over the credential's identity.max_ttl",
            ));
        }
        Some(t) => t,
    };
    let spend_cap_usd = match (asked.spend_cap_usd, trust.max_spend_cap_usd) {
        (Some(cap), _) if !(cap.is_finite() && cap >= 0.0) => {
            return Err(Denial::InvalidRequest(
                "spend_cap_usd must be a non-negative amount",
            ));
        }
        (Some(cap), Some(max)) if cap > max => {
            return Err(Denial::InvalidRequest(
                "spend_cap_usd is over the credential's identity.max_spend_cap_usd",
            ));
        }
        (asked, max) => asked.or(max),
    };
    let label = match asked.label {
        Some(l) if l.len() > 128 || l.chars().any(char::is_control) => {
            return Err(Denial::InvalidRequest(
                "label: at most 128 characters, none of them control characters",
            ));
        }
        label => label.filter(|l| !l.is_empty()),
    };
    Ok(Grant {
        credential: policy.credential_name(trust.credential).clone(),
        subject: verified.subject.clone(),
        label,
        ttl_seconds,
        spend_cap_usd,
    })
}

/// Answers a request for latchkey's own path: the minted key's JSON, or why not.
pub async fn answer_request(
    policy: &Policy,
    identities: &Identities,
    budgets: &Budgets,
    minter: Option<&dyn Minter>,
    req: &RequestView<'_>,
) -> Result<Vec<u8>, Denial> {
    let (method, path, headers) = (req.method, req.path, req.headers);
    let body = req.body.unwrap_or_default();
    let now_ms = crate::base::clock::now_unix_ms();
    let presented = keys::presented(headers);
    let verified = match identities.token(policy, &presented, now_ms).await {
        Some(verified) => verified?,
        // A proxy key mints nothing: a run key comes from a workload's identity.
        None => {
            presented?;
            return Err(Denial::InvalidKey(
                "run keys are minted with a workload token",
            ));
        }
    };
    let grant = grant(policy, method, path, &verified, body)?;
    // Each key is a row and a cap of its own: a looping agent must not mint without end.
    // Mints count against the credential's request limits and a rate of their own.
    let credential = verified.entry.credential;
    let mut limits = policy.credential_limits(credential).to_vec();
    limits.push(Limit {
        key: format!("mint:{}:{}:minute", grant.credential, grant.subject).into(),
        rate: Rate::per_minute(MINTS_PER_MINUTE),
    });
    match budgets.admit(&limits).await {
        Ok(Admission::Admitted { .. }) => {}
        Ok(Admission::Refused {
            limit,
            retry_after_ms,
        }) => {
            return Err(Denial::RateLimited {
                limit,
                retry_after_s: retry_after_ms.div_ceil(1000).max(1),
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing a mint: the budget store is unreachable");
            return Err(Denial::BudgetUnavailable);
        }
    }
    let minter = minter.ok_or(Denial::CredentialUnavailable(RESERVED.into()))?;
    let minted = minter.mint(&grant).await.map_err(|why| {
        tracing::error!(%why, credential = %grant.credential, "a run key could not be minted");
        Denial::CredentialUnavailable(RESERVED.into())
    })?;
    Ok(answer(&minted, &grant))
}

/// The answer: what `latchkey key issue -o json` prints for a run key.
pub fn answer(minted: &Minted, grant: &Grant) -> Vec<u8> {
    let body = serde_json::json!({
        "id": minted.id,
        "key": minted.key.as_str(),
        "credential": &*grant.credential,
        "label": grant.label,
        "expires_at": minted.expires_at_ms.saturating_add(999).div_euclid(1000),
        "spend_cap_usd": grant.spend_cap_usd,
    });
    serde_json::to_vec(&body).expect("JSON serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_paths() {
        assert!(is_own("/latchkey/v1/run-keys"));
        assert!(is_own("/LatchKey/v1/run-keys?x=1"));
        assert!(is_own("/latchkey?x"));
        assert!(!is_own("/latchkeys/v1"));
        assert!(!is_own("/api/latchkey"));
    }
}
