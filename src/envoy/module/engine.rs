//! The in-process data plane's safe half: what the Envoy module (a crate of its own,
//! which holds every `unsafe` line) runs for each request. Its connection to `latchkey
//! serve`, over which the policy comes in and the audit goes out, is `link`.
//!
//! One engine per Envoy process. Envoy makes a filter config per listener, and every
//! worker thread runs requests, so the engine is process-global and shared.

mod link;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::base::jwt;
use crate::base::trace::TraceParent;
use crate::dataplane::admission::{self, Asked};
use crate::dataplane::budget::{Budgets, LocalBudgets, SystemClock};
use crate::dataplane::denial::Denial;
use crate::dataplane::keys;
use crate::dataplane::mint;
use crate::dataplane::mutate::Forward;
use crate::dataplane::pipeline::{Caller, Judgement, Outcome, RequestView, Shown, decide_as};
use crate::dataplane::rules::Body;
use crate::dataplane::snapshot::Policy;
use crate::dataplane::spend::{LocalSpend, Spend};
use crate::envoy::convert;
use crate::envoy::module::outbox::{Deciding, Outbox};
use crate::envoy::module::wire::{Ending, Record};

/// What the module does with a request.
pub enum Verdict {
    /// Leave it to ext_proc, next in Envoy's chain: `latchkey serve` decides it.
    HandOn,
    /// Let it go upstream, changed so.
    Forward { forward: Forward, shown: Shown },
    /// Answer it in the upstream's place.
    Deny {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
}

/// A request as the module reads it from Envoy.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
    /// Whether a body follows the headers.
    pub has_body: bool,
}

/// A request the module decided, kept until Envoy says how it ended.
pub struct Pending {
    record: Record,
    started: Instant,
    _deciding: Deciding,
}

struct Loaded {
    policy: Policy,
    /// The proxies decided here (`Policy::in_process`); the rest are handed on. Keys
    /// play no part in it: a change of keys keeps it.
    local: Arc<foldhash::HashSet<Arc<str>>>,
    version: i64,
}

pub struct Engine {
    loaded: ArcSwapOption<Loaded>,
    budgets: Budgets,
    /// Never charged here (priced proxies are handed on); `admission` asks for one.
    spend: Spend,
    outbox: Outbox,
    connecting: AtomicBool,
}

/// How the engine reports what Envoy's log should show.
pub type Log = fn(error: bool, message: &str);

