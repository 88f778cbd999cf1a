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

/// Whether `pointer` finds something in `value` when object keys are compared ignoring
/// case.
fn pointer_ignoring_case(value: &serde_json::Value, pointer: &str) -> bool {
    let mut at = value;
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~").to_lowercase();
        let next = match at {
            serde_json::Value::Object(map) => map
                .iter()
                .find(|(k, _)| k.to_lowercase() == token)
                .map(|(_, v)| v),
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

    /// Whether this rule matches; its path regex already did.
    fn check(&self, facts: &Facts<'_>) -> Result<Match, Denial> {
        let method_ok = self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(facts.method));
        if !method_ok {
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
            (Some(why), Effect::Deny) => Err(Denial::BodyUnjudgeable {
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
                let mut folded = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    let StrictJson(value) = map.next_value()?;
                    if !folded.insert(key.to_lowercase()) {
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
}

impl RuleList {
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
        Ok(Self {
            rules: rules.into(),
            paths,
            pattern_rule: with_path.into(),
            pathless: pathless.into(),
        })
    }

    pub fn needs_body(&self) -> bool {
        self.rules.iter().any(|r| r.needs_body())
    }

    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::BodyCondition;
    use crate::policy::rows::RuleConditions;

    fn row(id: &str, effect: Effect, priority: i64, position: i64) -> RuleRow {
        RuleRow {
            id: id.into(),
            credential: None,
            proxy: Some("p".into()),
            effect,
            methods: Vec::new(),
            path: None,
            conditions: RuleConditions::default(),
            priority,
            notes: None,
            position,
        }
    }

    fn list(rows: &[RuleRow]) -> RuleList {
        RuleList::new(
            rows.iter()
                .map(|r| Arc::new(Rule::compile(r).unwrap()))
                .collect(),
        )
        .unwrap()
    }

    /// The id of the deciding rule, "default", or the denial's type.
    fn decide(lists: [&RuleList; 2], default: Effect, facts: &Facts<'_>) -> String {
        match evaluate(lists, default, &Arc::from("p"), facts) {
            Ok(Verdict::Allow(Some(rule))) => format!("allow:{}", rule.id),
            Ok(Verdict::Allow(None)) => "allow:default".into(),
            Ok(Verdict::NeedBody) => "need-body".into(),
            Err(Denial::RuleDenied { id, .. }) => format!("deny:{id}"),
            Err(Denial::DefaultDenied(_)) => "deny:default".into(),
            Err(other) => other.kind().as_str().into(),
        }
    }

    fn facts<'a>(method: &'a str, path: &'a str, body: &'a Body) -> Facts<'a> {
        Facts::new(method, path, &[], None, body)
    }

    #[test]
    fn evaluation_order_priority_then_file_order_across_both_lists() {
        let mut a = row("cred-10", Effect::Allow, 10, 0);
        a.path = Some("^/v1/".into());
        let b = row("proxy-5-late", Effect::Deny, 5, 9);
        let mut c = row("cred-5-early", Effect::Allow, 5, 3);
        c.methods = vec!["GET".into()];
        let cred = list(&[a, c]);
        let proxy = list(&[b]);
        let body = Body::Empty;
        let cases = [
            ("GET", "/v1/x", "allow:cred-5-early"),
            ("POST", "/v1/x", "deny:proxy-5-late"),
            ("get", "/v1/x", "allow:cred-5-early"),
        ];
        for (method, path, expected) in cases {
            assert_eq!(
                decide([&cred, &proxy], Effect::Deny, &facts(method, path, &body)),
                expected
            );
        }
        let empty = RuleList::default();
        assert_eq!(
            decide([&empty, &empty], Effect::Deny, &facts("GET", "/", &body)),
            "deny:default"
        );
        assert_eq!(
            decide([&empty, &empty], Effect::Allow, &facts("GET", "/", &body)),
            "allow:default"
        );
    }

    #[test]
    fn header_and_query_conditions() {
        let mut r = row("r", Effect::Allow, 1, 0);
        r.conditions
            .headers
            .insert("x-tenant".into(), ValueCondition::Regex("^acme$".into()));
        r.conditions.query.insert(
            "debug".into(),
            ValueCondition::Spec(crate::policy::ValueSpec {
                regex: None,
                presence: Some(Presence::MustNotExist),
            }),
        );
        let rules = list(&[r]);
        let empty = RuleList::default();
        let body = Body::Empty;
        type Headers<'a> = &'a [(&'a str, &'a [u8])];
        let cases: [(Headers<'_>, Option<&str>, &str); 6] = [
            (&[("x-tenant", b"acme")], None, "allow:r"),
            (&[("x-tenant", b"acme")], Some("a=1&b=2"), "allow:r"),
            (&[("x-tenant", b"acme")], Some("debug=0"), "deny:default"),
            (&[("x-tenant", b"acme")], Some("de%62ug"), "deny:default"),
            (
                &[("x-tenant", b"acme"), ("x-tenant", b"evil")],
                None,
                "deny:default",
            ),
            (&[], None, "deny:default"),
        ];
        for (headers, query, expected) in cases {
            let f = Facts::new("GET", "/", headers, query, &body);
            assert_eq!(
                decide([&rules, &empty], Effect::Deny, &f),
                expected,
                "{headers:?} {query:?}"
            );
        }
    }

    #[test]
    fn every_body_operator() {
        let cond = |json: &str| -> BodyCondition { serde_json::from_str(json).unwrap() };
        let cases = [
            (r#"{"pointer":"/n","lt":5}"#, r#"{"n":4}"#, true),
            (r#"{"pointer":"/n","lt":5}"#, r#"{"n":5}"#, false),
            (r#"{"pointer":"/n","lte":5}"#, r#"{"n":5}"#, true),
            (r#"{"pointer":"/n","gt":5}"#, r#"{"n":5}"#, false),
            (r#"{"pointer":"/n","gte":5}"#, r#"{"n":5.0}"#, true),
            (r#"{"pointer":"/n","eq":5}"#, r#"{"n":5}"#, true),
            (r#"{"pointer":"/n","eq":5}"#, r#"{"n":"5"}"#, false),
            (r#"{"pointer":"/n","gte":1,"lte":3}"#, r#"{"n":2}"#, true),
            (r#"{"pointer":"/n","gte":1,"lte":3}"#, r#"{"n":4}"#, false),
            (r#"{"pointer":"/s","regex":"^ab"}"#, r#"{"s":"abc"}"#, true),
            (r#"{"pointer":"/s","regex":"^ab"}"#, r#"{"s":1}"#, false),
            (
                r#"{"pointer":"/a/0/b","presence":"must_exist"}"#,
                r#"{"a":[{"b":null}]}"#,
                true,
            ),
            (
                r#"{"pointer":"/a/1","presence":"must_exist"}"#,
                r#"{"a":[1]}"#,
                false,
            ),
            (
                r#"{"pointer":"/x","presence":"must_not_exist"}"#,
                r#"{"y":1}"#,
                true,
            ),
            (
                r#"{"pointer":"/x","presence":"must_not_exist"}"#,
                r#"{"x":1}"#,
                false,
            ),
            (r#"{"pointer":"/x","presence":"must_not_exist"}"#, "", true),
            (r#"{"pointer":"/n","lt":5}"#, "", false),
        ];
        let empty = RuleList::default();
        for (condition, body, expected) in cases {
            let mut r = row("r", Effect::Allow, 1, 0);
            r.conditions.body = vec![cond(condition)];
            let rules = list(&[r]);
            let body = Body::parse(body.as_bytes(), Some(JSON));
            let got = decide([&rules, &empty], Effect::Deny, &facts("POST", "/", &body));
            assert_eq!(got == "allow:r", expected, "{condition} on {body:?}: {got}");
        }
    }

    #[test]
    fn a_body_rule_asks_for_the_body_and_refuses_what_it_cannot_judge() {
        let mut r = row("body-rule", Effect::Allow, 1, 0);
        r.methods = vec!["POST".into()];
        r.conditions.body = vec![serde_json::from_str(r#"{"pointer":"/n","lt":5}"#).unwrap()];
        let rules = list(&[r]);
        let empty = RuleList::default();
        let run =
            |method, body: &Body| decide([&rules, &empty], Effect::Deny, &facts(method, "/", body));
        assert_eq!(run("POST", &Body::Unread), "need-body");
        // A request the body rule does not apply to never waits for its body.
        assert_eq!(run("GET", &Body::Unread), "deny:default");
        assert_eq!(run("POST", &Body::Unjudgeable("x")), "rule_denied");
        assert_eq!(run("POST", &Body::TooLarge(10)), "body_too_large");
        assert_eq!(
            run("POST", &Body::parse(br#"{"n":1}"#, Some(JSON))),
            "allow:body-rule"
        );
        assert!(matches!(Body::parse(b"  \n", None), Body::Empty));
        assert!(matches!(
            Body::parse(b"{", Some(JSON)),
            Body::Unjudgeable(_)
        ));
    }

    const JSON: &[u8] = b"application/json; charset=utf-8";

    /// What an agent sends to slip past `deny /amount gt 5000`, then `allow POST`.
    #[test]
    fn a_deny_rule_judges_or_refuses() {
        let mut deny = row("no-big", Effect::Deny, 1, 0);
        deny.conditions.body =
            vec![serde_json::from_str(r#"{"pointer":"/amount","gt":5000}"#).unwrap()];
        let mut allow = row("post", Effect::Allow, 10, 1);
        allow.methods = vec!["POST".into()];
        let rules = list(&[deny, allow]);
        let empty = RuleList::default();
        let run = |body: &str, content_type: &[u8]| {
            let body = Body::parse(body.as_bytes(), Some(content_type));
            decide([&rules, &empty], Effect::Deny, &facts("POST", "/", &body))
        };
        assert_eq!(run(r#"{"amount":10}"#, JSON), "allow:post");
        assert_eq!(run(r#"{"amount":999999}"#, JSON), "deny:no-big");
        assert_eq!(run(r#"{"currency":"usd"}"#, JSON), "allow:post");
        for (body, content_type) in [
            (r#"{"amount":"999999"}"#, JSON),
            (r#"{"amount":[999999]}"#, JSON),
            (r#"{"amount":null}"#, JSON),
            (r#"[{"amount":999999}]"#, JSON),
            (
                r#""&amount=999999&x=""#,
                b"application/x-www-form-urlencoded",
            ),
            (r#"{"amount":1}"#, b"application/x-www-form-urlencoded"),
            (r#"{"amount":1}"#, b"text/plain"),
            (r#"{"amount":999999,"amount":1}"#, JSON),
            (r#"{"amount":1,"Amount":999999}"#, JSON),
            (r#"{"AMOUNT":999999}"#, JSON),
            (r#"{"a":{"b":1,"b":2},"amount":1}"#, JSON),
        ] {
            assert_eq!(
                run(body, content_type),
                "rule_denied",
                "{body} as {}",
                String::from_utf8_lossy(content_type)
            );
        }
        // The field moved to the query, which the upstream merges into the body's.
        let empty_body = Body::parse(b"{}", Some(JSON));
        for query in ["amount=999999", "Amount[]=1&x=2"] {
            let f = Facts::new("POST", "/", &[], Some(query), &empty_body);
            assert_eq!(
                decide([&rules, &empty], Effect::Deny, &f),
                "rule_denied",
                "{query}"
            );
        }
        let f = Facts::new("POST", "/", &[], Some("limit=3"), &empty_body);
        assert_eq!(decide([&rules, &empty], Effect::Deny, &f), "allow:post");
        assert!(is_json_media_type(b"application/vnd.api+json"));
        assert!(!is_json_media_type(b"application/jsonp"));
    }

    mod strict_bodies {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the body, a deny rule on a number either matches, passes a body
            /// whose number is in range, or refuses: a number over the bound never passes.
            #[test]
            fn a_number_over_a_deny_bound_never_passes(
                amount in prop_oneof![
                    (5001u64..u64::MAX).prop_map(|n| n.to_string()),
                    (5001u64..10_000_000).prop_map(|n| format!("\"{n}\"")),
                    (5001u64..10_000_000).prop_map(|n| format!("[{n}]")),
                    (5001u64..10_000_000).prop_map(|n| format!("{n}.5e0")),
                ],
                dup in any::<bool>(),
            ) {
                let mut deny = row("no-big", Effect::Deny, 1, 0);
                deny.conditions.body =
                    vec![serde_json::from_str(r#"{"pointer":"/amount","gt":5000}"#).unwrap()];
                let rules = list(&[deny, row("all", Effect::Allow, 10, 1)]);
                let empty = RuleList::default();
                let json = if dup {
                    format!(r#"{{"amount":{amount},"amount":1}}"#)
                } else {
                    format!(r#"{{"amount":{amount}}}"#)
                };
                let body = Body::parse(json.as_bytes(), Some(JSON));
                let got = decide([&rules, &empty], Effect::Deny, &facts("POST", "/", &body));
                if dup {
                    prop_assert_eq!(got, "rule_denied", "{}", json);
                } else {
                    prop_assert!(got == "deny:no-big" || got == "rule_denied", "{} -> {}", json, got);
                }
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const PATHS: [&str; 4] = ["^/a", "^/a/b", "^/b", "c$"];
        const REQUEST_PATHS: [&str; 5] = ["/a", "/a/b", "/b/c", "/c", "/x"];
        const METHODS: [&str; 3] = ["GET", "POST", "PUT"];

        /// (allow, priority, methods bitmask, path index or none, in credential list)
        type Spec = (bool, i64, u8, Option<usize>, bool);

        fn rows(specs: &[Spec]) -> Vec<(RuleRow, bool)> {
            specs
                .iter()
                .enumerate()
                .map(|(i, &(allow, priority, methods, path, cred))| {
                    let effect = if allow { Effect::Allow } else { Effect::Deny };
                    let mut r = row(&format!("r{i}"), effect, priority, i as i64);
                    r.methods = (0..2)
                        .filter(|b| methods & (1 << b) != 0)
                        .map(|b| METHODS[b].to_owned())
                        .collect();
                    r.path = path.map(|p| PATHS[p].to_owned());
                    (r, cred)
                })
                .collect()
        }

        /// The definition: sort everything, take the first match.
        fn reference(rows: &[(RuleRow, bool)], method: &str, path: &str) -> String {
            let mut all: Vec<&RuleRow> = rows.iter().map(|(r, _)| r).collect();
            all.sort_by_key(|r| (r.priority, r.position));
            for r in all {
                let method_ok = r.methods.is_empty() || r.methods.iter().any(|m| m == method);
                let path_ok = r
                    .path
                    .as_deref()
                    .is_none_or(|p| regex::Regex::new(p).unwrap().is_match(path));
                if method_ok && path_ok {
                    let verb = if r.effect == Effect::Allow {
                        "allow"
                    } else {
                        "deny"
                    };
                    return format!("{verb}:{}", r.id);
                }
            }
            "deny:default".into()
        }

        proptest! {
            #[test]
            fn matches_the_definition_and_a_lower_deny_always_wins(
                specs in prop::collection::vec((any::<bool>(), 0i64..4, 0u8..4, prop::option::of(0usize..4), any::<bool>()), 0..12),
                method in 0usize..3,
                path in 0usize..5,
            ) {
                let rows = rows(&specs);
                let cred: Vec<RuleRow> = rows.iter().filter(|(_, c)| *c).map(|(r, _)| r.clone()).collect();
                let proxy: Vec<RuleRow> = rows.iter().filter(|(_, c)| !*c).map(|(r, _)| r.clone()).collect();
                let (cred, proxy) = (list(&cred), list(&proxy));
                let body = Body::Empty;
                let f = facts(METHODS[method], REQUEST_PATHS[path], &body);
                let got = decide([&cred, &proxy], Effect::Deny, &f);
                prop_assert_eq!(&got, &decide([&cred, &proxy], Effect::Deny, &f), "deterministic");
                prop_assert_eq!(&got, &reference(&rows, METHODS[method], REQUEST_PATHS[path]));

                // A matching deny with a lower priority number than every matching allow wins.
                let matching: Vec<&RuleRow> = rows.iter().map(|(r, _)| r)
                    .filter(|r| reference(&[((*r).clone(), true)], METHODS[method], REQUEST_PATHS[path]) != "deny:default")
                    .collect();
                let best_allow = matching.iter().filter(|r| r.effect == Effect::Allow).map(|r| r.priority).min();
                let best_deny = matching.iter().filter(|r| r.effect == Effect::Deny).map(|r| r.priority).min();
                if let (Some(d), a) = (best_deny, best_allow) && a.is_none_or(|a| d < a) {
                    prop_assert!(got.starts_with("deny:"), "{got}");
                }
            }
        }
    }
}
