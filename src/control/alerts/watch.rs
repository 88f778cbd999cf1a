//! One subject's baseline — a key on a proxy, or the proxy as a whole — and when it
//! departs from it. Pure arithmetic on the times it is given, so tests drive it.
//!
//! Counts are taken over a sliding window (this fixed window's count plus the previous
//! one's, weighted by how much of it still overlaps), and the baseline is an
//! exponentially weighted mean of whole windows, each weighing `window / baseline`.
//! A subject with no history has a baseline of zero: only the floor (`min`) stands
//! between a new key's first burst and an alert, which is the point.

use std::collections::HashSet;
use std::sync::Arc;

use crate::dataplane::snapshot::AlertRule;

/// What fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Requests,
    Denials,
    Errors,
    SpendNearCap,
    NewPath,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Denials => "denials",
            Kind::Errors => "errors",
            Kind::SpendNearCap => "spend_near_cap",
            Kind::NewPath => "new_path",
        }
    }

    /// Whether it may quarantine the key: the kinds that say it is misbehaving now.
    pub fn quarantines(self) -> bool {
        matches!(self, Kind::Requests | Kind::Denials | Kind::Errors)
    }

    const ALL: usize = 5;

    fn index(self) -> usize {
        self as usize
    }
}

/// A departure: what was seen against what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub kind: Kind,
    pub observed: f64,
    pub baseline: f64,
    pub threshold: f64,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    requests: f64,
    denials: f64,
    answers: f64,
    errors: f64,
}

/// The most path shapes a proxy remembers, and a key; past it, new ones are not
/// alerted on.
pub const MAX_PATHS: usize = 1024;
pub const MAX_KEY_PATHS: usize = 64;

pub struct Watch {
    pub rule: Arc<AlertRule>,
    start_ms: i64,
    current: Counts,
    previous: Counts,
    /// Per whole window.
    baseline: Counts,
    first_ms: i64,
    pub last_ms: i64,
    /// When each kind last fired: one alert per kind per window (spend: per baseline).
    fired_ms: [Option<i64>; Kind::ALL],
    /// Path shapes seen, at most `max_paths`.
    paths: HashSet<String>,
    max_paths: usize,
}

/// What one request told.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen<'a> {
    pub request: bool,
    pub denied: bool,
    /// The vendor answered: whether the answer counts as an error (which of its statuses
    /// do is the caller's to say: a key's own or the whole proxy's).
    pub answered: Option<bool>,
    pub near_cap: bool,
    /// The path of a forwarded request, when the proxy alerts on new paths.
    pub path: Option<&'a str>,
}

impl Watch {
    /// `max_paths`: [`MAX_PATHS`] for a proxy, [`MAX_KEY_PATHS`] for a key.
    pub fn new(rule: Arc<AlertRule>, now_ms: i64, max_paths: usize) -> Self {
        Self {
            rule,
            start_ms: now_ms,
            current: Counts::default(),
            previous: Counts::default(),
            baseline: Counts::default(),
            first_ms: now_ms,
            last_ms: now_ms,
            fired_ms: [None; Kind::ALL],
            paths: HashSet::new(),
            max_paths,
        }
    }

    /// Moves the windows on to `now_ms`, folding finished ones into the baseline.
    fn roll(&mut self, now_ms: i64) {
        let window = self.rule.window_ms as i64;
        if now_ms < self.start_ms + window {
            return;
        }
        let alpha = self.rule.window_ms as f64 / self.rule.baseline_ms as f64;
        let passed = (now_ms - self.start_ms) / window;
        let fold = |base: &mut Counts, w: &Counts| {
            base.requests += alpha * (w.requests - base.requests);
            base.denials += alpha * (w.denials - base.denials);
            base.answers += alpha * (w.answers - base.answers);
            base.errors += alpha * (w.errors - base.errors);
        };
        fold(&mut self.baseline, &self.current.clone());
        // Windows with nothing in them pull the baseline down too.
        let empty = (passed - 1).min(100_000) as i32;
        let decay = (1.0 - alpha).powi(empty);
        for v in [
            &mut self.baseline.requests,
            &mut self.baseline.denials,
            &mut self.baseline.answers,
            &mut self.baseline.errors,
        ] {
            *v *= decay;
        }
        self.previous = if passed == 1 {
            self.current
        } else {
            Counts::default()
        };
        self.current = Counts::default();
        self.start_ms += passed * window;
    }

