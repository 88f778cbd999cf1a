//! The compiled policy snapshot the request path reads: built once per change from the
//! store, validated and pre-computed (regexes, injected header values, rule order), then
//! swapped in whole.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroizing;

use crate::base::money::to_micros;
use crate::dataplane::budget::{Limit, Rate};
use crate::dataplane::redact::Guard;
use crate::dataplane::rules::{Rule, RuleList};
use crate::dataplane::usage::PriceTable;
use crate::policy::Period;
use crate::policy::Vendor;
use crate::policy::rows::{KeyRow, SecretError, StoredPolicy};
use crate::policy::{Alerts, Cost, Effect, Webhook};

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
pub struct Secret(pub(super) Zeroizing<Vec<u8>>);

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
    /// A secret the server reads itself could not be read: requests are refused (503
    /// `credential_unavailable`) until it can.
    Unavailable,
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
    /// Runaway guards on POST and PATCH, when the proxy says.
    pub guards: RunawayGuards,
    /// The audit keeps the values of the body fields its rules read (`audit.body_fields`).
    pub keep_body_fields: bool,
    /// On MCP proxies (`protocol: mcp`): each POST is read as a JSON-RPC message.
    pub mcp: Option<Arc<McpProxy>>,
}

/// A proxy's runaway guards on its non-idempotent requests (POST, PATCH), and its alerts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunawayGuards {
    /// A repeat within this many milliseconds is refused (`duplicate_request`).
    pub duplicate_window_ms: Option<u64>,
    /// An `Idempotency-Key` derived from the request is added where none was sent.
    pub idempotency_key: bool,
    /// Envoy's retry headers for requests safe to repeat, when the proxy asks.
    pub retries: Option<RetryHeaders>,
    /// Anomaly alerts: read off the request path, by the control plane.
    pub alerts: Option<Arc<AlertRule>>,
    /// Where alerts and requests for approval are posted.
    pub webhooks: Arc<[Webhook]>,
}

impl AlertRule {
    /// What is watched and what happens, in words.
    fn explain(&self, hooks: bool) -> String {
        let spec = &self.spec;
        let mut watched = Vec::new();
        for (name, surge) in [("requests", &spec.requests), ("denials", &spec.denials)] {
            if let Some(s) = surge {
                watched.push(format!(
                    "{name} over {}× baseline (at least {})",
                    s.factor, s.min
                ));
            }
        }
        if let Some(e) = &spec.errors {
            watched.push(format!(
                "{:.0} % vendor errors (of at least {})",
                e.share * 100.0,
                e.min
            ));
        }
        if spec.spend_near_cap {
            watched.push("a spend cap 80 % used".to_owned());
        }
        if spec.new_paths {
            watched.push("new paths".to_owned());
        }
        format!(
            "anomaly alerts over {} s windows: {}{}{}",
            self.window_ms / 1000,
            watched.join(", "),
            if spec.quarantine {
                "; the key is quarantined (403 quarantined) when requests, denials or errors fire"
            } else {
                ""
            },
            if hooks {
                "; posted to the proxy's webhooks"
            } else {
                ""
            },
        )
    }
}

/// A proxy's anomaly alerts, their spans read.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub spec: Alerts,
    pub window_ms: u64,
    pub baseline_ms: u64,
}

/// What asks Envoy's router to retry one request: `x-envoy-max-retries`,
/// `x-envoy-retry-on` and `x-envoy-retriable-status-codes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryHeaders {
    pub max: String,
    pub on: String,
    pub statuses: String,
}

