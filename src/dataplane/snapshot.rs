//! The compiled policy snapshot the request path reads: built once per change from the
//! store, validated and pre-computed (regexes, injected header values, rule order), then
//! swapped in whole.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use zeroize::Zeroizing;

use crate::base::crypto::MasterKey;
use crate::base::money::to_micros;
use crate::dataplane::budget::{Limit, Rate};
use crate::dataplane::redact::Guard;
use crate::dataplane::rules::{Rule, RuleList};
use crate::dataplane::usage::PriceTable;
use crate::policy::Period;
use crate::policy::Vendor;
use crate::policy::rows::{SecretError, StoredPolicy};
use crate::policy::{AuthKind, Cost, CredentialType, Effect, Limits, TargetUrl};

/// Envoy clusters that reach any host (see envoy/envoy.yaml): which one a request takes
/// decides whether the upstream connection uses TLS.
pub const CLUSTER_TLS: &str = "latchkey_tls";
pub const CLUSTER_PLAIN: &str = "latchkey_plain";

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{0}")]
    Invalid(String),
}

/// Secret bytes that never print.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the real credential reaches the upstream.
#[derive(Debug)]
pub enum Injection {
    /// A header (lower-case name) with its complete value, e.g. `Bearer sk_…`.
    Header { name: String, value: Secret },
    /// A query parameter; name and value already percent-encoded.
    Query { param: String, value: Secret },
    /// `Authorization: Bearer` with a token fetched for the request (`credentials::oauth2`).
    OAuth2(Arc<crate::dataplane::credentials::oauth2::TokenSource>),
    /// An AWS Signature Version 4 over the request as it goes upstream.
    SigV4(crate::dataplane::credentials::sigv4::Signer),
}

impl Injection {
    /// Whether the credential covers the request body (an AWS signature over the
    /// payload): the body must be read before the request can go.
    pub fn signs_body(&self) -> bool {
        matches!(self, Injection::SigV4(signer) if signer.signs_payload())
    }
}

#[derive(Debug)]
pub struct Upstream {
    pub cluster: &'static str,
    pub authority: String,
    pub base_path: String,
}

#[derive(Debug)]
pub struct Proxy {
    pub name: Arc<str>,
    /// The target's name, for the audit.
    pub target: Arc<str>,
    pub upstream: Upstream,
    pub injection: Arc<Injection>,
    pub default_effect: Effect,
    /// The proxy's own rules; a credential's rules live with the credential.
    pub rules: RuleList,
    /// The proxy credentials bound to this proxy.
    pub bound: HashSet<u32>,
    /// Whether a request here may need its body read: a rule judges it, or the
    /// signature covers it.
    pub needs_body: bool,
    /// The proxy's request limits, for all its traffic.
    pub limits: Box<[Limit]>,
    /// What a successful response costs, when the proxy says.
    pub cost: Option<Arc<CostSpec>>,
    /// What is scrubbed or redacted from responses, when the proxy says.
    pub response: Option<Arc<Guard>>,
    /// How long a call may take, when the proxy says (else the Envoy route's timeout).
    pub timeout_ms: Option<u64>,
}

impl Proxy {
    /// Whether latchkey reads this proxy's response bodies (to scrub, redact or price).
    pub fn reads_response_body(&self) -> bool {
        self.response.is_some()
            || self.cost.as_deref().is_some_and(|c| {
                matches!(c, CostSpec::ResponseJson { .. } | CostSpec::Tokens { .. })
            })
    }

    /// The token pricing's vendor, on proxies priced by LLM tokens: their request bodies
    /// are read for the model.
    pub fn token_vendor(&self) -> Option<Vendor> {
        match self.cost.as_deref() {
            Some(CostSpec::Tokens { vendor, .. }) => Some(*vendor),
            _ => None,
        }
    }
}

