//! What the audit keeps of a request beyond its method and path, so that a replay can
//! judge the rules that read more: the values of the headers and query parameters some
//! rule of the request's proxy or credential reads and, where the proxy opts in
//! (`audit.body_fields`), of the body fields they read; nothing else. A key carrier or
//! anything named like a secret (`names::secret_like`), and any value over 256 bytes or
//! carrying a credential, is kept as withheld (`null`): a replay leaves a rule that reads
//! one unjudged rather than guess.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataplane::rules::{Name, Read, Reads};

/// The longest value kept.
const MAX_VALUE: usize = 256;

/// Recorded values by name (headers in lower case); `None`: withheld. `record` writes
/// them borrowed from the request and the rules; [`Recorded::parse`] reads them owned.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded<'a> {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<Cow<'a, str>, Option<Vec<Cow<'a, str>>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<Cow<'a, str>, Option<Vec<Cow<'a, str>>>>,
    /// By JSON pointer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub body: BTreeMap<Cow<'a, str>, Option<Field>>,
    /// On MCP proxies: the message's JSON-RPC method and tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpFacts<'a>>,
}

/// What the audit keeps of an MCP message: always, on MCP proxies (names, no arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpFacts<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<Cow<'a, str>>,
}

/// A body field as the request had it: absent, or present with a value (`null` too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub present: bool,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub value: serde_json::Value,
}

/// Whether a value may be kept: short, and not a credential whatever it is named (the
/// agent's own key in a header a rule reads, an `Authorization`-style value).
fn keepable(value: &str, presented: Option<&[u8]>) -> bool {
    let credential_like = ["bearer ", "basic "].iter().any(|scheme| {
        value.len() >= scheme.len()
            && value.as_bytes()[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes())
    });
    let carries_key = presented.is_some_and(|key| {
        !key.is_empty() && value.as_bytes().windows(key.len()).any(|w| w == key)
    });
    value.len() <= MAX_VALUE && !credential_like && !carries_key
}

/// The values kept of one name: all of them, or withheld.
fn kept<V: AsRef<str>>(
    name: &Name,
    values: impl Iterator<Item = V>,
    presented: Option<&[u8]>,
) -> Option<Vec<V>> {
    if name.withheld {
        return None;
    }
    let values: Vec<V> = values.collect();
    (values.iter().all(|v| keepable(v.as_ref(), presented))).then_some(values)
}

/// The body field at `pointer`: a scalar only (an object or array may hold anything),
/// unless the pointer is withheld or the value may not be kept.
fn kept_field(pointer: &Name, body: &serde_json::Value, presented: Option<&[u8]>) -> Option<Field> {
    if pointer.withheld {
        return None;
    }
    Some(match body.pointer(&pointer.text) {
        None => Field {
            present: false,
            value: serde_json::Value::Null,
        },
        Some(serde_json::Value::Object(_) | serde_json::Value::Array(_)) => return None,
        Some(serde_json::Value::String(text)) if !keepable(text, presented) => return None,
        Some(value) => Field {
            present: true,
            value: value.clone(),
        },
    })
}

/// [`Recorded`] as `record` writes it: each map a list of pairs, sorted by name when
/// written (two lists may read one name: the first is kept), so no map is built.
#[derive(Serialize)]
struct Written<'a> {
    #[serde(skip_serializing_if = "Pairs::is_empty")]
    headers: Pairs<'a, Option<Vec<Cow<'a, str>>>>,
    #[serde(skip_serializing_if = "Pairs::is_empty")]
    query: Pairs<'a, Option<Vec<Cow<'a, str>>>>,
    #[serde(skip_serializing_if = "Pairs::is_empty")]
    body: Pairs<'a, Option<Field>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mcp: Option<McpFacts<'a>>,
}

struct Pairs<'a, V>(Vec<(&'a str, V)>);

impl<V> Pairs<'_, V> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In name order, each name once, as the maps of [`Recorded`] hold them. Where both
    /// lists read a name, the first list's value is kept: the same as the second's, both
    /// made from the same request by the same rules of withholding.
    fn settle(&mut self) {
        self.0.sort_by(|a, b| a.0.cmp(b.0));
        self.0.dedup_by(|later, first| later.0 == first.0);
    }
}

impl<V: Serialize> Serialize for Pairs<'_, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, value)| (name, value)))
    }
}