impl RetryHeaders {
    /// `priced`: on a proxy with a cost, only a connection that never opened is retried:
    /// after a reset or a 5xx the vendor may have done (and billed) the work, and only one
    /// answer would be priced.
    pub fn new(r: &crate::policy::Retries, priced: bool) -> Self {
        if priced {
            return Self {
                max: r.max.to_string(),
                on: "connect-failure".to_owned(),
                statuses: String::new(),
            };
        }
        let mut on = Vec::new();
        if r.connection_failures {
            on.push("connect-failure,reset");
        }
        if !r.statuses.is_empty() {
            on.push("retriable-status-codes");
        }
        Self {
            max: r.max.to_string(),
            on: on.join(","),
            statuses: (r.statuses.iter().map(u16::to_string))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Whether a request may be sent twice: an idempotent method, or a key that lets the
    /// vendor deduplicate.
    pub fn safe(method: &str, idempotency_key: bool) -> bool {
        idempotency_key
            || ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
                .iter()
                .any(|m| method.eq_ignore_ascii_case(m))
    }
}

impl RunawayGuards {
    /// What the guards do to a request of `method`, in words (for `latchkey check`).
    pub fn explain(&self, method: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(alerts) = &self.alerts {
            out.push(alerts.explain(!self.webhooks.is_empty()));
        }
        if !self.cover(method) {
            return out;
        }
        if let Some(ms) = self.duplicate_window_ms {
            out.push(format!(
                "a repeat of this request (same key, path, body and Idempotency-Key) within {} s is refused: 409 duplicate_request",
                ms / 1000
            ));
        }
        if self.idempotency_key {
            out.push(
                "without an Idempotency-Key, it gets one derived from the request, for the vendor to deduplicate"
                    .to_owned(),
            );
        }
        out
    }

    /// Whether a request of `method` is guarded: it is then judged with its body.
    pub fn cover(&self, method: &str) -> bool {
        (self.duplicate_window_ms.is_some() || self.idempotency_key)
            && (method.eq_ignore_ascii_case("POST") || method.eq_ignore_ascii_case("PATCH"))
    }
}

/// What only ext_proc can enforce, the one list: `apply` checks a policy against it in
/// ext_authz mode, and a request that reaches ext_authz anyway is refused with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtProcOnly {
    SignsBody,
    ReadsBody,
    PricedFromResponse,
    GuardsResponse,
}

impl ExtProcOnly {
    pub fn why(self) -> &'static str {
        match self {
            ExtProcOnly::SignsBody => {
                "an AWS signature over the request body (or set `unsigned_payload: true`)"
            }
            ExtProcOnly::ReadsBody => "rules or runaway guards that read the request body",
            ExtProcOnly::PricedFromResponse => "a cost read from responses",
            ExtProcOnly::GuardsResponse => "responses scrubbed or redacted",
        }
    }
}

impl Proxy {
    /// The first thing this proxy does that ext_authz cannot, if any.
    pub fn ext_proc_only(&self) -> Option<ExtProcOnly> {
        if self.injection.signs_body() {
            Some(ExtProcOnly::SignsBody)
        } else if self.needs_body {
            Some(ExtProcOnly::ReadsBody)
        } else if self.cost.is_some() {
            Some(ExtProcOnly::PricedFromResponse)
        } else if self.response.is_some() {
            Some(ExtProcOnly::GuardsResponse)
        } else {
            None
        }
    }
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
    pub(super) fn from_policy(cost: &Cost) -> Option<Self> {
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
    pub(super) fn of(k: &crate::policy::rows::KeyRow) -> Option<Box<Self>> {
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

/// An MCP proxy's per-tool settings, compiled.
#[derive(Debug, Default)]
pub struct McpProxy {
    pub tools: Box<[McpTool]>,
}

#[derive(Debug)]
pub struct McpTool {
    /// The entry's name as the policy gives it (a glob): the limits' key.
    pub entry: Arc<str>,
    pub matches: regex::Regex,
    pub per_minute: Option<Rate>,
    pub per_day: Option<Rate>,
    pub cost: Option<Arc<CostSpec>>,
}

impl McpProxy {
    /// The settings of tool `name`: the first entry that matches it.
    pub fn tool(&self, name: &str) -> Option<&McpTool> {
        self.tools.iter().find(|t| t.matches.is_match(name))
    }
}

impl McpTool {
    /// The tool's rate limits for one proxy credential's callers together.
    pub fn limits(&self, proxy: &str, caller: &str) -> impl Iterator<Item = Limit> {
        [("minute", self.per_minute), ("day", self.per_day)]
            .into_iter()
            .filter_map(move |(period, rate)| {
                Some(Limit {
                    key: Arc::from(format!("tool:{proxy}:{}:{caller}:{period}", self.entry)),
                    rate: rate?,
                })
            })
    }
}

/// A proxy credential's trust in an issuer's workload tokens (`identity`), compiled.
#[derive(Debug)]
pub struct Trust {
    pub credential: u32,
    pub issuer: Box<str>,
    pub audience: Box<str>,
    pub source: JwksSource,
    pub subject: regex::Regex,
    pub claims: Box<[(Box<str>, regex::Regex)]>,
    /// What a run key minted with a token may be at most.
    pub max_ttl_ms: i64,
    pub max_spend_cap_usd: Option<f64>,
}

/// Where an issuer's public keys are read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JwksSource {
    File(std::path::PathBuf),
    Url(String),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(path) => write!(f, "file {}", path.display()),
            JwksSource::Url(url) => write!(f, "url {url}"),
        }
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
    /// Set while an alert's quarantine holds the key: by the snapshot, or at once on the
    /// replica whose alert set it.
    pub quarantined: AtomicBool,
    pub spend_cap_micros: Option<u64>,
    /// A run key's cap period and token budgets; boxed, since most keys have none
    /// (100,000 keys stay small).
    pub budgets: Option<Box<KeyBudgets>>,
    /// Spent as of the snapshot: where an account not yet in memory starts.
    pub spent_micros: u64,
}

impl KeyEntry {
    /// A copy, revoked if this one is by now.
    pub(super) fn copy(&self) -> Self {
        Self {
            hash: self.hash,
            id: self.id.clone(),
            credential: self.credential,
            label: self.label.clone(),
            expires_at_ms: self.expires_at_ms,
            revoked: AtomicBool::new(self.revoked.load(Ordering::Relaxed)),
            quarantined: AtomicBool::new(self.quarantined.load(Ordering::Relaxed)),
            spend_cap_micros: self.spend_cap_micros,
            budgets: self.budgets.clone(),
            spent_micros: self.spent_micros,
        }
    }
}

/// A change of keys alone, made on a running snapshot without compiling (`compile`'s
/// `Policy::changed`): what an admin, a mint or an alert did to one key. `serve` sends
/// these to the in-process modules too, in place of the whole policy.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub enum KeyChange {
    Issued(KeyRow),
    Revoked(String),
    Quarantined(String),
    Released(String),
}

