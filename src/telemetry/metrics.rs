//! The Prometheus metrics every part of a running `serve` counts into.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::audit::Llm;
use crate::telemetry::audit::AuditCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    proxy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// Only names from the policy: never a value a client made up.
    proxy: String,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PricingLabels {
    proxy: String,
    /// `unpriced` (charged its reservation), `closed` (no reservation: the account is
    /// closed) or `over_reservation` (priced above it, charged in full).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    proxy: String,
    /// The price-table entry a call was priced by (`*` for any other model): a name
    /// from the policy, never the model a client wrote.
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    proxy: String,
    model: String,
    /// `input`, `cached_input` or `output`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    /// `2xx` … `5xx`, or `none` when the client left before any status.
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub proxy: String,
    /// `requests`, `denials`, `errors`, `spend_near_cap` or `new_path`.
    pub kind: &'static str,
}

/// The anomaly alerts' counters.
#[derive(Clone, Default)]
pub struct AlertCounters {
    pub fired: Family<AlertLabels, Counter>,
    /// Keys an alert quarantined.
    pub quarantined: Counter,
    /// Batches of observations the alerts had no room for.
    pub dropped: Counter,
    /// Webhook posts that failed every attempt.
    pub dead_letters: Counter,
}

pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    responses: Family<StatusLabels, Counter>,
    /// The store's policy version the running snapshot was built from.
    pub policy_version: Gauge,
    pub policy_reload_failures: Counter,
    /// Reads of a secret the server reads itself (mounted, AWS) that failed.
    pub secret_read_failures: Counter,
    decision_seconds: Histogram,
    echoes: Family<ProxyLabels, Counter>,
    redactions: Family<ProxyLabels, Counter>,
    pricing: Family<PricingLabels, Counter>,
    near_cap: Family<ProxyLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    spend_micros: Family<ModelLabels, Counter>,
    pub audit: AuditCounters,
    audit_queued: Gauge,
    pub alerts: AlertCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("latchkey");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Requests decided, by proxy and decision",
            decisions.clone(),
        );
        let responses = Family::<StatusLabels, Counter>::default();
        registry.register(
            "responses",
            "Finished requests by the status class the agent got, from Envoy's access log",
            responses.clone(),
        );
        // Which build answers: `latchkey_build_info{version="…"} 1`.
        registry.register(
            "build",
            "The latchkey build serving",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "The store's policy version this replica runs (every apply, key issue and revoke moves it)",
            policy_version.clone(),
        );
        let policy_reload_failures = Counter::default();
        registry.register(
            "policy_reload_failures",
            "Policy reloads that failed (the running policy stays, with the store's revocations)",
            policy_reload_failures.clone(),
        );
        let secret_read_failures = Counter::default();
        registry.register(
            "secret_read_failures",
            "Reads of a mounted or AWS secret that failed (a secret read before keeps its last value)",
            secret_read_failures.clone(),
        );
        // 5 µs to 40 ms: latchkey's own time per decision, budgets included.
        let decision_seconds = Histogram::new(exponential_buckets(5e-6, 2.0, 14));
        registry.register(
            "decision_seconds",
            "Time latchkey took to decide a request, budget checks included",
            decision_seconds.clone(),
        );
        let echoes = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "credential_echoes",
            "Echoes of the target credential scrubbed from upstream responses",
            echoes.clone(),
        );
        let redactions = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "redacted_fields",
            "JSON response fields redacted",
            redactions.clone(),
        );
        let near_cap = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "spend_near_cap",
            "Requests admitted that left a spend cap 80 % or more used (spent and reserved)",
            near_cap.clone(),
        );
        let pricing = Family::<PricingLabels, Counter>::default();
        registry.register(
            "pricing_exceptions",
            "Priced responses that could not be priced, or cost more than was reserved",
            pricing.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "llm_tokens",
            "Tokens LLM answers reported, by proxy, priced model and kind",
            tokens.clone(),
        );
        let spend_micros = Family::<ModelLabels, Counter>::default();
        registry.register(
            "spend_micro_usd",
            "What priced responses were charged, in micro-dollars, by proxy and priced model",
            spend_micros.clone(),
        );
        let audit = AuditCounters::default();
        registry.register(
            "audit_events_written",
            "Audit events stored",
            audit.written.clone(),
        );
        registry.register(
            "audit_waits",
            "Times a request waited because the audit queue was full",
            audit.waited.clone(),
        );
        registry.register(
            "audit_events_dropped",
            "Audit events lost because the writer had stopped (only at shutdown)",
            audit.dropped.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed audit batch writes (each is retried)",
            audit.write_errors.clone(),
        );
        registry.register(
            "otlp_batches_dropped",
            "Telemetry batches dropped because the OTLP collector fell behind",
            audit.otlp_dropped.clone(),
        );
        let audit_queued = Gauge::default();
        registry.register(
            "audit_queue_depth",
            "Audit events waiting to be written",
            audit_queued.clone(),
        );
        let alerts = AlertCounters::default();
        registry.register(
            "alerts",
            "Anomaly alerts fired, by proxy and kind",
            alerts.fired.clone(),
        );
        registry.register(
            "keys_quarantined",
            "Keys quarantined by an anomaly alert",
            alerts.quarantined.clone(),
        );
        registry.register(
            "alert_batches_dropped",
            "Batches of requests the anomaly alerts had no room for (not judged)",
            alerts.dropped.clone(),
        );
        registry.register(
            "webhook_dead_letters",
            "Webhook posts that failed every attempt and went to the dead-letter log",
            alerts.dead_letters.clone(),
        );
        Self {
            registry,
            decisions,
            responses,
            policy_version,
            policy_reload_failures,
            secret_read_failures,
            decision_seconds,
            echoes,
            redactions,
            pricing,
            near_cap,
            tokens,
            spend_micros,
            audit,
            audit_queued,
            alerts,
        }
    }
}

