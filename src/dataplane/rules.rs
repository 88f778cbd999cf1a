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

use regex::{Regex, RegexSet, RegexSetBuilder};

use crate::dataplane::denial::Denial;
pub use crate::dataplane::usage::is_json_media_type;
use crate::policy::rows::RuleRow;
use crate::policy::{Effect, Presence, ValueCondition, compile_regex};

mod reads;
pub use reads::{Name, Read, Reads};

/// The compiled size all path regexes of one list may reach together.
const SET_SIZE_LIMIT: usize = 64 << 20;
/// The lazy DFA's cache per list: large sets need room to stay on the fast path.
const DFA_CACHE_LIMIT: usize = 16 << 20;

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

/// What one body condition makes of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judged {
    Yes,
    No,
    /// The value is there but of a type the condition cannot compare (a string where a
    /// number is bounded, a number where a regex applies): a deny rule refuses rather
    /// than let it through as "not matched".
    Incomparable(&'static str),
}

impl BodyMatcher {
    fn test(&self, body: Option<&serde_json::Value>) -> Judged {
        let value = body.and_then(|b| b.pointer(&self.pointer));
        // Many upstreams (Go, ASP.NET, Jackson configured so) match field names in any
        // case: `{"AMOUNT": 999999}` is the amount to them.
        if value.is_none() && body.is_some_and(|b| pointer_ignoring_case(b, &self.pointer)) {
            return Judged::Incomparable("the body names the field in another case");
        }
        let value = match (self.presence, value) {
            (Some(Presence::MustNotExist), v) => return judged(v.is_none()),
            (_, None) => return Judged::No,
            (_, Some(v)) => v,
        };
        if let Some(re) = &self.regex {
            let Some(text) = value.as_str() else {
                return Judged::Incomparable("a regex condition met a value that is not a string");
            };
            if !re.is_match(text) {
                return Judged::No;
            }
        }
        if self.bounds.is_empty() {
            return Judged::Yes;
        }
        let Some(n) = value.as_f64() else {
            return Judged::Incomparable("a numeric condition met a value that is not a number");
        };
        judged(self.bounds.iter().all(|&(op, bound)| match op {
            Op::Lt => n < bound,
            Op::Lte => n <= bound,
            Op::Gt => n > bound,
            Op::Gte => n >= bound,
            Op::Eq => n == bound,
        }))
    }
}

/// An `mcp` condition as the body conditions it is: the JSON-RPC `method`, and the
/// `tools/call`'s `params.name`, each matching one of the globs. So it judges or refuses
/// like any body condition: a batch or a tool name that is no string is refused by a deny.
fn mcp_matchers(
    condition: Option<&crate::policy::McpCondition>,
) -> impl Iterator<Item = Result<BodyMatcher, String>> {
    let matcher = |pointer: &str, globs: &[&str]| {
        Ok(BodyMatcher {
            pointer: pointer.into(),
            presence: None,
            regex: Some(crate::policy::globs_regex(globs).map_err(|e| format!("mcp: {e}"))?),
            bounds: Box::default(),
        })
    };
    let mut out = Vec::new();
    if let Some(c) = condition {
        out.push(matcher("/method", &c.methods()));
        if !c.tools.is_empty() {
            let tools: Vec<&str> = c.tools.iter().map(String::as_str).collect();
            out.push(matcher("/params/name", &tools));
        }
    }
    out.into_iter()
}