#[derive(Debug, Default, Clone)]
pub struct Policy {
    /// Everything but the keys: recompiled only when targets, credentials, proxies or
    /// rules change, shared by the snapshots of key changes.
    pub(super) compiled: Arc<Compiled>,
    /// Keyed by the first 16 bytes of the key's SHA-256; the full hash is compared in
    /// constant time after the lookup. The maps read on every request hash with
    /// foldhash, not SipHash: what they are keyed by is the policy's, never the agent's
    /// to choose, and SipHash cost 1,400 instructions a request.
    pub(super) keys: Arc<foldhash::HashMap<u128, KeyEntry>>,
    /// Keys issued on this replica since the key table was built, put into effect
    /// without reading the store back; folded into the table by the next load.
    pub(super) issued: Arc<foldhash::HashMap<u128, KeyEntry>>,
}

/// The compiled policy without its keys.
#[derive(Debug, Default)]
pub(super) struct Compiled {
    pub(super) proxies: foldhash::HashMap<Box<str>, Proxy>,
    pub(super) credentials: Vec<Arc<str>>,
    /// Each proxy credential's index by its name.
    pub(super) credential_index: foldhash::HashMap<Arc<str>, u32>,
    /// Each proxy credential's index by its store id, for the key table.
    pub(super) credential_ids: HashMap<Box<str>, u32>,
    /// Each proxy credential's own rules, by credential index.
    pub(super) credential_rules: Vec<RuleList>,
    /// Each proxy credential's request limits, across every proxy it uses.
    pub(super) credential_limits: Vec<Box<[Limit]>>,
    /// Each proxy credential's spend caps and token budgets.
    pub(super) credential_caps: Vec<Caps>,
    pub(super) rules_by_id: HashMap<Arc<str>, Arc<Rule>>,
    /// A digest of the rows it was compiled from: equal, and only keys changed.
    pub(super) source: [u8; 32],
    /// The generation of the server-read secrets it was compiled with.
    pub(super) server_generation: u64,
    /// Target credentials whose server-read secret could not be read, and why.
    pub(super) unavailable: Vec<(Arc<str>, String)>,
    /// The proxy credentials' trust in workload tokens.
    pub(super) trusts: Vec<Trust>,
    /// Unique to this compilation: what a verified token was verified under.
    pub(super) generation: u64,
}

impl Policy {
    /// Whether any proxy has anomaly alerts.
    pub fn has_alerts(&self) -> bool {
        self.compiled
            .proxies
            .values()
            .any(|p| p.guards.alerts.is_some())
    }

    pub fn proxy(&self, name: &str) -> Option<&Proxy> {
        self.compiled.proxies.get(name)
    }

    /// Target credentials whose secret the server reads and could not, with why.
    pub fn unavailable(&self) -> &[(Arc<str>, String)] {
        &self.compiled.unavailable
    }