impl Metrics {
    /// One decided request: its proxy (empty when none was found) and its decision.
    pub fn record(&self, proxy: &str, decision: &'static str) {
        let labels = DecisionLabels {
            proxy: proxy.to_owned(),
            decision,
        };
        self.decisions.get_or_create(&labels).inc();
    }

    pub fn record_response(&self, status: Option<u16>) {
        let class = match status.map(|s| s / 100) {
            Some(1) => "1xx",
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(5) => "5xx",
            _ => "none",
        };
        self.responses.get_or_create(&StatusLabels { class }).inc();
    }

    /// Echoes of the credential scrubbed, and fields redacted, from one response.
    pub fn record_response_safety(&self, proxy: &str, echoes: usize, redacted: usize) {
        let labels = ProxyLabels {
            proxy: proxy.to_owned(),
        };
        if echoes > 0 {
            self.echoes.get_or_create(&labels).inc_by(echoes as u64);
        }
        if redacted > 0 {
            self.redactions
                .get_or_create(&labels)
                .inc_by(redacted as u64);
        }
    }

    /// An admitted request that left a spend cap 80 % or more used.
    pub fn record_near_cap(&self, proxy: &str) {
        self.near_cap
            .get_or_create(&ProxyLabels {
                proxy: proxy.to_owned(),
            })
            .inc();
    }

    /// A priced response that was not charged as priced (see [`PricingLabels`]).
    pub fn record_pricing_exception(&self, proxy: &str, outcome: &'static str) {
        self.pricing
            .get_or_create(&PricingLabels {
                proxy: proxy.to_owned(),
                outcome,
            })
            .inc();
    }

    /// An LLM call's tokens and what it was charged.
    pub fn record_llm(&self, proxy: &str, llm: &Llm, micros: u64) {
        let model = llm.priced_as.as_deref().unwrap_or("none").to_owned();
        for (kind, n) in [
            ("input", llm.usage.input),
            ("cached_input", llm.usage.cached_input),
            ("output", llm.usage.output),
        ] {
            self.tokens
                .get_or_create(&TokenLabels {
                    proxy: proxy.to_owned(),
                    model: model.clone(),
                    kind,
                })
                .inc_by(n);
        }
        self.spend_micros
            .get_or_create(&ModelLabels {
                proxy: proxy.to_owned(),
                model,
            })
            .inc_by(micros);
    }

    pub fn observe_decision(&self, elapsed: std::time::Duration) {
        self.decision_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn encode(&self, audit_queued: usize) -> String {
        self.audit_queued
            .set(i64::try_from(audit_queued).unwrap_or(i64::MAX));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
