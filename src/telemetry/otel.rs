//! OpenTelemetry's shape of latchkey's events: a span per decided request (and per LLM
//! call, as the GenAI conventions describe one), and each audit event as a log record
//! linked to its span. Built from the audit writer's batches, never on the request path;
//! `otlp` sends them.

use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};

use crate::base::trace::TraceParent;
use crate::telemetry::events::{Completed, Decided, Event, Llm};

pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "latchkey".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    }
}

pub(super) fn text(s: &str) -> Value {
    Value::StringValue(s.to_owned())
}

pub(super) fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn ms_to_ns(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000)
}

fn decided_attrs(d: &Decided) -> Vec<KeyValue> {
    let mut attrs = vec![
        attr("latchkey.request_id", text(&d.request_id)),
        attr("latchkey.decision", text(d.decision)),
        attr("http.request.method", text(&d.method)),
        attr("url.path", text(&d.path)),
    ];
    let optional = [
        ("latchkey.proxy", &d.proxy),
        ("latchkey.target", &d.target),
        ("latchkey.credential", &d.credential),
        ("latchkey.key_id", &d.key_id),
        ("latchkey.run_label", &d.run_label),
        ("latchkey.rule_id", &d.rule_id),
    ];
    attrs.extend(
        optional
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| attr(k, text(v)))),
    );
    // An MCP message's method and tool, by OpenTelemetry's MCP conventions.
    if let Some(facts) = d.facts.as_deref().filter(|f| f.contains("\"mcp\""))
        && let Ok(facts) = serde_json::from_str::<serde_json::Value>(facts)
    {
        for (key, field) in [("mcp.method.name", "method"), ("gen_ai.tool.name", "tool")] {
            if let Some(value) = facts["mcp"][field].as_str() {
                attrs.push(attr(key, text(value)));
            }
        }
    }
    if let Some(status) = d.status {
        attrs.push(attr(
            "http.response.status_code",
            Value::IntValue(i64::from(status)),
        ));
    }
    attrs
}

fn completed_attrs(c: &Completed) -> Vec<KeyValue> {
    let mut attrs = vec![attr("latchkey.request_id", text(&c.request_id))];
    let numbers = [
        ("http.response.status_code", c.status.map(i64::from)),
        ("latchkey.upstream_status", c.upstream_status.map(i64::from)),
        ("latchkey.bytes_in", i64::try_from(c.bytes_in).ok()),
        ("latchkey.bytes_out", i64::try_from(c.bytes_out).ok()),
        ("latchkey.retries", Some(i64::from(c.retries))),
    ];
    attrs.extend(
        numbers
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| attr(k, Value::IntValue(v)))),
    );
    if let Some(ms) = c.latency_ms {
        attrs.push(attr("latchkey.latency_ms", Value::DoubleValue(ms)));
    }
    attrs
}

fn log(event_name: &str, time_ns: u64, body: String, attributes: Vec<KeyValue>) -> LogRecord {
    LogRecord {
        time_unix_nano: time_ns,
        observed_time_unix_nano: time_ns,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".to_owned(),
        event_name: event_name.to_owned(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(body)),
        }),
        attributes,
        ..Default::default()
    }
}

/// A request's trace id, its decision span's id and that span's parent. The span id is
/// derived from the request id with a key this process drew, so the charge, settled when
/// the answer ends, finds its parent without ids carried along, and an agent that picks
/// its request id cannot pick it. The trace is the agent's when it sent a `traceparent`
/// (its spans and latchkey's then form one trace, under the agent's span), otherwise one
/// derived like the span id.
fn trace_of(request_id: &str, agent: Option<TraceParent>) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use hmac::{Hmac, Mac};
    static KEY: std::sync::LazyLock<[u8; 32]> =
        std::sync::LazyLock::new(crate::base::crypto::random_bytes::<32>);
    let mut mac = <Hmac<sha2::Sha256>>::new_from_slice(&*KEY).expect("any key length");
    mac.update(request_id.as_bytes());
    let digest = mac.finalize().into_bytes();
    let span = digest[16..24].to_vec();
    match agent {
        Some(agent) => (agent.trace_id.to_vec(), span, agent.span_id.to_vec()),
        None => (digest[..16].to_vec(), span, Vec::new()),
    }
}

