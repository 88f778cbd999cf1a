//! The request path's steps, tied together: [`decide`] runs steps 1 to 5 (pure: a
//! snapshot and a request in, a decision out), [`conclude`] steps 6 to 8. The steps are
//! listed in the module doc of `dataplane`.

use std::borrow::Cow;
use std::sync::Arc;

use crate::base::trace::TraceParent;
use crate::dataplane::approval::{self, Ask};
use crate::dataplane::budget::Limit;
use crate::dataplane::credentials::oauth2::TokenSource;
use crate::dataplane::denial::{Denial, Kind};
use crate::dataplane::facts;
use crate::dataplane::guards::{self, Duplicate};
use crate::dataplane::identity::Verified;
use crate::dataplane::keys;
use crate::dataplane::mcp::{self, Call, Message};
use crate::dataplane::mutate::{self, Forward};
use crate::dataplane::redact::Guard;
pub use crate::dataplane::request::RequestView;
use crate::dataplane::route::route;
use crate::dataplane::rules::{self, Body, Facts, RuleList, Verdict};
use crate::dataplane::snapshot::Policy;
use crate::dataplane::snapshot::{CostSpec, Injection, KeyEntry, RetryHeaders};
use crate::dataplane::spend::{self, Account, Holder, Unit};
use crate::dataplane::usage;
use crate::policy::Period;

/// Who the request is judged as.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// Whoever the proxy key the request presents belongs to, read from its headers.
    Key,
    /// The same, for a caller that has read the key already: `keys::presented` of this
    /// request's headers, which are not read again.
    Presented(&'a Result<Cow<'a, [u8]>, Denial>),
    /// The workload whose token the request presents where a proxy key goes, verified
    /// (or refused) before the pipeline ran, by `identity`; `token` is what
    /// `keys::presented` read of this request's headers, which are not read again.
    Token {
        verified: &'a Result<Arc<Verified>, Denial>,
        token: &'a [u8],
    },
    /// A named proxy credential, for `latchkey check` without a key.
    Credential(&'a str),
    /// Nobody in particular: only the proxy's own rules and default apply.
    Anyone,
}

/// Who asked and what decided: filled in as far as the pipeline got, for the audit.
#[derive(Debug, Default, Clone)]
pub struct Subject {
    pub proxy: Option<Arc<str>>,
    pub target: Option<Arc<str>>,
    /// The upstream path the rules judged, without the query.
    pub path: Option<String>,
    pub credential: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub run_label: Option<Arc<str>>,
    pub rule_id: Option<Arc<str>>,
    /// What the audit keeps of the headers and query its rules read (`facts`).
    pub facts: Option<Box<str>>,
    /// On MCP proxies: the JSON-RPC message, whose id a refusal answers.
    pub mcp: Option<Call>,
}

#[derive(Debug)]
pub enum Outcome {
    Forward(Forward),
    Deny(Denial),
}

/// What steps 1 to 5 come to: a decision, or that the body must be read first.
#[derive(Debug)]
pub enum Judgement {
    Decided(Decision),
    /// A rule (or a signature) that reads the body was reached: ask Envoy for the body,
    /// then decide again. What was found so far says how the response will be read.
    NeedBody(Found),
}

/// What the steps found about a request, before its outcome.
#[derive(Debug, Default)]
pub struct Found {
    pub subject: Subject,
    pub limits: Vec<Limit>,
    pub charge: Option<Charge>,
    pub token: Option<Arc<TokenSource>>,
    pub guard: Option<Arc<Guard>>,
    pub duplicate: Option<Duplicate>,
    pub approval: Option<Ask>,
}

impl Found {
    pub fn decided(self, outcome: Outcome) -> Decision {
        Decision {
            subject: self.subject,
            outcome,
            limits: self.limits,
            shown: Shown::default(),
            charge: self.charge,
            token: self.token,
            guard: self.guard,
            duplicate: self.duplicate,
            approval: self.approval,
        }
    }
}

