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
        for dial in [Dial::Plain, Dial::ForeignCertificate] {
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
