//! Step 2 for workloads without a key: a signed token (JWT) presented where a proxy key
//! goes stands for the proxy credential whose `identity` trusts it. Verified, then cached
//! by its hash until it expires (and verified again every 5 minutes, and under a new
//! policy), so the request path stays a hash and a lookup.
//!
//! Verification reads the issuer's public keys ([`jwks`]), so it runs before the pure
//! pipeline, which is handed the outcome (`pipeline::Caller::Token`).

pub mod jwks;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::base::crypto::hash_key;
use crate::base::jwt::{self, Token};
use crate::dataplane::denial::Denial;
use crate::dataplane::snapshot::{KeyEntry, Policy, Trust};
use jwks::KeySets;

/// Clocks of issuer and latchkey may disagree by this much (`exp`, `nbf`).
const SKEW_S: f64 = 30.0;
/// Verified tokens kept; a token is verified again once it falls out.
const CACHE_SIZE: u64 = 100_000;
/// A verified token is verified again after this long: a key the issuer withdrew stops
/// vouching for it once its key set has been read again (`jwks`).
const REVERIFY_MS: i64 = 300_000;

/// Whether the token's claims are the ones `trust` accepts (its signature aside).
fn accepts(trust: &Trust, claims: &jwt::Claims) -> bool {
    let text = |name: &str| claims.other.get(name).and_then(|v| v.as_str());
    claims.iss.as_deref() == Some(&*trust.issuer)
        && claims
            .aud
            .as_ref()
            .is_some_and(|a| a.contains(&trust.audience))
        && claims
            .sub
            .as_deref()
            .is_some_and(|s| trust.subject.is_match(s))
        && (trust.claims.iter()).all(|(name, re)| text(name).is_some_and(|v| re.is_match(v)))
}

/// A verified token: the key entry it stands for, for as long as it is valid.
#[derive(Debug)]
pub struct Verified {
    pub entry: KeyEntry,
    pub subject: Arc<str>,
    /// The trust that accepted it, by position in its snapshot.
    pub trust: usize,
    /// The snapshot it was verified under: another snapshot verifies it again.
    generation: u64,
    verified_ms: i64,
}

/// Tokens verified, and the issuers' key sets.
pub struct Identities {
    verified: moka::sync::Cache<[u8; 32], Arc<Verified>>,
    sets: KeySets,
}

impl Default for Identities {
    fn default() -> Self {
        Self {
            verified: moka::sync::Cache::builder()
                .max_capacity(CACHE_SIZE)
                // Past a token's own expiry it is refused on sight; this only bounds
                // how long a long-lived token's entry sits unused.
                .time_to_idle(std::time::Duration::from_secs(3600))
                .build(),
            sets: KeySets::default(),
        }
    }
}

impl Identities {
    /// Forgets every verified token: the next presentation verifies it again (what a
    /// cold verification costs, in `benches/identity.rs`).
    pub fn forget_verified(&self) {
        self.verified.invalidate_all();
    }

    /// The token a request presents where a proxy key goes, verified; `None` when what
    /// it presents is no token (a proxy key, or nothing). `presented` is what
    /// [`keys::presented`](crate::dataplane::keys::presented) read of its headers.
    pub async fn token(
        &self,
        policy: &Policy,
        presented: &Result<Cow<'_, [u8]>, Denial>,
        now_ms: i64,
    ) -> Option<Result<Arc<Verified>, Denial>> {
        let key = presented.as_ref().ok()?;
        jwt::looks_like(key).then_some(())?;
        Some(self.verify(policy, key, now_ms).await)
    }

    /// The credential `token` stands for under `policy` at `now_ms`.
    pub async fn verify(
        &self,
        policy: &Policy,
        token: &[u8],
        now_ms: i64,
    ) -> Result<Arc<Verified>, Denial> {
        let hash = hash_key(token);
        let now = now_ms as f64 / 1000.0;
        if let Some(hit) = self.verified.get(&hash)
            && hit.generation == policy.generation()
            && now_ms - hit.verified_ms < REVERIFY_MS
        {
            // An expired token fails the same way it would the first time.
            return match hit.entry.expires_at_ms {
                Some(exp) if exp as f64 / 1000.0 + SKEW_S <= now => {
                    Err(Denial::InvalidKey("token expired"))
                }
                _ => Ok(hit),
            };
        }
        let parsed = Token::parse(token).map_err(Denial::InvalidKey)?;
        let claims = &parsed.claims;
        let exp = claims.exp.ok_or(Denial::InvalidKey("token without exp"))?;
        if exp + SKEW_S <= now {
            return Err(Denial::InvalidKey("token expired"));
        }
        if claims.nbf.is_some_and(|nbf| nbf - SKEW_S > now) {
            return Err(Denial::InvalidKey("token not yet valid"));
        }
        let trusts = policy.trusts();
        let candidates: Vec<usize> = (0..trusts.len())
            .filter(|&i| accepts(&trusts[i], claims))
            .collect();
        let mut accepted = None;
        for i in candidates {
            let keys = self
                .sets
                .keys_for(&trusts[i].source, parsed.kid.as_deref(), now_ms)
                .await;
            // The key the token names, when it names one: one signature check, not one
            // per key of the set.
            let named = |k: &&jwt::Jwk| parsed.kid.is_none() || k.kid == parsed.kid;
            if keys.iter().filter(named).any(|k| parsed.signed_by(k)) {
                if accepted.is_some() {
                    return Err(Denial::InvalidKey("token stands for two credentials"));
                }
                accepted = Some(i);
            }
        }
        let trust = accepted.ok_or(Denial::InvalidKey("token not trusted"))?;
        let sub = claims.sub.as_deref().unwrap_or_default();
        let subject: Arc<str> = Arc::from(truncated(sub));
        let credential = policy.credential_name(trusts[trust].credential);
        let verified = Arc::new(Verified {
            entry: KeyEntry {
                hash,
                // The audit's key id: who, not which token (tokens renew hourly); the
                // same subject of another credential (another cluster) is another.
                id: Arc::from(key_id(credential, sub)),
                credential: trusts[trust].credential,
                label: None,
                expires_at_ms: Some((exp * 1000.0) as i64),
                revoked: AtomicBool::new(false),
                quarantined: AtomicBool::new(false),
                spend_cap_micros: None,
                budgets: None,
                spent_micros: 0,
            },
            subject,
            trust,
            generation: policy.generation(),
            verified_ms: now_ms,
        });
        self.verified.insert(hash, verified.clone());
        Ok(verified)
    }
}

/// Whether a key id is a workload's (a verified token's), not a stored key's.
pub fn is_workload(key_id: &str) -> bool {
    key_id.starts_with("jwt:")
}

/// `jwt:<credential>:<subject>`; a subject over 160 bytes is cut, with a digest of the
/// whole so two long subjects alike at the start stay apart.
fn key_id(credential: &str, subject: &str) -> String {
    if subject.len() <= 160 {
        return format!("jwt:{credential}:{subject}");
    }
    let mut end = 120;
    while !subject.is_char_boundary(end) {
        end -= 1;
    }
    let digest = crate::base::crypto::sha256_hex(&[subject.as_bytes()]);
    format!("jwt:{credential}:{}…{}", &subject[..end], &digest[..16])
}

/// A subject as the audit keeps it: at most 200 bytes, cut at a character boundary.
fn truncated(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
