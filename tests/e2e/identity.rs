//! Workload identity through the real Envoy: JWTs signed in-test (RS256 and ES256),
//! trusted through a JWKS URL served in-test and a JWKS file, stand for their proxy
//! credential; every way a token can be wrong is refused as `invalid_key`; and a token
//! mints run keys within its credential's maxima.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::{self, Stack, Upstream, client, denial};

const SECRET: &str = "sk_identity_REAL_secret_42";
const ISSUER: &str = "https://issuer.test";
const FILE_ISSUER: &str = "https://file-issuer.test";
const SUBJECT: &str = "system:serviceaccount:agents:runner";

/// Tokens signed by an in-test issuer, and its key sets (see `identity/issuer.py`).
struct Issuer {
    dir: tempfile::TempDir,
    tokens: HashMap<String, String>,
}

impl Issuer {
    fn new(issuer: &str, subject: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let python = common::python();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/identity/issuer.py");
        let out = std::process::Command::new(python)
            .args([
                script,
                dir.path().to_str().unwrap(),
                issuer,
                "latchkey",
                subject,
            ])
            .output()
            .expect("the venv's python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tokens = serde_json::from_slice(&out.stdout).unwrap();
        Self { dir, tokens }
    }

    fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }

    fn set(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }
}

/// A JWKS URL served in-test: the document can be swapped, and fetches are counted.
struct JwksServer {
    url: String,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(doc: String) -> Self {
        let doc = Arc::new(Mutex::new(doc));
        let hits = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (doc.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/keys",
            axum::routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().clone();
                async move { ([("content-type", "application/json")], body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/keys", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, doc, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn policy(upstream: &str, jwks_url: &str, jwks_file: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ value: {SECRET} }} }}
  - name: agents
    type: proxy
    identity:
      issuer: "{ISSUER}"
      audience: latchkey
      jwks: {{ url: "{jwks_url}" }}
      subject: "system:serviceaccount:agents:*"
      max_ttl: 10m
      max_spend_cap_usd: 2
  - name: spiffe-agents
    type: proxy
    identity:
      issuer: "{FILE_ISSUER}"
      audience: latchkey
      jwks: {{ file: "{jwks_file}" }}
      subject: "spiffe://corp.test/agents/*"
proxies:
  - {{ name: api, target: vendor, target_credential: vendor-cred, proxy_credentials: [agents, spiffe-agents], default_effect: allow }}
"#
    )
}

async fn get(stack: &Stack, token: &str) -> reqwest::Response {
    client()
        .get(stack.url("/api/v1/things"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn workload_tokens_stand_for_their_credential_and_nothing_else() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(ISSUER, SUBJECT);
    let spiffe = Issuer::new(FILE_ISSUER, "spiffe://corp.test/agents/planner");
    let jwks = JwksServer::start(issuer.set("jwks.json")).await;
    let jwks_file = spiffe.dir.path().join("jwks.json");
    let stack = Stack::start().await;
    stack.apply(
        &policy(&upstream.url(), &jwks.url, jwks_file.to_str().unwrap()),
        &[],
    );

    // Valid tokens of both algorithms, from the URL and from the file.
    for (issuer, name, credential) in [
        (&issuer, "valid_rs256", "agents"),
        (&issuer, "valid_es256", "agents"),
        (&spiffe, "valid_rs256", "spiffe-agents"),
        (&spiffe, "valid_es256", "spiffe-agents"),
    ] {
        let r = get(&stack, issuer.token(name)).await;
        assert_eq!(r.status(), 200, "{name} of {credential}");
    }
    let seen = upstream.take();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
        assert!(
            !s.dump().contains("eyJ"),
            "no token reaches the vendor: {}",
            s.dump()
        );
    }
    assert_eq!(jwks.hits(), 1, "the key set is read once, then cached");

    // Every way a token can be wrong: 401 invalid_key, nothing forwarded.
    for (name, why) in [
        ("expired", "token expired"),
        ("not_yet", "token not yet valid"),
        ("no_exp", "token without exp"),
        ("wrong_audience", "token not trusted"),
        ("wrong_issuer", "token not trusted"),
        ("other_subject", "token not trusted"),
        ("alg_none", "token algorithm not accepted"),
        ("hs256_public_key", "token algorithm not accepted"),
        ("forged", "token not trusted"),
        ("wrong_key", "token not trusted"),
    ] {
        let (status, kind, body) = denial(get(&stack, issuer.token(name)).await).await;
        assert_eq!(
            (status, kind.as_str()),
            (401, "invalid_key"),
            "{name}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{name}: {message}");
    }
    // A token of one issuer is not the other's, whatever its subject.
    let (status, kind, _) = denial(get(&stack, spiffe.token("other_subject")).await).await;
    assert_eq!((status, kind.as_str()), (401, "invalid_key"));
    assert!(upstream.take().is_empty());

    // An unknown kid: the set is read again once (rate-limited), then the new key works.
    let hits = jwks.hits();
    let (status, _, _) = denial(get(&stack, issuer.token("unknown_kid")).await).await;
    assert_eq!(status, 401);
    assert_eq!(jwks.hits(), hits + 1, "an unknown kid reads the set once");
    let (status, _, _) = denial(get(&stack, issuer.token("unknown_kid")).await).await;
    assert_eq!(status, 401);
    assert_eq!(jwks.hits(), hits + 1, "and not again within 10 s");
    *jwks.doc.lock().unwrap() = issuer.set("jwks-rotated.json");
    tokio::time::sleep(std::time::Duration::from_millis(10_100)).await;
    assert_eq!(get(&stack, issuer.token("unknown_kid")).await.status(), 200);
    assert_eq!(jwks.hits(), hits + 2, "the rotated key was read once");

    // The audit names who called: the token's subject, never the token.
    let out = stack.cli(&["requests", "--limit", "50", "-o", "json"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("jwt:agents:{SUBJECT}")), "{text}");
    assert!(!text.contains("eyJ"), "no token in the audit");
    let log = stack.log("latchkey");
    assert!(!log.contains(issuer.token("valid_rs256")));
}

#[tokio::test]
async fn a_token_mints_run_keys_within_its_credentials_maxima() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(ISSUER, SUBJECT);
    let jwks = JwksServer::start(issuer.set("jwks.json")).await;
    let stack = Stack::start().await;
    stack.apply(
        &policy(&upstream.url(), &jwks.url, "/nonexistent/jwks.json"),
        &[],
    );
    let mint = |token: &str, body: serde_json::Value| {
        client()
            .post(stack.url("/latchkey/v1/run-keys"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let valid = issuer.token("valid_es256");

    let r = mint(
        valid,
        serde_json::json!({"ttl_seconds": 2, "label": "run-7", "spend_cap_usd": 1.5}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let minted: serde_json::Value = r.json().await.unwrap();
    assert_eq!(minted["credential"], "agents");
    assert_eq!(minted["label"], "run-7");
    assert_eq!(minted["spend_cap_usd"], 1.5);
    let key = minted["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("lk_"));
    let with_key = |path: &str| client().get(stack.url(path)).bearer_auth(&key).send();
    assert_eq!(with_key("/api/v1/x").await.unwrap().status(), 200);
    assert_eq!(
        upstream.take().len(),
        1,
        "the mint itself was never forwarded"
    );

    // Past the maxima, with a key instead of a token, with a bad token, or not a POST.
    for (token, body, status, kind) in [
        (
            valid,
            serde_json::json!({"ttl_seconds": 3600}),
            400,
            "invalid_request",
        ),
        (
            valid,
            serde_json::json!({"spend_cap_usd": 5}),
            400,
            "invalid_request",
        ),
        (
            valid,
            serde_json::json!({"spend_cap_usd": -1}),
            400,
            "invalid_request",
        ),
        (
            valid,
            serde_json::json!({"admin": true}),
            400,
            "invalid_request",
        ),
        (key.as_str(), serde_json::json!({}), 401, "invalid_key"),
        (
            issuer.token("expired"),
            serde_json::json!({}),
            401,
            "invalid_key",
        ),
        (
            issuer.token("other_subject"),
            serde_json::json!({}),
            401,
            "invalid_key",
        ),
    ] {
        let (got, got_kind, error) = denial(mint(token, body.clone()).await.unwrap()).await;
        assert_eq!((got, got_kind.as_str()), (status, kind), "{body}: {error}");
    }
    let r = client()
        .get(stack.url("/latchkey/v1/run-keys"))
        .bearer_auth(valid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Without asking: the maxima (10 min, $2).
    let r = mint(valid, serde_json::json!({})).await.unwrap();
    assert_eq!(r.status(), 201);
    let defaults: serde_json::Value = r.json().await.unwrap();
    assert_eq!(defaults["spend_cap_usd"], 2.0);
    let ttl = defaults["expires_at"].as_i64().unwrap() - chrono_now();
    assert!((590..=601).contains(&ttl), "{ttl}");

    // The CLI mints the same way, from a token file.
    let file = issuer.dir.path().join("token");
    std::fs::write(&file, format!("{valid}\n")).unwrap();
    let out = stack.cli(
        &[
            "key",
            "issue",
            "--identity-token",
            file.to_str().unwrap(),
            "--ttl",
            "5m",
            "--label",
            "cli-run",
            "-o",
            "json",
        ],
        &[("LATCHKEY_GATEWAY", &stack.url(""))],
    );
    let issued = common::json(&out);
    assert_eq!(issued["credential"], "agents");
    assert_eq!(issued["label"], "cli-run");
    assert!(issued["key"].as_str().unwrap().starts_with("lk_"));

    // 10 mints a minute per workload: three so far, so 7 more, then 429.
    let mut minted_more = 0;
    loop {
        let r = mint(valid, serde_json::json!({"ttl_seconds": 60}))
            .await
            .unwrap();
        if r.status() != 201 {
            let (status, kind, _) = denial(r).await;
            assert_eq!((status, kind.as_str()), (429, "rate_limited"));
            break;
        }
        minted_more += 1;
        assert!(minted_more <= 10, "mints are not limited");
    }
    assert_eq!(minted_more, 7);

    // The 2 s key is refused once its TTL has passed.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let (status, kind, _) = denial(with_key("/api/v1/x").await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "expired_key"));
    assert!(upstream.take().is_empty());
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn ext_authz_takes_workload_tokens_and_bodiless_mints() {
    let upstream = Upstream::start().await;
    let issuer = Issuer::new(ISSUER, SUBJECT);
    let jwks = JwksServer::start(issuer.set("jwks.json")).await;
    let stack = Stack::start_in(common::Mode::ExtAuthz).await;
    stack.apply(
        &policy(&upstream.url(), &jwks.url, "/nonexistent/jwks.json"),
        &[],
    );
    assert_eq!(get(&stack, issuer.token("valid_rs256")).await.status(), 200);
    let (status, kind, _) = denial(get(&stack, issuer.token("alg_none")).await).await;
    assert_eq!((status, kind.as_str()), (401, "invalid_key"));
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // A mint without a body takes the maxima; ext_authz sees no body to read.
    let r = client()
        .post(stack.url("/latchkey/v1/run-keys"))
        .bearer_auth(issuer.token("valid_es256"))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let minted: serde_json::Value = r.json().await.unwrap();
    assert_eq!(minted["spend_cap_usd"], 2.0);
    let key = minted["key"].as_str().unwrap();
    assert_eq!(get(&stack, key).await.status(), 200);
    assert!(upstream.take().len() == 1, "the mint was never forwarded");
}
