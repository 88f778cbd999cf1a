//! The policy file (DESIGN.md §4): its serde model, plain data. Parsing and validation
//! (`validate.rs`) are shared by the CLI and the server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::Period;
use crate::policy::alerts::{Alerts, Webhook};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file: {0}")]
    Syntax(String),
    #[error("policy file, {item}: {problem}")]
    Invalid { item: String, problem: String },
}

pub(crate) fn invalid(item: impl Into<String>, problem: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        item: item.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    #[serde(default)]
    pub credentials: Vec<CredentialSpec>,
    #[serde(default)]
    pub proxies: Vec<ProxySpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

impl PolicyFile {
    /// Webhook URLs as scheme and host only, for readers who may not post to them
    /// (a Slack-style hook's path is its token).
    pub fn hide_webhook_paths(&mut self) {
        for p in &mut self.proxies {
            for hook in p.guards.iter_mut().flat_map(|g| g.webhooks.iter_mut()) {
                hook.url = hook.shown();
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub name: String,
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialType {
    Target,
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    Bearer,
    Header,
    Basic,
    Query,
    Oauth2ClientCredentials,
    AwsSigv4,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: CredentialType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// oauth2: `basic` (default) or `body`: how the client secret reaches the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
    /// oauth2: extra form parameters of the token request, e.g. `audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_params: Option<BTreeMap<String, String>>,
    /// aws_sigv4: the access key id; the secret is the secret access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// aws_sigv4: temporary credentials' session token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<SecretRef>,
    /// aws_sigv4: sign `UNSIGNED-PAYLOAD` instead of the body's hash (S3 allows it); the
    /// body then never passes through latchkey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsigned_payload: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<SecretRef>>,
    /// Proxy credentials: request limits across every proxy the credential uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Proxy credentials: the workload tokens (JWTs) that stand for it, instead of keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::policy::Identity>,
}

/// Where secret material comes from: exactly one of the six. `env`, `file` and `value` are
/// read by the client that applies the file, and sealed in the store; `sealed: true` keeps
/// what latchkey already holds (what `export` writes for a secret that was given inline).
/// `mounted` and `aws_secrets_manager` are read by `latchkey serve` itself, and kept
/// current: the plaintext never crosses the admin API nor sits in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<bool>,
    /// An absolute path on the server, e.g. a Kubernetes Secret volume's file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounted: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_secrets_manager: Option<AwsSecretRef>,
}

/// A secret in AWS Secrets Manager, fetched by the server at start and every `refresh`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSecretRef {
    /// The secret's name or ARN.
    pub id: String,
    /// The secret's region; default: the server's `AWS_REGION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// For a secret stored as a JSON object: the member holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// How often the server fetches it again, e.g. `5m` (the default); at least `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    #[default]
    Deny,
    /// Rules only: hold the request for a person (`latchkey approvals`); an approved
    /// request passes once.
    Approve,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::Approve => "approve",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    pub name: String,
    pub target: String,
    pub target_credential: String,
    #[serde(default)]
    pub proxy_credentials: Vec<String>,
    #[serde(default)]
    pub default_effect: Effect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// What latchkey does to responses before the agent sees them. Only proxies that set
    /// it stream their responses through latchkey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSafety>,
    /// Runaway guards: what stops a looping agent before it costs anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guards: Option<Guards>,
    /// What the audit keeps of this proxy's requests beyond their method and path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditFacts>,
    /// `mcp`: the target is an MCP server (streamable HTTP).
    #[serde(default, skip_serializing_if = "crate::policy::Protocol::is_http")]
    pub protocol: crate::policy::Protocol,
    /// An MCP proxy's per-tool limits and prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<crate::policy::McpSpec>,
}

/// Opt-in facts for replay. The headers and query parameters rules read are always kept
/// (secrets withheld); body fields only where a proxy says so, since bodies carry what
/// agents send, personal data included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFacts {
    /// Keep the values of the body fields the rules read (JSON pointers), secrets and
    /// values over 256 bytes withheld, so a replay can judge body rules.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_fields: bool,
}

/// A proxy's runaway guards.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guards {
    /// Refuse (409 `duplicate_request`) a POST or PATCH that repeats one of the same key,
    /// path, body and `Idempotency-Key` within this window, e.g. `60s` (1s to 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window: Option<String>,
    /// Give a POST or PATCH that carries no `Idempotency-Key` one derived from the request
    /// (same key, path and body: same value), so a vendor that honours it, such as
    /// Stripe, deduplicates too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotency_key: bool,
    /// Envoy retries failed calls that are safe to repeat: idempotent methods, and
    /// requests with an `Idempotency-Key` (the agent's or the derived one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Anomaly alerts, and quarantine of the key that sets them off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
    /// Where this proxy's alerts and requests for approval are posted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Webhook>,
}

/// Upstream retries, by Envoy's router, with exponential backoff (0.1 s doubling, capped
/// at 2 s) and a vendor's `Retry-After` honoured on 429 (capped at 10 s).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Attempts after the first: 1 to 5.
    pub max: u32,
    /// Upstream statuses retried: any of 429, 502, 503, 504 (default: 502, 503, 504).
    #[serde(default = "Retries::default_statuses")]
    pub statuses: Vec<u16>,
    /// Retry when the connection fails or is reset (default: yes).
    #[serde(default = "Retries::yes")]
    pub connection_failures: bool,
}

