//! OpenTelemetry export to a real OTLP/gRPC receiver (the collector's own protobuf
//! services, served here), and secret hygiene across every output of a full scenario.

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::common::otlp::{Collector, attr, text};
use crate::common::{Stack, Upstream, client, denial};

const AGENT_KEY: &str = "lk_otelAgentKEY0000000000000001";
const SECRET: &str = "sk_live_OTEL_secret_value_4242";

fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - {{ name: vendor-cred, type: target, auth: bearer, secret: {{ env: SECRET }} }}
  - {{ name: agent, type: proxy, keys: [{{ env: AGENT_KEY }}] }}
proxies:
  - name: api
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: deny
    limits: {{ requests_per_minute: 1000 }}
rules:
  - {{ proxy: api, id: reads, effect: allow, methods: [GET], path: "^/v1/" }}
"#
    )
}

#[tokio::test]
async fn spans_and_audit_logs_reach_an_otlp_collector_and_no_secret_goes_anywhere() {
    let (collector, endpoint) = Collector::start().await;
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(
        |c| c,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "latchkey-test"),
            // Everything latchkey and its libraries would say, to search it all.
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let env = [("SECRET", SECRET), ("AGENT_KEY", AGENT_KEY)];
    stack.apply(&policy(&upstream.url()), &env);
    let http = client();
    let ok = http
        .get(stack.url("/api/v1/things"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok_body = ok.text().await.unwrap();
    // The agent's own trace: latchkey's span joins it, under the agent's span.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, _, denied_body) = denial(
        http.post(stack.url("/api/v1/things"))
            .bearer_auth(AGENT_KEY)
            .header("traceparent", traceparent)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let (_, _, bad_key_body) = denial(
        http.get(stack.url("/api/v1/things"))
            .bearer_auth(format!("{AGENT_KEY}x"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let allowed_id = upstream.take()[0]
        .header("x-request-id")
        .unwrap()
        .to_owned();

    // Two decisions by a known key plus one by an unknown one: three spans, and log
    // records for the decisions and the completions.
    let deadline = Instant::now() + Duration::from_secs(20);
    while collector.spans().len() < 3
        || collector
            .records()
            .iter()
            .filter(|r| r.event_name == "latchkey.request.completed")
            .count()
            < 3
    {
        assert!(
            Instant::now() < deadline,
            "the collector got: {}",
            collector.dump()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = collector.spans();
    let allowed = spans
        .iter()
        .find(|s| text(&s.attributes, "latchkey.request_id") == allowed_id)
        .expect("a span for the allowed request");
    assert_eq!(text(&allowed.attributes, "latchkey.proxy"), "api");
    assert_eq!(text(&allowed.attributes, "latchkey.credential"), "agent");
    assert_eq!(text(&allowed.attributes, "latchkey.decision"), "allow");
    assert_eq!(text(&allowed.attributes, "latchkey.rule_id"), "reads");
    assert!(allowed.end_time_unix_nano >= allowed.start_time_unix_nano);
    let denied = spans
        .iter()
        .find(|s| text(&s.attributes, "latchkey.decision") == "rule_denied")
        .unwrap();
    assert_eq!(
        attr(&denied.attributes, "http.response.status_code"),
        Some(&Value::IntValue(403))
    );
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&denied.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&denied.parent_span_id), "00f067aa0ba902b7");
    assert!(
        allowed.parent_span_id.is_empty(),
        "no traceparent: a trace of its own"
    );
    assert_ne!(allowed.trace_id, denied.trace_id);
    let service = collector.traces.lock().unwrap()[0].resource_spans[0]
        .resource
        .clone()
        .unwrap();
    assert_eq!(text(&service.attributes, "service.name"), "latchkey-test");
    let decided = collector
        .records()
        .into_iter()
        .find(|r| {
            r.event_name == "latchkey.request.decided"
                && text(&r.attributes, "latchkey.request_id") == allowed_id
        })
        .expect("the audit record as a log record");
    assert_eq!(decided.span_id, allowed.span_id);
    let completed = collector
        .records()
        .into_iter()
        .find(|r| {
            r.event_name == "latchkey.request.completed"
                && text(&r.attributes, "latchkey.request_id") == allowed_id
        })
        .unwrap();
    assert_eq!(
        attr(&completed.attributes, "latchkey.upstream_status"),
        Some(&Value::IntValue(200))
    );

    // Secret hygiene: every output of the scenario, searched for the upstream secret and
    // the proxy key.
    let metrics = stack.metrics().await;
    let requests = stack.cli(&["requests", "--json"], &[]);
    let telemetry = stack.cli(&["telemetry", "--json"], &[]);
    let keys = stack.cli(&["key", "list", "--json"], &[]);
    // SQLite in WAL mode: the newest pages may still be in the -wal file.
    let mut db = std::fs::read(stack.db_path()).unwrap();
    let wal = stack.db_path().with_extension("db-wal");
    db.extend(std::fs::read(wal).unwrap_or_default());
    let outputs = [
        ("latchkey log (debug)", stack.log("latchkey")),
        ("envoy log", stack.log("envoy")),
        ("metrics", metrics),
        ("OTLP exports", collector.dump()),
        ("requests", String::from_utf8_lossy(&requests.stdout).into()),
        (
            "telemetry",
            String::from_utf8_lossy(&telemetry.stdout).into(),
        ),
        ("key list", String::from_utf8_lossy(&keys.stdout).into()),
        ("database", String::from_utf8_lossy(&db).into()),
        ("allowed body", ok_body),
        ("denial body", denied_body.to_string()),
        ("bad key body", bad_key_body.to_string()),
    ];
    assert!(
        outputs[0].1.contains("DEBUG"),
        "the log really is at debug level"
    );
    for (what, text) in &outputs {
        assert!(!text.is_empty() || *what == "envoy log", "{what} is empty");
        for secret in [SECRET, AGENT_KEY] {
            assert!(!text.contains(secret), "{secret} leaked into the {what}");
        }
    }
}

/// Logs as one JSON object per line when asked (for log collectors), and the build in
/// the metrics.
#[tokio::test]
async fn json_logs_and_the_build_in_the_metrics() {
    let stack = Stack::start_configured(|c| c, &[("LATCHKEY_LOG_FORMAT", "json")]).await;
    let metrics = stack.metrics().await;
    let build = format!(
        "latchkey_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(metrics.contains(&build), "{metrics}");
    let log = std::fs::read_to_string(stack.db_path().with_file_name("latchkey.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "latchkey serving"),
        "{log}"
    );
}

/// An `https://` collector: trusted through `OTEL_EXPORTER_OTLP_CERTIFICATE` (the system's
/// roots otherwise), and spans arrive over TLS.
#[tokio::test]
async fn spans_reach_a_collector_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certificates(certs.path());
    let (collector, endpoint) = Collector::start_tls(certs.path()).await;
    let ca = certs.path().join("ca.pem");
    let stack = Stack::start_configured(
        |c| c,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.to_str().unwrap()),
        ],
    )
    .await;
    // A decision of any kind is a span: here a request without a key.
    let denied = client()
        .get(stack.url("/api/v1/things"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    while collector.spans().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "{}", collector.dump());
    assert_eq!(
        text(&spans[0].attributes, "latchkey.decision"),
        "missing_key"
    );
}

#[tokio::test]
async fn spans_and_logs_reach_a_collector_over_otlp_http() {
    let (collector, endpoint) = Collector::start_http().await;
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(
        |c| c,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=team-a"),
        ],
    )
    .await;
    let env = [("SECRET", SECRET), ("AGENT_KEY", AGENT_KEY)];
    stack.apply(&policy(&upstream.url()), &env);
    let ok = client()
        .get(stack.url("/api/v1/things"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (collector.spans().is_empty() || collector.records().is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "{}", collector.dump());
    assert_eq!(text(&spans[0].attributes, "latchkey.decision"), "allow");
    let posts = collector.posts.lock().unwrap().clone();
    for path in ["/v1/traces", "/v1/logs"] {
        assert!(
            posts.contains(&(path.to_owned(), Some("team-a".to_owned()))),
            "{posts:?}"
        );
    }
}
