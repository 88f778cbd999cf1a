//! `auth: aws_sigv4`: the upstream receives a request signed as AWS checks it, verified
//! here by botocore's signer (an implementation independent of latchkey's), never the
//! proxy key, never the secret.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use sha2::Digest;

use crate::common::{Mode, Seen, Stack, Upstream, client, denial, envoy_bin};

const AGENT_KEY: &str = "lk_sigv4AgentKEY0000000000001";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const TOKEN: &str = "FwoGZXIvYXdzEXAMPLEsessionTOKEN/+=";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_SECRET", SECRET),
        ("AWS_TOKEN", TOKEN),
        ("AGENT_KEY", AGENT_KEY),
    ]
}

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: aws, url: "{upstream}/stage" }}
credentials:
  - name: aws-api
    type: target
    auth: aws_sigv4
    access_key_id: AKIDEXAMPLE
    region: eu-west-1
    service: execute-api
    secret: {{ env: AWS_SECRET }}
  - name: aws-s3
    type: target
    auth: aws_sigv4
    access_key_id: ASIAEXAMPLE
    region: us-east-1
    service: s3
    unsigned_payload: true
    secret: {{ env: AWS_SECRET }}
    session_token: {{ env: AWS_TOKEN }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - {{ name: api, target: aws, target_credential: aws-api, proxy_credentials: [agent], default_effect: allow }}
  - {{ name: s3, target: aws, target_credential: aws-s3, proxy_credentials: [agent], default_effect: allow }}
"#
    )
}

/// botocore's verdict on a request as the upstream received it.
fn botocore(seen: &Seen) -> serde_json::Value {
    botocore_with(seen, SECRET)
}

fn botocore_with(seen: &Seen, secret: &str) -> serde_json::Value {
    let input = serde_json::json!({
        "method": seen.method,
        "uri": seen.uri,
        "headers": seen.headers,
        "body": base64::engine::general_purpose::STANDARD.encode(&seen.body),
        "secret_access_key": secret,
    });
    let python = envoy_bin().with_file_name("python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/sigv4_check.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the virtualenv's python (make installs botocore)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sigv4_check.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_clean(seen: &Seen) {
    let dump = seen.dump();
    assert!(!dump.contains(AGENT_KEY), "proxy key upstream: {dump}");
    assert!(!dump.contains(SECRET), "secret upstream: {dump}");
}

async fn signed_requests_verify(mode: Mode) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_full(mode, |c| c, &[]).await;
    stack.apply(&policy(&upstream.url()), &env());
    let http = client();

    // S3 with temporary credentials and an unsigned payload: works through both filters.
    let put = http
        .put(stack.url("/s3/bucket/reports/q3%20final.csv?x-id=PutObject"))
        .bearer_auth(AGENT_KEY)
        .header("content-type", "text/csv")
        .header("x-amz-meta-run", "run-42")
        .header("x-amz-security-token", "agent-supplied")
        .body("a,b\n1,2\n")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let seen = upstream.take().pop().unwrap();
    assert_eq!(
        seen.uri,
        "/stage/bucket/reports/q3%20final.csv?x-id=PutObject"
    );
    assert_clean(&seen);
    assert_eq!(seen.all("x-amz-security-token"), vec![TOKEN]);
    assert_eq!(
        seen.header("x-amz-content-sha256"),
        Some("UNSIGNED-PAYLOAD")
    );
    let verdict = botocore(&seen);
    assert_eq!(verdict["valid"], true, "{verdict}");
    assert_eq!(verdict["service"], "s3");
    let signed = verdict["signed_headers"].to_string();
    for h in [
        "content-type",
        "host",
        "x-amz-meta-run",
        "x-amz-security-token",
    ] {
        assert!(signed.contains(h), "{h} not signed: {signed}");
    }

    // The check can fail: the same request with another path, or checked with another
    // secret, does not verify.
    let mut moved = seen.clone();
    moved.uri = "/stage/bucket/reports/other.csv?x-id=PutObject".into();
    assert_eq!(botocore(&moved)["valid"], false);
    assert_eq!(botocore_with(&seen, "another-secret")["valid"], false);

    // A bodiless GET with a query on a signed-payload proxy: the empty body's hash, no
    // body phase.
    let get = http
        .get(stack.url("/api/v1/items?limit=10&b=hello%20world&a=%E2%9C%93"))
        .header("x-api-key", AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let seen = upstream.take().pop().unwrap();
    assert_clean(&seen);
    assert_eq!(
        seen.header("x-amz-content-sha256"),
        Some(format!("{:x}", sha2::Sha256::digest(b"")).as_str())
    );
    assert!(seen.header("x-amz-security-token").is_none());
    let verdict = botocore(&seen);
    assert_eq!(verdict["valid"], true, "{verdict}");
    assert_eq!(verdict["region"], "eu-west-1");
}

#[tokio::test]
async fn s3_and_bodiless_requests_are_signed_as_botocore_checks_them() {
    signed_requests_verify(Mode::ExtProc).await;
}

#[tokio::test]
async fn ext_authz_signs_what_it_can_see() {
    signed_requests_verify(Mode::ExtAuthz).await;
}

#[tokio::test]
async fn the_payload_hash_covers_the_body() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &env());
    let http = client();
    let body = r#"{"name":"widget","tags":["a","b"]}"#;
    let post = http
        .post(stack.url("/api/v1/items"))
        .bearer_auth(AGENT_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    let seen = upstream.take().pop().unwrap();
    assert_clean(&seen);
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.header("x-amz-content-sha256"),
        Some(format!("{:x}", sha2::Sha256::digest(body)).as_str())
    );
    let verdict = botocore(&seen);
    assert_eq!(verdict["valid"], true, "{verdict}");
    let mut altered = seen.clone();
    altered.body = br#"{"name":"widget","tags":["a","c"]}"#.to_vec();
    let verdict = botocore(&altered);
    assert_eq!(verdict["valid"], false);
    assert!(verdict["problems"].to_string().contains("body's hash"));

    // Too large to hash within latchkey's body limit: refused, not sent unsigned.
    let (status, kind, _) = denial(
        http.post(stack.url("/api/v1/items"))
            .bearer_auth(AGENT_KEY)
            .body(vec![b'x'; 2 << 20])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (413, "body_too_large"));
    assert!(upstream.take().is_empty());
}