impl Retries {
    fn default_statuses() -> Vec<u16> {
        vec![502, 503, 504]
    }

    fn yes() -> bool {
        true
    }
}

/// Response safety of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseSafety {
    /// Replace the target credential's secret wherever the upstream echoes it, in
    /// response headers and body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scrub_credential: bool,
    /// JSON response fields replaced with `"[REDACTED]"`: a JSON pointer (`/user/email`)
    /// or a field name matched at any depth (`phone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u32>,
    /// Proxy credentials: what all their requests may cost per UTC day (USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_usd_per_day: Option<f64>,
    /// Proxy credentials: per UTC week, Monday to Sunday (USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_usd_per_week: Option<f64>,
    /// Proxy credentials: per UTC calendar month (USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_usd_per_month: Option<f64>,
    /// Proxy credentials: LLM tokens per minute, counted from the usage answers report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Proxy credentials: LLM tokens per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Proxies: how long a call may take, answer included (seconds, 1 to 3600), instead
    /// of the Envoy route's timeout; long LLM generations need more than its 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_timeout_s: Option<u32>,
}

impl Limits {
    /// The spend caps (USD) of a proxy credential, with their periods.
    pub fn spend_caps(&self) -> Vec<(Period, f64)> {
        [
            (Period::Day, self.spend_usd_per_day),
            (Period::Week, self.spend_usd_per_week),
            (Period::Month, self.spend_usd_per_month),
        ]
        .into_iter()
        .filter_map(|(p, v)| Some((p, v?)))
        .collect()
    }

    /// The LLM token budgets of a proxy credential, with their periods.
    pub fn token_budgets(&self) -> Vec<(Period, u64)> {
        [
            (Period::Minute, self.tokens_per_minute),
            (Period::Day, self.tokens_per_day),
        ]
        .into_iter()
        .filter_map(|(p, v)| Some((p, v?)))
        .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_json: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_unit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_request_usd: Option<f64>,
    /// With `response_json` or `tokens`: reserved before forwarding, and charged whole
    /// for a response that cannot be priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_usd_per_request: Option<f64>,
    /// LLM token pricing: whose usage format the answers follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vendor>,
    /// With `tokens`: USD per million tokens, by the request's `model` (`"*"`: any other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd_per_million: Option<BTreeMap<String, crate::base::money::Price>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Optional stable id; otherwise one is derived from the rule's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    pub effect: Effect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Request header name (any case) → condition on its value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, ValueCondition>,
    /// Query parameter name → condition on its (decoded) value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, ValueCondition>,
    /// Conditions on the JSON request body, by JSON pointer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body: Vec<BodyCondition>,
    /// On MCP proxies: the JSON-RPC methods and tools the rule judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<crate::policy::McpCondition>,
    #[serde(default = "default_priority")]
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    MustExist,
    MustNotExist,
}

/// A header or query condition: a bare string is a regex every value must match.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ValueCondition {
    Regex(String),
    Spec(ValueSpec),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<Presence>,
}

impl ValueCondition {
    pub fn regex(&self) -> Option<&str> {
        match self {
            ValueCondition::Regex(r) => Some(r),
            ValueCondition::Spec(s) => s.regex.as_deref(),
        }
    }