/// Whether `pointer` finds something in `value` when object keys are compared ignoring
/// case.
fn pointer_ignoring_case(value: &serde_json::Value, pointer: &str) -> bool {
    let mut at = value;
    for token in pointer.split('/').skip(1) {
        let token = folded(&token.replace("~1", "/").replace("~0", "~"));
        let next = match at {
            serde_json::Value::Object(map) => {
                map.iter().find(|(k, _)| folded(k) == token).map(|(_, v)| v)
            }
            serde_json::Value::Array(items) => {
                token.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        };
        match next {
            Some(next) => at = next,
            None => return false,
        }
    }
    true
}

/// A name as parsers that ignore case see it: case folded the way .NET's and Go's JSON
/// do, where `ſ` (long s) is `s` and `K` (Kelvin) is `k`, so `paramſ` is `params`.
fn folded(name: &str) -> String {
    name.to_uppercase().to_lowercase()
}

fn judged(yes: bool) -> Judged {
    if yes { Judged::Yes } else { Judged::No }
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
            .chain(mcp_matchers(row.conditions.mcp.as_ref()))
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

    /// What it reads of a request beyond its method and path.
    pub fn reads(&self) -> impl Iterator<Item = Read<'_>> {
        let headers = self.headers.iter().map(|(n, _)| Read::Header(n));
        let query = self.query.iter().map(|(n, _)| Read::Query(n));
        headers
            .chain(query)
            .chain(self.body.iter().map(|m| Read::Body(&m.pointer)))
    }

    fn method_ok(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }

    /// Whether this rule matches; its path regex already did.
    fn check(&self, facts: &Facts<'_>) -> Result<Match, Denial> {
        if !self.method_ok(facts.method) {
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
        // Rails, Laravel and many APIs merge the query into the body's fields: a field the
        // rule judges must not come in the query instead.
        if facts.query.is_some() {
            let pairs = facts.query_pairs();
            let shadowed = self.body.iter().any(|m| {
                let field = m.pointer.split('/').nth(1).unwrap_or_default();
                pairs.iter().any(|(name, _)| {
                    let name = name.split('[').next().unwrap_or_default();
                    !field.is_empty() && name.eq_ignore_ascii_case(field)
                })
            });
            if shadowed {
                return Err(Denial::BodyUnjudgeable {
                    id: self.id.clone(),
                    why: "the query names a field the body rule judges",
                });
            }
        }
        let json = match facts.body {
            Body::Unread => return Ok(Match::NeedBody),
            Body::Empty => None,
            Body::Json(value) => Some(value),
            Body::Unjudgeable(why) => {
                return Err(Denial::BodyUnjudgeable {
                    id: self.id.clone(),
                    why,
                });
            }
            Body::TooLarge(limit) => return Err(Denial::BodyTooLarge(*limit)),
        };
        let mut incomparable = None;
        for matcher in &self.body {
            match matcher.test(json) {
                Judged::Yes => {}
                Judged::No => return Ok(Match::No),
                Judged::Incomparable(why) => incomparable = Some(why),
            }
        }
        match (incomparable, self.effect) {
            (None, _) => Ok(Match::Yes),
            // Neither refusing nor holding for a person may be dodged by a body it cannot
            // judge.
            (Some(why), Effect::Deny | Effect::Approve) => Err(Denial::BodyUnjudgeable {
                id: self.id.clone(),
                why,
            }),
            // An allow rule that cannot judge does not allow.
            (Some(_), Effect::Allow) => Ok(Match::No),
        }
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
    /// A JSON object, sent as JSON, each key once.
    Json(serde_json::Value),
    /// A body no rule can judge: why.
    Unjudgeable(&'static str),
    /// Larger than latchkey reads (the limit, in bytes).
    TooLarge(usize),
}

impl Body {
    /// The body a rule judges: only a JSON object sent as JSON. Anything else (another
    /// content type the upstream would parse its own way, a top-level array or string,
    /// a key given twice, which parsers resolve differently) is refused by any rule
    /// that must judge it.
    pub fn parse(bytes: &[u8], content_type: Option<&[u8]>) -> Self {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Body::Empty;
        }
        if !content_type.is_some_and(is_json_media_type) {
            return Body::Unjudgeable("the body is not sent as application/json");
        }
        match serde_json::from_slice::<StrictJson>(bytes) {
            Ok(StrictJson(value)) if value.is_object() => Body::Json(value),
            Ok(_) => Body::Unjudgeable("the body is not a JSON object"),
            Err(e) if e.to_string().starts_with(DUPLICATE) => {
                Body::Unjudgeable("the body gives a JSON key twice (in some case)")
            }
            Err(_) => Body::Unjudgeable("the body is not JSON"),
        }
    }
}

const DUPLICATE: &str = "duplicate key";

/// JSON read into a `serde_json::Value`, refusing an object that gives a key twice.
struct StrictJson(serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, SeqAccess, Visitor};
        use serde_json::Value;
        struct Strict;
        impl<'de> Visitor<'de> for Strict {
            type Value = Value;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(v.into())
            }
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(v.into())
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::String(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Value, E> {
                Ok(Value::String(v))
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(StrictJson(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Value::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut object = serde_json::Map::new();
                // Keys equal but for case are duplicates too, to upstreams that ignore it.
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    let StrictJson(value) = map.next_value()?;
                    if !seen.insert(folded(&key)) {
                        return Err(A::Error::custom(format!("{DUPLICATE} {key:?}")));
                    }
                    object.insert(key, value);
                }
                Ok(Value::Object(object))
            }
        }
        d.deserialize_any(Strict).map(StrictJson)
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
#[derive(Debug, Default)]
pub struct RuleList {
    rules: Box<[Arc<Rule>]>,
    /// The path regexes of the rules that have one, in rule order; `None` when none has.
    paths: Option<RegexSet>,
    /// For each pattern of `paths`, the index of its rule.
    pattern_rule: Box<[usize]>,
    /// The rules without a path: candidates for every request.
    pathless: Box<[usize]>,
    /// What some rule reads, which is what the audit keeps of a request these rules
    /// judge (`facts`).
    reads: Reads,
}

impl RuleList {
    /// Whether a rule here holds requests for a person (`approve`).
    pub fn any_approves(&self) -> bool {
        self.rules.iter().any(|r| r.effect == Effect::Approve)
    }

    pub fn new(mut rules: Vec<Arc<Rule>>) -> Result<Self, String> {
        rules.sort_by_key(|r| r.order());
        let (with_path, pathless): (Vec<usize>, Vec<usize>) =
            (0..rules.len()).partition(|&i| rules[i].path.is_some());
        let paths = if with_path.is_empty() {
            None
        } else {
            let patterns = with_path
                .iter()
                .map(|&i| rules[i].path.as_deref().unwrap_or_default());
            Some(
                RegexSetBuilder::new(patterns)
                    .size_limit(SET_SIZE_LIMIT)
                    .dfa_size_limit(DFA_CACHE_LIMIT)
                    .build()
                    .map_err(|e| format!("path regexes together: {e}"))?,
            )
        };
        let reads = Reads::new(rules.iter().flat_map(|r| r.reads()));
        Ok(Self {
            rules: rules.into(),
            paths,
            pattern_rule: with_path.into(),
            pathless: pathless.into(),
            reads,
        })
    }

    /// Header names (lower case), query parameters and body fields (JSON pointers) some
    /// rule reads.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    pub fn needs_body(&self) -> bool {
        // A held request is known by its body (`approval`).
        self.rules
            .iter()
            .any(|r| r.needs_body() || r.effect == Effect::Approve)
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// The rules a request of `method` and `path` may meet: their method and path match,
    /// their conditions are not looked at.
    pub fn may_meet(&self, method: &str, path: &str) -> impl Iterator<Item = &Arc<Rule>> {
        (self.candidates(path).into_iter())
            .map(|i| &self.rules[i])
            .filter(move |r| r.method_ok(method))
    }

    /// The rules whose path matches or who have none, in evaluation order: the only
    /// ones worth a closer look.
    fn candidates(&self, path: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.pathless.to_vec();
        if let Some(set) = &self.paths {
            out.extend(set.matches(path).iter().map(|p| self.pattern_rule[p]));
            out.sort_unstable();
        }
        out
    }
}

/// How the rules decided.
#[derive(Debug)]
pub enum Verdict {
    /// Allowed by this rule, or by the default when `None`.
    Allow(Option<Arc<Rule>>),
    /// Held for a person by this rule: allowed once approved.
    Approve(Arc<Rule>),
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
    let candidates = lists.map(|l| l.candidates(facts.path));
    let mut next = [0usize; 2];
    loop {
        let rule_at = |list: usize| {
            candidates[list]
                .get(next[list])
                .map(|&i| &lists[list].rules[i])
        };
        // The list whose next candidate comes first.
        let (pick, rule) = match (rule_at(0), rule_at(1)) {
            (None, None) => break,
            (Some(a), None) => (0, a),
            (None, Some(b)) => (1, b),
            (Some(a), Some(b)) if b.order() < a.order() => (1, b),
            (Some(a), Some(_)) => (0, a),
        };
        next[pick] += 1;
        match rule.check(facts)? {
            Match::No => continue,
            Match::NeedBody => return Ok(Verdict::NeedBody),
            Match::Yes if rule.effect == Effect::Allow => {
                return Ok(Verdict::Allow(Some(rule.clone())));
            }
            Match::Yes if rule.effect == Effect::Approve => {
                return Ok(Verdict::Approve(rule.clone()));
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
        // Refused by validation; were it not, nothing is allowed without a rule.
        Effect::Deny | Effect::Approve => Err(Denial::DefaultDenied(proxy.clone())),
    }
}

#[cfg(test)]
mod tests;