#[derive(Debug)]
pub struct Decision {
    pub subject: Subject,
    pub outcome: Outcome,
    /// The budgets an allowed request counts against (step 6).
    pub limits: Vec<Limit>,
    /// After step 6: what the response tells the agent of its budgets.
    pub shown: Shown,
    /// What the response will cost and whom it is charged to, on priced proxies.
    pub charge: Option<Charge>,
    /// Where the credential comes from when it is fetched per request (OAuth2).
    pub token: Option<Arc<TokenSource>>,
    /// What is scrubbed or redacted from the response, on proxies that say.
    pub guard: Option<Arc<Guard>>,
    /// On a proxy with a duplicate window: the request, as the guard knows it (step 6).
    pub duplicate: Option<Duplicate>,
    /// A request an `approve` rule holds: what the desk is asked (step 6).
    pub approval: Option<Ask>,
}

impl Decision {
    /// The decision's name in the audit and the metrics: `allow` or the denial's kind.
    pub fn kind(&self) -> Kind {
        match &self.outcome {
            Outcome::Forward(_) => Kind::Allow,
            Outcome::Deny(denial) => denial.kind(),
        }
    }
}

/// What an allowed request's response tells the agent of its budgets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shown {
    /// The tightest rate limit and what is left of it.
    pub rate: Option<(u32, u32)>,
    /// What the tightest spend cap leaves, this request's reservation deducted (USD).
    pub budget_left_usd: Option<f64>,
}

impl Shown {
    /// As response headers: `x-ratelimit-limit`, `x-ratelimit-remaining` and
    /// `x-latchkey-budget-remaining-usd`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some((limit, remaining)) = self.rate {
            out.push(("x-ratelimit-limit", limit.to_string()));
            out.push(("x-ratelimit-remaining", remaining.to_string()));
        }
        if let Some(usd) = self.budget_left_usd {
            out.push(("x-latchkey-budget-remaining-usd", format!("{usd:.6}")));
        }
        out
    }

    /// As Envoy's dynamic metadata under `latchkey`, which the shipped routes copy into
    /// those headers: `ratelimit_limit`, `ratelimit_remaining`, `budget_remaining_usd`.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let key = |name: &str| {
            let name = name
                .trim_start_matches("x-")
                .trim_start_matches("latchkey-");
            name.replace('-', "_")
        };
        let headers = self.headers().into_iter();
        headers.map(|(name, value)| (key(name), value)).collect()
    }
}

/// A priced request's accounts: its key's and, if capped, its credential's for the day.
#[derive(Debug, Clone)]
pub struct Charge {
    pub cost: Arc<CostSpec>,
    pub proxy: Arc<str>,
    /// The model the request asked for, on proxies priced by LLM tokens.
    pub model: Option<Arc<str>>,
    pub key_id: Arc<str>,
    pub accounts: Vec<Account>,
    /// Reserved by step 6, in micro-dollars; settled when the response is judged.
    pub reserved: u64,
    /// When the request was decided (Unix milliseconds): where an LLM call's span starts.
    pub decided_ms: i64,
    /// The agent's trace, which the LLM call's span joins.
    pub trace: Option<TraceParent>,
}

pub(super) const DAY_S: i64 = 86_400;

/// The slot a derived `Idempotency-Key` stays the same in, on proxies without a duplicate
/// window.
const DEFAULT_KEY_WINDOW_MS: u64 = 3_600_000;

