//! The cost of one decision (key lookup + rules + mutation build) on a proxy with 10, 100
//! and 1,000 rules, headers only. The request matches the last rule: the worst case.
//! And the whole ext_proc message as latchkey handles it: the request-headers message
//! decoded from its wire bytes, decided, and the answer encoded (budgets and the audit
//! record, which are asynchronous, are measured apart: `benches/budget.rs`).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};
use latchkey::base::crypto::MasterKey;
use latchkey::dataplane::pipeline::{Judgement, Outcome, RequestView, decide};
use latchkey::dataplane::rules::Body;
use latchkey::dataplane::snapshot::Policy;
use latchkey::envoy::convert::{self, ResponseRead};
use latchkey::store::memory;
use prost::Message;

const KEY: &str = "lk_benchKEY0000000000000000001";

/// A proxy with `rules` allow rules, built from its policy file as `apply` stores it.
fn policy(rules: usize, master: &MasterKey) -> Policy {
    let mut yaml = format!(
        r#"
targets:
  - {{ name: vendor, url: "https://api.vendor.example/base" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: sk_live_benchmark_secret }} }}
  - {{ name: agent, type: proxy, keys: [{{ value: {KEY} }}] }}
proxies:
  - {{ name: vendor, target: vendor, target_credential: vendor-cred, proxy_credentials: [agent], default_effect: deny }}
rules:
"#
    );
    for i in 0..rules {
        yaml.push_str(&format!(
            "  - {{ proxy: vendor, id: rule_{i}, effect: allow, methods: [GET, POST], \
             path: \"^/v1/resource_{i}(/|$)\", priority: {i} }}\n"
        ));
    }
    let stored = memory::stored(&yaml, master).expect("the benchmark policy");
    Policy::compile(&stored, master, &Default::default()).expect("the benchmark policy compiles")
}

fn decision(c: &mut Criterion) {
    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let mut group = c.benchmark_group("decision");
    for rules in [10, 100, 1000] {
        let policy = policy(rules, &master);
        let path = format!("/vendor/v1/resource_{}/items?limit=10", rules - 1);
        let bearer = format!("Bearer {KEY}");
        let headers = agent_headers(path.as_bytes(), bearer.as_bytes());
        let view = RequestView {
            method: "GET",
            path: &path,
            headers: &headers,
            body: Some(&[]),
        };
        let d = decide(&policy, &view, &Body::Empty, 0);
        assert!(
            matches!(&d, Judgement::Decided(d) if matches!(d.outcome, Outcome::Forward(_))),
            "{d:?}"
        );
        group.bench_with_input(BenchmarkId::from_parameter(rules), &view, |b, view| {
            b.iter(|| decide(black_box(&policy), black_box(view), &Body::Empty, 0))
        });
    }
    group.finish();
}

/// What Envoy sends: the request headers, as `raw_value` bytes.
fn request_headers_message(headers: &[(&str, &[u8])]) -> Vec<u8> {
    ProcessingRequest {
        request: Some(Phase::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: headers
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).to_owned(),
                        raw_value: v.to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Wire bytes in, wire bytes out: decode, decide, build and encode the mutation.
fn handle(policy: &Policy, wire: &[u8]) -> Vec<u8> {
    let message = ProcessingRequest::decode(wire).expect("a valid message");
    let Some(Phase::RequestHeaders(headers)) = message.request else {
        unreachable!("request headers")
    };
    let pairs = convert::header_pairs(headers.headers.as_ref());
    let text = |name| {
        convert::header_value(&pairs, name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or_default()
    };
    let view = RequestView {
        method: text(":method"),
        path: text(":path"),
        headers: &pairs,
        body: Some(&[]),
    };
    let Judgement::Decided(decision) = decide(policy, &view, &Body::Empty, 0) else {
        unreachable!("decided on the headers")
    };
    let Outcome::Forward(forward) = decision.outcome else {
        unreachable!("allowed")
    };
    convert::allow(forward, false, decision.shown, ResponseRead::Nothing).encode_to_vec()
}

/// The headers of an agent's GET as Envoy passes them on.
fn agent_headers<'a>(path: &'a [u8], authorization: &'a [u8]) -> Vec<(&'a str, &'a [u8])> {
    vec![
        (":method", b"GET"),
        (":path", path),
        (":authority", b"127.0.0.1:10000"),
        (":scheme", b"http"),
        ("user-agent", b"agent-sdk/1.2.3"),
        ("accept", b"application/json"),
        ("authorization", authorization),
        ("x-request-id", b"6c1f9a34-5b7e-4c1d-9d2a-0f3e8b7a6c5d"),
        ("x-forwarded-proto", b"http"),
        ("content-type", b"application/json"),
    ]
}

fn ext_proc_message(c: &mut Criterion) {
    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let policy = policy(10, &master);
    let bearer = format!("Bearer {KEY}");
    let wire = request_headers_message(&agent_headers(
        b"/vendor/v1/resource_9/items?limit=10",
        bearer.as_bytes(),
    ));
    assert!(!handle(&policy, &wire).is_empty());
    c.bench_function("ext_proc_request_headers_message", |b| {
        b.iter(|| handle(black_box(&policy), black_box(&wire)))
    });
}

criterion_group!(benches, decision, ext_proc_message);
criterion_main!(benches);
