//! The data plane: credential swap for every auth type, denials, hostile input, apply,
//! fail-closed, TLS targets, secrets at rest.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::common::{self, Mode, Stack, Upstream, client, denial};

/// Name/value pairs: request headers or environment variables.
type Headers<'a> = Vec<(&'a str, &'a str)>;

const AGENT_KEY: &str = "lk_agentKEY000000000000000001";
const OTHER_KEY: &str = "lk_otherKEY000000000000000002";
const BEARER_SECRET: &str = "sk_live_BEARER_secret_value";
const HEADER_SECRET: &str = "hdr-SECRET-value-42";
const BASIC_SECRET: &str = "basic-PASS-word-7";
const QUERY_SECRET: &str = "q&SECRET=value/9";

fn secrets() -> Vec<(&'static str, &'static str)> {
    vec![
        ("BEARER_SECRET", BEARER_SECRET),
        ("HEADER_SECRET", HEADER_SECRET),
        ("BASIC_SECRET", BASIC_SECRET),
        ("QUERY_SECRET", QUERY_SECRET),
        ("AGENT_KEY", AGENT_KEY),
        ("OTHER_KEY", OTHER_KEY),
    ]
}

/// Four proxies, one per auth type, all to the same recording upstream under different
/// base paths; `agent` may use all of them, `other` only `bearer`'s sibling `lonely`.
fn policy(upstream: &str, extra_rules: &str) -> String {
    format!(
        r#"
targets:
  - name: vendor
    url: {upstream}/base
  - name: vendor-root
    url: {upstream}
credentials:
  - name: bearer-cred
    type: target
    auth: bearer
    secret: {{ env: BEARER_SECRET }}
  - name: header-cred
    type: target
    auth: header
    header: X-Vendor-Key
    prefix: "Token "
    secret: {{ env: HEADER_SECRET }}
  - name: basic-cred
    type: target
    auth: basic
    username: acct_1
    secret: {{ env: BASIC_SECRET }}
  - name: query-cred
    type: target
    auth: query
    param: api_key
    secret: {{ env: QUERY_SECRET }}
  - name: agent
    type: proxy
    keys: [{{ env: AGENT_KEY }}]
  - name: other
    type: proxy
    keys: [{{ env: OTHER_KEY }}]
proxies:
  - name: bearer
    target: vendor
    target_credential: bearer-cred
    proxy_credentials: [agent]
    default_effect: deny
  - name: header
    target: vendor-root
    target_credential: header-cred
    proxy_credentials: [agent]
    default_effect: allow
  - name: basic
    target: vendor-root
    target_credential: basic-cred
    proxy_credentials: [agent]
    default_effect: allow
  - name: query
    target: vendor-root
    target_credential: query-cred
    proxy_credentials: [agent]
    default_effect: allow
  - name: lonely
    target: vendor-root
    target_credential: bearer-cred
    proxy_credentials: [other]
    default_effect: allow
rules:
  - credential: agent
    effect: allow
    methods: [GET, POST]
    path: "^/v1/(charges|refunds)"
    priority: 10
    notes: "charges and refunds only"
  - proxy: bearer
    effect: deny
    path: "^/v1/refunds/big"
    priority: 5
    notes: "no big refunds"
{extra_rules}
"#
    )
}

async fn stack_with_policy() -> (Stack, Upstream) {
    stack_in(Mode::ExtProc).await
}

async fn stack_in(mode: Mode) -> (Stack, Upstream) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(mode).await;
    stack.apply(&policy(&upstream.url(), ""), &secrets());
    (stack, upstream)
}

fn assert_no_proxy_key(seen: &common::Seen) {
    let dump = seen.dump();
    for key in [AGENT_KEY, OTHER_KEY] {
        assert!(
            !dump.contains(key),
            "proxy key reached the upstream: {dump}"
        );
    }
    for (name, _) in &seen.headers {
        assert!(
            !name.starts_with("x-latchkey-"),
            "{name} reached the upstream"
        );
    }
}

/// A stack whose Envoy reaches `serve` over the Unix socket `socket`, and its address.
async fn on_unix_socket(socket: &std::path::Path) -> (Stack, String) {
    let addr = format!("unix:{}", socket.display());
    let stack = Stack::start_configured(
        |config| common::on_unix_socket(&config, socket),
        &[("LATCHKEY_GRPC_ADDR", &addr)],
    )
    .await;
    (stack, addr)
}

