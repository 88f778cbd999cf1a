//! The request path, in order: route → authenticate → scope → rules → mutate. It knows
//! nothing of protobuf; `envoy.rs` converts at the edge.

use std::sync::Arc;

use crate::denial::Denial;
use crate::keys;
use crate::mutate::{self, Forward};
use crate::policy::Policy;
use crate::route::route;
use crate::rules::{self, Facts};

/// A request as the pipeline sees it. Header names are lower-case, as Envoy sends them.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
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
pub struct Decision {
    pub subject: Subject,
    pub outcome: Result<Forward, Denial>,
}

pub fn decide(policy: &Policy, req: &RequestView<'_>, now: i64) -> Decision {
    let mut subject = Subject::default();
    let outcome = run(policy, req, now, &mut subject);
    if let Err(denial) = &outcome {
        subject.rule_id = denial.rule_id().map(Arc::from);
    }
    Decision { subject, outcome }
}

fn run(
    policy: &Policy,
    req: &RequestView<'_>,
    now: i64,
    subject: &mut Subject,
) -> Result<Forward, Denial> {
    let route = route(req.path)?;
    let proxy = policy
        .proxy(route.proxy)
        .ok_or_else(|| Denial::UnknownProxy(route.proxy.chars().take(128).collect()))?;
    subject.proxy = Some(proxy.name.clone());

    let key = keys::presented(req.headers)?;
    let entry = keys::authenticate(policy, &key, now)?;
    subject.credential = Some(policy.credential_name(entry.credential).clone());
    subject.key_id = Some(entry.id.clone());
    subject.run_label = entry.label.clone();

    let rules = proxy
        .rules
        .get(&entry.credential)
        .ok_or_else(|| Denial::NotBound(proxy.name.clone()))?;

    let facts = Facts {
        method: req.method,
        path: &route.path,
    };
    subject.rule_id = rules::evaluate(proxy, rules, &facts)?;
    Ok(mutate::forward(proxy, &route, req.headers))
}
