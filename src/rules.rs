//! Step 4, rules: the first matching rule, in evaluation order, decides; if none matches,
//! the proxy's default effect does.

use std::sync::Arc;

use crate::denial::Denial;
use crate::policy::{Proxy, Rule};
use crate::policy_file::Effect;

/// What the request is judged on.
pub struct Facts<'a> {
    pub method: &'a str,
    pub path: &'a str,
}

impl Rule {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(facts.method)))
            && self.path.as_ref().is_none_or(|re| re.is_match(facts.path))
    }
}

/// The deciding rule's id on allow (`None` when the default allowed), or the denial.
pub fn evaluate(
    proxy: &Proxy,
    rules: &[Arc<Rule>],
    facts: &Facts<'_>,
) -> Result<Option<Arc<str>>, Denial> {
    match rules.iter().find(|r| r.matches(facts)) {
        Some(rule) if rule.effect == Effect::Allow => Ok(Some(rule.id.clone())),
        Some(rule) => Err(Denial::RuleDenied {
            id: rule.id.clone(),
            notes: rule.notes.clone(),
        }),
        None if proxy.default_effect == Effect::Allow => Ok(None),
        None => Err(Denial::DefaultDenied(proxy.name.clone())),
    }
}