impl Engine {
    /// The process's engine.
    pub fn global() -> &'static Engine {
        static ENGINE: OnceLock<Engine> = OnceLock::new();
        ENGINE.get_or_init(Engine::new)
    }

    fn new() -> Self {
        Engine {
            loaded: ArcSwapOption::empty(),
            budgets: Budgets::Local(LocalBudgets::new(Arc::new(SystemClock))),
            spend: Spend::Local(LocalSpend::default()),
            outbox: Outbox::default(),
            connecting: AtomicBool::new(false),
        }
    }

    /// The policy version in force, if one arrived.
    pub fn version(&self) -> Option<i64> {
        self.loaded.load().as_ref().map(|l| l.version)
    }

    /// Steps 1 to 6 for a request, from the snapshot and the counters in this process.
    pub fn judge(&'static self, req: &Request<'_>, now_ms: i64) -> (Verdict, Option<Pending>) {
        let started = Instant::now();
        // Counted before the policy is read: a closing channel that no longer sees it
        // sees the policy gone, and this request hands on.
        let deciding = self.outbox.deciding();
        // Until the first policy arrives, `serve` decides everything.
        let Some(loaded) = self.loaded.load_full() else {
            return (Verdict::HandOn, None);
        };
        // latchkey's own endpoint, and workload tokens (their issuers' keys are fetched).
        let presented = keys::presented(req.headers);
        let token = presented.as_ref().is_ok_and(|k| jwt::looks_like(k));
        if token || mint::is_own(req.path) {
            return (Verdict::HandOn, None);
        }
        // As ext_proc names it: Envoy's id, or a fresh one if the client's is unusable.
        let request_id = convert::request_id(req.headers);
        let view = RequestView {
            method: req.method,
            path: req.path,
            headers: req.headers,
            body: (!req.has_body).then_some(&[][..]),
        };
        let body = if req.has_body {
            Body::Unread
        } else {
            Body::Empty
        };
        let caller = Caller::Presented(&presented);
        let Judgement::Decided(mut decision) =
            decide_as(&loaded.policy, &view, &body, caller, now_ms)
        else {
            return (Verdict::HandOn, None);
        };
        let elsewhere =
            (decision.subject.proxy.as_ref()).is_some_and(|p| !loaded.local.contains(p));
        // `in_process` hands these proxies on already; a decision that still asks for
        // any of them is not this module's to make.
        let waits = decision.token.is_some()
            || decision.approval.is_some()
            || decision.duplicate.is_some()
            || decision.charge.is_some()
            || decision.guard.is_some();
        if elsewhere || waits {
            return (Verdict::HandOn, None);
        }
        // `serve` is not keeping up with the audit: ext_proc, which waits for it,
        // decides until it does, rather than records piling up in Envoy. But not a
        // request that counts against limits, which are counted here: `serve` would
        // count it afresh on counters of its own, and an agent that flooded the audit
        // would get its limits twice over. It is refused until `serve` catches up.
        if self.outbox.behind() {
            if decision.limits.is_empty() {
                return (Verdict::HandOn, None);
            }
            if matches!(decision.outcome, Outcome::Forward(_)) {
                decision.outcome = Outcome::Deny(Denial::BudgetUnavailable);
            }
        }
        let asked = Asked {
            request_id: &request_id,
            method: req.method,
            path: req.path,
            trace: convert::header_value(req.headers, "traceparent").and_then(TraceParent::parse),
        };
        let admitting = admission::admit(&self.budgets, &self.spend, &mut decision, &request_id);
        // Counters in memory answer at once; should one ever wait, the request is
        // refused rather than let through uncounted.
        let near_cap = ready(admitting).unwrap_or_else(|| {
            decision.outcome = Outcome::Deny(Denial::BudgetUnavailable);
            false
        });
        let decided = admission::decided(&asked, &decision, started.elapsed(), near_cap);
        let pending = Pending {
            record: Record::of(decided),
            started,
            _deciding: deciding,
        };
        let verdict = match decision.outcome {
            Outcome::Forward(forward) => Verdict::Forward {
                forward,
                shown: decision.shown,
            },
            Outcome::Deny(denial) => Verdict::Deny {
                status: denial.http_status(),
                headers: convert::denial_headers(&denial),
                body: denial.body(&request_id),
            },
        };
        (verdict, Some(pending))
    }

    /// A decided request ended (Envoy's figures in `ending`, but for the latency,
    /// measured here): its record goes to `serve` with the next batch.
    pub fn ended(&self, pending: Pending, mut ending: Ending) {
        let mut record = pending.record;
        ending.latency_ms = Some(pending.started.elapsed().as_secs_f64() * 1000.0);
        record.completed = Some(ending);
        self.outbox.push(record);
    }

    /// Waits up to `timeout` for every record to reach `serve`; how many did not.
    pub fn drain(&self, timeout: Duration) -> u64 {
        self.outbox.drain(timeout)
    }

    /// Records decided, sent and dropped (the queue full while `serve` was away).
    pub fn counts(&self) -> (u64, u64, u64) {
        self.outbox.counts()
    }
}

/// The output of a future that needs nothing to wait for, or `None` if it would wait.
fn ready<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::base::crypto::MasterKey;
    use crate::envoy::module::wire::{BUILD, Batch, Push, frame, read_frame};
    use crate::store::memory;

    pub(super) const POLICY: &str = r#"
targets:
  - { name: vendor, url: "https://api.vendor.example/base" }
credentials:
  - { name: vendor-key, type: target, auth: bearer, secret: { value: sk_vendor_1234 } }
  - name: agent
    type: proxy
    keys: [{ value: lk_agentKEY0000000000000001 }]
    limits: { requests_per_minute: 2 }
  - { name: reader, type: proxy, keys: [{ value: lk_readerKEY000000000000001 }] }
  - { name: free, type: proxy, keys: [{ value: lk_freeKEY00000000000000001 }] }
proxies:
  - { name: api, target: vendor, target_credential: vendor-key, proxy_credentials: [agent], default_effect: allow }
  - { name: open, target: vendor, target_credential: vendor-key, proxy_credentials: [free], default_effect: allow }
  - { name: bodied, target: vendor, target_credential: vendor-key, proxy_credentials: [reader] }
