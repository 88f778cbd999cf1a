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
        Ok(Verdict::Approve(rule)) => format!("approve:{}", rule.id),
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
    // Go's and .NET's JSON fold `ſ` to `s` and the Kelvin sign to `k`: to them these are
    // the same key twice, and the later one wins.
    for twice in [
        r#"{"params":{"name":"search"},"paramſ":{"name":"delete_all"}}"#,
        "{\"kind\":1,\"\u{212a}ind\":2}",
        r#"{"a":{"Name":1,"NAME":2}}"#,
    ] {
        assert!(
            matches!(
                Body::parse(twice.as_bytes(), Some(JSON)),
                Body::Unjudgeable(_)
            ),
            "{twice}"
        );
    }
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

#[test]
fn an_approve_rule_holds_and_cannot_be_dodged_by_an_unjudgeable_body() {
    let mut approve = row("refunds", Effect::Approve, 10, 0);
    approve.path = Some("^/v1/refunds".into());
    approve.conditions.body = vec![BodyCondition {
        pointer: "/amount".into(),
        gte: Some(1000.0),
        ..BodyCondition::default()
    }];
    let proxy = list(&[approve]);
    let empty = RuleList::default();
    let at = |body: &Body| {
        decide(
            [&empty, &proxy],
            Effect::Allow,
            &facts("POST", "/v1/refunds", body),
        )
    };
    assert_eq!(
        at(&Body::parse(
            br#"{"amount": 5000}"#,
            Some(b"application/json")
        )),
        "approve:refunds"
    );
    assert_eq!(
        at(&Body::parse(br#"{"amount": 5}"#, Some(b"application/json"))),
        "allow:default"
    );
    // A string where a number is expected: refused, as a deny rule would be.
    assert_eq!(
        at(&Body::parse(
            br#"{"amount": "5000"}"#,
            Some(b"application/json")
        )),
        "rule_denied"
    );
    assert_eq!(at(&Body::Unread), "need-body");
}