/// How a proxy's responses are priced.
#[derive(Debug, Clone, PartialEq)]
pub enum CostSpec {
    /// A fixed price per successful request, in micro-dollars.
    PerRequest(u64),
    /// A number read from the JSON response, times a price per unit. `max_micros` is
    /// reserved before forwarding and charged whole when the response cannot be priced.
    ResponseJson {
        pointer: String,
        usd_per_unit: f64,
        max_micros: Option<u64>,
    },
    /// LLM tokens, read from the answer (JSON or an event stream) as the vendor reports
    /// them and priced by the request's model. The request body is read for the model.
    Tokens {
        vendor: Vendor,
        prices: PriceTable,
        max_micros: Option<u64>,
    },
}

impl CostSpec {
    fn from_policy(cost: &Cost) -> Option<Self> {
        if let (Some(vendor), Some(prices)) = (cost.tokens, &cost.usd_per_million) {
            let by_model = prices.iter().map(|(m, p)| (m.clone(), *p)).collect();
            return Some(CostSpec::Tokens {
                vendor,
                prices: PriceTable { by_model },
                max_micros: cost.max_usd_per_request.map(to_micros),
            });
        }
        match (&cost.response_json, cost.usd_per_unit, cost.per_request_usd) {
            (Some(pointer), Some(usd_per_unit), _) => Some(CostSpec::ResponseJson {
                pointer: pointer.clone(),
                usd_per_unit,
                max_micros: cost.max_usd_per_request.map(to_micros),
            }),
            (_, _, Some(usd)) => Some(CostSpec::PerRequest(to_micros(usd))),
            _ => None,
        }
    }

    /// What is reserved before forwarding: the known price, or the most a response may
    /// cost (0 when the proxy gives no maximum).
    pub fn reservation(&self) -> u64 {
        match self {
            CostSpec::PerRequest(micros) => *micros,
            CostSpec::ResponseJson { max_micros, .. } | CostSpec::Tokens { max_micros, .. } => {
                max_micros.unwrap_or(0)
            }
        }
    }

    /// The price of one response, in micro-dollars: `None` if the body does not say.
    /// (Token prices come from a [`crate::dataplane::usage::Meter`] instead.)
    pub fn price(&self, body: &[u8]) -> Option<u64> {
        match self {
            CostSpec::PerRequest(micros) => Some(*micros),
            CostSpec::Tokens { .. } => None,
            CostSpec::ResponseJson {
                pointer,
                usd_per_unit,
                ..
            } => {
                let json: serde_json::Value = serde_json::from_slice(body).ok()?;
                let units = json.pointer(pointer)?.as_f64()?;
                Some(to_micros(units.max(0.0) * usd_per_unit))
            }
        }
    }
}