/// The facts to keep of a request judged by the rules that read `reads`: `None` when no
/// rule reads a header, the query or a kept body (most proxies), else compact JSON (a
/// [`Recorded`]). `body` is the JSON body the rules judged, when the proxy keeps body
/// fields; `presented`, the proxy key the request carried, which is never kept wherever
/// it appears.
pub fn record(
    reads: [&Reads; 2],
    headers: &[(&str, &[u8])],
    query: Option<&str>,
    body: Option<&serde_json::Value>,
    presented: Option<&[u8]>,
    mcp: Option<&crate::dataplane::mcp::Call>,
) -> Option<Box<str>> {
    let mut out = Written {
        headers: Pairs(Vec::new()),
        query: Pairs(Vec::new()),
        body: Pairs(Vec::new()),
        mcp: mcp.map(|call| McpFacts {
            method: call.method.as_deref().map(Cow::Borrowed),
            tool: call.tool.as_deref().map(Cow::Borrowed),
        }),
    };
    let mut pairs: Option<Vec<(Cow<'_, str>, Cow<'_, str>)>> = None;
    for reads in reads {
        if let Some(body) = body {
            for pointer in &reads.body {
                (out.body.0).push((&pointer.text, kept_field(pointer, body, presented)));
            }
        }
        for name in &reads.headers {
            let values = (headers.iter())
                .filter(|(n, _)| n.eq_ignore_ascii_case(&name.text))
                .map(|(_, v)| Cow::Borrowed(std::str::from_utf8(v).unwrap_or("\u{fffd}")));
            (out.headers.0).push((&name.text, kept(name, values, presented)));
        }
        if reads.query.is_empty() {
            continue;
        }
        let pairs = pairs.get_or_insert_with(|| {
            query
                .map(|q| form_urlencoded::parse(q.as_bytes()).collect())
                .unwrap_or_default()
        });
        for name in &reads.query {
            let values = (pairs.iter())
                .filter(|(n, _)| n == name.text.as_ref())
                .map(|(_, v)| v.clone());
            (out.query.0).push((&name.text, kept(name, values, presented)));
        }
    }
    if out.headers.is_empty() && out.query.is_empty() && out.body.is_empty() && out.mcp.is_none() {
        return None;
    }
    out.headers.settle();
    out.query.settle();
    out.body.settle();
    Some(
        serde_json::to_string(&out)
            .expect("a map of strings serializes")
            .into(),
    )
}