/// The accounts a priced request of `entry` is charged to at `now` (Unix seconds): the
/// key's spend first (what the audit records as the key's), its credential's spend caps,
/// and on LLM proxies the token budgets of both.
fn accounts(policy: &Policy, entry: &KeyEntry, now: i64, llm: bool) -> Vec<Account> {
    let of_period = |owner: String, holder, period: Period, cap, unit| {
        let (id, left) = Account::period_id(&owner, period, now);
        Account {
            id,
            cap_micros: Some(cap),
            seed_micros: 0,
            // Kept a little past its end; another period is another account.
            ttl_s: Some(left + 60),
            unit,
            holder,
            period: Some(period),
        }
    };
    let budgets = entry.budgets.as_deref();
    let key = spend::key_owner(&entry.id);
    let mut out = Vec::with_capacity(2);
    match (budgets.and_then(|b| b.cap_period), entry.spend_cap_micros) {
        (Some(period), Some(cap)) => {
            out.push(of_period(
                key.clone(),
                Holder::Key,
                period,
                cap,
                Unit::Micros,
            ));
        }
        _ => out.push(Account {
            id: key.as_str().into(),
            cap_micros: entry.spend_cap_micros,
            seed_micros: entry.spent_micros,
            ttl_s: None,
            unit: Unit::Micros,
            holder: Holder::Key,
            period: None,
        }),
    }
    let caps = policy.credential_caps(entry.credential);
    let credential = spend::credential_owner(policy.credential_name(entry.credential));
    for &(period, cap) in &caps.spend {
        out.push(of_period(
            credential.clone(),
            Holder::Credential,
            period,
            cap,
            Unit::Micros,
        ));
    }
    if llm {
        let key_tokens = budgets.map(|b| b.tokens.as_slice()).unwrap_or_default();
        for (owner, holder, list) in [
            (&key, Holder::Key, key_tokens),
            (&credential, Holder::Credential, caps.tokens.as_slice()),
        ] {
            for &(period, cap) in list {
                out.push(of_period(
                    spend::tokens_owner(owner),
                    holder,
                    period,
                    cap,
                    Unit::Tokens,
                ));
            }
        }
    }
    out
}

/// Steps 1 to 5 at `now_ms`, Unix milliseconds.
pub fn decide(policy: &Policy, req: &RequestView<'_>, body: &Body, now_ms: i64) -> Judgement {
    decide_as(policy, req, body, Caller::Key, now_ms)
}

pub fn decide_as(
    policy: &Policy,
    req: &RequestView<'_>,
    body: &Body,
    caller: Caller<'_>,
    now_ms: i64,
) -> Judgement {
    // Filled in as the steps go, for the audit whatever the outcome.
    let mut found = Found::default();
    let outcome = match run(policy, req, body, caller, now_ms, &mut found) {
        Ok(Some(forward)) => Outcome::Forward(forward),
        Ok(None) => return Judgement::NeedBody(found),
        Err(denial) => {
            found.subject.rule_id = denial.rule_id().map(Arc::from);
            Outcome::Deny(denial)
        }
    };
    Judgement::Decided(found.decided(outcome))
}