#[tokio::test]
async fn envoy_reaches_latchkey_over_a_unix_socket() {
    let upstream = Upstream::start().await;
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("ext_proc.sock");
    let (stack, addr) = on_unix_socket(&socket).await;
    stack.apply(&policy(&upstream.url(), ""), &secrets());
    let response = client()
        .get(stack.url("/bearer/v1/charges"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.take().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {BEARER_SECRET}").as_str())
    );
    assert_no_proxy_key(&seen);
    assert!(stack.log("latchkey").contains(&addr));
}

/// Envoy resets the ext_proc stream of each request whose client hangs up, so agents
/// hanging up in a burst reach `serve` as a burst of resets. Streams reset before `serve`
/// took them up must not close Envoy's connection: every other request in flight on it
/// would fail (h2's flood guard closes it after 20 such resets by default). Written as
/// raw frames in one write, so every reset lands before its stream can be taken up.
#[tokio::test]
async fn a_burst_of_streams_reset_at_once_leaves_envoys_connection_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const STREAMS: u32 = 100;
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("ext_proc.sock");
    let _stack = on_unix_socket(&socket).await;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    };
    // HPACK, no table: POST, http, then :path and content-type as literals.
    let path = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process";
    let mut headers = vec![0x83, 0x86, 0x04, path.len() as u8];
    headers.extend(path);
    headers.extend([0x0f, 0x10, 16]);
    headers.extend(b"application/grpc");
    let mut burst = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    burst.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    for n in 0..STREAMS {
        burst.extend(frame(0x1, 0x4, 2 * n + 1, &headers)); // HEADERS, END_HEADERS
    }
    for n in 0..STREAMS {
        burst.extend(frame(0x3, 0, 2 * n + 1, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    burst.extend(frame(0x6, 0, 0, b"stillup?")); // PING
    let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
    conn.write_all(&burst).await.unwrap();

    // The connection is open if the PING is answered before any GOAWAY.
    let answer = async {
        loop {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head)
                .await
                .expect("serve closed the connection");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.unwrap();
            match head[3] {
                0x7 => panic!(
                    "GOAWAY, error code {}",
                    u32::from_be_bytes(payload[4..8].try_into().unwrap())
                ),
                0x6 if head[4] & 1 == 1 => return payload,
                _ => {}
            }
        }
    };
    let payload = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("the PING is answered");
    assert_eq!(payload, b"stillup?");
}

#[tokio::test]
async fn each_auth_type_arrives_upstream_and_the_proxy_key_never_does() {
    each_auth_type(Mode::ExtProc).await;
}

#[tokio::test]
async fn each_auth_type_arrives_upstream_through_ext_authz_too() {
    each_auth_type(Mode::ExtAuthz).await;
}

async fn each_auth_type(mode: Mode) {
    let (stack, upstream) = stack_in(mode).await;
    let http = client();
    let basic_carrier = format!("Basic {}", BASE64.encode(format!("anyone:{AGENT_KEY}")));
    let bearer_carrier = format!("Bearer {AGENT_KEY}");
    let cases: [(&str, &str, &str); 4] = [
        (
            "/bearer/v1/charges?limit=3&starting_after=ch_1",
            "authorization",
            &bearer_carrier,
        ),
        (
            "/header/v1/charges/ch_9?expand[]=customer",
            "x-api-key",
            AGENT_KEY,
        ),
        ("/basic/v1/refunds", "authorization", &basic_carrier),
        (
            "/query/v1/charges?api_key=client-sent&b=2",
            "x-latchkey-key",
            AGENT_KEY,
        ),
    ];
    for (path, carrier, value) in cases {
        let response = http
            .get(stack.url(path))
            .header(carrier, value)
            .header("proxy-authorization", format!("Bearer {AGENT_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let body = response.text().await.unwrap();
        for secret in [BEARER_SECRET, HEADER_SECRET, BASIC_SECRET, "SECRET"] {
            assert!(!body.contains(secret), "the agent saw a secret: {body}");
        }
    }

    let seen = upstream.take();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_no_proxy_key(s);
        assert_eq!(s.header("host"), Some(upstream.addr.to_string().as_str()));
        assert!(s.header("proxy-authorization").is_none());
    }
    // Bearer, with the target's base path and the query unchanged.
    assert_eq!(seen[0].uri, "/base/v1/charges?limit=3&starting_after=ch_1");
    assert_eq!(
        seen[0].all("authorization"),
        [format!("Bearer {BEARER_SECRET}")]
    );
    // A named header with its prefix; the x-api-key carrier is gone.
    assert_eq!(seen[1].uri, "/v1/charges/ch_9?expand[]=customer");
    assert_eq!(
        seen[1].header("x-vendor-key"),
        Some(format!("Token {HEADER_SECRET}").as_str())
    );
    assert!(seen[1].header("x-api-key").is_none());
    assert!(seen[1].header("authorization").is_none());
    // Basic: the configured user and the secret as password.
    let basic = format!("Basic {}", BASE64.encode(format!("acct_1:{BASIC_SECRET}")));
    assert_eq!(seen[2].all("authorization"), [basic]);
    // Query: the client's own api_key is dropped, the secret is encoded.
    assert_eq!(
        seen[3].uri,
        "/v1/charges?b=2&api_key=q%26SECRET%3Dvalue%2F9"
    );
    assert!(seen[3].header("authorization").is_none());

    // Neither the secrets nor the proxy keys show in metrics or in any log.
    stack
        .metrics_showing(r#"latchkey_decisions_total{proxy="bearer",decision="allow"} 1"#)
        .await;
    let denied = http
        .get(stack.url("/made-up-proxy/x"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 404);
    let metrics = stack
        .metrics_showing(r#"latchkey_decisions_total{proxy="",decision="unknown_proxy"}"#)
        .await;
    assert!(
        !metrics.contains("made-up-proxy"),
        "client input became a label"
    );
    for text in [metrics, stack.log("latchkey"), stack.log("envoy")] {
        for secret in [
            BEARER_SECRET,
            HEADER_SECRET,
            BASIC_SECRET,
            QUERY_SECRET,
            AGENT_KEY,
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}

#[tokio::test]
async fn denials_are_json_and_never_reach_the_upstream() {
    denials_are_json(Mode::ExtProc).await;
}

#[tokio::test]
async fn denials_are_json_through_ext_authz_too() {
    denials_are_json(Mode::ExtAuthz).await;
}

async fn denials_are_json(mode: Mode) {
    let (stack, upstream) = stack_in(mode).await;
    let http = client();
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut r = http.get(stack.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let bearer = format!("Bearer {AGENT_KEY}");
    let cases: Vec<(&str, Headers<'_>, u16, &str)> = vec![
        ("/bearer/v1/charges", vec![], 401, "missing_key"),
        (
            "/bearer/v1/charges",
            vec![("authorization", "Bearer short")],
            401,
            "invalid_key",
        ),
        (
            "/bearer/v1/charges",
            vec![("x-api-key", "lk_unknownKEY00000000000000")],
            401,
            "invalid_key",
        ),
        (
            "/bearer/v1/charges",
            vec![("x-api-key", AGENT_KEY), ("x-latchkey-key", OTHER_KEY)],
            401,
            "invalid_key",
        ),
        (
            "/nowhere/v1/charges",
            vec![("authorization", &bearer)],
            404,
            "unknown_proxy",
        ),
        (
            "/lonely/v1/charges",
            vec![("authorization", &bearer)],
            403,
            "not_bound",
        ),
        (
            "/bearer/v1/customers",
            vec![("authorization", &bearer)],
            403,
            "rule_denied",
        ),
        (
            "/bearer/v1/refunds/big",
            vec![("authorization", &bearer)],
            403,
            "rule_denied",
        ),
        (
            "/bearer/v1/a%2Fb",
            vec![("authorization", &bearer)],
            400,
            "invalid_request",
        ),
    ];
    for (path, headers, status, kind) in cases {
        let (got_status, got_kind, body) = denial(get(path, &headers).await.unwrap()).await;
        assert_eq!(
            (got_status, got_kind.as_str()),
            (status, kind),
            "{path} {headers:?}: {body}"
        );
        let text = body.to_string();
        for secret in [BEARER_SECRET, AGENT_KEY, OTHER_KEY] {
            assert!(!text.contains(secret), "{text}");
        }
    }
    // A denying rule names itself and its notes; the default denial says so.
    let (_, _, body) = denial(
        get("/bearer/v1/refunds/big", &[("authorization", &bearer)])
            .await
            .unwrap(),
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no big refunds"),
        "{body}"
    );
    assert!(
        body["error"]["rule_id"]
            .as_str()
            .unwrap()
            .starts_with("rule_"),
        "{body}"
    );
    // The request id is Envoy's.
    let (_, _, body) = denial(
        get(
            "/bearer/v1/customers",
            &[
                ("authorization", &bearer),
                ("x-request-id", "req-from-test"),
            ],
        )
        .await
        .unwrap(),
    )
    .await;
    assert!(body["error"]["request_id"].is_string());
    // The other credential works where it is bound; then nothing denied got through.
    let ok = get("/lonely/anything", &[("x-api-key", OTHER_KEY)])
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let seen = upstream.take();
    assert_eq!(
        seen.len(),
        1,
        "only the allowed request reached the upstream: {seen:?}"
    );
    assert_eq!(seen[0].uri, "/anything");
}

/// Through ext_proc, or in process (`LATCHKEY_TEST_MODE=inprocess`), where the module
/// alone removes an agent's `x-latchkey-cluster` from a request it decides.
#[tokio::test]
async fn hostile_input_neither_bypasses_rules_nor_reroutes() {
    hostile_input(Mode::default_for_tests()).await;
}

#[tokio::test]
async fn hostile_input_through_ext_authz_too() {
    hostile_input(Mode::ExtAuthz).await;
}

async fn hostile_input(mode: Mode) {
    let (stack, upstream) = stack_in(mode).await;
    let http = client();
    let bearer = format!("Bearer {AGENT_KEY}");

    // Client-sent routing and latchkey headers, a forged Host, method overrides.
    let response = http
        .get(stack.url("/bearer/v1/charges"))
        .header("authorization", &bearer)
        .header("host", "evil.example.com")
        .header("x-latchkey-cluster", "latchkey")
        .header("x-latchkey-decision", "allow")
        .header("x-envoy-upstream-rq-timeout-ms", "1")
        .header("x-original-url", "/v1/admin")
        .header("x-http-method-override", "DELETE")
        .header("x-forwarded-host", "evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.header("host"), Some(upstream.addr.to_string().as_str()));
    for stripped in [
        "x-latchkey-cluster",
        "x-latchkey-decision",
        "x-envoy-upstream-rq-timeout-ms",
        "x-original-url",
        "x-http-method-override",
        "x-forwarded-host",
    ] {
        assert!(
            s.header(stripped).is_none(),
            "{stripped} reached the upstream"
        );
    }
    assert_no_proxy_key(s);

    // Paths: what the rules judged is exactly what is forwarded.
    let cases: [(&str, u16, Option<&str>); 8] = [
        ("/bearer/v1/charges/../customers", 403, None),
        ("/bearer/v1/charges/./x", 200, Some("/base/v1/charges/x")),
        ("/bearer//v1//charges", 200, Some("/base/v1/charges")),
        ("/bearer/v1/charges%2F..%2F..%2Fadmin", 400, None),
        // Envoy decodes encoded dots and resolves them before latchkey judges the path.
        ("/bearer/v1/%2e%2e/customers", 403, None),
        ("/bearer/v1/charges/%2E%2E/%2E%2E/admin", 403, None),
        // Climbing out of one proxy lands in another, whose binding is then checked.
        ("/bearer/../lonely/v1/charges", 403, None),
        ("/header/v1/charges/../../../bearer/v1/customers", 403, None),
    ];
    for (path, status, forwarded) in cases {
        let response = http
            .get(stack.url(path))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        let seen = upstream.take();
        match forwarded {
            Some(uri) => {
                assert_eq!(seen.len(), 1, "{path}");
                assert_eq!(seen[0].uri, uri, "{path}");
            }
            None => assert!(seen.is_empty(), "{path} reached the upstream: {seen:?}"),
        }
    }

    // A client-sent copy of the injected header does not ride along: one value arrives.
    let response = http
        .get(stack.url("/header/v1/charges"))
        .header("x-api-key", AGENT_KEY)
        .header("x-vendor-key", "Token client-made")
        .header("x-vendor-key", "Token client-made-2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.take();
    assert_eq!(
        seen[0].all("x-vendor-key"),
        [format!("Token {HEADER_SECRET}")]
    );

    // Envoy joins repeated Authorization headers into one value: that is no clean key.
    let response = http
        .get(stack.url("/bearer/v1/charges"))
        .header("authorization", &bearer)
        .header("authorization", "Digest username=\"x\"")
        .send()
        .await
        .unwrap();
    assert_eq!(denial(response).await.1, "invalid_key");
    assert!(upstream.take().is_empty());

    // A very long header is refused by Envoy or latchkey, and nothing is forwarded
    // unchecked either way.
    let response = http
        .get(stack.url("/bearer/v1/customers"))
        .header("authorization", &bearer)
        .header("x-padding", "a".repeat(90_000))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    assert!(upstream.take().is_empty());
    let response = http
        .get(stack.url("/bearer/v1/charges"))
        .header("authorization", format!("Bearer {}", "k".repeat(4000)))
        .send()
        .await
        .unwrap();
    assert_eq!(denial(response).await.1, "invalid_key");
    assert!(upstream.take().is_empty());
}

#[tokio::test]
async fn apply_validates_is_idempotent_and_takes_effect_on_the_next_request() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let http = client();
    let bearer = format!("Bearer {AGENT_KEY}");
    let good = policy(&upstream.url(), "");
    let first = stack.apply(&good, &secrets());
    assert!(first.contains("proxy bearer: created"), "{first}");
    assert!(!first.contains(BEARER_SECRET) && !first.contains(AGENT_KEY));
    assert_eq!(stack.apply(&good, &secrets()).trim(), "no changes");

    let charges = || {
        http.get(stack.url("/bearer/v1/charges"))
            .header("authorization", &bearer)
            .send()
    };
    assert_eq!(charges().await.unwrap().status(), 200);

    // Each bad file is refused with the item named, and nothing changes.
    let bad: Vec<(String, Headers<'_>, &str)> = vec![
        (
            good.replace("(charges|refunds)", "(charges"),
            secrets(),
            "rules[0]",
        ),
        (
            good.replace("    priority: 10\n", "    priority: 10\n    prio: 1\n"),
            secrets(),
            "unknown field `prio`",
        ),
        (
            good.replace(
                "proxy_credentials: [agent]\n    default_effect: deny",
                "proxy_credentials: [agentx]\n    default_effect: deny",
            ),
            secrets(),
            "\"agentx\" is not defined",
        ),
        (
            good.clone(),
            secrets()
                .into_iter()
                .filter(|(k, _)| *k != "QUERY_SECRET")
                .collect(),
            "QUERY_SECRET",
        ),
        (
            good.replace("target: vendor\n", "target: nowhere\n"),
            secrets(),
            "target \"nowhere\" is not defined",
        ),
    ];
    for (text, env, expected) in bad {
        let out = stack.try_apply(&text, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expected}: accepted");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    assert_eq!(stack.apply(&good, &secrets()).trim(), "no changes");
    assert_eq!(charges().await.unwrap().status(), 200);

    // A change takes effect on the very next request.
    let denying = policy(
        &upstream.url(),
        "  - credential: agent\n    effect: deny\n    path: \"^/v1/charges\"\n    priority: 1\n",
    );
    let out = stack.apply(&denying, &secrets());
    assert!(
        out.contains("rule rule_") && out.contains("created"),
        "{out}"
    );
    let (status, kind, _) = denial(charges().await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (403, "rule_denied"));

    // A rotated secret reaches the upstream on the next request too.
    stack.apply(&good, &secrets());
    let mut env = secrets();
    env.retain(|(k, _)| *k != "BEARER_SECRET");
    env.push(("BEARER_SECRET", "sk_live_ROTATED"));
    let out = stack.apply(&good, &env);
    assert!(out.contains("credential bearer-cred: updated"), "{out}");
    upstream.take();
    assert_eq!(charges().await.unwrap().status(), 200);
    assert_eq!(
        upstream.take()[0].header("authorization"),
        Some("Bearer sk_live_ROTATED")
    );

    // Removing the key from the file revokes it.
    let keyless = good.replace("    keys: [{ env: AGENT_KEY }]\n", "");
    let out = stack.apply(&keyless, &env);
    assert!(
        out.contains("key agent/") && out.contains("deleted"),
        "{out}"
    );
    assert_eq!(denial(charges().await.unwrap()).await.1, "invalid_key");

    // A wrong admin token changes nothing.
    let out = stack.cli(
        &["apply", "-f", "/dev/null", "--admin-token", "wrong-token"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown or revoked admin token"));
}

#[tokio::test]
async fn latchkey_down_means_nothing_is_forwarded() {
    latchkey_down(Mode::ExtProc).await;
}

#[tokio::test]
async fn latchkey_down_means_nothing_is_forwarded_through_ext_authz_either() {
    latchkey_down(Mode::ExtAuthz).await;
}

async fn latchkey_down(mode: Mode) {
    let (mut stack, upstream) = stack_in(mode).await;
    let http = client();
    let bearer = format!("Bearer {AGENT_KEY}");
    let url = stack.url("/bearer/v1/charges");
    let charges = || http.get(&url).header("authorization", &bearer).send();
    assert_eq!(charges().await.unwrap().status(), 200);
    upstream.take();
    stack.kill_latchkey();
    if stack.mode == Mode::InProcess {
        // The module stops deciding when its channel closes, which its thread sees a
        // moment after the process is gone.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for _ in 0..5 {
        let response = http
            .get(&url)
            .header("authorization", &bearer)
            .header("x-latchkey-cluster", "latchkey_plain")
            .send()
            .await
            .unwrap();
        assert!(response.status().is_server_error(), "{}", response.status());
    }
    assert!(
        upstream.take().is_empty(),
        "forwarded without latchkey's yes"
    );
    // And it recovers when latchkey is back.
    stack.start_latchkey().await;
    let mut ok = false;
    for _ in 0..50 {
        if charges().await.unwrap().status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "Envoy did not recover once latchkey was back");
}

#[test]
fn every_envoy_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy");
    // The configs name the ext_proc channel's certificates relative to where Envoy runs,
    // as `latchkey serve` mints them.
    let here = tempfile::tempdir().unwrap();
    latchkey::envoy::channel::ensure_minted(&here.path().join(".latchkey/tls")).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            // envoy-inprocess.yaml loads the module built beside the binaries.
            let out = std::process::Command::new(common::envoy_bin())
                .current_dir(here.path())
                .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", common::modules_dir())
                .args(["--mode", "validate", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "envoy.yaml, envoy-ext-authz.yaml and envoy-inprocess.yaml"
    );
}

#[tokio::test]
async fn secrets_are_sealed_at_rest_and_a_wrong_master_key_is_refused() {
    let (mut stack, _upstream) = stack_with_policy().await;
    stack.kill_latchkey();
    let db = std::fs::read(stack.db_path()).unwrap();
    let wal = std::fs::read(stack.db_path().with_extension("db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        for secret in [
            BEARER_SECRET,
            HEADER_SECRET,
            BASIC_SECRET,
            QUERY_SECRET,
            AGENT_KEY,
        ] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} stored in clear"
            );
        }
    }

    // A different master key: a clear refusal, not garbage credentials.
    let other_key = String::from_utf8(
        std::process::Command::new(common::latchkey_bin())
            .arg("keygen")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let out = stack
        .serve_command()
        .env("LATCHKEY_MASTER_KEY", other_key.trim())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("wrong master key"), "{stderr}");

    // No master key at all: says how to make one.
    let out = stack
        .serve_command()
        .env_remove("LATCHKEY_MASTER_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("latchkey keygen"), "{stderr}");
}

/// A CA and a certificate for `localhost` signed by it, made with the openssl command.
#[tokio::test]
async fn https_targets_get_sni_and_a_checked_certificate() {
    let certs = tempfile::tempdir().unwrap();
    common::make_certificates(certs.path());
    let port = common::free_port();
    let record = certs.path().join("seen.jsonl");
    let mut server = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/tls_upstream.py"
        ))
        .arg(certs.path().join("server.pem"))
        .arg(certs.path().join("server.key"))
        .arg(port.to_string())
        .arg(&record)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");

    let ca = certs.path().join("ca.pem");
    let stack = Stack::start_with(|config| {
        config.replace("/etc/ssl/certs/ca-certificates.crt", ca.to_str().unwrap())
    })
    .await;
    let policy = format!(
        r#"
targets:
  - {{ name: good, url: "https://localhost:{port}/api" }}
  - {{ name: wrong-name, url: "https://127.0.0.1:{port}/api" }}
credentials:
  - {{ name: vendor, type: target, auth: bearer, secret: {{ env: BEARER_SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - {{ name: good, target: good, target_credential: vendor, proxy_credentials: [agent], default_effect: allow }}
  - {{ name: bad, target: wrong-name, target_credential: vendor, proxy_credentials: [agent], default_effect: allow }}
"#
    );
    stack.apply(&policy, &secrets());
    let http = client();
    let response = http
        .get(stack.url("/good/v1/charges?x=1"))
        .header("x-api-key", AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The certificate names localhost, not 127.0.0.1: Envoy must refuse to talk.
    let response = http
        .get(stack.url("/bad/v1/charges"))
        .header("x-api-key", AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let _ = server.kill();
    let _ = server.wait();

    let lines = std::fs::read_to_string(&record).unwrap();
    let seen: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(seen.len(), 1, "{lines}");
    assert_eq!(seen[0]["path"], "/api/v1/charges?x=1");
    let headers = seen[0]["headers"].as_array().unwrap();
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_owned())
    };
    assert_eq!(
        get("authorization"),
        Some(format!("Bearer {BEARER_SECRET}"))
    );
    assert_eq!(get("host"), Some(format!("localhost:{port}")));
    assert!(!lines.contains(AGENT_KEY));
}

/// Targets are named by host name, which Envoy resolves itself on first use. One whose
/// name does not resolve is answered 503: nothing reaches any vendor, the answer holds
/// no secret, and the audit records the 503.
#[tokio::test]
async fn targets_are_resolved_by_name_and_one_that_does_not_resolve_is_503() {
    targets_by_name(Mode::ExtProc).await;
}

#[tokio::test]
async fn targets_are_resolved_by_name_through_ext_authz_too() {
    targets_by_name(Mode::ExtAuthz).await;
}

async fn targets_by_name(mode: Mode) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(mode).await;
    let port = upstream.url().rsplit(':').next().unwrap().to_owned();
    let policy = format!(
        r#"
targets:
  - {{ name: named, url: "http://localhost:{port}/api" }}
  - {{ name: nowhere, url: "http://nothing.invalid:{port}/api" }}
credentials:
  - {{ name: vendor, type: target, auth: bearer, secret: {{ env: BEARER_SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - {{ name: named, target: named, target_credential: vendor, proxy_credentials: [agent], default_effect: allow }}
  - {{ name: nowhere, target: nowhere, target_credential: vendor, proxy_credentials: [agent], default_effect: allow }}
"#
    );
    stack.apply(&policy, &secrets());
    let http = client();
    let ask = |path: &'static str| {
        http.get(stack.url(path))
            .header("x-api-key", AGENT_KEY)
            .send()
    };
    for _ in 0..2 {
        let response = ask("/named/v1/items").await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let seen = upstream.take();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].uri, "/api/v1/items");
    assert_eq!(seen[0].header("host"), Some(&*format!("localhost:{port}")));
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {BEARER_SECRET}"))
    );
    // Twice: the first waits on the failed lookup, the second meets the cached failure.
    for _ in 0..2 {
        let response = ask("/nowhere/v1/items").await.unwrap();
        assert_eq!(response.status(), 503);
        let headers = format!("{:?}", response.headers());
        let body = response.text().await.unwrap();
        assert!(!body.contains(BEARER_SECRET) && !headers.contains(BEARER_SECRET));
        assert!(!body.contains(AGENT_KEY), "{body}");
    }
    assert_eq!(upstream.count(), 0);
    // Two 200s and two 503s, each recorded with its status.
    let records = stack.records_until(4).await;
    let failed = (records.iter())
        .filter(|r| r.proxy.as_deref() == Some("nowhere") && r.status == Some(503))
        .count();
    assert_eq!(failed, 2, "{records:?}");
}