/// Spend caps (micro-dollars) and LLM token budgets, each with the period it resets in.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub spend: Vec<(Period, u64)>,
    pub tokens: Vec<(Period, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyBudgets {
    /// The period the key's spend cap resets in; none: the key's whole life.
    pub cap_period: Option<Period>,
    pub tokens: Vec<(Period, u64)>,
}

impl KeyBudgets {
    fn of(k: &crate::policy::rows::KeyRow) -> Option<Box<Self>> {
        let tokens: Vec<(Period, u64)> = [
            (Period::Minute, k.tokens_per_minute),
            (Period::Day, k.tokens_per_day),
        ]
        .into_iter()
        .filter_map(|(p, n)| Some((p, n?)))
        .collect();
        (k.cap_period.is_some() || !tokens.is_empty()).then(|| {
            Box::new(Self {
                cap_period: k.cap_period,
                tokens,
            })
        })
    }
}

#[derive(Debug)]
pub struct KeyEntry {
    pub hash: [u8; 32],
    pub id: Arc<str>,
    pub credential: u32,
    pub label: Option<Arc<str>>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    /// Set by the snapshot that revoked it, or later by [`Policy::apply_revocations`].
    pub revoked: AtomicBool,
    pub spend_cap_micros: Option<u64>,
    /// A run key's cap period and token budgets; boxed, since most keys have none
    /// (100,000 keys stay small).
    pub budgets: Option<Box<KeyBudgets>>,
    /// Spent as of the snapshot: where an account not yet in memory starts.
    pub spent_micros: u64,
}

#[derive(Debug, Default)]
pub struct Policy {
    proxies: HashMap<Box<str>, Proxy>,
    /// Keyed by the first 16 bytes of the key's SHA-256; the full hash is compared in
    /// constant time after the lookup.
    keys: HashMap<u128, KeyEntry>,
    credentials: Vec<Arc<str>>,
    /// Each proxy credential's own rules, by credential index.
    credential_rules: Vec<RuleList>,
    /// Each proxy credential's request limits, across every proxy it uses.
    credential_limits: Vec<Box<[Limit]>>,
    /// Each proxy credential's daily spend cap, in micro-dollars.
    credential_caps: Vec<Caps>,
    rules_by_id: HashMap<Arc<str>, Arc<Rule>>,
}

/// Characters left as they are in a query parameter.
const QUERY_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A target secret in every form it travels upstream, so an echo of any is caught: as
/// given, and as the injection carries it (Basic's base64 pair, a query's encoding, an
/// AWS secret and session token).
fn echoed_forms(kind: AuthKind, secret: &str, injection: &Injection) -> Vec<Zeroizing<Vec<u8>>> {
    let bytes = |s: &[u8]| Zeroizing::new(s.to_vec());
    match (kind, injection) {
        (_, Injection::SigV4(signer)) => signer.secrets().map(bytes).collect(),
        (AuthKind::Basic, Injection::Header { value, .. }) => {
            let pair = value.expose().strip_prefix(b"Basic ").unwrap_or_default();
            vec![bytes(secret.as_bytes()), bytes(pair)]
        }
        (_, Injection::Query { value, .. }) => {
            vec![bytes(secret.as_bytes()), bytes(value.expose())]
        }
        _ => vec![bytes(secret.as_bytes())],
    }
}

/// The budget limits a `limits:` block sets, with their store keys.
fn limits(owner: &str, name: &str, limits: Option<&Limits>) -> Box<[Limit]> {
    let Some(limits) = limits else {
        return Box::default();
    };
    [
        ("minute", limits.requests_per_minute.map(Rate::per_minute)),
        ("day", limits.requests_per_day.map(Rate::per_day)),
    ]
    .into_iter()
    .filter_map(|(period, rate)| {
        Some(Limit {
            key: Arc::from(format!("{owner}:{name}:{period}")),
            rate: rate?,
        })
    })
    .collect()
}

impl Policy {
    pub fn proxy(&self, name: &str) -> Option<&Proxy> {
        self.proxies.get(name)
    }

    /// Why this policy cannot be enforced by ext_authz alone, if it cannot: the first
    /// proxy that needs a body or a response phase, named.
    pub fn ext_authz_obstacle(&self) -> Option<String> {
        let mut names: Vec<&Proxy> = self.proxies.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        names.into_iter().find_map(|p| {
            let why = if p.injection.signs_body() {
                "an AWS signature over the request body (or set `unsigned_payload: true`)"
            } else if p.needs_body {
                "rules that read the request body"
            } else if p.cost.is_some() {
                "a cost read from responses"
            } else if p.response.is_some() {
                "responses scrubbed or redacted"
            } else {
                return None;
            };
            Some(format!(
                "proxy {:?} has {why}, which needs Envoy's ext_proc; this latchkey runs with LATCHKEY_MODE=ext_authz",
                p.name
            ))
        })
    }

    /// Revokes, in this running snapshot, every key the store revokes or no longer
    /// has: a replica that cannot compile the store's policy (a master key it lacks, a
    /// bug) still stops revoked keys, which must never wait for a full compile.
    /// Returns how many keys it revoked.
    pub fn apply_revocations(&self, stored: &StoredPolicy) -> usize {
        let live: HashMap<&[u8], bool> = stored
            .keys
            .iter()
            .map(|k| (k.hash.as_slice(), k.revoked_at.is_some()))
            .collect();
        self.keys
            .values()
            .filter(|entry| {
                live.get(entry.hash.as_slice())
                    .is_none_or(|&revoked| revoked)
                    && !entry.revoked.swap(true, Ordering::Relaxed)
            })
            .count()
    }

    pub fn key(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        let prefix = u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"));
        self.keys
            .get(&prefix)
            .filter(|k| crate::base::crypto::ct_eq(&k.hash, hash))
    }

    pub fn credential_name(&self, index: u32) -> &Arc<str> {
        &self.credentials[index as usize]
    }

    pub fn credential_index(&self, name: &str) -> Option<u32> {
        self.credentials
            .iter()
            .position(|c| c.as_ref() == name)
            .map(|i| i as u32)
    }

    pub fn credential_rules(&self, index: u32) -> &RuleList {
        &self.credential_rules[index as usize]
    }

    pub fn credential_limits(&self, index: u32) -> &[Limit] {
        &self.credential_limits[index as usize]
    }

    pub fn credential_caps(&self, index: u32) -> &Caps {
        &self.credential_caps[index as usize]
    }

    pub fn rule(&self, id: &str) -> Option<&Arc<Rule>> {
        self.rules_by_id.get(id)
    }

    /// Builds the snapshot, decrypting every target secret: a wrong master key fails here,
    /// at start-up or at apply, never on a request.
    pub fn compile(stored: &StoredPolicy, master: &MasterKey) -> Result<Self, CompileError> {
        let invalid = |s: String| CompileError::Invalid(s);
        let mut cred_index: HashMap<&str, u32> = HashMap::new();
        let mut cred_by_id: HashMap<&str, u32> = HashMap::new();
        let mut credentials = Vec::new();
        let mut credential_limits = Vec::new();
        let mut credential_caps = Vec::new();
        let mut injections: HashMap<&str, Arc<Injection>> = HashMap::new();
        let mut echoes: HashMap<&str, Vec<Zeroizing<Vec<u8>>>> = HashMap::new();
        // Only the credentials a proxy scrubs need their echoed forms.
        let scrubbed: HashSet<&str> = stored
            .proxies
            .iter()
            .filter(|p| p.response.as_ref().is_some_and(|r| r.scrub_credential))
            .map(|p| p.target_credential.as_str())
            .collect();
        for c in &stored.credentials {
            match c.kind {
                CredentialType::Proxy => {
                    let i = credentials.len() as u32;
                    credentials.push(Arc::from(c.name.as_str()));
                    credential_limits.push(limits("credential", &c.name, c.limits.as_ref()));
                    let given = c.limits.clone().unwrap_or_default();
                    credential_caps.push(Caps {
                        spend: (given.spend_caps().into_iter())
                            .map(|(p, usd)| (p, to_micros(usd)))
                            .collect(),
                        tokens: given.token_budgets(),
                    });
                    cred_index.insert(&c.name, i);
                    cred_by_id.insert(&c.id, i);
                }
                CredentialType::Target => {
                    let (Some(auth), Some(plain)) = (&c.auth, c.open_secret(master)?) else {
                        return Err(invalid(format!(
                            "credential {:?} has no auth or secret",
                            c.name
                        )));
                    };
                    let secret = std::str::from_utf8(&plain).map_err(|_| {
                        invalid(format!("credential {:?}: secret is not UTF-8", c.name))
                    })?;
                    let header = |name: &str, value: String| Injection::Header {
                        name: name.to_ascii_lowercase(),
                        value: Secret(Zeroizing::new(value.into_bytes())),
                    };
                    let injection = match auth.kind {
                        AuthKind::Bearer => header("authorization", format!("Bearer {secret}")),
                        AuthKind::Header => header(
                            auth.header.as_deref().unwrap_or_default(),
                            format!("{}{secret}", auth.prefix.as_deref().unwrap_or_default()),
                        ),
                        AuthKind::Basic => {
                            let user = auth.username.as_deref().unwrap_or_default();
                            let pair = Zeroizing::new(format!("{user}:{secret}"));
                            header("authorization", format!("Basic {}", BASE64.encode(&*pair)))
                        }
                        AuthKind::Query => Injection::Query {
                            param: utf8_percent_encode(
                                auth.param.as_deref().unwrap_or_default(),
                                QUERY_SAFE,
                            )
                            .to_string(),
                            value: Secret(Zeroizing::new(
                                utf8_percent_encode(secret, QUERY_SAFE)
                                    .to_string()
                                    .into_bytes(),
                            )),
                        },
                        AuthKind::Oauth2ClientCredentials => {
                            Injection::OAuth2(crate::dataplane::credentials::oauth2::source(
                                &c.id,
                                crate::dataplane::credentials::oauth2::TokenConfig {
                                    token_url: auth.token_url.clone().unwrap_or_default(),
                                    client_id: auth.client_id.clone().unwrap_or_default(),
                                    scopes: auth.scopes.clone().unwrap_or_default(),
                                    client_auth: auth.client_auth.unwrap_or_default(),
                                    params: auth.token_params.clone().unwrap_or_default(),
                                },
                                secret,
                            ))
                        }
                        AuthKind::AwsSigv4 => {
                            let (secret, token) = match secret.split_once('\n') {
                                Some((s, t)) => (s, Some(t)),
                                None => (secret, None),
                            };
                            crate::policy::secrets::check_aws_secrets(secret, token)
                                .map_err(|e| invalid(format!("credential {:?}: {e}", c.name)))?;
                            Injection::SigV4(crate::dataplane::credentials::sigv4::Signer::new(
                                auth.access_key_id.as_deref().unwrap_or_default(),
                                secret,
                                token,
                                auth.region.as_deref().unwrap_or_default(),
                                auth.service.as_deref().unwrap_or_default(),
                                auth.unsigned_payload.unwrap_or(false),
                            ))
                        }
                    };
                    if let Injection::Header { value, .. } = &injection
                        && value
                            .expose()
                            .iter()
                            .any(|&b| b == b'\r' || b == b'\n' || b == 0)
                    {
                        return Err(invalid(format!(
                            "credential {:?}: secret holds a line break or NUL",
                            c.name
                        )));
                    }
                    if scrubbed.contains(c.name.as_str()) {
                        echoes.insert(&c.name, echoed_forms(auth.kind, secret, &injection));
                    }
                    injections.insert(&c.name, Arc::new(injection));
                }
            }
        }

        // Sized once: growing a table of 100,000s of keys leaves its smaller copies behind as
        // freed but resident memory.
        let mut keys = HashMap::with_capacity(stored.keys.len());
        for k in &stored.keys {
            let Some(&credential) = cred_by_id.get(k.credential_id.as_str()) else {
                continue;
            };
            let hash: [u8; 32] = k
                .hash
                .as_slice()
                .try_into()
                .map_err(|_| invalid(format!("key {} has a malformed hash", k.id)))?;
            let prefix = u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"));
            keys.insert(
                prefix,
                KeyEntry {
                    hash,
                    id: Arc::from(k.id.as_str()),
                    credential,
                    label: k.label.as_deref().map(Arc::from),
                    expires_at_ms: k.expires_at_ms,
                    revoked: AtomicBool::new(k.revoked_at.is_some()),
                    spend_cap_micros: k.spend_cap_usd.map(to_micros),
                    budgets: KeyBudgets::of(k),
                    spent_micros: to_micros(k.spent_usd),
                },
            );
        }

        let mut credential_rules: HashMap<&str, Vec<Arc<Rule>>> = HashMap::new();
        let mut proxy_rules: HashMap<&str, Vec<Arc<Rule>>> = HashMap::new();
        let mut rules_by_id = HashMap::new();
        for r in &stored.rules {
            let rule =
                Arc::new(Rule::compile(r).map_err(|e| invalid(format!("rule {}: {e}", r.id)))?);
            rules_by_id.insert(rule.id.clone(), rule.clone());
            let owner = match (&r.credential, &r.proxy) {
                (Some(c), _) => credential_rules.entry(c).or_default(),
                (None, Some(p)) => proxy_rules.entry(p).or_default(),
                (None, None) => return Err(invalid(format!("rule {} has no owner", r.id))),
            };
            owner.push(rule);
        }
        let credential_rules = credentials
            .iter()
            .map(|name: &Arc<str>| {
                RuleList::new(credential_rules.remove(name.as_ref()).unwrap_or_default())
                    .map_err(|e| invalid(format!("rules of credential {name:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let targets: HashMap<&str, &str> = stored
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.url.as_str()))
            .collect();
        let mut proxies = HashMap::with_capacity(stored.proxies.len());
        for p in &stored.proxies {
            let url = targets
                .get(p.target.as_str())
                .ok_or_else(|| invalid(format!("proxy {:?}: no target {:?}", p.name, p.target)))?;
            let url = TargetUrl::parse(url).map_err(invalid)?;
            let injection = injections
                .get(p.target_credential.as_str())
                .cloned()
                .ok_or_else(|| {
                    invalid(format!(
                        "proxy {:?}: no target credential {:?}",
                        p.name, p.target_credential
                    ))
                })?;
            let mut bound = HashSet::new();
            for c in &p.proxy_credentials {
                let Some(&index) = cred_index.get(c.as_str()) else {
                    return Err(invalid(format!(
                        "proxy {:?}: no proxy credential {c:?}",
                        p.name
                    )));
                };
                bound.insert(index);
            }
            let rules = RuleList::new(proxy_rules.remove(p.name.as_str()).unwrap_or_default())
                .map_err(|e| invalid(format!("rules of proxy {:?}: {e}", p.name)))?;
            let needs_body = injection.signs_body()
                || p.cost.as_ref().is_some_and(|c| c.tokens.is_some())
                || rules.needs_body()
                || bound
                    .iter()
                    .any(|&c| credential_rules[c as usize].needs_body());
            proxies.insert(
                Box::from(p.name.as_str()),
                Proxy {
                    name: Arc::from(p.name.as_str()),
                    target: Arc::from(p.target.as_str()),
                    upstream: Upstream {
                        cluster: if url.tls { CLUSTER_TLS } else { CLUSTER_PLAIN },
                        authority: url.authority,
                        base_path: url.base_path,
                    },
                    injection,
                    default_effect: p.default_effect,
                    rules,
                    bound,
                    needs_body,
                    limits: limits("proxy", &p.name, p.limits.as_ref()),
                    timeout_ms: (p.limits.as_ref())
                        .and_then(|l| l.upstream_timeout_s)
                        .map(|s| u64::from(s) * 1000),
                    cost: p
                        .cost
                        .as_ref()
                        .and_then(CostSpec::from_policy)
                        .map(Arc::new),
                    response: p
                        .response
                        .as_ref()
                        .map(|spec| {
                            let forms = echoes.get(p.target_credential.as_str()).cloned();
                            Guard::new(spec, forms.unwrap_or_default())
                                .map(Arc::new)
                                .map_err(|e| invalid(format!("proxy {:?}: response: {e}", p.name)))
                        })
                        .transpose()?,
                },
            );
        }
        Ok(Self {
            proxies,
            keys,
            credentials,
            credential_rules,
            credential_limits,
            credential_caps,
            rules_by_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_redacted_wherever_they_sit() {
        let injection = Injection::Header {
            name: "authorization".into(),
            value: Secret(Zeroizing::new(b"Bearer sk_live_123".to_vec())),
        };
        let printed = format!("{injection:?} {:?}", Secret(Zeroizing::new(b"pw".to_vec())));
        assert!(!printed.contains("sk_live_123") && !printed.contains("pw\""));
        assert!(printed.contains("<redacted>"));
    }
}