    /// The sliding window's counts at `now_ms`.
    fn sliding(&self, now_ms: i64) -> Counts {
        let overlap = 1.0 - (now_ms - self.start_ms) as f64 / self.rule.window_ms as f64;
        let w = overlap.clamp(0.0, 1.0);
        Counts {
            requests: self.current.requests + w * self.previous.requests,
            denials: self.current.denials + w * self.previous.denials,
            answers: self.current.answers + w * self.previous.answers,
            errors: self.current.errors + w * self.previous.errors,
        }
    }

    fn may_fire(&mut self, kind: Kind, now_ms: i64) -> bool {
        let quiet = match kind {
            Kind::SpendNearCap => self.rule.baseline_ms,
            _ => self.rule.window_ms,
        } as i64;
        let slot = &mut self.fired_ms[kind.index()];
        if slot.is_some_and(|t| now_ms - t < quiet) {
            return false;
        }
        *slot = Some(now_ms);
        true
    }

    /// Takes one request (or its answer) in; what it set off.
    pub fn observe(&mut self, seen: Seen<'_>, now_ms: i64) -> Vec<Fired> {
        self.roll(now_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let rule = self.rule.clone();
        let spec = &rule.spec;
        let mut out = Vec::new();
        if seen.request {
            self.current.requests += 1.0;
        }
        if seen.denied {
            self.current.denials += 1.0;
        }
        if let Some(error) = seen.answered {
            self.current.answers += 1.0;
            if error {
                self.current.errors += 1.0;
            }
        }
        let now = self.sliding(now_ms);
        let window_s = self.rule.window_ms / 1000;
        let surges = [
            (
                Kind::Requests,
                &spec.requests,
                now.requests,
                self.baseline.requests,
                seen.request,
            ),
            (
                Kind::Denials,
                &spec.denials,
                now.denials,
                self.baseline.denials,
                seen.denied,
            ),
        ];
        for (kind, surge, observed, baseline, touched) in surges {
            let Some(surge) = surge else { continue };
            let threshold = (surge.factor * baseline).max(f64::from(surge.min));
            if touched && observed >= threshold && self.may_fire(kind, now_ms) {
                out.push(Fired {
                    kind,
                    observed,
                    baseline,
                    threshold,
                    message: format!(
                        "{} {} in the last {window_s} s against a baseline of {baseline:.1} (alerts at {threshold:.1}: {}× baseline, at least {})",
                        observed.round(),
                        kind.as_str(),
                        surge.factor,
                        surge.min
                    ),
                });
            }
        }
        if let (Some(errors), Some(_)) = (&spec.errors, seen.answered)
            && now.answers >= f64::from(errors.min)
        {
            let share = now.errors / now.answers;
            if share >= errors.share && self.may_fire(Kind::Errors, now_ms) {
                out.push(Fired {
                    kind: Kind::Errors,
                    observed: share,
                    baseline: if self.baseline.answers > 0.0 {
                        self.baseline.errors / self.baseline.answers
                    } else {
                        0.0
                    },
                    threshold: errors.share,
                    message: format!(
                        "{:.0} % of the vendor's last {} answers were 4xx or 5xx (alerts at {:.0} %)",
                        share * 100.0,
                        now.answers.round(),
                        errors.share * 100.0
                    ),
                });
            }
        }
        if spec.spend_near_cap && seen.near_cap && self.may_fire(Kind::SpendNearCap, now_ms) {
            out.push(Fired {
                kind: Kind::SpendNearCap,
                observed: 0.8,
                baseline: 0.0,
                threshold: 0.8,
                message: "a spend cap is 80 % used (spent and reserved)".to_owned(),
            });
        }
        if let (true, Some(path)) = (spec.new_paths, seen.path) {
            let shape = shape(path);
            let learning = now_ms - self.first_ms < self.rule.baseline_ms as i64;
            if !self.paths.contains(&shape) && self.paths.len() < self.max_paths {
                if learning {
                    self.paths.insert(shape);
                } else if self.may_fire(Kind::NewPath, now_ms) {
                    // One a window: another new shape meanwhile is not learned, so it
                    // is told in a later window.
                    out.push(Fired {
                        kind: Kind::NewPath,
                        observed: 1.0,
                        baseline: 0.0,
                        threshold: 1.0,
                        message: format!("first request to {shape}"),
                    });
                    self.paths.insert(shape);
                }
            }
        }
        out
    }
}

/// A path with what varies per object (segments with a digit, but for versions such as
/// `v1`, or long ones) read as `*`,
/// so `/v1/customers/cus_9/charges` and `/v1/customers/cus_10/charges` are one shape.
pub fn shape(path: &str) -> String {
    let mut out = String::new();
    for segment in path.split('/').skip(1).take(16) {
        out.push('/');
        let version = segment.len() <= 4
            && segment.starts_with('v')
            && segment[1..].bytes().all(|b| b.is_ascii_digit());
        if (segment.bytes().any(|b| b.is_ascii_digit()) && !version) || segment.len() > 24 {
            out.push('*');
        } else {
            out.extend(segment.chars().take(24));
        }
    }
    if out.is_empty() { "/".to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Alerts;

    fn rule(yaml: &str) -> Arc<AlertRule> {
        let spec: Alerts = serde_norway::from_str(yaml).unwrap();
        let spans = spec.spans().unwrap();
        Arc::new(AlertRule {
            spec,
            window_ms: spans.window_ms,
            baseline_ms: spans.baseline_ms,
        })
    }

    fn request() -> Seen<'static> {
        Seen {
            request: true,
            ..Seen::default()
        }
    }

    #[test]
    fn a_new_key_fires_at_the_floor_once_per_window() {
        let mut w = Watch::new(rule("requests: { factor: 5, min: 30 }"), 0, MAX_PATHS);
        let fired: Vec<_> = (0..100)
            .flat_map(|i| w.observe(request(), i * 10))
            .collect();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].kind, Kind::Requests);
        assert_eq!((fired[0].observed, fired[0].threshold), (30.0, 30.0));
        // A window after it fired, it fires again while the burst goes on.
        assert!(w.observe(request(), 60_001).is_empty());
        assert_eq!(w.observe(request(), 60_300).len(), 1);
    }

    #[test]
    fn a_steady_key_is_quiet_and_five_times_its_baseline_fires() {
        let mut w = Watch::new(
            rule("requests: { factor: 5, min: 30 }\nbaseline: 10m"),
            0,
            MAX_PATHS,
        );
        // 20 a minute for an hour: the baseline learns 20.
        let mut t = 0;
        for _ in 0..60 {
            for i in 0..20 {
                assert!(
                    w.observe(request(), t + i * 3_000).is_empty(),
                    "steady at {t}"
                );
            }
            t += 60_000;
        }
        assert!((w.baseline.requests - 20.0).abs() < 1.0, "{:?}", w.baseline);
        // A burst: 100 in the next few seconds (5× 20, past the floor).
        let fired: Vec<_> = (0..120)
            .flat_map(|i| w.observe(request(), t + i * 10))
            .collect();
        assert_eq!(fired.len(), 1);
        assert!(fired[0].observed >= fired[0].threshold && fired[0].threshold > 90.0);
    }

    #[test]
    fn denials_errors_spend_and_new_paths() {
        let yaml = "denials: { factor: 3, min: 5 }\nerrors: { share: 0.5, min: 4 }\n\
                    spend_near_cap: true\nnew_paths: true\nwindow: 10s\nbaseline: 20s";
        let mut w = Watch::new(rule(yaml), 0, MAX_PATHS);
        let denied = Seen {
            request: true,
            denied: true,
            ..Seen::default()
        };
        let kinds = |f: Vec<Fired>| f.into_iter().map(|f| f.kind).collect::<Vec<_>>();
        assert!((0..4).all(|i| w.observe(denied, i).is_empty()));
        assert_eq!(kinds(w.observe(denied, 5)), [Kind::Denials]);
        let answer = |error| Seen {
            answered: Some(error),
            ..Seen::default()
        };
        assert!(w.observe(answer(false), 6).is_empty());
        assert!(w.observe(answer(true), 7).is_empty());
        assert!(
            w.observe(answer(true), 8).is_empty(),
            "3 answers: under the floor"
        );
        assert_eq!(kinds(w.observe(answer(true), 9)), [Kind::Errors]);
        let near = Seen {
            near_cap: true,
            ..Seen::default()
        };
        assert_eq!(kinds(w.observe(near, 10)), [Kind::SpendNearCap]);
        assert!(w.observe(near, 15_000).is_empty(), "once per baseline");
        let at = |p| Seen {
            path: Some(p),
            ..Seen::default()
        };
        assert!(w.observe(at("/v1/charges/ch_1"), 11).is_empty(), "learning");
        assert!(
            w.observe(at("/v1/charges/ch_2"), 25_000).is_empty(),
            "same shape"
        );
        assert_eq!(kinds(w.observe(at("/v1/refunds"), 25_001)), [Kind::NewPath]);
        assert!(w.observe(at("/v1/refunds"), 25_002).is_empty());
        // Another new shape within the window waits for the next one.
        assert!(w.observe(at("/v1/payouts"), 25_003).is_empty());
        assert_eq!(kinds(w.observe(at("/v1/payouts"), 35_001)), [Kind::NewPath]);
    }

    #[test]
    fn idle_windows_pull_the_baseline_down() {
        let mut w = Watch::new(
            rule("requests: { factor: 2, min: 1 }\nwindow: 10s\nbaseline: 20s"),
            0,
            MAX_PATHS,
        );
        for i in 0..50 {
            w.observe(request(), i);
        }
        w.observe(request(), 10_000);
        let before = w.baseline.requests;
        w.observe(request(), 1_000_000);
        assert!(
            w.baseline.requests < before / 1000.0,
            "{before} {:?}",
            w.baseline
        );
    }

    #[test]
    fn shapes() {
        assert_eq!(
            shape("/v1/customers/cus_9/charges"),
            "/v1/customers/*/charges"
        );
        assert_eq!(shape("/"), "/");
        assert_eq!(shape(""), "/");
        assert_eq!(shape("/a/0123456789abcdefghijklmnopqrstuvwxyz"), "/a/*");
    }

    proptest::proptest! {
        /// Hostile paths and any order of times: no panic, a shape stays short and has no
        /// digits but in versions, and no kind fires twice within a window.
        #[test]
        fn any_traffic_is_judged_calmly(
            events in proptest::collection::vec(
                (0i64..400_000, proptest::bool::ANY, proptest::option::of(proptest::bool::ANY), ".{0,80}"),
                1..300,
            )
        ) {
            let yaml = "requests: { factor: 2, min: 3 }\ndenials: { factor: 2, min: 2 }\n\
                        errors: { share: 0.3, min: 2 }\nnew_paths: true\nspend_near_cap: true\n\
                        window: 10s\nbaseline: 20s";
            let mut w = Watch::new(rule(yaml), 0, MAX_PATHS);
            let mut last: std::collections::HashMap<Kind, i64> = Default::default();
            let mut t = 0;
            for (step, denied, answered, path) in events {
                t += step % 3_000;
                let shaped = shape(&path);
                proptest::prop_assert!(shaped.starts_with('/') && shaped.len() <= 16 * 25);
                let seen = Seen { request: true, denied, answered, near_cap: denied, path: Some(&path) };
                for fired in w.observe(seen, t) {
                    proptest::prop_assert!(fired.observed.is_finite() && fired.threshold.is_finite());
                    if let Some(before) = last.insert(fired.kind, t) {
                        proptest::prop_assert!(t - before >= 10_000, "{:?} twice", fired.kind);
                    }
                }
                proptest::prop_assert!(w.paths.len() <= MAX_PATHS);
            }
        }
    }
}