rules:
  - { proxy: api, id: no-admin, effect: deny, path: "^/admin" }
  - { proxy: bodied, effect: deny, body: [{ pointer: /amount, gt: 100 }] }
"#;

    /// `POLICY` as `serve` pushes it, through a frame.
    pub(super) fn push() -> Push {
        let key = MasterKey::generate();
        let master = MasterKey::parse(&key).unwrap();
        let push = Push {
            build: BUILD.to_owned(),
            version: 7,
            shared_budgets: false,
            channel_key: key.into(),
            stored: memory::stored(POLICY, &master).unwrap(),
            server: Vec::new(),
            server_generation: 0,
            counts: Vec::new(),
        };
        let bytes = frame(&push).unwrap();
        read_frame(&mut &bytes[..]).unwrap().unwrap()
    }

    /// An engine of its own, given `POLICY`.
    pub(super) fn engine() -> &'static Engine {
        let engine: &'static Engine = Box::leak(Box::new(Engine::new()));
        engine
            .loaded
            .store(Some(Arc::new(link::load(push()).unwrap())));
        engine
    }

    pub(super) fn ask(
        engine: &'static Engine,
        path: &str,
        key: &str,
        body: bool,
    ) -> (Verdict, Option<Pending>) {
        let bearer = format!("Bearer {key}");
        let headers = [
            ("authorization", bearer.as_bytes()),
            ("x-request-id", b"r-1".as_slice()),
        ];
        let req = Request {
            method: "GET",
            path,
            headers: &headers,
            has_body: body,
        };
        engine.judge(&req, crate::base::clock::now_unix_ms())
    }

    pub(super) const AGENT: &str = "lk_agentKEY0000000000000001";

    #[test]
    fn decides_headers_counts_limits_and_hands_on_the_rest() {
        let engine = engine();
        assert_eq!(engine.version(), Some(7));
        let (Verdict::Forward { forward, shown }, Some(pending)) =
            ask(engine, "/api/v1/x", AGENT, false)
        else {
            panic!("allowed")
        };
        let auth = forward
            .set
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap();
        assert_eq!(auth.1, b"Bearer sk_vendor_1234");
        assert_eq!(shown.rate, Some((2, 1)));
        assert_eq!(pending.record.decision, "allow");
        let (Verdict::Deny { status, body, .. }, Some(_)) = ask(engine, "/api/admin", AGENT, false)
        else {
            panic!("denied")
        };
        assert_eq!(status, 403);
        assert!(String::from_utf8(body).unwrap().contains("no-admin"));
        assert!(matches!(
            ask(engine, "/api/v1/x", AGENT, false).0,
            Verdict::Forward { .. }
        ));
        let (
            Verdict::Deny {
                status, headers, ..
            },
            _,
        ) = ask(engine, "/api/v1/x", AGENT, false)
        else {
            panic!("limited")
        };
        assert_eq!(status, 429);
        assert!(headers.iter().any(|(k, _)| *k == "retry-after"));
        // Bodies, tokens and latchkey's own endpoint are `serve`'s.
        let reader = "lk_readerKEY000000000000001";
        assert!(matches!(
            ask(engine, "/bodied/v1/x", reader, true),
            (Verdict::HandOn, None)
        ));
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
        assert!(matches!(
            ask(engine, "/api/v1/x", token, false),
            (Verdict::HandOn, None)
        ));
        assert!(matches!(
            ask(engine, "/latchkey/v1/run-keys", AGENT, false),
            (Verdict::HandOn, None)
        ));
        // Only the first request's record is still to be queued.
        assert_eq!(engine.outbox.deciding.load(Ordering::Acquire), 1);
        drop(pending);
        assert_eq!(engine.outbox.deciding.load(Ordering::Acquire), 0);
    }

    /// Behind on the audit, a request that counts against limits is refused rather
    /// than handed on to `serve`, which would count it on counters of its own.
    #[test]
    fn behind_on_the_audit_limited_requests_are_refused_not_counted_twice() {
        let engine = engine();
        (engine.outbox.queued).store(crate::envoy::module::outbox::HIGH_WATER, Ordering::Release);
        let (Verdict::Deny { status, body, .. }, Some(pending)) =
            ask(engine, "/api/v1/x", AGENT, false)
        else {
            panic!("refused")
        };
        assert_eq!(status, 503);
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("budget_unavailable")
        );
        assert_eq!(pending.record.decision, "budget_unavailable");
        // A rule's denial stays the rule's; nothing was counted for either.
        let (Verdict::Deny { status, .. }, Some(_)) = ask(engine, "/api/admin", AGENT, false)
        else {
            panic!("denied")
        };
        assert_eq!(status, 403);
        // Without limits there is nothing to count twice: `serve` decides.
        let free = "lk_freeKEY00000000000000001";
        assert!(matches!(
            ask(engine, "/open/v1/x", free, false),
            (Verdict::HandOn, None)
        ));
        // Caught up: decided here again, and both requests of the limit of 2 are still
        // there.
        engine.outbox.queued.store(0, Ordering::Release);
        assert!(matches!(
            ask(engine, "/open/v1/x", free, false).0,
            Verdict::Forward { .. }
        ));
        for _ in 0..2 {
            assert!(matches!(
                ask(engine, "/api/v1/x", AGENT, false).0,
                Verdict::Forward { .. }
            ));
        }
    }

    /// A key missing, or two of them, or a malformed one: refused as the pipeline
    /// refuses it when it reads the key itself.
    #[test]
    fn a_key_read_once_is_refused_as_one_read_in_the_pipeline() {
        let engine = engine();
        let loaded = engine.loaded.load_full().unwrap();
        let bearer = format!("Bearer {AGENT}");
        let cases: [&[(&str, &[u8])]; 3] = [
            &[("x-request-id", b"r-1")],
            &[
                ("authorization", bearer.as_bytes()),
                ("x-api-key", b"lk_otherKEY0000000000000001"),
            ],
            &[("authorization", b"Bearer lk_short")],
        ];
        for headers in cases {
            let req = Request {
                method: "GET",
                path: "/api/v1/x",
                headers,
                has_body: false,
            };
            let (Verdict::Deny { status, body, .. }, Some(pending)) = engine.judge(&req, 0) else {
                panic!("refused")
            };
            let view = RequestView {
                method: "GET",
                path: "/api/v1/x",
                headers,
                body: Some(&[]),
            };
            let read_there =
                crate::dataplane::pipeline::decide(&loaded.policy, &view, &Body::Empty, 0);
            let Judgement::Decided(decision) = read_there else {
                panic!("decided")
            };
            let Outcome::Deny(denial) = decision.outcome else {
                panic!("refused there too")
            };
            assert_eq!(status, denial.http_status());
            assert_eq!(pending.record.decision, denial.kind().as_str());
            assert!(
                String::from_utf8(body)
                    .unwrap()
                    .contains(denial.kind().as_str())
            );
        }
    }

    #[test]
    fn without_a_policy_everything_is_handed_on() {
        let engine: &'static Engine = Box::leak(Box::new(Engine::new()));
        assert!(matches!(
            ask(engine, "/api/v1/x", AGENT, false),
            (Verdict::HandOn, None)
        ));
    }

    #[test]
    fn a_record_crosses_the_channel_whole() {
        let engine = engine();
        let (_, Some(pending)) = ask(engine, "/api/admin?x=1", AGENT, false) else {
            panic!("decided")
        };
        let ending = Ending {
            status: Some(403),
            ..Ending::default()
        };
        engine.ended(pending, ending);
        assert_eq!(engine.counts(), (1, 0, 0));
        assert_eq!(engine.outbox.deciding.load(Ordering::Acquire), 0);
        let record = engine.outbox.queue.lock().unwrap().pop_front().unwrap();
        let batch = Batch {
            records: vec![record],
            version: Some(7),
            counts: Vec::new(),
        };
        let bytes = batch.frame();
        let mut batch = Batch::parse(&bytes[4..]).unwrap();
        let (decided, completed) = batch.records.remove(0).into_events().unwrap();
        assert_eq!(decided.decision, "rule_denied");
        assert_eq!(decided.path, "/admin", "the upstream path, no query");
        assert_eq!(decided.rule_id.as_deref(), Some("no-admin"));
        assert_eq!(decided.status, Some(403));
        let completed = completed.unwrap();
        assert_eq!(
            (completed.status, completed.request_id.as_str()),
            (Some(403), "r-1")
        );
        assert!(completed.latency_ms.is_some());
    }
}
