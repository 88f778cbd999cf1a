//! Step 6, budgets: request rate limits per proxy and per proxy credential.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): a limit of `L` requests per
//! period `P` admits one request every `T = P / L`, with a burst of up to `L` at once. Its
//! state is one timestamp per limit (the theoretical arrival time), so it needs no window
//! boundaries and has none of a fixed window's edge burst: at most `L` requests pass in
//! any instant, and at most `L + t / T` in any span `t`.
//!
//! Two stores behind one type: per replica in memory (one map, bounded), or shared in Redis
//! (one Lua script checks and updates every limit of a request atomically, on Redis's
//! clock).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

mod redis;

pub use redis::{RedisBudgets, redis_connection};

/// Milliseconds since the Unix epoch; a trait so tests move time by hand.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::base::clock::now_unix_ms().max(0) as u64
    }
}

/// How far ahead a limit's arrival time can be: a day's period, and the intervals of a
/// few retries counted on top.
const FURTHEST_US: u64 = 2 * 86_400_000_000;
/// The longest store key of a limit (names of a credential, a proxy, a tool).
const LONGEST_KEY: usize = 1024;

/// `limit` requests per `period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u32,
    pub period_ms: u64,
}

impl Rate {
    pub fn per_minute(limit: u32) -> Self {
        Self {
            limit,
            period_ms: 60_000,
        }
    }

    pub fn per_day(limit: u32) -> Self {
        Self {
            limit,
            period_ms: 86_400_000,
        }
    }

    fn period_us(&self) -> u64 {
        self.period_ms * 1000
    }

    /// The spacing between requests at the sustained rate, in µs (at least 1): fine
    /// enough for a million requests a second per limit.
    fn interval_us(&self) -> u64 {
        (self.period_us() / u64::from(self.limit.max(1))).max(1)
    }
}

/// One limit a request counts against, with its store key.
#[derive(Debug, Clone)]
pub struct Limit {
    pub key: Arc<str>,
    pub rate: Rate,
}

/// What a request's limits allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted. The tightest limit and what is left of it, for the rate-limit headers.
    Admitted { limit: u32, remaining: u32 },
    /// Refused; a request would be admitted after this many ms.
    Refused { limit: u32, retry_after_ms: u64 },
}

/// GCRA for one limit, in µs: the new arrival time and what remains, or how long to
/// wait.
pub fn gcra(tat: Option<u64>, now: u64, rate: Rate) -> Result<(u64, u32), u64> {
    let (interval, period) = (rate.interval_us(), rate.period_us());
    let next = tat.unwrap_or(now).max(now) + interval;
    if next - now > period {
        return Err(next - period - now);
    }
    let remaining = (period - (next - now)) / interval;
    Ok((next, remaining.min(u64::from(u32::MAX)) as u32))
}

