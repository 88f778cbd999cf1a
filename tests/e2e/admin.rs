//! The admin plane: tokens and roles, export round trips, gRPC health, and rotations
//! of a target credential and of a proxy key without a failed request.

use std::time::Duration;

use latchkey::pb::admin_client::AdminClient;
use latchkey::pb::{ApplyRequest, ExportRequest, IssueKeyRequest, ListKeysRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{ADMIN_TOKEN, Stack, Upstream, client, denial, json};

const OLD_KEY: &str = "lk_adminOLDkey00000000000001";
const NEW_KEY: &str = "lk_adminNEWkey00000000000002";
const SECRET_V1: &str = "sk_rotation_secret_v1_aaaa";
const SECRET_V2: &str = "sk_rotation_secret_v2_bbbb";

async fn admin(stack: &Stack) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://127.0.0.1:{}", stack.admin_port))
        .await
        .unwrap()
}

fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn policy(upstream: &str, credential: &str, keys: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: cred-v1, type: target, auth: bearer, secret: {{ env: SECRET_V1 }} }}
  - {{ name: cred-v2, type: target, auth: header, header: X-Key, secret: {{ value: {SECRET_V2} }} }}
  - name: agent
    type: proxy
    keys: {keys}
    limits: {{ requests_per_minute: 10000 }}
proxies:
  - name: api
    target: vendor
    target_credential: {credential}
    proxy_credentials: [agent]
    default_effect: deny
    cost: {{ per_request_usd: 0.001 }}
rules:
  - credential: agent
    effect: allow
    methods: [GET, POST]
    path: "^/v1/"
    headers: {{ x-team: {{ regex: "^(billing|ops)$" }} }}
    priority: 5
    notes: "team-scoped"
  - proxy: api
    effect: deny
    body: [{{ pointer: /amount, gt: 100 }}]
"#
    )
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("SECRET_V1", SECRET_V1),
        ("OLD_KEY", OLD_KEY),
        ("NEW_KEY", NEW_KEY),
    ]
}