/// `Ok(None)`: the body is needed to decide.
fn run(
    policy: &Policy,
    req: &RequestView<'_>,
    body: &Body,
    caller: Caller<'_>,
    now_ms: i64,
    found: &mut Found,
) -> Result<Option<Forward>, Denial> {
    let now = now_ms.div_euclid(1000);
    let Found {
        subject,
        limits,
        charge,
        token,
        guard,
        duplicate,
        approval,
    } = found;
    // An upstream that answers TRACE sends the request back as it reached it, the
    // credential set here included. (Compared in any case: some servers read it so.)
    if ["TRACE", "TRACK"]
        .iter()
        .any(|m| req.method.eq_ignore_ascii_case(m))
    {
        return Err(Denial::InvalidRequest(
            "TRACE and TRACK are refused: the upstream would echo its credential",
        ));
    }
    let route = route(req.path)?;
    let proxy = policy.proxy(&route.proxy);
    if let Some(proxy) = proxy {
        subject.proxy = Some(proxy.name.clone());
        subject.target = Some(proxy.target.clone());
    }
    subject.path = Some(route.path.to_string());
    // The key is checked before the proxy is said to be unknown: a caller without a
    // valid key cannot tell which proxies exist.
    let presented = match caller {
        Caller::Key => Some(keys::presented(req.headers)?),
        // The facts screen the request for this key: it must be the request's own.
        Caller::Presented(key) => {
            debug_assert_eq!(key, &keys::presented(req.headers));
            Some(Cow::Borrowed(key.as_deref().map_err(Clone::clone)?))
        }
        Caller::Token { token, .. } => {
            debug_assert_eq!(Ok(Cow::Borrowed(token)), keys::presented(req.headers));
            Some(Cow::Borrowed(token))
        }
        _ => None,
    };
    let entry = match (caller, &presented) {
        (Caller::Token { verified, .. }, _) => {
            Some(&verified.as_ref().map_err(Clone::clone)?.entry)
        }
        (_, Some(key)) => Some(keys::authenticate(policy, key, now_ms)?),
        (_, None) => None,
    };
    let proxy =
        proxy.ok_or_else(|| Denial::UnknownProxy(route.proxy.chars().take(128).collect()))?;
    guard.clone_from(&proxy.response);
    // An MCP proxy reads each POST's message before anything else is decided of it.
    if proxy.mcp.is_some() {
        match mcp::message(req, body) {
            Ok(Message::NeedBody) => return Ok(None),
            Ok(Message::None) => {}
            Ok(Message::Call(call)) => subject.mcp = Some(call),
            Err(denial) => {
                // Refused as a JSON-RPC error all the same, answering its id if it has one.
                subject.mcp = Some(mcp::unreadable(body));
                return Err(denial);
            }
        }
    }
    let tool = match (&proxy.mcp, subject.mcp.as_ref()) {
        (
            Some(settings),
            Some(Call {
                tool: Some(name), ..
            }),
        ) => settings.tool(name),
        _ => None,
    };

    let no_rules = RuleList::default();
    let credential = match (caller, entry) {
        (Caller::Key | Caller::Presented(_) | Caller::Token { .. }, Some(entry)) => {
            subject.key_id = Some(entry.id.clone());
            subject.run_label = entry.label.clone();
            // A tool's price stands in for the proxy's.
            if let Some(cost) = tool.and_then(|t| t.cost.as_ref()).or(proxy.cost.as_ref()) {
                let accounts = accounts(policy, entry, now, proxy.token_vendor().is_some());
                *charge = Some(Charge {
                    cost: cost.clone(),
                    proxy: proxy.name.clone(),
                    model: None,
                    key_id: entry.id.clone(),
                    accounts,
                    reserved: 0,
                    decided_ms: now_ms,
                    // Set with the rest of what was asked (`conclude`).
                    trace: None,
                });
            }
            Some(entry.credential)
        }
        (Caller::Credential(name), _) => Some(
            policy
                .credential_index(name)
                .ok_or(Denial::InvalidKey("unknown credential"))?,
        ),
        (Caller::Key | Caller::Presented(_) | Caller::Token { .. } | Caller::Anyone, _) => None,
    };
    let credential_rules = match credential {
        Some(index) => {
            subject.credential = Some(policy.credential_name(index).clone());
            if !proxy.bound.contains(&index) {
                return Err(Denial::NotBound(proxy.name.clone()));
            }
            policy.credential_rules(index)
        }
        None => &no_rules,
    };
    limits.extend(policy.request_limits(proxy, credential).cloned());
    // Per credential, not per key: a fresh run key must not bring fresh counts.
    if let Some(tool) = tool {
        let caller = subject.credential.as_deref().unwrap_or("anyone");
        limits.extend(tool.limits(&proxy.name, caller));
    }

    let kept_body = match body {
        Body::Json(json) if proxy.keep_body_fields => Some(json),
        _ => None,
    };
    subject.facts = facts::record(
        [credential_rules.reads(), proxy.rules.reads()],
        req.headers,
        route.query,
        kept_body,
        presented.as_deref(),
        subject.mcp.as_ref(),
    );
    let facts = Facts::new(req.method, &route.path, req.headers, route.query, body);
    match rules::evaluate(
        [credential_rules, &proxy.rules],
        proxy.default_effect,
        &proxy.name,
        &facts,
    )? {
        Verdict::NeedBody => Ok(None),
        verdict @ (Verdict::Allow(_) | Verdict::Approve(_)) => {
            let (rule, held) = match verdict {
                Verdict::Approve(rule) => (Some(rule.clone()), Some(rule)),
                Verdict::Allow(rule) => (rule, None),
                Verdict::NeedBody => unreachable!("matched above"),
            };
            subject.rule_id = rule.map(|r| r.id.clone());
            match &*proxy.injection {
                Injection::OAuth2(source) => *token = Some(source.clone()),
                Injection::Unavailable => {
                    return Err(Denial::CredentialUnavailable(proxy.name.clone()));
                }
                // A signature over the payload waits for the payload.
                injection if injection.signs_body() => {
                    if let Body::TooLarge(limit) = body {
                        return Err(Denial::BodyTooLarge(*limit));
                    }
                    if req.body.is_none() {
                        return Ok(None);
                    }
                }
                _ => {}
            }
            // Runaway guards know a POST or PATCH by its body, an approval any request:
            // read it first.
            let fingerprint = if proxy.guards.cover(req.method) || held.is_some() {
                if let Body::TooLarge(limit) = body {
                    return Err(Denial::BodyTooLarge(*limit));
                }
                let Some(bytes) = req.body else {
                    return Ok(None);
                };
                let caller = subject.key_id.as_deref().or(subject.credential.as_deref());
                let caller = caller.unwrap_or_default();
                let print = guards::fingerprint(&proxy.name, caller, req, &route, bytes, false);
                if proxy.guards.cover(req.method) {
                    *duplicate = (proxy.guards.duplicate_window_ms).map(|window_ms| Duplicate {
                        fingerprint: print,
                        window_ms,
                    });
                }
                *approval = held.map(|rule| Ask {
                    fingerprint: guards::fingerprint(&proxy.name, caller, req, &route, bytes, true),
                    proxy: proxy.name.clone(),
                    credential: subject.credential.clone(),
                    key_id: subject.key_id.clone(),
                    run_label: subject.run_label.clone(),
                    rule_id: rule.id.clone(),
                    method: truncated(req.method, 32).to_owned(),
                    path: truncated(&route.path, 512).to_owned(),
                    body_summary: approval::summary(
                        bytes,
                        (req.headers.iter())
                            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                            .map(|(_, v)| *v),
                    ),
                    webhooks: proxy.guards.webhooks.clone(),
                });
                Some(print)
            } else {
                None
            };
            // A token price depends on the model the body names: read it first.
            let asked = match (proxy.token_vendor(), req.body) {
                (None, _) => None,
                // Past what latchkey reads: the model stays unknown (priced by "*").
                (Some(_), _) if matches!(body, Body::TooLarge(_)) => None,
                (Some(_), None) => return Ok(None),
                (Some(vendor), Some(bytes)) => Some(usage::asked(vendor, &route.path, bytes)),
            };
            let mut forward = mutate::forward(proxy, &route, req, now);
            let mut keyed = guards::has_idempotency_key(req);
            if let Some(print) = fingerprint
                && proxy.guards.idempotency_key
                && !keyed
            {
                forward.set.push((
                    std::borrow::Cow::Borrowed("idempotency-key"),
                    guards::idempotency_key(
                        &print,
                        now_ms,
                        proxy
                            .guards
                            .duplicate_window_ms
                            .unwrap_or(DEFAULT_KEY_WINDOW_MS),
                    ),
                ));
                keyed = true;
            }
            // Retried only when sending it twice is safe: an idempotent method, or a key the
            // vendor is said to honour (`idempotency_key: true`). A client's own x-envoy-*
            // headers were stripped: the agent cannot ask for retries.
            if let Some(retries) = &proxy.guards.retries
                && RetryHeaders::safe(req.method, keyed && proxy.guards.idempotency_key)
            {
                let set = [
                    ("x-envoy-max-retries", &retries.max),
                    ("x-envoy-retry-on", &retries.on),
                    ("x-envoy-retriable-status-codes", &retries.statuses),
                ];
                for (name, value) in set.into_iter().filter(|(_, v)| !v.is_empty()) {
                    forward
                        .set
                        .push((std::borrow::Cow::Borrowed(name), value.as_bytes().to_vec()));
                }
            }
            if let Some(asked) = asked {
                if let Some(charge) = charge.as_mut() {
                    charge.model = asked.model.map(|m| Arc::from(truncated(&m, 128)));
                }
                forward.body = asked.rewritten;
            }
            Ok(Some(forward))
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary: a client-chosen name that
/// goes into the audit stays bounded.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::crypto::MasterKey;
    use crate::store::memory;

    const KEY: &str = "lk_agentKEY0000000000000001";
    const POLICY: &str = r#"
targets:
  - { name: vendor, url: "https://api.vendor.example/base" }
credentials:
  - { name: vendor-key, type: target, auth: bearer, secret: { value: sk_vendor_1234 } }
  - { name: agent, type: proxy, keys: [{ value: lk_agentKEY0000000000000001 }] }
  - { name: other, type: proxy, keys: [{ value: lk_otherKEY0000000000000001 }] }
proxies:
  - { name: api, target: vendor, target_credential: vendor-key, proxy_credentials: [agent], default_effect: deny }
rules:
  - { proxy: api, id: reads, effect: allow, methods: [GET], path: "^/v1/" }
  - proxy: api
    id: small-charges
    effect: allow
    methods: [POST]
    path: "^/v1/charges$"
    body: [{ pointer: /amount, lte: 100 }]
"#;

    fn policy() -> Policy {
        let master = MasterKey::parse(&MasterKey::generate()).unwrap();
        Policy::compile(
            &memory::stored(POLICY, &master).unwrap(),
            &master,
            &Default::default(),
        )
        .unwrap()
    }

    fn ask(policy: &Policy, method: &str, path: &str, key: &str, body: &Body) -> Judgement {
        let bearer = format!("Bearer {key}");
        let headers = [("authorization", bearer.as_bytes())];
        let req = RequestView {
            method,
            path,
            headers: &headers,
            body: None,
        };
        decide(policy, &req, body, 1_700_000_000_000)
    }

    #[test]
    fn an_allowed_request_swaps_the_key_and_names_its_rule() {
        let Judgement::Decided(decision) =
            ask(&policy(), "GET", "/api/v1/things", KEY, &Body::Unread)
        else {
            panic!("decided on the headers")
        };
        assert_eq!(decision.kind(), Kind::Allow);
        assert_eq!(decision.subject.rule_id.as_deref(), Some("reads"));
        assert_eq!(decision.subject.credential.as_deref(), Some("agent"));
        let Outcome::Forward(forward) = &decision.outcome else {
            panic!("{decision:?}")
        };
        let set: Vec<(&str, &[u8])> = forward
            .set
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_slice()))
            .collect();
        assert!(set.contains(&("authorization", b"Bearer sk_vendor_1234".as_slice())));
        assert!(
            set.contains(&(":path", b"/base/v1/things".as_slice())),
            "{set:?}"
        );
    }

    #[test]
    fn each_refusal_says_why() {
        let policy = policy();
        for (method, path, key, kind) in [
            ("GET", "/api/v1/things", "", "missing_key"),
            (
                "GET",
                "/api/v1/things",
                "lk_wrongKEY0000000000000001",
                "invalid_key",
            ),
            ("GET", "/nope/v1/things", KEY, "unknown_proxy"),
            (
                "GET",
                "/api/v1/things",
                "lk_otherKEY0000000000000001",
                "not_bound",
            ),
            ("DELETE", "/api/v1/things", KEY, "rule_denied"),
            ("GET", "/api/v1/%2e%2e/admin", KEY, "invalid_request"),
            // Dot segments resolve before the rules: `/admin` is no read under `/v1/`.
            ("GET", "/api/v1/../admin", KEY, "rule_denied"),
            ("GET", "/api/v1;x/things", KEY, "invalid_request"),
        ] {
            let Judgement::Decided(decision) = ask(&policy, method, path, key, &Body::Unread)
            else {
                panic!("{method} {path}: decided on the headers")
            };
            assert_eq!(
                decision.kind().as_str(),
                kind,
                "{method} {path}: {decision:?}"
            );
        }
    }

    /// A rule on the body asks for it, then judges it.
    #[test]
    fn a_body_rule_waits_for_the_body() {
        let policy = policy();
        let asked = ask(&policy, "POST", "/api/v1/charges", KEY, &Body::Unread);
        let Judgement::NeedBody(found) = asked else {
            panic!("{asked:?}")
        };
        assert_eq!(found.subject.proxy.as_deref(), Some("api"));
        let small = Body::Json(serde_json::json!({ "amount": 50 }));
        let large = Body::Json(serde_json::json!({ "amount": 5000 }));
        let check = |body| match ask(&policy, "POST", "/api/v1/charges", KEY, body) {
            Judgement::Decided(decision) => decision.kind().as_str(),
            Judgement::NeedBody(_) => panic!("the body was given"),
        };
        assert_eq!(check(&small), "allow");
        assert_eq!(check(&large), "rule_denied");
    }
}