/// Checks every limit and, only if all admit, counts the request against each. Times
/// in µs.
fn admit_all(limits: &[Limit], now: u64, tats: &mut [Option<u64>]) -> Admission {
    let mut refused: Option<(u32, u64)> = None;
    let mut next = Vec::with_capacity(limits.len());
    let mut tightest = (u32::MAX, u32::MAX);
    for (limit, tat) in limits.iter().zip(tats.iter()) {
        match gcra(*tat, now, limit.rate) {
            Ok((t, remaining)) => {
                next.push(t);
                if remaining < tightest.1 {
                    tightest = (limit.rate.limit, remaining);
                }
            }
            Err(wait) => {
                if refused.is_none_or(|(_, w)| wait > w) {
                    refused = Some((limit.rate.limit, wait));
                }
            }
        }
    }
    if let Some((limit, wait_us)) = refused {
        return Admission::Refused {
            limit,
            retry_after_ms: wait_us.div_ceil(1000),
        };
    }
    for (tat, t) in tats.iter_mut().zip(next) {
        *tat = Some(t);
    }
    Admission::Admitted {
        limit: tightest.0,
        remaining: tightest.1,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the shared budget store is unreachable: {0}")]
pub struct BudgetError(String);

impl BudgetError {
    pub fn new(problem: String) -> Self {
        Self(problem)
    }
}

/// Per replica, in memory.
pub struct LocalBudgets {
    tats: Mutex<Tats>,
    /// Guarded requests seen, by fingerprint: until when a repeat is refused (ms).
    seen: moka::sync::Cache<[u8; 32], u64>,
    /// Requests Envoy may retry, by request id: the limits their retries count against,
    /// one entry per admission (a client may send its own id more than once).
    retriable: moka::sync::Cache<String, Remembered>,
    clock: Arc<dyn Clock>,
}

/// The limits of each admission under one request id, oldest first.
type Remembered = Arc<Mutex<Vec<Arc<[Limit]>>>>;

/// How long a retriable request's limits are kept for its completion: longer than any
/// call with its retries takes.
const RETRIABLE_TTL: Duration = Duration::from_secs(600);

const LOCAL_CAPACITY: u64 = 1_000_000;

/// Each limit's theoretical arrival time (µs), in one map under one lock: a request's
/// limits are checked and counted together, with no lock per limit to order. A time
/// that has passed says no more than no entry (the limit is full again), so such
/// entries are swept out whenever the map has doubled since the last sweep: it holds
/// the limits in use, at amortised constant cost. Were [`LOCAL_CAPACITY`] of them in
/// use at once, a request that would add one more is refused, not let through
/// uncounted.
struct Tats {
    /// foldhash, as the policy's maps: limits are named by the policy, not the agent.
    by_key: foldhash::HashMap<Arc<str>, u64>,
    sweep_at: usize,
    capacity: usize,
    /// When the last sweep was (µs).
    swept: u64,
}

/// The smallest map that is swept.
const SWEEP_FLOOR: usize = 1024;

impl Default for Tats {
    fn default() -> Self {
        Self {
            by_key: foldhash::HashMap::default(),
            sweep_at: SWEEP_FLOOR,
            capacity: LOCAL_CAPACITY as usize,
            swept: 0,
        }
    }
}

impl Tats {
    fn get(&self, key: &str) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// Whether `adding` more entries fit, after a sweep if the map has doubled since the
    /// last, or would be full (then at most once a second: a map full of limits in use
    /// is not swept in vain on every request).
    fn room(&mut self, adding: usize, now: u64) -> bool {
        if adding == 0 {
            return true;
        }
        let wanted = self.by_key.len() + adding;
        if wanted > self.sweep_at || (wanted > self.capacity && now >= self.swept + 1_000_000) {
            self.by_key.retain(|_, tat| *tat > now);
            self.sweep_at = (2 * self.by_key.len()).max(SWEEP_FLOOR);
            self.swept = now;
        }
        self.by_key.len() + adding <= self.capacity
    }

    fn set(&mut self, key: &Arc<str>, tat: u64) {
        match self.by_key.get_mut(&**key) {
            Some(slot) => *slot = tat,
            None => {
                self.by_key.insert(key.clone(), tat);
            }
        }
    }
}

impl LocalBudgets {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            tats: Mutex::default(),
            // The longest duplicate window is a day.
            seen: moka::sync::Cache::builder()
                .max_capacity(LOCAL_CAPACITY)
                .time_to_live(Duration::from_secs(86_400 + 60))
                .build(),
            retriable: moka::sync::Cache::builder()
                .max_capacity(LOCAL_CAPACITY)
                .time_to_live(RETRIABLE_TTL)
                .build(),
            clock,
        }
    }

    /// Counts `attempts` more requests against each limit, admitted or not: the retries
    /// Envoy made happened. A limit in debt refuses until it is paid off.
    fn charge(&self, limits: &[Limit], attempts: u32) {
        self.charge_at(limits, attempts, self.clock.now_ms());
    }

    /// As [`LocalBudgets::charge`], for requests made at `at_ms`.
    fn charge_at<'a>(
        &self,
        limits: impl IntoIterator<Item = &'a Limit>,
        attempts: u32,
        at_ms: u64,
    ) {
        let now = at_ms * 1000;
        // A poisoned map still holds valid timestamps.
        let mut tats = self.tats.lock().unwrap_or_else(PoisonError::into_inner);
        for limit in limits {
            let from = tats.get(&limit.key).unwrap_or(now).max(now);
            tats.set(
                &limit.key,
                from + u64::from(attempts) * limit.rate.interval_us(),
            );
        }
    }

    /// The limits in use (those a request counted against lately): each one's
    /// theoretical arrival time, in µs since the Unix epoch, which another process on
    /// the host reads alike.
    fn in_use(&self) -> Vec<(String, u64)> {
        let now = self.clock.now_ms() * 1000;
        let tats = self.tats.lock().unwrap_or_else(PoisonError::into_inner);
        (tats.by_key.iter())
            .filter(|(_, tat)| **tat > now)
            .map(|(key, tat)| (key.to_string(), *tat))
            .collect()
    }

    /// Takes up counts made elsewhere: each limit's is the later of its own and the one
    /// given, so nothing counted here is forgotten. A count no limit could have made (an
    /// arrival time more than [`FURTHEST_US`] ahead, which would also overflow the
    /// arithmetic, or a key past [`LONGEST_KEY`]) is left out.
    fn take_up(&self, counts: &[(String, u64)]) {
        let now = self.clock.now_ms() * 1000;
        let mut tats = self.tats.lock().unwrap_or_else(PoisonError::into_inner);
        let possible = |(key, tat): &&(String, u64)| {
            *tat > now && *tat - now <= FURTHEST_US && key.len() <= LONGEST_KEY
        };
        for (key, tat) in counts.iter().filter(possible) {
            let own = tats.get(key);
            if own.is_some_and(|own| own >= *tat) || (own.is_none() && !tats.room(1, now)) {
                continue;
            }
            tats.set(&Arc::from(key.as_str()), *tat);
        }
    }

    /// Whether a request of this fingerprint is new (then remembered for `window_ms`),
    /// rather than a repeat within the window. One at a time per fingerprint.
    fn first_seen(&self, fingerprint: [u8; 32], window_ms: u64) -> bool {
        let now = self.clock.now_ms();
        let result = self
            .seen
            .entry(fingerprint)
            .and_compute_with(|seen| match seen {
                Some(until) if *until.value() > now => moka::ops::compute::Op::Nop,
                _ => moka::ops::compute::Op::Put(now + window_ms),
            });
        !matches!(result, moka::ops::compute::CompResult::Unchanged(_))
    }

    pub fn admit(&self, limits: &[Limit]) -> Admission {
        let now = self.clock.now_ms() * 1000;
        let mut tats = self.tats.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current: Vec<Option<u64>> = limits.iter().map(|l| tats.get(&l.key)).collect();
        let adding = current.iter().filter(|tat| tat.is_none()).count();
        let admission = admit_all(limits, now, &mut current);
        if let Admission::Admitted { .. } = admission {
            if !tats.room(adding, now) {
                return Admission::Refused {
                    limit: limits.first().map_or(0, |l| l.rate.limit),
                    retry_after_ms: 1000,
                };
            }
            for (limit, tat) in limits.iter().zip(current) {
                if let Some(tat) = tat {
                    tats.set(&limit.key, tat);
                }
            }
        }
        admission
    }
}

