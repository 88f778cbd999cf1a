//! What an agent holding a valid proxy key tries, to get the real secret, a free paid
//! call or a request its rules deny: each attempt here must fail.

use std::time::Duration;

use crate::common::{self, ExtraEnvoy, Stack, Upstream, client, free_port};

const AGENT_KEY: &str = "lk_containAGENT0000000000001";
const SECRET: &str = "sk_live_CONTAINED_secret_42";

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - name: vendor
    url: {upstream}
credentials:
  - name: vendor-key
    type: target
    auth: bearer
    secret: {{ env: VENDOR_SECRET }}
  - name: agent
    type: proxy
    keys: [{{ env: AGENT_KEY }}]
proxies:
  - name: vendor
    target: vendor
    target_credential: vendor-key
    proxy_credentials: [agent]
    default_effect: allow
"#
    )
}

const ENV: [(&str, &str); 2] = [("VENDOR_SECRET", SECRET), ("AGENT_KEY", AGENT_KEY)];

/// How the attacker's own Envoy reaches latchkey's data-plane port.
#[derive(Clone, Copy, Debug)]
enum Dial {
    /// Plain h2, as the port spoke before it was guarded.
    Plain,
    /// TLS with a client certificate of its own CA.
    ForeignCertificate,
    /// TLS without a client certificate.
    NoCertificate,
}

#[derive(Clone, Copy, Debug)]
enum Filter {
    ExtProc,
    ExtAuthz,
}

/// A minimal Envoy of the attacker's: every request goes to the attacker's own server
/// (whatever latchkey answers), asking latchkey first, and logging to latchkey too.
fn attacker_config(
    filter: Filter,
    dial: Dial,
    ports: (u16, u16, u16, u16),
    certs: &std::path::Path,
) -> String {
    let (listen, admin, grpc, mine) = ports;
    let filter = match filter {
        Filter::ExtProc => {
            r#"                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service: { envoy_grpc: { cluster_name: latchkey }, timeout: 2s }
                      failure_mode_allow: true
                      processing_mode: { request_header_mode: SEND, response_header_mode: SKIP }"#
        }
        Filter::ExtAuthz => {
            r#"                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      grpc_service: { envoy_grpc: { cluster_name: latchkey }, timeout: 2s }
                      transport_api_version: V3
                      failure_mode_allow: true"#
        }
    };
    let transport = match dial {
        Dial::Plain => String::new(),
        Dial::NoCertificate => r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]"#
            .to_owned(),
        Dial::ForeignCertificate => format!(
            r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{ filename: {0}/client.pem }}
                private_key: {{ filename: {0}/client.key }}"#,
            certs.display()
        ),
    };
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
    - name: attacker
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: attacker
                access_log:
                  - name: envoy.access_loggers.http_grpc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
                      common_config:
                        log_name: latchkey
                        transport_api_version: V3
                        grpc_service: {{ envoy_grpc: {{ cluster_name: latchkey }} }}
                        buffer_flush_interval: 0.1s
                route_config:
                  virtual_hosts:
                    - name: any
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          route: {{ cluster: mine }}
                http_filters:
{filter}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: latchkey
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      {transport}
      load_assignment:
        cluster_name: latchkey
        endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {grpc} }} }} }} }}] }}]
    - name: mine
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: mine
        endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {mine} }} }} }} }}] }}]
"#
    )
}

fn audit_records(stack: &Stack) -> usize {
    common::json(&stack.cli(&["requests", "--json"], &[]))
        .as_array()
        .unwrap()
        .len()
}