    /// Why this policy cannot be enforced by ext_authz alone, if it cannot: the first
    /// proxy that needs a body or a response phase, named.
    pub fn ext_authz_obstacle(&self) -> Option<String> {
        let mut names: Vec<&Proxy> = self.compiled.proxies.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        names.into_iter().find_map(|p| {
            Some(format!(
                "proxy {:?} has {}, which needs Envoy's ext_proc; this latchkey runs with LATCHKEY_MODE=ext_authz",
                p.name,
                p.ext_proc_only()?.why()
            ))
        })
    }

    /// Revokes, in this running snapshot, every key the store revokes or no longer
    /// has: a replica that cannot compile the store's policy (a master key it lacks, a
    /// bug) still stops revoked and quarantined keys, which must never wait for a full
    /// compile.
    /// Returns how many keys it stopped that were not stopped so (revoked, or
    /// quarantined) before.
    pub fn apply_revocations(&self, stored: &StoredPolicy) -> usize {
        let live: HashMap<&[u8], (bool, bool)> = stored
            .keys
            .iter()
            .map(|k| {
                let stopped = (k.revoked_at.is_some(), k.quarantined_at.is_some());
                (k.hash.as_slice(), stopped)
            })
            .collect();
        self.all_keys()
            .filter(|entry| {
                let (revoked, quarantined) = live
                    .get(entry.hash.as_slice())
                    .copied()
                    .unwrap_or((true, false));
                // Quarantines too, never a release: that waits for a compile.
                let newly_quarantined =
                    quarantined && !entry.quarantined.swap(true, Ordering::Relaxed);
                let newly_revoked = revoked && !entry.revoked.swap(true, Ordering::Relaxed);
                newly_revoked || newly_quarantined
            })
            .count()
    }

    pub fn key(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        let prefix = u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"));
        self.keys
            .get(&prefix)
            .or_else(|| self.issued.get(&prefix))
            .filter(|k| crate::base::crypto::ct_eq(&k.hash, hash))
    }

    /// Every key, the table's and those issued here since.
    fn all_keys(&self) -> impl Iterator<Item = &KeyEntry> {
        self.keys.values().chain(self.issued.values())
    }

    /// Revokes the key `id` in this snapshot (and every snapshot sharing its key table):
    /// whether it was there.
    pub fn revoke(&self, id: &str) -> bool {
        self.all_keys()
            .find(|k| &*k.id == id)
            .inspect(|k| k.revoked.store(true, Ordering::Relaxed))
            .is_some()
    }

    /// Quarantines a key, or releases it, in this snapshot (and those sharing its key
    /// table) at once; the store's row is what later snapshots are built from.
    pub fn set_quarantined(&self, id: &str, quarantined: bool) -> bool {
        self.all_keys()
            .find(|k| &*k.id == id)
            .inspect(|k| k.quarantined.store(quarantined, Ordering::Relaxed))
            .is_some()
    }

    /// The proxy credentials' trust in workload tokens.
    pub fn trusts(&self) -> &[Trust] {
        &self.compiled.trusts
    }

    /// Which compilation this is: tokens verified under another are verified again.
    pub fn generation(&self) -> u64 {
        self.compiled.generation
    }

    pub fn credential_name(&self, index: u32) -> &Arc<str> {
        &self.compiled.credentials[index as usize]
    }

    pub fn credential_index(&self, name: &str) -> Option<u32> {
        self.compiled.credential_index.get(name).copied()
    }

    pub fn credential_rules(&self, index: u32) -> &RuleList {
        &self.compiled.credential_rules[index as usize]
    }

    pub fn credential_limits(&self, index: u32) -> &[Limit] {
        &self.compiled.credential_limits[index as usize]
    }

    /// The request limits a request through `proxy` counts against: its credential's
    /// (by index), then the proxy's. (On MCP proxies a tool's come on top.)
    pub fn request_limits<'a>(
        &'a self,
        proxy: &'a Proxy,
        credential: Option<u32>,
    ) -> impl Iterator<Item = &'a Limit> {
        let credential = credential.map_or(&[][..], |index| self.credential_limits(index));
        credential.iter().chain(proxy.limits.iter())
    }

    pub fn credential_caps(&self, index: u32) -> &Caps {
        &self.compiled.credential_caps[index as usize]
    }

    pub fn rule(&self, id: &str) -> Option<&Arc<Rule>> {
        self.compiled.rules_by_id.get(id)
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