pub enum Budgets {
    Local(LocalBudgets),
    Redis(RedisBudgets),
}

impl Budgets {
    /// Forgets a request the duplicate guard remembered (it was not forwarded after all).
    /// Best effort: at worst a repeat within the window is refused.
    pub async fn forget(&self, fingerprint: [u8; 32]) {
        match self {
            Budgets::Local(local) => local.seen.invalidate(&fingerprint),
            Budgets::Redis(redis) => redis.forget(fingerprint).await,
        }
    }

    /// The duplicate guard: whether a request of this fingerprint is new (and is then
    /// remembered for `window_ms`, on every replica when counters are shared).
    pub async fn first_seen(
        &self,
        fingerprint: [u8; 32],
        window_ms: u64,
    ) -> Result<bool, BudgetError> {
        match self {
            Budgets::Local(local) => Ok(local.first_seen(fingerprint, window_ms)),
            Budgets::Redis(redis) => redis.first_seen(fingerprint, window_ms).await,
        }
    }

    /// Whether the shared counters answer (`None`: counted in this process).
    pub async fn ping(&self) -> Option<Result<(), String>> {
        let Budgets::Redis(redis) = self else {
            return None;
        };
        Some(redis.ping().await)
    }

    pub async fn admit(&self, limits: &[Limit]) -> Result<Admission, BudgetError> {
        self.admit_retriable(limits, None).await
    }

