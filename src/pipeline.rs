//! The request path, in order: route → authenticate → scope → rules → mutate. It knows
//! nothing of protobuf; `envoy.rs` converts at the edge.

use std::sync::Arc;

use crate::budget::{Admission, Budgets, Limit};
use crate::denial::Denial;
use crate::keys;
use crate::mutate::{self, Forward};
use crate::policy::Policy;
use crate::route::route;
use crate::rules::{self, Body, Facts, RuleList, Verdict};

/// A request as the pipeline sees it. Header names are lower-case, as Envoy sends them.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The full `:path`: `/<proxy>/<upstream path>[?query]`.
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// Who the request is judged as.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// Whoever the presented proxy key belongs to: every real request.
    Key,
    /// A named proxy credential, for `latchkey check` without a key.
    Credential(&'a str),
    /// Nobody in particular: only the proxy's own rules and default apply.
    Anyone,
}

/// Who asked and what decided: filled in as far as the pipeline got, for the audit.
#[derive(Debug, Default, Clone)]
pub struct Subject {
    pub proxy: Option<Arc<str>>,
    pub credential: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub run_label: Option<Arc<str>>,
    pub rule_id: Option<Arc<str>>,
}

#[derive(Debug)]
pub enum Outcome {
    Forward(Forward),
    Deny(Denial),
    /// A rule that judges the body was reached: ask Envoy for the body, then decide.
    NeedBody,
}

#[derive(Debug)]
pub struct Decision {
    pub subject: Subject,
    pub outcome: Outcome,
    /// The budgets an allowed request counts against (step 5).
    pub limits: Vec<Limit>,
    /// After step 5: the tightest limit and what is left of it.
    pub rate: Option<(u32, u32)>,
}

/// Step 5, budgets: counts an allowed request against its limits, or refuses it. Apart
/// from the rest because a shared store answers asynchronously.
pub async fn admit(budgets: &Budgets, decision: &mut Decision) {
    if !matches!(decision.outcome, Outcome::Forward(_)) || decision.limits.is_empty() {
        return;
    }
    match budgets.admit(&decision.limits).await {
        Ok(Admission::Admitted { limit, remaining }) => decision.rate = Some((limit, remaining)),
        Ok(Admission::Refused {
            limit,
            retry_after_ms,
        }) => {
            decision.outcome = Outcome::Deny(Denial::RateLimited {
                limit,
                retry_after_s: retry_after_ms.div_ceil(1000).max(1),
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing a limited request");
            decision.outcome = Outcome::Deny(Denial::BudgetUnavailable);
        }
    }
}

pub fn decide(policy: &Policy, req: &RequestView<'_>, body: &Body, now: i64) -> Decision {
    decide_as(policy, req, body, Caller::Key, now)
}

pub fn decide_as(
    policy: &Policy,
    req: &RequestView<'_>,
    body: &Body,
    caller: Caller<'_>,
    now: i64,
) -> Decision {
    let mut subject = Subject::default();
    let mut limits = Vec::new();
    let outcome = match run(policy, req, body, caller, now, &mut subject, &mut limits) {
        Ok(Some(forward)) => Outcome::Forward(forward),
        Ok(None) => Outcome::NeedBody,
        Err(denial) => {
            subject.rule_id = denial.rule_id().map(Arc::from);
            Outcome::Deny(denial)
        }
    };
    Decision {
        subject,
        outcome,
        limits,
        rate: None,
    }
}

/// `Ok(None)`: the body is needed to decide.
fn run(
    policy: &Policy,
    req: &RequestView<'_>,
    body: &Body,
    caller: Caller<'_>,
    now: i64,
    subject: &mut Subject,
    limits: &mut Vec<Limit>,
) -> Result<Option<Forward>, Denial> {
    let route = route(req.path)?;
    let proxy = policy
        .proxy(route.proxy)
        .ok_or_else(|| Denial::UnknownProxy(route.proxy.chars().take(128).collect()))?;
    subject.proxy = Some(proxy.name.clone());

    let no_rules = RuleList::default();
    let credential = match caller {
        Caller::Key => {
            let key = keys::presented(req.headers)?;
            let entry = keys::authenticate(policy, &key, now)?;
            subject.key_id = Some(entry.id.clone());
            subject.run_label = entry.label.clone();
            Some(entry.credential)
        }
        Caller::Credential(name) => Some(
            policy
                .credential_index(name)
                .ok_or(Denial::InvalidKey("unknown credential"))?,
        ),
        Caller::Anyone => None,
    };
    let credential_rules = match credential {
        Some(index) => {
            subject.credential = Some(policy.credential_name(index).clone());
            if !proxy.bound.contains(&index) {
                return Err(Denial::NotBound(proxy.name.clone()));
            }
            limits.extend_from_slice(policy.credential_limits(index));
            policy.credential_rules(index)
        }
        None => &no_rules,
    };
    limits.extend_from_slice(&proxy.limits);

    let facts = Facts::new(req.method, &route.path, req.headers, route.query, body);
    match rules::evaluate(
        [credential_rules, &proxy.rules],
        proxy.default_effect,
        &proxy.name,
        &facts,
    )? {
        Verdict::NeedBody => Ok(None),
        Verdict::Allow(rule) => {
            subject.rule_id = rule.map(|r| r.id.clone());
            Ok(Some(mutate::forward(proxy, &route, req.headers)))
        }
    }
}