impl Recorded<'_> {
    pub fn parse(text: &str) -> Option<Recorded<'static>> {
        serde_json::from_str(text).ok()
    }

    /// Whether every value in `reads` was kept, so a rule can be judged on these facts.
    /// Where no body field was kept at all, a body read counts as covered: the replay
    /// gives such a rule no body, and it says itself that it cannot judge.
    pub fn covers<'r>(&self, mut reads: impl Iterator<Item = Read<'r>>) -> bool {
        reads.all(|read| match read {
            Read::Header(name) => {
                matches!(
                    self.headers.get(name.to_ascii_lowercase().as_str()),
                    Some(Some(_))
                )
            }
            Read::Query(name) => matches!(self.query.get(name), Some(Some(_))),
            // An MCP message's method and tool are kept: its `mcp` conditions judge.
            Read::Body("/method" | "/params/name") if self.mcp.is_some() => true,
            Read::Body(pointer) => {
                self.body.is_empty() || matches!(self.body.get(pointer), Some(Some(_)))
            }
        })
    }

    /// A body carrying the kept fields where they were: `None` when none was kept.
    pub fn body_json(&self) -> Option<serde_json::Value> {
        let mut root = match &self.mcp {
            Some(m) => {
                let mut message = serde_json::json!({});
                if let Some(method) = &m.method {
                    message["method"] = method.as_ref().into();
                }
                if let Some(tool) = &m.tool {
                    message["params"] = serde_json::json!({ "name": tool });
                }
                message
            }
            None if self.body.is_empty() => return None,
            None => serde_json::Value::Object(serde_json::Map::new()),
        };
        for (pointer, field) in &self.body {
            let Some(Field {
                present: true,
                value,
            }) = field
            else {
                continue;
            };
            let tokens: Vec<String> = (pointer.split('/').skip(1))
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect();
            let Some((last, parents)) = tokens.split_last() else {
                continue;
            };
            let mut at = &mut root;
            for token in parents {
                let serde_json::Value::Object(map) = at else {
                    break;
                };
                at = map
                    .entry(token.clone())
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            }
            if let serde_json::Value::Object(map) = at {
                map.insert(last.clone(), value.clone());
            }
        }
        Some(root)
    }

    /// The kept headers, as a request carries them.
    pub fn header_pairs(&self) -> Vec<(&str, &[u8])> {
        (self.headers.iter())
            .filter_map(|(name, values)| Some((name, values.as_ref()?)))
            .flat_map(|(name, values)| values.iter().map(move |v| (name.as_ref(), v.as_bytes())))
            .collect()
    }

    /// The kept query parameters, as a query string.
    pub fn query_string(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, values) in &self.query {
            for value in values.iter().flatten() {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dataplane::rules::{Rule, RuleList};
    use crate::policy::Effect;
    use crate::policy::rows::RuleRow;

    fn list(conditions: &str) -> RuleList {
        let row = RuleRow {
            id: "r".into(),
            credential: None,
            proxy: Some("p".into()),
            effect: Effect::Deny,
            methods: Vec::new(),
            path: None,
            conditions: serde_norway::from_str(conditions).unwrap(),
            priority: 1,
            notes: None,
            position: 0,
        };
        RuleList::new(vec![Arc::new(Rule::compile(&row).unwrap())]).unwrap()
    }

    #[test]
    fn only_what_rules_read_is_kept_and_secrets_are_withheld() {
        let rules = list(
            r#"{ headers: { X-Env: "prod", X-Api-Key: { presence: must_exist } },
                 query: { mode: "x", token: { presence: must_exist },
                          long: { presence: must_exist } } }"#,
        );
        let none = RuleList::default();
        let long = "v".repeat(300);
        let query = format!("mode=a&mode=b%20c&token=t0p&other=1&long={long}");
        let headers: [(&str, &[u8]); 4] = [
            ("x-env", b"prod"),
            ("x-api-key", b"lk_secret"),
            ("accept", b"*/*"),
            ("x-env", b"staging"),
        ];
        let text = record(
            [none.reads(), rules.reads()],
            &headers,
            Some(&query),
            None,
            None,
            None,
        )
        .unwrap();
        assert!(!text.contains("lk_secret") && !text.contains("t0p") && !text.contains("accept"));
        let kept = Recorded::parse(&text).unwrap();
        // Written from lists, read back into maps: the same text, names in order.
        assert_eq!(serde_json::to_string(&kept).unwrap(), &*text);
        // A name both lists read is written once.
        let both = [rules.reads(), rules.reads()];
        let twice = record(both, &headers, Some(&query), None, None, None);
        assert_eq!(twice.as_deref(), Some(&*text));
        assert_eq!(
            kept.headers["x-env"],
            Some(vec!["prod".into(), "staging".into()])
        );
        assert_eq!(kept.headers["x-api-key"], None);
        assert_eq!(kept.query["mode"], Some(vec!["a".into(), "b c".into()]));
        assert_eq!(kept.query["token"], None);
        assert_eq!(kept.query["long"], None, "too long to keep");
        assert!(kept.covers([Read::Header("X-Env"), Read::Query("mode")].into_iter()));
        assert!(!kept.covers([Read::Header("x-api-key")].into_iter()));
        assert!(
            !kept.covers([Read::Header("x-other")].into_iter()),
            "not kept at all"
        );
        assert_eq!(kept.query_string(), "mode=a&mode=b+c");
        // No rule reads anything: nothing is kept.
        assert_eq!(
            record(
                [none.reads(), none.reads()],
                &headers,
                Some(&query),
                None,
                None,
                None
            ),
            None
        );
        // The agent's own key, or a credential-like value, in a header a rule reads.
        let sneaky: [(&str, &[u8]); 2] = [("x-env", b"prod lk_secret"), ("x-env", b"x")];
        let text = record(
            [none.reads(), rules.reads()],
            &sneaky,
            None,
            None,
            Some(b"lk_secret"),
            None,
        )
        .unwrap();
        assert!(!text.contains("lk_secret"), "{text}");
        let bearer: [(&str, &[u8]); 1] = [("x-env", b"Bearer abc")];
        let text = record(
            [none.reads(), rules.reads()],
            &bearer,
            None,
            None,
            None,
            None,
        )
        .unwrap();
        assert!(!text.contains("abc"), "{text}");
    }

    #[test]
    fn body_fields_are_kept_only_when_given_and_rebuilt_where_they_were() {
        let rules = list(
            r#"{ body: [ { pointer: /amount, gt: 100 }, { pointer: /meta/tier, presence: must_exist },
                         { pointer: /metadata, presence: must_exist },
                         { pointer: /auth/0, presence: must_exist },
                         { pointer: /card_token, presence: must_exist },
                         { pointer: /note, presence: must_exist }, { pointer: /gone, presence: must_exist } ] }"#,
        );
        let none = RuleList::default();
        let body = serde_json::json!({
            "amount": 250, "meta": { "tier": "gold", "other": 1 }, "card_token": "tok_123",
            "note": "n".repeat(300), "unread": "x",
            "metadata": { "api_key": "lk_nested" }, "auth": ["pw"],
        });
        assert_eq!(
            record([rules.reads(), none.reads()], &[], None, None, None, None),
            None,
            "not opted in"
        );
        let text = record(
            [rules.reads(), none.reads()],
            &[],
            None,
            Some(&body),
            None,
            None,
        )
        .unwrap();
        assert!(!text.contains("tok_123") && !text.contains("unread") && !text.contains("other"));
        assert!(
            !text.contains("lk_nested") && !text.contains("pw"),
            "{text}"
        );
        let kept = Recorded::parse(&text).unwrap();
        // Written borrowed, read back owned: the same text.
        assert_eq!(serde_json::to_string(&kept).unwrap(), &*text);
        assert!(kept.covers([Read::Body("/amount"), Read::Body("/gone")].into_iter()));
        assert!(
            !kept.covers([Read::Body("/card_token")].into_iter()),
            "withheld"
        );
        assert!(!kept.covers([Read::Body("/note")].into_iter()), "too long");
        assert_eq!(
            kept.body_json().unwrap(),
            serde_json::json!({ "amount": 250, "meta": { "tier": "gold" } })
        );
    }

    #[test]
    fn an_mcp_calls_facts_are_written_as_recorded_writes_them() {
        let call = crate::dataplane::mcp::Call {
            method: Some("tools/call".into()),
            tool: Some("search".into()),
            id: None,
        };
        let none = RuleList::default();
        let text = record(
            [none.reads(), none.reads()],
            &[],
            None,
            None,
            None,
            Some(&call),
        )
        .unwrap();
        let kept = Recorded::parse(&text).unwrap();
        assert_eq!(serde_json::to_string(&kept).unwrap(), &*text);
        assert!(kept.covers([Read::Body("/method"), Read::Body("/params/name")].into_iter()));
    }

    proptest::proptest! {
        /// Whatever the agent sends, the kept facts parse back, hold a carrier's value
        /// never, and give the rules back exactly the values kept.
        #[test]
        fn hostile_headers_and_queries_round_trip_without_secrets(
            env in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..4),
            key in "[A-Za-z0-9]{20,40}",
            query in ".{0,200}",
        ) {
            let rules = list(r#"{ headers: { X-Env: "x", Authorization: "y" }, query: { q: "z" } }"#);
            let none = RuleList::default();
            let bearer = format!("Bearer {key}");
            let mut headers: Vec<(&str, &[u8])> = env.iter().map(|v| ("x-env", v.as_slice())).collect();
            headers.push(("authorization", bearer.as_bytes()));
            let reads = [rules.reads(), none.reads()];
            let text = record(reads, &headers, Some(&query), None, None, None).unwrap();
            proptest::prop_assert!(!text.contains(&key));
            let kept = Recorded::parse(&text).unwrap();
            // Written borrowed, read back owned: rows of earlier releases and of this one
            // read and compare alike.
            proptest::prop_assert_eq!(serde_json::to_string(&kept).unwrap(), text.to_string());
            // As the rules see them: a value that is not UTF-8 is one replacement character.
            let lossy: Vec<Cow<'_, str>> = (env.iter())
                .map(|v| Cow::Owned(std::str::from_utf8(v).unwrap_or("\u{fffd}").to_owned()))
                .collect();
            let expected = lossy.iter().all(|v| v.len() <= MAX_VALUE).then_some(lossy);
            proptest::prop_assert_eq!(kept.headers.get("x-env").cloned(), Some(expected.clone()));
            let back: Vec<&[u8]> = kept.header_pairs().into_iter().map(|(_, v)| v).collect();
            let want: Vec<&[u8]> = expected.iter().flatten().map(|v| v.as_bytes()).collect();
            proptest::prop_assert_eq!(back, want);
            // The query string rebuilt parses to the kept values again.
            let rebuilt: Vec<(String, String)> =
                form_urlencoded::parse(kept.query_string().as_bytes()).into_owned().collect();
            let kept_q: Vec<(String, String)> = kept.query.get("q").cloned().flatten().unwrap_or_default()
                .into_iter().map(|v| ("q".to_owned(), v.into_owned())).collect();
            proptest::prop_assert_eq!(rebuilt, kept_q);
        }
    }
}
