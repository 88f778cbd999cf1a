//! Workload identity on the request path: a decision for a caller with a proxy key, the
//! same for a caller with a JWT already verified (cached by its hash), and a JWT's cold
//! verification (parse, claims, signature) with the issuer's keys in memory, for RS256
//! and ES256. The RSA key is a throwaway made for this benchmark (benches/data).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use criterion::{Criterion, criterion_group, criterion_main};
use latchkey::base::crypto::MasterKey;
use latchkey::dataplane::identity::Identities;
use latchkey::dataplane::keys;
use latchkey::dataplane::pipeline::{Caller, Judgement, Outcome, RequestView, decide, decide_as};
use latchkey::dataplane::rules::Body;
use latchkey::dataplane::snapshot::Policy;
use latchkey::store::memory;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};

const KEY: &str = "lk_benchKEY0000000000000000001";
const NOW_MS: i64 = 1_800_000_000_000;

/// What an async call comes to when it does not wait (the keys are in memory).
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the call waited: the keys were not in memory"),
    }
}

fn token(alg: &str, kid: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let header = B64URL.encode(format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"JWT"}}"#));
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "aud": ["latchkey"],
        "sub": "system:serviceaccount:agents:research-1",
        "iat": NOW_MS / 1000, "exp": NOW_MS / 1000 + 3600,
        "kubernetes.io": {"namespace": "agents", "pod": {"name": "research-1-abc"}},
    });
    let signed = format!("{header}.{}", B64URL.encode(claims.to_string()));
    let signature = sign(signed.as_bytes());
    format!("{signed}.{}", B64URL.encode(signature))
}

fn identity(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let dir = tempfile::tempdir().unwrap();
    // One key set: the RSA key of benches/data and a fresh P-256 key.
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data");
    let rsa = RsaKeyPair::from_pkcs8(&std::fs::read(format!("{data}/jwt-rsa-2048.pk8")).unwrap())
        .unwrap();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let ec = EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let mut jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{data}/jwt-rsa-2048.jwks.json")).unwrap())
            .unwrap();
    let point = ec.public_key().as_ref();
    jwks["keys"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
            "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..]),
        }));
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let rs256 = token("RS256", "rsa-1", |m| {
        let mut sig = vec![0; rsa.public().modulus_len()];
        rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, m, &mut sig)
            .unwrap();
        sig
    });
    let es256 = token("ES256", "ec-1", |m| {
        ec.sign(&rng, m).unwrap().as_ref().to_vec()
    });

    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let yaml = format!(
        r#"
targets:
  - {{ name: vendor, url: "https://api.vendor.example/base" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: sk_live_benchmark_secret }} }}
  - name: agents
    type: proxy
    keys: [{{ value: {KEY} }}]
    identity:
      issuer: https://kubernetes.default.svc.cluster.local
      audience: latchkey
      jwks: {{ file: "{}" }}
      subject: "system:serviceaccount:agents:*"
proxies:
  - {{ name: vendor, target: vendor, target_credential: vendor-cred, proxy_credentials: [agents], default_effect: deny }}
rules:
  - {{ proxy: vendor, effect: allow, methods: [GET], path: "^/v1/" }}
"#,
        jwks_path.display()
    );
    let stored = memory::stored(&yaml, &master).unwrap();
    let policy = Policy::compile(&stored, &master, &Default::default()).unwrap();
    let identities = Identities::default();
    // The key set read once, as the first request would.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(identities.verify(&policy, rs256.as_bytes(), NOW_MS))
        .unwrap();

    let path = "/vendor/v1/items?limit=10";
    let (key_bearer, jwt_bearer) = (format!("Bearer {KEY}"), format!("Bearer {es256}"));
    let headers = |bearer: &'static str| -> Vec<(&'static str, &'static [u8])> {
        vec![
            (":method", b"GET"),
            (":path", path.as_bytes()),
            ("authorization", bearer.as_bytes()),
            ("user-agent", b"agent/1.0"),
        ]
    };
    let key_headers = headers(Box::leak(key_bearer.into_boxed_str()));
    let jwt_headers = headers(Box::leak(jwt_bearer.into_boxed_str()));
    let request = |headers| RequestView {
        method: "GET",
        path,
        headers,
        body: Some(&[]),
    };
    let (key_view, jwt_view) = (request(&key_headers), request(&jwt_headers));

    let allowed = |j: &Judgement| matches!(j, Judgement::Decided(d) if matches!(d.outcome, Outcome::Forward(_)));
    assert!(allowed(&decide(&policy, &key_view, &Body::Empty, NOW_MS)));
    let decide_jwt = || {
        let presented = keys::presented(jwt_view.headers);
        let verified =
            ready(identities.token(&policy, &presented, NOW_MS)).expect("a token is presented");
        let token = presented.as_deref().expect("a token is presented");
        let caller = Caller::Token {
            verified: &verified,
            token,
        };
        decide_as(&policy, &jwt_view, &Body::Empty, caller, NOW_MS)
    };
    assert!(allowed(&decide_jwt()));

    let mut group = c.benchmark_group("identity");
    group.bench_function("decision_proxy_key", |b| {
        b.iter(|| {
            decide(
                black_box(&policy),
                black_box(&key_view),
                &Body::Empty,
                NOW_MS,
            )
        })
    });
    group.bench_function("decision_cached_jwt", |b| {
        b.iter(|| black_box(decide_jwt()))
    });
    for (name, token) in [("cold_verify_rs256", &rs256), ("cold_verify_es256", &es256)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                identities.forget_verified();
                ready(identities.verify(&policy, black_box(token.as_bytes()), NOW_MS)).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, identity);
criterion_main!(benches);
