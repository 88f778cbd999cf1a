//! Step 4, rules: compiled once per policy change; at request time the first matching
//! rule in evaluation order decides, and if none matches, the proxy's default effect does.
//!
//! Evaluation order: lowest `priority` first; equal priorities keep their order in the
//! policy file. A credential's rules and a proxy's rules are two lists merged on that
//! order. Path regexes of a list are matched in one pass by a `RegexSet`, so a list of a
//! thousand rules costs one automaton walk, not a thousand.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::Arc;

use regex::{Regex, RegexSet, RegexSetBuilder, SetMatches};

use crate::denial::Denial;
use crate::policy_file::{Effect, Presence, ValueCondition, compile_regex};
use crate::store::RuleRow;

/// The compiled size all path regexes of one list may reach together.
const SET_SIZE_LIMIT: usize = 64 << 20;

#[derive(Debug)]
enum ValueMatcher {
    Exists,
    Absent,
    /// At least one value, and every value matches.
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(condition: &ValueCondition) -> Result<Self, String> {
        Ok(match (condition.regex(), condition.presence()) {
            (Some(r), _) => ValueMatcher::Regex(compile_regex(r)?),
            (None, Some(Presence::MustNotExist)) => ValueMatcher::Absent,
            (None, _) => ValueMatcher::Exists,
        })
    }

    fn test<'v>(&self, mut values: impl Iterator<Item = &'v str>) -> bool {
        match self {
            ValueMatcher::Exists => values.next().is_some(),
            ValueMatcher::Absent => values.next().is_none(),
            ValueMatcher::Regex(re) => {
                let mut any = false;
                values.all(|v| {
                    any = true;
                    re.is_match(v)
                }) && any
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Lt,
    Lte,
    Gt,
    Gte,
    Eq,
}

#[derive(Debug)]
struct BodyMatcher {
    pointer: Box<str>,
    presence: Option<Presence>,
    regex: Option<Regex>,
    bounds: Box<[(Op, f64)]>,
}

impl BodyMatcher {
    fn test(&self, body: Option<&serde_json::Value>) -> bool {
        let value = body.and_then(|b| b.pointer(&self.pointer));
        match (self.presence, value) {
            (Some(Presence::MustNotExist), v) => return v.is_none(),
            (_, None) => return false,
            (_, Some(_)) => {}
        }
        let value = value.expect("checked above");
        if let Some(re) = &self.regex
            && !value.as_str().is_some_and(|s| re.is_match(s))
        {
            return false;
        }
        if self.bounds.is_empty() {
            return true;
        }
        let Some(n) = value.as_f64() else {
            return false;
        };
        self.bounds.iter().all(|&(op, bound)| match op {
            Op::Lt => n < bound,
            Op::Lte => n <= bound,
            Op::Gt => n > bound,
            Op::Gte => n >= bound,
            Op::Eq => n == bound,
        })
    }
}

#[derive(Debug)]
pub struct Rule {
    pub id: Arc<str>,
    pub effect: Effect,
    /// Upper-case; empty matches every method.
    pub methods: Box<[Box<str>]>,
    pub path: Option<Box<str>>,
    pub notes: Option<Arc<str>>,
    pub priority: i64,
    position: i64,
    headers: Box<[(Box<str>, ValueMatcher)]>,
    query: Box<[(Box<str>, ValueMatcher)]>,
    body: Box<[BodyMatcher]>,
}

impl Rule {
    pub fn compile(row: &RuleRow) -> Result<Self, String> {
        let values = |conditions: &std::collections::BTreeMap<String, ValueCondition>, what| {
            conditions
                .iter()
                .map(|(name, c)| {
                    ValueMatcher::compile(c)
                        .map(|m| (Box::from(name.as_str()), m))
                        .map_err(|e| format!("{what} {name}: {e}"))
                })
                .collect::<Result<Box<[_]>, String>>()
        };
        let body = row
            .conditions
            .body
            .iter()
            .map(|c| {
                let bounds = c
                    .bounds()
                    .into_iter()
                    .zip([Op::Lt, Op::Lte, Op::Gt, Op::Gte, Op::Eq])
                    .filter_map(|((_, v), op)| v.map(|v| (op, v)))
                    .collect();
                Ok(BodyMatcher {
                    pointer: c.pointer.as_str().into(),
                    presence: c.presence,
                    regex: c.regex.as_deref().map(compile_regex).transpose()?,
                    bounds,
                })
            })
            .collect::<Result<Box<[_]>, String>>()
            .map_err(|e| format!("body: {e}"))?;
        Ok(Self {
            id: Arc::from(row.id.as_str()),
            effect: row.effect,
            methods: row.methods.iter().map(|m| m.as_str().into()).collect(),
            path: row.path.as_deref().map(Box::from),
            notes: row.notes.as_deref().map(Arc::from),
            priority: row.priority,
            position: row.position,
            headers: values(&row.conditions.headers, "header")?,
            query: values(&row.conditions.query, "query")?,
            body,
        })
    }

    fn order(&self) -> (i64, i64) {
        (self.priority, self.position)
    }

    pub fn needs_body(&self) -> bool {
        !self.body.is_empty()
    }

    /// Whether this rule matches, given whether its path regex did.
    fn check(&self, path_matched: bool, facts: &Facts<'_>) -> Result<Match, Denial> {
        let method_ok = self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(facts.method));
        if !method_ok || !path_matched {
            return Ok(Match::No);
        }
        for (name, matcher) in &self.headers {
            let values = facts
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| std::str::from_utf8(v).unwrap_or("\u{fffd}"));
            if !matcher.test(values) {
                return Ok(Match::No);
            }
        }
        if !self.query.is_empty() {
            let pairs = facts.query_pairs();
            for (name, matcher) in &self.query {
                let values = pairs
                    .iter()
                    .filter(|(n, _)| n == name.as_ref())
                    .map(|(_, v)| v.as_ref());
                if !matcher.test(values) {
                    return Ok(Match::No);
                }
            }
        }
        if self.body.is_empty() {
            return Ok(Match::Yes);
        }
        let json = match facts.body {
            Body::Unread => return Ok(Match::NeedBody),
            Body::Empty => None,
            Body::Json(value) => Some(value),
            Body::NotJson => {
                return Err(Denial::BodyNotJson {
                    id: self.id.clone(),
                });
            }
            Body::TooLarge(limit) => return Err(Denial::BodyTooLarge(*limit)),
        };
        Ok(if self.body.iter().all(|m| m.test(json)) {
            Match::Yes
        } else {
            Match::No
        })
    }
}

