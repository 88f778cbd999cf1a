//! The cost of one decision (key lookup + rules + mutation build) on a proxy with 10, 100
//! and 1,000 rules, headers only. The request matches the last rule: the worst case.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use latchkey::crypto::{MasterKey, hash_key};
use latchkey::pipeline::{Outcome, RequestView, decide};
use latchkey::policy::Policy;
use latchkey::policy_file::{AuthKind, CredentialType, Effect};
use latchkey::rules::Body;
use latchkey::store::{
    AuthSpec, CredentialRow, KeyRow, ProxyRow, RuleConditions, RuleRow, StoredPolicy, TargetRow,
};

const KEY: &str = "lk_benchKEY0000000000000000001";

fn policy(rules: usize, master: &MasterKey) -> Policy {
    let stored = StoredPolicy {
        targets: vec![TargetRow {
            name: "vendor".into(),
            url: "https://api.vendor.example/base".into(),
        }],
        credentials: vec![
            CredentialRow {
                id: "cred_t".into(),
                name: "vendor-cred".into(),
                kind: CredentialType::Target,
                auth: Some(AuthSpec::of(AuthKind::Bearer)),
                secret_ref: None,
                sealed: Some(master.seal("cred_t", b"sk_live_benchmark_secret")),
                master_key_id: Some(master.id().into()),
                limits: None,
            },
            CredentialRow {
                id: "cred_a".into(),
                name: "agent".into(),
                kind: CredentialType::Proxy,
                auth: None,
                secret_ref: None,
                sealed: None,
                master_key_id: None,
                limits: None,
            },
        ],
        keys: vec![KeyRow {
            id: "key_1".into(),
            credential_id: "cred_a".into(),
            hash: hash_key(KEY.as_bytes()).to_vec(),
            policy_sourced: true,
            label: None,
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            spend_cap_usd: None,
            spent_usd: 0.0,
        }],
        proxies: vec![ProxyRow {
            name: "vendor".into(),
            target: "vendor".into(),
            target_credential: "vendor-cred".into(),
            proxy_credentials: vec!["agent".into()],
            default_effect: Effect::Deny,
            limits: None,
            cost: None,
            response: None,
        }],
        rules: (0..rules)
            .map(|i| RuleRow {
                id: format!("rule_{i}"),
                credential: None,
                proxy: Some("vendor".into()),
                effect: Effect::Allow,
                methods: vec!["GET".into(), "POST".into()],
                path: Some(format!("^/v1/resource_{i}(/|$)")),
                conditions: RuleConditions::default(),
                priority: i as i64,
                notes: None,
                position: i as i64,
            })
            .collect(),
    };
    Policy::compile(&stored, master).expect("the benchmark policy compiles")
}

fn decision(c: &mut Criterion) {
    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let mut group = c.benchmark_group("decision");
    for rules in [10, 100, 1000] {
        let policy = policy(rules, &master);
        let path = format!("/vendor/v1/resource_{}/items?limit=10", rules - 1);
        let bearer = format!("Bearer {KEY}");
        let headers: Vec<(&str, &[u8])> = vec![
            (":method", b"GET"),
            (":path", path.as_bytes()),
            (":authority", b"127.0.0.1:10000"),
            (":scheme", b"http"),
            ("user-agent", b"agent-sdk/1.2.3"),
            ("accept", b"application/json"),
            ("authorization", bearer.as_bytes()),
            ("x-request-id", b"6c1f9a34-5b7e-4c1d-9d2a-0f3e8b7a6c5d"),
            ("x-forwarded-proto", b"http"),
            ("content-type", b"application/json"),
        ];
        let view = RequestView {
            method: "GET",
            path: &path,
            headers: &headers,
            body: Some(&[]),
        };
        let d = decide(&policy, &view, &Body::Empty, 0);
        assert!(matches!(d.outcome, Outcome::Forward(_)), "{d:?}");
        group.bench_with_input(BenchmarkId::from_parameter(rules), &view, |b, view| {
            b.iter(|| decide(black_box(&policy), black_box(view), &Body::Empty, 0))
        });
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