    pub fn presence(&self) -> Option<Presence> {
        match self {
            ValueCondition::Regex(_) => None,
            ValueCondition::Spec(s) => s.presence,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        match (self.regex(), self.presence()) {
            (None, None) => Err("give `regex` or `presence`".into()),
            (Some(_), Some(Presence::MustNotExist)) => {
                Err("`regex` with `presence: must_not_exist` can never match".into())
            }
            (Some(r), _) => compile_regex(r).map(drop),
            (None, Some(_)) => Ok(()),
        }
    }
}

/// A condition on the JSON request body at `pointer`; every operator given must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BodyCondition {
    pub pointer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<Presence>,
}

impl BodyCondition {
    pub fn bounds(&self) -> [(&'static str, Option<f64>); 5] {
        [
            ("lt", self.lt),
            ("lte", self.lte),
            ("gt", self.gt),
            ("gte", self.gte),
            ("eq", self.eq),
        ]
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.pointer.is_empty() && !self.pointer.starts_with('/') {
            return Err(format!(
                "pointer {:?} is not a JSON pointer (\"\" or starting with /)",
                self.pointer
            ));
        }
        let numeric = self.bounds().iter().filter(|(_, v)| v.is_some()).count();
        if let Some((op, _)) = self
            .bounds()
            .iter()
            .find(|(_, v)| v.is_some_and(|v| !v.is_finite()))
        {
            return Err(format!("`{op}` must be a finite number"));
        }
        if numeric > 0 && self.regex.is_some() {
            return Err(
                "a value is a number or a string: give numeric operators or `regex`, not both"
                    .into(),
            );
        }
        match self.presence {
            Some(Presence::MustNotExist) if numeric > 0 || self.regex.is_some() => {
                Err("an operator with `presence: must_not_exist` can never match".into())
            }
            None if numeric == 0 && self.regex.is_none() => Err(
                "give at least one of `regex`, `lt`, `lte`, `gt`, `gte`, `eq`, `presence`".into(),
            ),
            _ => self
                .regex
                .as_deref()
                .map_or(Ok(()), |r| compile_regex(r).map(drop)),
        }
    }
}

fn default_priority() -> i64 {
    100
}

/// The longest regex source a rule may carry, and the compiled size it may reach: a
/// policy must not be able to make the hot path slow or the process large.
pub(crate) const MAX_REGEX_LEN: usize = 4096;
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
pub(crate) const MAX_NAME_LEN: usize = 128;

/// Proxy names are the first path segment of every request.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

/// Compiles a rule's path regex with the limits every rule regex obeys.
pub fn compile_regex(source: &str) -> Result<regex::Regex, String> {
    if source.len() > MAX_REGEX_LEN {
        return Err(format!("regex longer than {MAX_REGEX_LEN} characters"));
    }
    regex::RegexBuilder::new(source)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            // The syntax error's last line says what is wrong; the lines above draw it.
            regex::Error::Syntax(text) => format!(
                "invalid regex {source:?}: {}",
                text.lines()
                    .last()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
            ),
            regex::Error::CompiledTooBig(limit) => {
                format!("regex {source:?} compiles to more than {limit} bytes")
            }
            other => format!("invalid regex {source:?}: {other}"),
        })
}

/// A glob (`*` any run of characters, `?` one) as an anchored regex.
pub fn glob_regex(glob: &str) -> Result<regex::Regex, String> {
    globs_regex(&[glob])
}

/// Globs as one anchored regex that matches what any of them matches.
pub fn globs_regex(globs: &[&str]) -> Result<regex::Regex, String> {
    let mut source = String::from("^(?s:");
    for (i, glob) in globs.iter().enumerate() {
        if i > 0 {
            source.push('|');
        }
        for c in glob.chars() {
            match c {
                '*' => source.push_str(".*"),
                '?' => source.push('.'),
                c => source.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
            }
        }
    }
    source.push_str(")$");
    compile_regex(&source)
}

/// Whose usage format a proxy's answers follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// Chat Completions (`usage.prompt_tokens`…) and the Responses API
    /// (`usage.input_tokens`…, streamed in `response.completed`).
    OpenAi,
    /// Messages: `usage` in the answer, or in `message_start` and `message_delta`.
    Anthropic,
}

impl Vendor {
    /// The policy file's word for it, which is also OpenTelemetry's `gen_ai.provider.name`.
    pub fn name(self) -> &'static str {
        match self {
            Vendor::OpenAi => "openai",
            Vendor::Anthropic => "anthropic",
        }
    }
}

/// How the client authenticates to the token endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret (RFC 6749 §2.3.1, the default).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
}