    /// Counted in this process (no shared store).
    pub fn is_local(&self) -> bool {
        matches!(self, Budgets::Local(_))
    }

    /// Counts a request admitted elsewhere (by the in-process module) at `decided_ms`
    /// against `limits`, so that what this process decides of the same limits, and
    /// what it tells a module that connects, follow it. In a shared store there is
    /// nothing to do: a proxy with limits is never decided in a module then.
    pub fn count<'a>(&self, limits: impl IntoIterator<Item = &'a Limit>, decided_ms: i64) {
        if let Budgets::Local(local) = self {
            local.charge_at(limits, 1, decided_ms.max(0) as u64);
        }
    }

    /// The counts of the limits in use (`LocalBudgets`; none in a shared store), for a
    /// module that connects: an Envoy restarted does not start its limits afresh.
    pub fn in_use(&self) -> Vec<(String, u64)> {
        match self {
            Budgets::Local(local) => local.in_use(),
            Budgets::Redis(_) => Vec::new(),
        }
    }

    /// Takes up counts another process made ([`Budgets::in_use`]).
    pub fn take_up(&self, counts: &[(String, u64)]) {
        if let Budgets::Local(local) = self {
            local.take_up(counts);
        }
    }

    /// Admits a request, and with `retriable` (its id: Envoy may retry it) remembers its
    /// limits so its retries count against them too ([`Budgets::charge_retries`]). No
    /// round trip more than [`Budgets::admit`].
    pub async fn admit_retriable(
        &self,
        limits: &[Limit],
        retriable: Option<&str>,
    ) -> Result<Admission, BudgetError> {
        match self {
            Budgets::Local(local) => {
                let admission = local.admit(limits);
                if let (Some(id), Admission::Admitted { .. }) = (retriable, admission) {
                    let entries = local.retriable.get_with_by_ref(id, Default::default);
                    let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
                    entries.push(limits.into());
                }
                Ok(admission)
            }
            Budgets::Redis(redis) => redis.admit(limits, retriable).await,
        }
    }

    /// A finished request was retried `retries` times by Envoy: the retries count against
    /// the limits its admission remembered (none if it was not retriable). Off the
    /// request path, from the access log.
    pub async fn charge_retries(&self, request_id: &str, retries: u32) {
        match self {
            Budgets::Local(local) => {
                let Some(entries) = local.retriable.get(request_id) else {
                    return;
                };
                let limits = {
                    let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
                    let first = (!entries.is_empty()).then(|| entries.remove(0));
                    if entries.is_empty() {
                        local.retriable.invalidate(request_id);
                    }
                    first
                };
                if let (Some(limits), true) = (limits, retries > 0) {
                    local.charge(&limits, retries);
                }
            }
            Budgets::Redis(redis) if retries > 0 => redis.charge_retries(request_id, retries).await,
            // Forgotten when its key expires: no round trip for requests never retried.
            Budgets::Redis(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct FakeClock(AtomicU64);

    impl Clock for FakeClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl FakeClock {
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms, Ordering::SeqCst);
        }
    }

    fn setup() -> (Arc<FakeClock>, LocalBudgets) {
        let clock = Arc::new(FakeClock(AtomicU64::new(1_700_000_000_000)));
        (clock.clone(), LocalBudgets::new(clock))
    }

    fn limit(key: &str, rate: Rate) -> Limit {
        Limit {
            key: key.into(),
            rate,
        }
    }

    /// What one process counted, another takes up: a module in an Envoy restarted
    /// starts from `serve`'s counts, and counts of its own are never lowered by them.
    #[test]
    fn counts_made_elsewhere_are_taken_up_never_lowered() {
        let clock = Arc::new(FakeClock(AtomicU64::new(1_700_000_000_000)));
        let serve = Budgets::Local(LocalBudgets::new(clock.clone()));
        let module = Budgets::Local(LocalBudgets::new(clock.clone()));
        let Budgets::Local(deciding) = &module else {
            unreachable!()
        };
        let limits = [limit("c:agent:rpm", Rate::per_minute(3))];
        let now = 1_700_000_000_000;
        for _ in 0..3 {
            serve.count(&limits, now);
        }
        module.take_up(&serve.in_use());
        assert!(matches!(deciding.admit(&limits), Admission::Refused { .. }));
        // A limit used up long ago: nothing in use to give.
        clock.advance(60_000);
        assert!(serve.in_use().is_empty());
        // Its own count stands against an earlier one taken up; a later one wins.
        assert!(matches!(
            deciding.admit(&limits),
            Admission::Admitted { .. }
        ));
        let own = module.in_use();
        let (key, tat) = own[0].clone();
        module.take_up(&[(key.clone(), tat - 1)]);
        assert_eq!(module.in_use(), own);
        // None that no limit could have made: further ahead than any, or a key longer.
        let far = clock.now_ms() * 1000 + FURTHEST_US + 1;
        module.take_up(&[(key.clone(), far), ("k".repeat(LONGEST_KEY + 1), tat)]);
        module.take_up(&[(key.clone(), u64::MAX)]);
        assert_eq!(module.in_use(), own);
        module.take_up(&[(key, tat + 60_000_000)]);
        assert!(matches!(deciding.admit(&limits), Admission::Refused { .. }));
        // Counted when it was decided, not when its record came: a request decided a
        // minute ago holds no limit now.
        let later = Budgets::Local(LocalBudgets::new(clock.clone()));
        later.count(&limits, clock.now_ms() as i64 - 60_000);
        assert!(later.in_use().is_empty());
        later.count(&limits, clock.now_ms() as i64);
        assert_eq!(later.in_use().len(), 1);
    }

    #[test]
    fn a_full_burst_then_the_sustained_rate() {
        let (clock, budgets) = setup();
        let l = [limit("p", Rate::per_minute(60))];
        for expected_left in (0..60).rev() {
            assert_eq!(
                budgets.admit(&l),
                Admission::Admitted {
                    limit: 60,
                    remaining: expected_left
                }
            );
        }
        assert_eq!(
            budgets.admit(&l),
            Admission::Refused {
                limit: 60,
                retry_after_ms: 1000
            }
        );
        clock.advance(999);
        assert!(matches!(
            budgets.admit(&l),
            Admission::Refused {
                retry_after_ms: 1,
                ..
            }
        ));
        clock.advance(1);
        assert!(matches!(
            budgets.admit(&l),
            Admission::Admitted { remaining: 0, .. }
        ));
    }

    #[test]
    fn no_double_burst_across_a_window_edge() {
        let (clock, budgets) = setup();
        let l = [limit("p", Rate::per_minute(100))];
        // Spend the whole minute's worth at its very end…
        clock.advance(59_900);
        let first = (0..300)
            .filter(|_| matches!(budgets.admit(&l), Admission::Admitted { .. }))
            .count();
        assert_eq!(first, 100);
        // …and just after the edge a fixed window would admit another 100; GCRA does not.
        clock.advance(200);
        let second = (0..300)
            .filter(|_| matches!(budgets.admit(&l), Admission::Admitted { .. }))
            .count();
        assert_eq!(second, 0);
        // Over any span t at most L + t/T: a full minute later, the bucket is full again.
        clock.advance(60_000);
        let third = (0..300)
            .filter(|_| matches!(budgets.admit(&l), Admission::Admitted { .. }))
            .count();
        assert_eq!(third, 100);
    }

    #[test]
    fn every_limit_must_admit_and_a_refusal_counts_nowhere() {
        let (clock, budgets) = setup();
        let minute = limit("c:m", Rate::per_minute(5));
        let day = limit("c:d", Rate::per_day(7));
        for _ in 0..5 {
            assert!(matches!(
                budgets.admit(&[minute.clone(), day.clone()]),
                Admission::Admitted { .. }
            ));
        }
        // The minute limit refuses; the day limit must not have been charged for it.
        assert!(matches!(
            budgets.admit(&[minute.clone(), day.clone()]),
            Admission::Refused { limit: 5, .. }
        ));
        clock.advance(60_000);
        for _ in 0..2 {
            assert!(matches!(
                budgets.admit(&[minute.clone(), day.clone()]),
                Admission::Admitted { .. }
            ));
        }
        match budgets.admit(&[minute.clone(), day.clone()]) {
            Admission::Refused {
                limit,
                retry_after_ms,
            } => {
                assert_eq!(limit, 7);
                // Eight requests are due 8·T after the start; one day of them may be early.
                let interval_us: u64 = 86_400_000_000 / 7;
                let wait_us = 8 * interval_us - 86_400_000_000 - 60_000_000;
                assert_eq!(retry_after_ms, wait_us.div_ceil(1000));
            }
            other => panic!("{other:?}"),
        }
        // The tightest limit is the one reported on admission.
        let (_, fresh) = setup();
        assert_eq!(
            fresh.admit(&[
                limit("a", Rate::per_minute(100)),
                limit("b", Rate::per_minute(3))
            ]),
            Admission::Admitted {
                limit: 3,
                remaining: 2
            }
        );
    }

    #[test]
    fn limits_whose_time_has_passed_are_swept_and_full_again() {
        let (clock, budgets) = setup();
        let rate = Rate::per_minute(2);
        for n in 0..5_000 {
            let admitted = budgets.admit(&[limit(&format!("k{n}"), rate)]);
            assert!(matches!(admitted, Admission::Admitted { .. }));
        }
        assert_eq!(budgets.tats.lock().unwrap().by_key.len(), 5_000);
        // Every one is full again a minute on: the map forgets them as it grows.
        clock.advance(60_001);
        for n in 0..5_000 {
            let admitted = budgets.admit(&[limit(&format!("fresh{n}"), rate)]);
            assert!(matches!(admitted, Admission::Admitted { .. }));
        }
        let held = budgets.tats.lock().unwrap().by_key.len();
        assert!(held < 6_000, "{held} entries held");
        // A limit still in use is kept through a sweep, and keeps counting.
        let used = [limit("fresh0", rate)];
        assert_eq!(
            budgets.admit(&used),
            Admission::Admitted {
                limit: 2,
                remaining: 0
            }
        );
        assert!(matches!(budgets.admit(&used), Admission::Refused { .. }));
    }

    #[test]
    fn with_every_place_taken_a_new_limit_refuses_and_the_rest_count_on() {
        let (clock, budgets) = setup();
        budgets.tats.lock().unwrap().capacity = 3;
        let rate = Rate::per_minute(100);
        for n in 0..3 {
            let admitted = budgets.admit(&[limit(&format!("k{n}"), rate)]);
            assert!(matches!(admitted, Admission::Admitted { .. }));
        }
        let new = [limit("k3", rate)];
        assert!(matches!(budgets.admit(&new), Admission::Refused { .. }));
        // Refused, not counted: the limit in use before is where it was.
        assert_eq!(
            budgets.admit(&[limit("k0", rate)]),
            Admission::Admitted {
                limit: 100,
                remaining: 98
            }
        );
        // Once the others are full again, there is room.
        clock.advance(60_001);
        assert!(matches!(budgets.admit(&new), Admission::Admitted { .. }));
    }

    #[test]
    fn gcra_maths() {
        // In µs: 2 per minute is one every 30 s.
        let rate = Rate::per_minute(2);
        let s = 1_000_000;
        assert_eq!(gcra(None, 0, rate), Ok((30 * s, 1)));
        assert_eq!(gcra(Some(30 * s), 0, rate), Ok((60 * s, 0)));
        assert_eq!(gcra(Some(60 * s), 0, rate), Err(30 * s));
        assert_eq!(gcra(Some(60 * s), 30 * s, rate), Ok((90 * s, 0)));
        // An old arrival time does not bank credit beyond the burst.
        assert_eq!(gcra(Some(5), 1000 * s, rate), Ok((1030 * s, 1)));
    }

    /// Limits above 1,000 a second hold as configured, not at the clock's resolution.
    #[test]
    fn high_limits_are_not_capped_by_the_clock() {
        let (clock, budgets) = setup();
        let l = [limit("big", Rate::per_minute(120_000))];
        let burst = (0..130_000)
            .take_while(|_| matches!(budgets.admit(&l), Admission::Admitted { .. }))
            .count();
        assert_eq!(burst, 120_000);
        // Then the sustained 2,000 a second: 20 in 10 ms.
        clock.advance(10);
        let sustained = (0..100)
            .take_while(|_| matches!(budgets.admit(&l), Admission::Admitted { .. }))
            .count();
        assert_eq!(sustained, 20);
    }
}