/// The GenAI semantic conventions' attributes of an LLM call.
fn llm_attrs(llm: &Llm) -> Vec<KeyValue> {
    let count = |n: u64| Value::IntValue(i64::try_from(n).unwrap_or(i64::MAX));
    let mut attrs = vec![
        attr("gen_ai.operation.name", text("chat")),
        attr("gen_ai.provider.name", text(llm.vendor.name())),
        attr(
            "gen_ai.usage.input_tokens",
            count(llm.usage.input + llm.usage.cached_input),
        ),
        attr("gen_ai.usage.output_tokens", count(llm.usage.output)),
        attr(
            "gen_ai.usage.cache_read.input_tokens",
            count(llm.usage.cached_input),
        ),
    ];
    if let Some(model) = &llm.model {
        attrs.push(attr("gen_ai.request.model", text(model)));
    }
    attrs
}

/// A span for each decision (its own trace: latchkey is where the agent's call begins),
/// a child span for each LLM call's usage, and a log record for each event, linked to
/// its span.
pub fn convert(events: &[Event]) -> (Vec<Span>, Vec<LogRecord>) {
    let mut spans = Vec::new();
    let mut records = Vec::with_capacity(events.len());
    let now_ns = ms_to_ns(crate::base::clock::now_unix_ms());
    for event in events {
        match event {
            Event::Decided(d) => {
                let (trace_id, span_id, parent_span_id) = trace_of(&d.request_id, d.trace);
                let end = ms_to_ns(d.time_ms);
                let attributes = decided_attrs(d);
                spans.push(Span {
                    trace_id: trace_id.clone(),
                    span_id: span_id.clone(),
                    parent_span_id,
                    name: format!("latchkey {}", d.decision),
                    kind: SpanKind::Server as i32,
                    start_time_unix_nano: end.saturating_sub(u64::from(d.elapsed_us) * 1_000),
                    end_time_unix_nano: end,
                    attributes: attributes.clone(),
                    ..Default::default()
                });
                let mut record = log(
                    "latchkey.request.decided",
                    end,
                    format!(
                        "{} {} {} -> {}",
                        d.proxy.as_deref().unwrap_or("-"),
                        d.method,
                        d.path,
                        d.decision
                    ),
                    attributes,
                );
                record.trace_id = trace_id;
                record.span_id = span_id;
                records.push(record);
            }
            Event::Completed(c) => records.push(log(
                "latchkey.request.completed",
                now_ns,
                format!(
                    "request {} completed with {}",
                    c.request_id,
                    c.status.map_or("no status".to_owned(), |s| s.to_string())
                ),
                completed_attrs(c),
            )),
            Event::Charged {
                request_id,
                started_ms,
                key_id,
                micros,
                llm,
                trace,
            } => {
                let (trace_id, parent, _) = trace_of(request_id, *trace);
                let mut attrs = vec![
                    attr("latchkey.request_id", text(request_id)),
                    attr("latchkey.key_id", text(key_id)),
                    attr(
                        "latchkey.cost_usd",
                        Value::DoubleValue(crate::base::money::to_usd(*micros)),
                    ),
                ];
                let mut record = log(
                    "latchkey.request.charged",
                    now_ns,
                    format!(
                        "request {request_id} cost {} USD",
                        crate::base::money::to_usd(*micros)
                    ),
                    Vec::new(),
                );
                record.trace_id = trace_id.clone();
                record.span_id = parent.clone();
                // The LLM call as the GenAI conventions describe one: a client span from
                // the decision to the settled answer, inside the decision's trace.
                if let Some(llm) = llm {
                    attrs.extend(llm_attrs(llm));
                    let span_id = crate::base::crypto::random_bytes::<8>().to_vec();
                    spans.push(Span {
                        trace_id,
                        span_id: span_id.clone(),
                        parent_span_id: parent,
                        name: format!("chat {}", llm.model.as_deref().unwrap_or("unknown")),
                        kind: SpanKind::Client as i32,
                        start_time_unix_nano: ms_to_ns(*started_ms).min(now_ns),
                        end_time_unix_nano: now_ns,
                        attributes: attrs.clone(),
                        ..Default::default()
                    });
                    record.span_id = span_id;
                }
                record.attributes = attrs;
                records.push(record);
            }
        }
    }
    (spans, records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_is_a_span_and_a_linked_log_record() {
        let (spans, records) = convert(&[Event::Decided(Decided {
            request_id: "r1".into(),
            time_ms: 1_700_000_000_000,
            elapsed_us: 250,
            proxy: Some("stripe".into()),
            method: "GET".into(),
            path: "/v1/x".into(),
            status: Some(403),
            decision: "rule_denied",
            rule_id: Some("no-refunds".into()),
            ..Decided::default()
        })]);
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].end_time_unix_nano - spans[0].start_time_unix_nano,
            250_000
        );
        assert_eq!(records[0].span_id, spans[0].span_id);
        assert_eq!(records[0].event_name, "latchkey.request.decided");
        let keys: Vec<&str> = spans[0].attributes.iter().map(|a| a.key.as_str()).collect();
        for k in [
            "latchkey.proxy",
            "latchkey.decision",
            "latchkey.rule_id",
            "http.response.status_code",
        ] {
            assert!(keys.contains(&k), "{k} in {keys:?}");
        }
        // An MCP message's method and tool, from the facts the audit keeps.
        let (spans, _) = convert(&[Event::Decided(Decided {
            request_id: "r2".into(),
            decision: "allow",
            facts: Some(r#"{"mcp":{"method":"tools/call","tool":"search_docs"}}"#.into()),
            ..Decided::default()
        })]);
        let attrs = &spans[0].attributes;
        let value = |k: &str| {
            attrs
                .iter()
                .find(|a| a.key == k)
                .map(|a| format!("{:?}", a.value))
        };
        assert!(value("mcp.method.name").unwrap().contains("tools/call"));
        assert!(value("gen_ai.tool.name").unwrap().contains("search_docs"));
    }

    /// An LLM call's usage is a client span inside its decision's trace, with the GenAI
    /// attributes, and the charge's log record points at it.
    #[test]
    fn an_llm_charge_is_a_genai_span_in_the_decisions_trace() {
        let llm = Llm {
            model: Some("gpt-4o".into()),
            priced_as: Some("gpt-4o".into()),
            vendor: crate::policy::Vendor::OpenAi,
            usage: crate::base::money::Usage {
                input: 100,
                cached_input: 20,
                output: 7,
            },
        };
        let (spans, records) = convert(&[
            Event::Decided(Decided {
                request_id: "r1".into(),
                time_ms: 1_700_000_000_000,
                decision: "allowed",
                ..Decided::default()
            }),
            Event::Charged {
                request_id: "r1".into(),
                started_ms: 1_700_000_000_000,
                key_id: "k1".into(),
                micros: 900,
                llm: Some(llm.clone()),
                trace: None,
            },
        ]);
        let [decision, call] = &spans[..] else {
            panic!("two spans: {spans:?}")
        };
        assert_eq!(call.trace_id, decision.trace_id);
        assert_eq!(call.parent_span_id, decision.span_id);
        assert_eq!(call.name, "chat gpt-4o");
        assert_eq!(call.kind, SpanKind::Client as i32);
        let int = |key: &str| {
            call.attributes.iter().find(|a| a.key == key).and_then(|a| {
                match a.value.as_ref()?.value.as_ref()? {
                    Value::IntValue(n) => Some(*n),
                    _ => None,
                }
            })
        };
        assert_eq!(int("gen_ai.usage.input_tokens"), Some(120));
        assert_eq!(int("gen_ai.usage.output_tokens"), Some(7));
        assert_eq!(records[1].span_id, call.span_id);
        // Another request is another trace.
        assert_ne!(trace_of("r2", None).0, decision.trace_id);
        assert!(decision.parent_span_id.is_empty(), "a root span");

        // With the agent's traceparent, both spans join the agent's trace, under its span.
        let agent = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let (spans, _) = convert(&[
            Event::Decided(Decided {
                request_id: "r3".into(),
                decision: "allowed",
                trace: agent,
                ..Decided::default()
            }),
            Event::Charged {
                request_id: "r3".into(),
                started_ms: 1_700_000_000_000,
                key_id: "k1".into(),
                micros: 900,
                llm: Some(llm),
                trace: agent,
            },
        ]);
        let agent = agent.unwrap();
        assert_eq!(spans[0].trace_id, agent.trace_id);
        assert_eq!(spans[0].parent_span_id, agent.span_id);
        assert_eq!(spans[1].trace_id, agent.trace_id);
        assert_eq!(spans[1].parent_span_id, spans[0].span_id);
    }
}