#[tokio::test]
async fn tokens_have_roles_and_every_rpc_checks_them() {
    let stack = Stack::start().await;
    let mut a = admin(&stack).await;
    let export = || ExportRequest {};

    // Missing and wrong tokens.
    let err = a.export(with_token(None, export())).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = a
        .export(with_token(Some("not-a-token"), export()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The bootstrap token creates a viewer and an admin.
    let viewer = json(&stack.cli(
        &[
            "token",
            "create",
            "--name",
            "dashboards",
            "--role",
            "viewer",
            "--json",
        ],
        &[],
    ));
    let ops = json(&stack.cli(
        &[
            "token", "create", "--name", "ops", "--role", "admin", "--json",
        ],
        &[],
    ));
    let viewer_token = viewer["token"].as_str().unwrap();
    let ops_token = ops["token"].as_str().unwrap();
    // At least 128 bits: 22 base62 characters after the prefix.
    assert!(viewer_token.starts_with("lkadm_") && viewer_token.len() >= 6 + 22);
    let dup = stack.cli(
        &["token", "create", "--name", "ops", "--role", "admin"],
        &[],
    );
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists"));

    // A viewer reads, and may not change.
    let as_viewer = [("LATCHKEY_ADMIN_TOKEN", viewer_token)];
    assert!(stack.cli(&["export"], &as_viewer).status.success());
    assert!(
        stack
            .cli(&["requests", "--json"], &as_viewer)
            .status
            .success()
    );
    assert!(stack.cli(&["key", "list"], &as_viewer).status.success());
    let err = a
        .apply(with_token(
            Some(viewer_token),
            ApplyRequest {
                policy_yaml: "targets: []".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let dry = a
        .apply(with_token(
            Some(viewer_token),
            ApplyRequest {
                policy_yaml: "targets: []".into(),
                dry_run: true,
                ..Default::default()
            },
        ))
        .await;
    assert!(dry.is_ok(), "a dry run only reads: {dry:?}");
    for denied in [
        stack.cli(&["key", "issue", "--credential", "x"], &as_viewer),
        stack.cli(&["token", "list"], &as_viewer),
        stack.cli(
            &["token", "create", "--name", "sneaky", "--role", "admin"],
            &as_viewer,
        ),
    ] {
        assert!(!denied.status.success());
        assert!(
            String::from_utf8_lossy(&denied.stderr).contains("viewer"),
            "{}",
            String::from_utf8_lossy(&denied.stderr)
        );
    }

    // An admin token may change; errors name what to fix.
    let err = a
        .issue_key(with_token(
            Some(ops_token),
            IssueKeyRequest {
                credential: "nobody".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nobody"));
    let err = a
        .apply(with_token(
            Some(ops_token),
            ApplyRequest {
                policy_yaml: "targets: [{ name: t, url: 'ftp://x' }]".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Listing shows names and roles, never a token; a revoked one is refused next call.
    let listed = stack.cli(&["token", "list", "--json"], &[]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("dashboards") && !text.contains(viewer_token));
    let revoke = stack.cli(&["token", "revoke", viewer["id"].as_str().unwrap()], &[]);
    assert!(revoke.status.success());
    let err = a
        .list_keys(with_token(Some(viewer_token), ListKeysRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let log = stack.log("latchkey");
    assert!(!log.contains(viewer_token) && !log.contains(ops_token) && !log.contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn export_then_apply_changes_nothing_and_shows_no_secret() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(
        &policy(&upstream.url(), "cred-v1", "[{ env: OLD_KEY }]"),
        &env(),
    );
    let exported = stack.cli(&["export"], &[]);
    assert!(exported.status.success());
    let yaml = String::from_utf8(exported.stdout).unwrap();
    for secret in [SECRET_V1, SECRET_V2, OLD_KEY] {
        assert!(!yaml.contains(secret), "{secret} in the export:\n{yaml}");
    }
    assert!(yaml.contains("env: SECRET_V1"), "{yaml}");
    assert!(yaml.contains("sealed: true"), "{yaml}");
    // The exported file goes back in unchanged (the env reference resolves again).
    let again = stack.apply(&yaml, &[("SECRET_V1", SECRET_V1)]);
    assert!(again.contains("no changes"), "{again}");
    // And the policy still works as before.
    let ok = client()
        .get(stack.url("/api/v1/x"))
        .bearer_auth(OLD_KEY)
        .header("x-team", "ops")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // `sealed: true` for a credential latchkey holds no secret of: refused, named.
    let bad = stack.try_apply(
        &yaml
            .replace("name: cred-v2", "name: cred-v3")
            .replace("target_credential: cred-v2", "target_credential: cred-v3"),
        &[("SECRET_V1", SECRET_V1)],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("cred-v3"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[tokio::test]
async fn grpc_health_answers_on_both_grpc_ports() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let stack = Stack::start().await;
    let admin =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", stack.admin_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    for channel in [stack.data_plane().await, admin] {
        let mut health = HealthClient::new(channel);
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

/// Sends requests one after another until told to stop; returns every status.
async fn steady_load(
    stack: &Stack,
    key: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u16> {
    let http = client();
    let mut statuses = Vec::new();
    while !*stop.borrow() {
        let status = http
            .get(stack.url("/api/v1/rotating"))
            .bearer_auth(key)
            .header("x-team", "billing")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        statuses.push(status);
    }
    statuses
}

#[tokio::test]
async fn rotations_of_the_target_credential_and_of_a_proxy_key_fail_no_request() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(
        &policy(&upstream.url(), "cred-v1", "[{ env: OLD_KEY }]"),
        &env(),
    );

    // (a) Target credential: point the proxy at the new one under continuous load.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = steady_load(&stack, OLD_KEY, stopped);
    let rotate = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stack.apply(
            &policy(&upstream.url(), "cred-v2", "[{ env: OLD_KEY }]"),
            &env(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(true).unwrap();
    };
    let (statuses, ()) = tokio::join!(load, rotate);
    assert!(statuses.len() > 20, "{} requests", statuses.len());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let seen = upstream.take();
    let old = seen
        .iter()
        .filter(|s| s.header("authorization") == Some(&format!("Bearer {SECRET_V1}")))
        .count();
    let new = seen
        .iter()
        .filter(|s| s.header("x-key") == Some(SECRET_V2) && s.header("authorization").is_none())
        .count();
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    assert_eq!(
        old + new,
        seen.len(),
        "every request carried exactly one of them"
    );
    // Once switched, never back.
    let switched = seen
        .iter()
        .position(|s| s.header("x-key").is_some())
        .unwrap();
    assert!(seen[switched..].iter().all(|s| s.header("x-key").is_some()));

    // (b) Proxy key: both keys live during the overlap, then the old one goes.
    stack.apply(
        &policy(
            &upstream.url(),
            "cred-v2",
            "[{ env: OLD_KEY }, { env: NEW_KEY }]",
        ),
        &env(),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (old_statuses, new_statuses, ()) = tokio::join!(
        steady_load(&stack, OLD_KEY, stopped.clone()),
        steady_load(&stack, NEW_KEY, stopped),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.send(true).unwrap();
        }
    );
    assert!(old_statuses.iter().chain(&new_statuses).all(|s| *s == 200));
    stack.apply(
        &policy(&upstream.url(), "cred-v2", "[{ env: NEW_KEY }]"),
        &env(),
    );
    let (_, kind, _) = denial(
        client()
            .get(stack.url("/api/v1/rotating"))
            .bearer_auth(OLD_KEY)
            .header("x-team", "billing")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(kind, "invalid_key");
    let new_key_ok = client()
        .get(stack.url("/api/v1/rotating"))
        .bearer_auth(NEW_KEY)
        .header("x-team", "billing")
        .send()
        .await
        .unwrap();
    assert_eq!(new_key_ok.status(), 200);
}

#[tokio::test]
async fn grpc_reflection_lists_the_admin_api() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let stack = Stack::start().await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", stack.admin_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(answer)) = answers.next().await else {
        panic!("no reflection answer");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"latchkey.admin.v1.Admin".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

/// Master key rotation: restart with the new key (the old one as previous), re-seal
/// everything while serving, then run with the new key alone.
#[tokio::test]
async fn master_key_rotation_reseals_every_secret_while_serving() {
    let upstream = Upstream::start().await;
    let mut stack = Stack::start().await;
    stack.apply(
        &policy(&upstream.url(), "cred-v1", "[{ env: OLD_KEY }]"),
        &env(),
    );
    let old = stack.master_key.clone();
    let new = String::from_utf8(
        std::process::Command::new(crate::common::latchkey_bin())
            .arg("keygen")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();

    stack.kill_latchkey();
    stack.master_key = new.clone();
    stack
        .serve_env
        .push(("LATCHKEY_MASTER_KEY_PREVIOUS".into(), old.clone()));
    stack.start_latchkey().await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = steady_load(&stack, OLD_KEY, stopped);
    let rekey = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = stack.cli(&["rekey"], &[]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send(true).unwrap();
        out
    };
    let (statuses, out) = tokio::join!(load, rekey);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("2 secret(s) re-sealed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        statuses.len() > 5 && statuses.iter().all(|s| *s == 200),
        "{statuses:?}"
    );
    let again = stack.cli(&["rekey"], &[]);
    assert!(String::from_utf8_lossy(&again.stdout).starts_with("0 secret(s)"));

    // The new key alone now opens everything; the old one alone no longer does.
    stack.kill_latchkey();
    stack
        .serve_env
        .retain(|(k, _)| k != "LATCHKEY_MASTER_KEY_PREVIOUS");
    stack.start_latchkey().await;
    let ok = client()
        .get(stack.url("/api/v1/x"))
        .bearer_auth(OLD_KEY)
        .header("x-team", "ops")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        upstream.take().last().unwrap().header("authorization"),
        Some(format!("Bearer {SECRET_V1}").as_str())
    );
    stack.kill_latchkey();
    let refused = stack
        .serve_command()
        .env("LATCHKEY_MASTER_KEY", &old)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wrong master key"));
}

#[tokio::test]
async fn the_admin_api_over_tls_and_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certificates(certs.path());
    let path = |f: &str| certs.path().join(f).display().to_string();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let stack = Stack::start_configured(
        |c| c,
        &[
            ("LATCHKEY_ADMIN_TLS_CERT", cert.as_str()),
            ("LATCHKEY_ADMIN_TLS_KEY", key.as_str()),
            ("LATCHKEY_ADMIN_TLS_CLIENT_CA", ca.as_str()),
        ],
    )
    .await;
    let addr = format!("https://localhost:{}", stack.admin_port);
    let (client_cert, client_key) = (path("client.pem"), path("client.key"));
    let with = |extra: &[(&str, &str)]| {
        let mut env = vec![("LATCHKEY_ADMIN_ADDR", addr.as_str())];
        env.extend_from_slice(extra);
        stack.cli(&["key", "list", "--json"], &env)
    };
    // TLS with the CA and a client certificate: in.
    let ok = with(&[
        ("LATCHKEY_ADMIN_CA", ca.as_str()),
        ("LATCHKEY_ADMIN_CLIENT_CERT", client_cert.as_str()),
        ("LATCHKEY_ADMIN_CLIENT_KEY", client_key.as_str()),
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // No client certificate, no trust in the server, or plain text: out.
    for refused in [
        with(&[("LATCHKEY_ADMIN_CA", ca.as_str())]),
        with(&[]),
        stack.cli(
            &["key", "list"],
            &[(
                "LATCHKEY_ADMIN_ADDR",
                &format!("127.0.0.1:{}", stack.admin_port),
            )],
        ),
    ] {
        assert!(!refused.status.success());
    }
}

/// The admin token from a mounted file (a Kubernetes Secret), for the server and the
/// CLI alike; the token the environment no longer gives is not accepted.
#[tokio::test]
async fn the_admin_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "file-token-0123456789abcdef\n").unwrap();
    let file = file.to_str().unwrap();
    let env = [
        ("LATCHKEY_ADMIN_TOKEN", ""),
        ("LATCHKEY_ADMIN_TOKEN_FILE", file),
    ];
    let stack = Stack::start_configured(|c| c, &env).await;
    let out = stack.cli(&["export"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = stack.cli(&["export"], &[]);
    assert!(
        !refused.status.success(),
        "the old token is not the server's"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown or revoked admin token"));
}