enum Match {
    No,
    Yes,
    NeedBody,
}

/// The request body as the rules see it.
#[derive(Debug)]
pub enum Body {
    /// Not received yet: a rule that judges the body cannot decide.
    Unread,
    /// The request has no body: every pointer is missing.
    Empty,
    Json(serde_json::Value),
    NotJson,
    /// Larger than latchkey reads (the limit, in bytes).
    TooLarge(usize),
}

impl Body {
    pub fn parse(bytes: &[u8]) -> Self {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Body::Empty;
        }
        serde_json::from_slice(bytes).map_or(Body::NotJson, Body::Json)
    }
}

/// What the request is judged on.
pub struct Facts<'a> {
    pub method: &'a str,
    /// The normalized upstream path, without the query.
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
    pub query: Option<&'a str>,
    pub body: &'a Body,
    query_pairs: OnceCell<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

impl<'a> Facts<'a> {
    pub fn new(
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a [u8])],
        query: Option<&'a str>,
        body: &'a Body,
    ) -> Self {
        Self {
            method,
            path,
            headers,
            query,
            body,
            query_pairs: OnceCell::new(),
        }
    }

    /// Decoded query parameters, parsed once and only if a rule asks.
    fn query_pairs(&self) -> &[(Cow<'a, str>, Cow<'a, str>)] {
        self.query_pairs.get_or_init(|| {
            self.query
                .map(|q| form_urlencoded::parse(q.as_bytes()).collect())
                .unwrap_or_default()
        })
    }
}

/// One owner's rules (a credential's or a proxy's), in evaluation order.
#[derive(Debug)]
pub struct RuleList {
    rules: Box<[Arc<Rule>]>,
    paths: RegexSet,
    /// For each rule, its pattern's index in `paths`, if it has a path.
    slot: Box<[Option<usize>]>,
}

impl Default for RuleList {
    fn default() -> Self {
        Self {
            rules: Box::default(),
            paths: RegexSet::empty(),
            slot: Box::default(),
        }
    }
}

impl RuleList {
    pub fn new(mut rules: Vec<Arc<Rule>>) -> Result<Self, String> {
        rules.sort_by_key(|r| r.order());
        let mut patterns = Vec::new();
        let slot = rules
            .iter()
            .map(|r| {
                r.path.as_ref().map(|p| {
                    patterns.push(p.as_ref());
                    patterns.len() - 1
                })
            })
            .collect();
        let paths = RegexSetBuilder::new(patterns)
            .size_limit(SET_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("path regexes together: {e}"))?;
        Ok(Self {
            rules: rules.into(),
            paths,
            slot,
        })
    }

    pub fn needs_body(&self) -> bool {
        self.rules.iter().any(|r| r.needs_body())
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    fn path_matches(&self, path: &str) -> Option<SetMatches> {
        (!self.paths.is_empty()).then(|| self.paths.matches(path))
    }
}

/// How the rules decided.
#[derive(Debug)]
pub enum Verdict {
    /// Allowed by this rule, or by the default when `None`.
    Allow(Option<Arc<Rule>>),
    /// A rule that judges the body was reached before the body was read.
    NeedBody,
}

/// Walks both lists in evaluation order; the first match decides.
pub fn evaluate(
    lists: [&RuleList; 2],
    default: Effect,
    proxy: &Arc<str>,
    facts: &Facts<'_>,
) -> Result<Verdict, Denial> {
    let matches = lists.map(|l| l.path_matches(facts.path));
    let mut next = [0usize; 2];
    loop {
        // The list whose next rule comes first.
        let pick = match (lists[0].rules.get(next[0]), lists[1].rules.get(next[1])) {
            (None, None) => break,
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (Some(a), Some(b)) => usize::from(b.order() < a.order()),
        };
        let i = next[pick];
        next[pick] += 1;
        let list = lists[pick];
        let rule = &list.rules[i];
        let path_matched = match (list.slot[i], &matches[pick]) {
            (Some(slot), Some(m)) => m.matched(slot),
            _ => true,
        };
        match rule.check(path_matched, facts)? {
            Match::No => continue,
            Match::NeedBody => return Ok(Verdict::NeedBody),
            Match::Yes if rule.effect == Effect::Allow => {
                return Ok(Verdict::Allow(Some(rule.clone())));
            }
            Match::Yes => {
                return Err(Denial::RuleDenied {
                    id: rule.id.clone(),
                    notes: rule.notes.clone(),
                });
            }
        }
    }
    match default {
        Effect::Allow => Ok(Verdict::Allow(None)),
        Effect::Deny => Err(Denial::DefaultDenied(proxy.clone())),
    }
}