#[tokio::test]
async fn ext_authz_refuses_a_signature_over_the_body_at_apply() {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(Mode::ExtAuthz).await;
    let out = stack.try_apply(&policy(&upstream.url()), &env());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"api\"") && err.contains("unsigned_payload") && err.contains("ext_proc"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_aws_settings_are_refused_with_the_field_named() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let good = policy(&upstream.url());
    for (from, to, field) in [
        ("region: eu-west-1", "region: \"eu west\"", "region"),
        ("    service: execute-api\n", "", "service"),
        (
            "    region: eu-west-1\n",
            "    region: eu-west-1\n    param: x\n",
            "param",
        ),
        (
            "secret: { env: AWS_SECRET }\n    session_token",
            "secret: { sealed: true }\n    session_token",
            "session_token",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        let out = stack.try_apply(&good.replacen(from, to, 1), &env());
        assert!(!out.status.success(), "{field} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[tokio::test]
async fn export_keeps_the_aws_settings_and_no_secret() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    // The S3 secret inline, its session token from the environment: held as one.
    let mixed = policy(&upstream.url()).replacen(
        "    unsigned_payload: true\n    secret: { env: AWS_SECRET }",
        &format!("    unsigned_payload: true\n    secret: {{ value: \"{SECRET}\" }}"),
        1,
    );
    assert_ne!(mixed, policy(&upstream.url()));
    stack.apply(&mixed, &env());
    let exported = stack.cli(&["export"], &[]);
    assert!(exported.status.success());
    let yaml = String::from_utf8(exported.stdout).unwrap();
    assert!(!yaml.contains(SECRET) && !yaml.contains(TOKEN), "{yaml}");
    for expected in [
        "auth: aws_sigv4",
        "access_key_id: ASIAEXAMPLE",
        "service: execute-api",
        "unsigned_payload: true",
    ] {
        assert!(yaml.contains(expected), "{expected}:\n{yaml}");
    }
    let again = stack.apply(&yaml, &env());
    assert!(again.contains("no changes"), "{again}");
    // Items can still be edited one at a time beside it.
    let item = stack.dir.path().join("target.yaml");
    std::fs::write(&item, "{ name: other, url: \"http://other.example\" }").unwrap();
    let out = stack.cli(&["target", "create", "-f", item.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The S3 proxy still signs with the held secret and token.
    let put = client()
        .put(stack.url("/s3/bucket/k"))
        .bearer_auth(AGENT_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let seen = upstream.take().pop().unwrap();
    assert_eq!(seen.header("x-amz-security-token"), Some(TOKEN));
    assert_eq!(botocore(&seen)["valid"], true);
}