/// Sends one request with the agent's key through the attacker's Envoy; returns what
/// the attacker's server saw, as text, and the number of audit records written.
async fn attack(stack: &Stack, filter: Filter, dial: Dial) -> (String, usize) {
    let mine = Upstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    common::make_certificates(certs.path());
    let (listen, admin) = (free_port(), free_port());
    let config = attacker_config(
        filter,
        dial,
        (listen, admin, stack.grpc_port, mine.addr.port()),
        certs.path(),
    );
    let _envoy = ExtraEnvoy::start(stack.dir.path(), "attacker", &config, admin).await;
    let before = audit_records(stack);
    let response = client()
        .get(format!("http://127.0.0.1:{listen}/vendor/v1/balance"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    let status = response.status();
    // Access logs are flushed every 0.1 s, the audit every 50 ms.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen: Vec<String> = mine.take().iter().map(common::Seen::dump).collect();
    (
        format!("{status}\n{}", seen.join("\n")),
        audit_records(stack) - before,
    )
}

#[tokio::test]
async fn an_envoy_without_envoys_certificate_gets_no_secret_and_writes_no_audit() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &ENV);
    // The real Envoy works, and its request is audited.
    let ok = client()
        .get(stack.url("/vendor/v1/balance"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(upstream.take()[0].dump().contains(SECRET));

    for filter in [Filter::ExtProc, Filter::ExtAuthz] {
        for dial in [Dial::Plain, Dial::ForeignCertificate, Dial::NoCertificate] {
            let (seen, audited) = attack(&stack, filter, dial).await;
            assert!(!seen.contains(SECRET), "{filter:?} {dial:?}: {seen}");
            assert_eq!(audited, 0, "{filter:?} {dial:?} wrote to the audit");
        }
    }
}

/// The same attack against a latchkey told to serve plain TCP: the secret arrives.
/// This is what the guard above stops, and proof that the attack is a real one.
#[tokio::test]
async fn the_insecure_opt_in_is_what_hands_out_the_secret() {
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(
        |config| common::plain_channel(&config),
        &[("LATCHKEY_GRPC_INSECURE", "true")],
    )
    .await;
    stack.apply(&policy(&upstream.url()), &ENV);
    assert!(stack.log("latchkey").contains("LATCHKEY_GRPC_INSECURE"));
    let (seen, audited) = attack(&stack, Filter::ExtProc, Dial::Plain).await;
    assert!(seen.contains(SECRET), "{seen}");
    assert!(audited >= 1);
}

/// A vendor priced from its JSON answers (`{"units": 3}`, 0.30 USD), with the answers an
/// agent can provoke: compressed when asked (`/honest`) or always (`/gzip`), a slow
/// event stream (`/stream`), a body over Envoy's buffer (`/large`), a slow answer
/// (`/slow`).
struct Vendor {
    addr: std::net::SocketAddr,
    /// Each request's path and the `accept-encoding` it came with.
    seen: Asked,
}

type Asked = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

impl Vendor {
    async fn start() -> Self {
        use axum::body::Body;
        use axum::http::{HeaderMap, Response, Uri};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let log = log.clone();
            async move {
                let accept = headers
                    .get("accept-encoding")
                    .map(|v| v.to_str().unwrap().to_owned());
                log.lock()
                    .unwrap()
                    .push((uri.path().to_owned(), accept.clone()));
                let json = |body: Vec<u8>| {
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from(body))
                        .unwrap()
                };
                // Not real gzip: what matters is that latchkey cannot read it.
                let gzip = || {
                    Response::builder()
                        .header("content-type", "application/json")
                        .header("content-encoding", "gzip")
                        .body(Body::from(vec![0x1f, 0x8b, 8, 0, 1, 2, 3]))
                        .unwrap()
                };
                match uri.path() {
                    "/v1/honest" if accept.as_deref().is_some_and(|a| a.contains("gzip")) => gzip(),
                    "/v1/gzip" => gzip(),
                    "/v1/stream" => {
                        let chunks = futures_util::stream::unfold(0, |i| async move {
                            if i == 3 {
                                return None;
                            }
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            let event = format!("data: {{\"units\": 3, \"chunk\": {i}}}\n\n");
                            Some((Ok::<_, std::io::Error>(event), i + 1))
                        });
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Body::from_stream(chunks))
                            .unwrap()
                    }
                    "/v1/large" => {
                        let pad = "x".repeat(2 << 20);
                        json(format!("{{\"pad\":\"{pad}\",\"units\":3}}").into_bytes())
                    }
                    "/v1/slow" => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        json(b"{\"units\":3}".to_vec())
                    }
                    _ => json(b"{\"units\":3}".to_vec()),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn take(&self) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn priced(upstream: &str, cost: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-key, type: target, auth: bearer, secret: {{ env: VENDOR_SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: paid
    target: vendor
    target_credential: vendor-key
    proxy_credentials: [agent]
    default_effect: allow
    cost: {cost}
"#
    )
}

/// `n` calls one after another with `accept-encoding: gzip`; their statuses.
async fn calls(stack: &Stack, key: &str, path: &str, n: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let response = client()
            .get(stack.url(path))
            .bearer_auth(key)
            .header("accept-encoding", "gzip, br")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        let _ = response.bytes().await;
    }
    statuses
}

const RESERVED: &str = "{ response_json: /units, usd_per_unit: 0.1, max_usd_per_request: 0.5 }";

#[tokio::test]
async fn priced_calls_cannot_be_made_free() {
    priced_calls(&[]).await;
}

#[tokio::test]
async fn priced_calls_cannot_be_made_free_with_budgets_in_redis() {
    priced_calls(&[("LATCHKEY_REDIS_URL", "redis://127.0.0.1:6379")]).await;
}

async fn priced_calls(serve_env: &[(&str, &str)]) {
    let vendor = Vendor::start().await;
    let stack = Stack::start_configured(|c| c, serve_env).await;
    stack.apply(&priced(&vendor.url(), RESERVED), &ENV);

    // Asking for gzip: the vendor is asked for identity instead and the price is read.
    let (id, key) = capped_key(&stack, "1.2");
    // The agent is told what its cap leaves, its reservation deducted: 1.20 - 0.50.
    let first = client()
        .get(stack.url("/paid/v1/honest"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        first.headers()["x-latchkey-budget-remaining-usd"],
        "0.700000"
    );
    let _ = first.bytes().await;
    assert!((common::settled_spend(&stack, &id, 0.3).await - 0.3).abs() < 1e-9);
    assert_eq!(calls(&stack, &key, "/paid/v1/honest", 2).await, [200; 2]);
    assert!(
        vendor
            .take()
            .iter()
            .all(|(_, accept)| accept.as_deref() == Some("identity"))
    );
    assert!((common::settled_spend(&stack, &id, 0.9).await - 0.9).abs() < 1e-9);
    // 0.9 spent + 0.5 reserved would cross the 1.20 cap: refused before forwarding.
    assert_eq!(calls(&stack, &key, "/paid/v1/honest", 1).await, [429]);
    assert!(vendor.take().is_empty());

    // Answers latchkey cannot price are charged their reservation: two fit in 1.00.
    for path in ["/paid/v1/gzip", "/paid/v1/stream", "/paid/v1/large"] {
        let (id, key) = capped_key(&stack, "1");
        assert_eq!(
            calls(&stack, &key, path, 4).await,
            [200, 200, 429, 429],
            "{path}"
        );
        assert!(
            (common::settled_spend(&stack, &id, 1.0).await - 1.0).abs() < 1e-9,
            "{path}"
        );
        assert_eq!(vendor.take().len(), 2, "{path}");
    }
    let metrics = stack.metrics().await;
    assert!(
        metrics
            .contains("latchkey_pricing_exceptions_total{proxy=\"paid\",outcome=\"unpriced\"} 6"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_caller_that_hangs_up_is_charged_the_reservation() {
    let vendor = Vendor::start().await;
    let stack = Stack::start().await;
    stack.apply(&priced(&vendor.url(), RESERVED), &ENV);
    let (id, key) = capped_key(&stack, "1");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for _ in 0..2 {
        let gone = impatient
            .get(stack.url("/paid/v1/slow"))
            .bearer_auth(&key)
            .send()
            .await;
        assert!(gone.is_err(), "the caller hung up");
    }
    assert!((common::settled_spend(&stack, &id, 1.0).await - 1.0).abs() < 1e-9);
    assert_eq!(calls(&stack, &key, "/paid/v1/slow", 1).await, [429]);
}

#[tokio::test]
async fn without_a_maximum_an_unpriceable_answer_closes_the_account() {
    let vendor = Vendor::start().await;
    let stack = Stack::start().await;
    stack.apply(
        &priced(
            &vendor.url(),
            "{ response_json: /units, usd_per_unit: 0.1 }",
        ),
        &ENV,
    );
    let (id, key) = capped_key(&stack, "1");
    assert_eq!(calls(&stack, &key, "/paid/v1/ok", 1).await, [200]);
    assert!((common::settled_spend(&stack, &id, 0.3).await - 0.3).abs() < 1e-9);
    assert_eq!(calls(&stack, &key, "/paid/v1/gzip", 2).await, [200, 429]);
    assert!((common::settled_spend(&stack, &id, 1.0).await - 1.0).abs() < 1e-9);
}

#[tokio::test]
async fn a_stream_on_a_priced_proxy_is_not_held_back() {
    let vendor = Vendor::start().await;
    let stack = Stack::start().await;
    stack.apply(&priced(&vendor.url(), RESERVED), &ENV);
    let started = std::time::Instant::now();
    let mut response = client()
        .get(stack.url("/paid/v1/stream"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("\"chunk\": 0"));
    // The vendor pauses 400 ms between events: the first one came before the second.
    assert!(first_at < Duration::from_millis(350), "{first_at:?}");
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&rest).contains("\"chunk\": 2"));
}

fn ruled(upstream: &str) -> String {
    format!(
        r#"{}
rules:
  - {{ proxy: vendor, effect: deny, path: "^/v1/admin", priority: 1 }}
  - {{ proxy: vendor, effect: allow, methods: [GET, POST], path: "^/v1/charges", priority: 10 }}
"#,
        policy(upstream).replace("default_effect: allow", "default_effect: deny")
    )
}

#[tokio::test]
async fn paths_and_overrides_the_upstream_reads_differently_are_refused() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&ruled(&upstream.url()), &ENV);
    let http = client();
    let get = |path: &str| {
        http.get(stack.url(&format!("/vendor{path}")))
            .bearer_auth(AGENT_KEY)
            .send()
    };
    assert_eq!(get("/v1/charges").await.unwrap().status(), 200);
    upstream.take();
    // Servlet path parameters on dot segments: none reaches the vendor.
    for path in [
        "/v1/charges/%2e%2e;/admin",
        "/v1/charges/..;/admin",
        "/v1/charges/..;jsessionid=x/admin",
        "/v1/charges/%2E%2E%3B/admin",
        "/v1/charges/..%3b/admin",
        "/v1/charges/.;/x",
    ] {
        let response = get(path).await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        // Refused by latchkey (400); resolved by Envoy to /v1/admin and denied (403);
        // or resolved to a plain path the rules allow: never forwarded as `..;`.
        assert!(
            matches!(status.as_u16(), 200 | 400 | 403 | 404),
            "{path}: {status} {body}"
        );
        for seen in upstream.take() {
            let lower = seen.uri.to_ascii_lowercase();
            assert!(
                !lower.contains("/..;") && !lower.contains("/.;") && !lower.contains("%3b"),
                "{path} reached the vendor as {}",
                seen.uri
            );
            assert!(seen.uri.starts_with("/v1/charges/"), "{}", seen.uri);
        }
    }
    // An escaped letter is the same path to the upstream: the deny rule sees it.
    let (status, kind, _) = common::denial(get("/v1/%61dmin").await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (403, "rule_denied"));
    // Method overrides: in the query, or in a header spelled with underscores.
    for query in [
        "_method=DELETE",
        "X-HTTP-Method-Override=DELETE",
        "%5Fmethod=DELETE",
    ] {
        let response = http
            .post(stack.url(&format!("/vendor/v1/charges?{query}")))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
    }
    for header in ["x_http_method_override", "x_api_key", "x_latchkey_key"] {
        let response = http
            .post(stack.url("/vendor/v1/charges"))
            .bearer_auth(AGENT_KEY)
            .header(header, "DELETE")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{header}");
    }
    assert!(
        upstream.take().is_empty(),
        "none of them reached the vendor"
    );
}

/// An upstream that answers TRACE sends the request back as it reached it, the
/// credential latchkey set included. On a proxy that allows every method, TRACE and
/// TRACK, in any case, are refused before they are forwarded.
#[tokio::test]
async fn trace_is_refused_before_it_could_echo_the_credential() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &ENV);
    let http = client();
    let send = |method: &str| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        (http.request(method, stack.url("/vendor/v1/charges")))
            .bearer_auth(AGENT_KEY)
            .send()
    };
    let (status, kind, _) = common::denial(send("TRACE").await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request"));
    // Methods are case-sensitive, but a server may read them otherwise; Envoy's HTTP/1
    // parser refuses TRACK itself. Refused by latchkey or by Envoy, never forwarded.
    for method in ["TRACK", "trace", "Track"] {
        let status = send(method).await.unwrap().status();
        assert_eq!(status, 400, "{method}");
    }
    assert!(upstream.take().is_empty(), "none reached the vendor");
    assert_eq!(send("GET").await.unwrap().status(), 200);
    assert_eq!(send("OPTIONS").await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_deny_rule_on_the_body_judges_or_refuses() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let rules = r#"
rules:
  - { proxy: vendor, effect: deny, body: [{ pointer: /amount, gt: 5000 }], priority: 1 }
  - { proxy: vendor, effect: allow, methods: [POST], path: "^/v1/charges$", priority: 10 }
"#;
    let file = policy(&upstream.url()).replace("default_effect: allow", "default_effect: deny");
    stack.apply(&format!("{file}{rules}"), &ENV);
    let post = |body: &'static str, content_type: &'static str| {
        client()
            .post(stack.url("/vendor/v1/charges"))
            .bearer_auth(AGENT_KEY)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json = "application/json";
    assert_eq!(post(r#"{"amount":100}"#, json).await.unwrap().status(), 200);
    assert_eq!(upstream.take().len(), 1);
    for (body, content_type) in [
        (r#"{"amount":999999}"#, json),
        (r#"{"amount":"999999"}"#, json),
        (r#"[{"amount":999999}]"#, json),
        (
            r#""&amount=999999&x=""#,
            "application/x-www-form-urlencoded",
        ),
        (r#"{"amount":999999,"amount":1}"#, json),
        (r#"{"amount":1,"Amount":999999}"#, json),
        (r#"{"AMOUNT":999999}"#, json),
    ] {
        let (status, kind, error) = common::denial(post(body, content_type).await.unwrap()).await;
        assert_eq!(
            (status, kind.as_str()),
            (403, "rule_denied"),
            "{body}: {error}"
        );
    }
    assert!(
        upstream.take().is_empty(),
        "a refused body reached the vendor"
    );
}

#[tokio::test]
async fn a_run_key_expires_to_the_millisecond() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&policy(&upstream.url()), &ENV);
    let (_, key) = common::issue_key(&stack, "agent", &["--ttl", "1s"]);
    let started = std::time::Instant::now();
    let call = || {
        client()
            .get(stack.url("/vendor/v1/balance"))
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(call().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed())).await;
    let (status, kind, _) = common::denial(call().await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "expired_key"));
}

#[tokio::test]
async fn without_a_valid_key_no_proxy_name_can_be_probed_and_sdk_carriers_work() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    stack.apply(&ruled(&upstream.url()), &ENV);
    let http = client();
    // Known and unknown proxies answer a caller without a valid key alike.
    for key in [None, Some("lk_notAKeyAtAll0000000000")] {
        let mut answers = Vec::new();
        for proxy in ["vendor", "no-such-proxy"] {
            let mut request = http.get(stack.url(&format!("/{proxy}/v1/charges")));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.headers().get("x-should-retry").unwrap(),
                "false",
                "a 401 is permanent"
            );
            let (status, kind, _) = common::denial(response).await;
            answers.push((status, kind));
        }
        assert_eq!(answers[0], answers[1], "{key:?}");
        assert_eq!(answers[0].0, 401);
    }
    let (status, kind, _) = common::denial(
        http.get(stack.url("/no-such-proxy/v1/charges"))
            .bearer_auth(AGENT_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (404, "unknown_proxy"));
    // Azure OpenAI's and Gemini's SDKs send their key in these headers.
    for carrier in ["api-key", "x-goog-api-key"] {
        let response = http
            .get(stack.url("/vendor/v1/charges"))
            .header(carrier, AGENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{carrier}");
        let seen = upstream.take().pop().unwrap();
        assert!(seen.header(carrier).is_none(), "{carrier} forwarded");
        assert!(!seen.dump().contains(AGENT_KEY));
    }
    let denied = http
        .delete(stack.url("/vendor/v1/charges"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.headers().get("x-should-retry").unwrap(), "false");
}

/// SDKs often write the body after the headers: the body phase's answer (route, key
/// swap) must still decide where the request goes.
#[tokio::test]
async fn a_body_that_arrives_after_the_headers_is_judged_and_routed() {
    let upstream = Upstream::start().await;
    let stack = Stack::start().await;
    let rules = r#"
rules:
  - { proxy: vendor, effect: allow, methods: [POST], body: [{ pointer: /amount, lt: 100 }] }
"#;
    let file = policy(&upstream.url()).replace("default_effect: allow", "default_effect: deny");
    stack.apply(&format!("{file}{rules}"), &ENV);
    for (amount, status) in [(5, "200"), (500, "403"), (7, "200")] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = format!("{{\"amount\":{amount}}}");
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.envoy_port))
            .await
            .unwrap();
        let head = format!(
            "POST /vendor/v1/charges HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {AGENT_KEY}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        tcp.write_all(body.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "amount {amount}: {answer}"
        );
    }
    let seen = upstream.take();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.header("authorization") == Some(&format!("Bearer {SECRET}")))
    );
}

/// Envoy's own timeout cuts a call the vendor may still bill: it is charged.
#[tokio::test]
async fn a_call_cut_by_the_route_timeout_is_charged_the_reservation() {
    let vendor = Vendor::start().await;
    let stack = Stack::start_with(|config| config.replace("timeout: 60s", "timeout: 1s")).await;
    stack.apply(&priced(&vendor.url(), RESERVED), &ENV);
    let (id, key) = capped_key(&stack, "1");
    assert_eq!(calls(&stack, &key, "/paid/v1/slow", 1).await, [504]);
    assert!((common::settled_spend(&stack, &id, 0.5).await - 0.5).abs() < 1e-9);
}

/// A key of `agent` capped at `cap` USD: its id and the key.
fn capped_key(stack: &Stack, cap: &str) -> (String, String) {
    common::issue_key(stack, "agent", &["--spend-cap-usd", cap])
}

/// A proxy may give long calls (LLM generations) more time than the route's timeout;
/// an agent cannot give itself more.
#[tokio::test]
async fn a_proxy_gives_long_calls_their_own_timeout_and_an_agent_cannot() {
    let vendor = Vendor::start().await;
    let stack = Stack::start_with(|config| config.replace("timeout: 60s", "timeout: 1s")).await;
    let file = priced(&vendor.url(), RESERVED).replace(
        "    cost: ",
        "    limits: { upstream_timeout_s: 5 }\n    cost: ",
    );
    stack.apply(&file, &ENV);
    assert_eq!(calls(&stack, AGENT_KEY, "/paid/v1/slow", 1).await, [200]);
    stack.apply(&priced(&vendor.url(), RESERVED), &ENV);
    let response = client()
        .get(stack.url("/paid/v1/slow"))
        .bearer_auth(AGENT_KEY)
        .header("x-envoy-upstream-rq-timeout-ms", "5000")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        504,
        "the agent's own timeout header is stripped"
    );
}

/// `--help` shows where settings come from, never a password in them: the store's and
/// Redis's URLs as the environment gives them are not printed.
#[test]
fn help_never_prints_a_password_from_the_environment() {
    let out = std::process::Command::new(crate::common::latchkey_bin())
        .args(["serve", "--help"])
        .env(
            "LATCHKEY_DATABASE_URL",
            "postgres://latchkey:db-pw-4242@db/latchkey",
        )
        .env("LATCHKEY_REDIS_URL", "redis://:redis-pw-4242@cache:6379")
        .env("LATCHKEY_ADMIN_TOKEN", "admin-token-4242-secret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("LATCHKEY_DATABASE_URL"), "{help}");
    assert!(!help.contains("4242"), "{help}");
}

/// Envoy forwards only what latchkey marked allowed: a request ext_proc let pass
/// unanswered (here, the ext_proc filter cut out of the shipped config) goes nowhere.
#[tokio::test]
async fn a_request_latchkey_never_allowed_goes_nowhere() {
    let upstream = Upstream::start().await;
    let cut = common::without_filter(
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.dynamic_forward_proxy",
    );
    let stack = Stack::start_full(common::Mode::ExtProc, cut, &[]).await;
    stack.apply(&policy(&upstream.url()), &ENV);
    common::goes_nowhere(&stack, &upstream).await;
}

/// An agent on Envoy's host reaches its admin port on the loopback as it reaches the
/// listener. What would stop Envoy, drain or fail it, change its runtime flags, dump its
/// config or turn on the logs that print each upstream request's credential is refused;
/// what reads Envoy's state still answers. Envoy keeps serving, and its log holds no
/// secret.
#[tokio::test]
async fn envoys_admin_port_refuses_what_an_agent_could_misuse() {
    admin_port_refuses(common::Mode::ExtProc).await;
}

#[tokio::test]
async fn envoys_admin_port_refuses_it_in_the_ext_authz_config_too() {
    admin_port_refuses(common::Mode::ExtAuthz).await;
}

async fn admin_port_refuses(mode: common::Mode) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(mode).await;
    stack.apply(&policy(&upstream.url()), &ENV);
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", stack.envoy_admin_port);
    let http = client();
    for path in [
        "/logging?level=debug",
        "/logging?paths=router:trace,http:trace",
        "/runtime_modify?envoy.reloadable_features.dfp_cluster_resolves_hosts=false",
        "/quitquitquit",
        "/drain_listeners",
        "/healthcheck/fail",
        "/config_dump",
        "/reset_counters",
        "/heap_dump",
        "/cpuprofiler?enable=y",
        "/tap",
        "/READY",
        "/ready/../quitquitquit",
        "/stats/../quitquitquit",
        "/stats/prometheus/../../quitquitquit",
        "/%71uitquitquit",
    ] {
        for post in [true, false] {
            let request = if post {
                http.post(admin(path))
            } else {
                http.get(admin(path))
            };
            let status = request.send().await.unwrap().status();
            assert_eq!(status, 403, "{path}");
        }
    }
    for path in [
        "/ready",
        "/stats?filter=^server.live$",
        "/stats/prometheus",
        "/clusters",
        "/memory",
    ] {
        let status = http.get(admin(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
    let response = http
        .get(stack.url("/vendor/v1/items"))
        .header("authorization", format!("Bearer {AGENT_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.take()[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    let log = stack.log("envoy");
    assert!(!log.contains(SECRET), "the secret in Envoy's log");
}
