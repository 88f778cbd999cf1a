//! Spend caps: what a run key (and a proxy credential, per day) has cost, and whether
//! one more request may start.
//!
//! Costs are known only when a response comes back, so a request *reserves* before it is
//! forwarded and *settles* when its response is judged. What is reserved is the fixed
//! price, or the proxy's `max_usd_per_request`: a capped account admits a request only
//! if spent + reserved + this reservation fit under the cap, so the cap is a ceiling.
//! A response that cannot be priced (compressed, streamed, too large, the caller gone)
//! is charged its whole reservation. Without a maximum nothing is reserved: a capped
//! account then admits a request only while its spend is below the cap and fewer than
//! [`MAX_IN_FLIGHT`] of its requests are in flight, and an unpriceable response closes
//! the account for its period ([`Settlement::Close`]): failing closed.
//!
//! Amounts are whole micro-dollars, so both stores add them exactly and atomically.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::base::clock::now_unix;
use crate::dataplane::budget::BudgetError;
pub use crate::policy::Period;

/// Requests of one capped account in flight at once on proxies whose cost comes from
/// the response: the overshoot bound.
pub const MAX_IN_FLIGHT: u64 = 8;

/// What the spend caps leave once a reservation is admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    /// What the tightest dollar cap leaves, in micro-dollars; `None`: no cap.
    pub left: Option<u64>,
    /// Whether an account is now 80 % or more spent and reserved: worth telling a person.
    pub near_cap: bool,
}

impl Headroom {
    /// Takes in an account of `cap` with `used` spent and reserved.
    fn take(&mut self, cap: u64, used: u64) {
        let this = cap.saturating_sub(used);
        self.left = Some(self.left.map_or(this, |l| l.min(this)));
        self.near_cap |= u128::from(used) * 5 >= u128::from(cap) * 4;
    }
}

/// One account a request's cost is charged to.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// The store key: `key:<id>`, or with its period `key:<id>:month:<n>`,
    /// `credential:<name>:day:<n>`, `tokens:key:<id>:minute:<n>`…
    pub id: Arc<str>,
    /// In the account's unit.
    pub cap_micros: Option<u64>,
    /// What the durable store said was spent, for an account not yet in memory.
    pub seed_micros: u64,
    /// How long the account lives after its last change (accounts of one period).
    pub ttl_s: Option<u64>,
    /// Micro-dollars, or LLM tokens (counted from usage, never reserved).
    pub unit: Unit,
    /// Whose account it is, and the period it covers (none: a key's whole life), for
    /// the refusal's message and its `Retry-After`.
    pub holder: Holder,
    pub period: Option<Period>,
}

/// Whose accounts they are, as their ids begin: a key's, a proxy credential's, and the
/// LLM tokens of either (`tokens:key:<id>`). Start-up seeding names them the same way.
pub fn key_owner(id: &str) -> String {
    format!("key:{id}")
}

pub fn credential_owner(name: &str) -> String {
    format!("credential:{name}")
}

pub fn tokens_owner(owner: &str) -> String {
    format!("tokens:{owner}")
}

impl Account {
    /// The id of `owner`'s account (`key:<id>`, `credential:<name>`, `tokens:key:<id>`…)
    /// for the `period` that holds `now`, and the seconds until that period ends.
    pub fn period_id(owner: &str, period: Period, now: i64) -> (Arc<str>, u64) {
        let (n, left) = period.at(now);
        (format!("{owner}:{}:{n}", period.name()).into(), left)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Key,
    Credential,
}

impl Account {
    /// What a refusal by this account names, e.g. "the credential's monthly spend cap".
    pub fn describe(&self) -> String {
        let whose = match self.holder {
            Holder::Key => "this key's",
            Holder::Credential => "the credential's",
        };
        let per = match self.period {
            None => "",
            Some(Period::Minute) => " per-minute",
            Some(Period::Day) => " daily",
            Some(Period::Week) => " weekly",
            Some(Period::Month) => " monthly",
        };
        let what = match self.unit {
            Unit::Micros => "spend cap",
            Unit::Tokens => "token budget",
        };
        format!("{whose}{per} {what}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Micros,
    Tokens,
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Charge this many micro-dollars (0: released, nothing charged).
    Charge(u64),
    /// The response could not be priced and nothing was reserved for it: each capped
    /// account's spend is raised to its cap, closing it until its period ends.
    Close,
}

/// How long a shared account's in-flight counters outlive its last reservation: a
/// count a failed settlement left behind drains once the account is idle this long.
const IN_FLIGHT_TTL_S: u64 = 600;

/// Why a request may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The account at this index is at its cap.
    CapReached(usize),
    TooManyInFlight,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    spent: u64,
    reserved: u64,
    in_flight: u64,
    /// Unix seconds after which an idle account with a TTL may be forgotten.
    expires: Option<i64>,
}

/// Per replica, in memory. Accounts with a TTL (a credential's day) are pruned once
/// expired, so the map does not grow day after day.
#[derive(Default)]
pub struct LocalSpend {
    accounts: Mutex<Accounts>,
}

#[derive(Default)]
struct Accounts {
    map: HashMap<Arc<str>, State>,
    prune_at: usize,
}

impl Accounts {
    fn prune(&mut self, now: i64) {
        if self.map.len() < self.prune_at {
            return;
        }
        self.map
            .retain(|_, s| s.in_flight > 0 || s.expires.is_none_or(|e| e > now));
        self.prune_at = (self.map.len() * 2).max(1024);
    }
}

impl LocalSpend {
    /// Starts an account of the current period at what the audit says it spent before
    /// this process started: a restart must not hand a day's, week's or month's cap back.
    /// An account already in memory is left as it is.
    pub fn seed(&self, id: Arc<str>, spent: u64, ttl_s: u64) {
        let mut guard = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let expires = now_unix().saturating_add(i64::try_from(ttl_s).unwrap_or(i64::MAX));
        guard.map.entry(id).or_insert(State {
            spent,
            expires: Some(expires),
            ..State::default()
        });
    }

    fn reserve(&self, accounts: &[Account], estimate: u64) -> Result<Headroom, Refusal> {
        let mut guard = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_unix();
        guard.prune(now);
        let all = &mut guard.map;
        for (i, a) in accounts.iter().enumerate() {
            let s = all.entry(a.id.clone()).or_insert(State {
                spent: a.seed_micros,
                ..State::default()
            });
            s.expires = a.ttl_s.map(|t| now.saturating_add(t as i64));
            match (a.cap_micros, a.unit) {
                (Some(cap), Unit::Tokens) if s.spent >= cap => {
                    return Err(Refusal::CapReached(i));
                }
                (Some(cap), Unit::Micros) => {
                    check(s, cap, estimate).map_err(|r| match r {
                        Refusal::CapReached(_) => Refusal::CapReached(i),
                        other => other,
                    })?;
                }
                _ => {}
            }
        }
        let mut headroom = Headroom::default();
        for a in accounts.iter().filter(|a| a.unit == Unit::Micros) {
            let s = all.get_mut(&a.id).expect("inserted above");
            s.reserved += estimate;
            s.in_flight += 1;
            if let Some(cap) = a.cap_micros {
                headroom.take(cap, s.spent + s.reserved);
            }
        }
        Ok(headroom)
    }

    /// Returns what was charged to the first account (the key's).
    fn settle(
        &self,
        accounts: &[Account],
        reserved: u64,
        settlement: Settlement,
        tokens: u64,
    ) -> u64 {
        let mut guard = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let all = &mut guard.map;
        let mut first = None;
        for a in accounts {
            let s = all.entry(a.id.clone()).or_default();
            if a.unit == Unit::Tokens {
                s.spent += tokens;
                continue;
            }
            s.reserved = s.reserved.saturating_sub(reserved);
            s.in_flight = s.in_flight.saturating_sub(1);
            let charged = match (settlement, a.cap_micros) {
                (Settlement::Charge(actual), _) => actual,
                (Settlement::Close, Some(cap)) => cap.saturating_sub(s.spent),
                (Settlement::Close, None) => 0,
            };
            s.spent += charged;
            first.get_or_insert(charged);
        }
        first.unwrap_or(0)
    }

    fn spent(&self, id: &str) -> Option<u64> {
        let guard = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        guard.map.get(id).map(|s| s.spent)
    }
}

/// The admission rule both stores apply to a capped account.
fn check(s: &State, cap: u64, estimate: u64) -> Result<(), Refusal> {
    if estimate > 0 {
        // A known cost: admit only what fits under the cap.
        if s.spent + s.reserved + estimate > cap {
            return Err(Refusal::CapReached(0));
        }
    } else {
        if s.spent + s.reserved >= cap {
            return Err(Refusal::CapReached(0));
        }
        if s.in_flight >= MAX_IN_FLIGHT {
            return Err(Refusal::TooManyInFlight);
        }
    }
    Ok(())
}

/// Shared through Redis. KEYS: per account its spent, reserved and in-flight counters.
/// ARGV: estimate, max in flight, in-flight TTL, then per account cap (-1 for none),
/// seed, ttl (0 for none), unit (0 micro-dollars, 1 tokens: only checked, not reserved).
/// Returns {0, what the tightest spend cap leaves (-1: none), 1 if an account is past
/// 80 % of its cap}, or {i, 0, 0} when account i refuses, {-1, 0, 0} when too many are in
/// flight.
const RESERVE_SCRIPT: &str = r"
local estimate = tonumber(ARGV[1])
local max_in_flight = tonumber(ARGV[2])
local in_flight_ttl = tonumber(ARGV[3])
local n = #KEYS / 3
for i = 1, n do
  local cap = tonumber(ARGV[4 * i])
  redis.call('SET', KEYS[3 * i - 2], ARGV[4 * i + 1], 'NX')
  if ARGV[4 * i + 3] == '1' then
    if cap >= 0 and tonumber(redis.call('GET', KEYS[3 * i - 2])) >= cap then return {i, 0, 0} end
  elseif cap >= 0 then
    local spent = tonumber(redis.call('GET', KEYS[3 * i - 2]))
    local reserved = tonumber(redis.call('GET', KEYS[3 * i - 1]) or '0')
    local in_flight = tonumber(redis.call('GET', KEYS[3 * i]) or '0')
    if estimate > 0 then
      if spent + reserved + estimate > cap then return {i, 0, 0} end
    else
      if spent + reserved >= cap then return {i, 0, 0} end
      if in_flight >= max_in_flight then return {-1, 0, 0} end
    end
  end
end
local left = -1
local near = 0
for i = 1, n do
  local ttl = tonumber(ARGV[4 * i + 2])
  if ARGV[4 * i + 3] ~= '1' then
    local reserved = redis.call('INCRBY', KEYS[3 * i - 1], estimate)
    redis.call('INCR', KEYS[3 * i])
    local cap = tonumber(ARGV[4 * i])
    if cap >= 0 then
      local used = tonumber(redis.call('GET', KEYS[3 * i - 2])) + reserved
      local this = cap - used
      if this < 0 then this = 0 end
      if left < 0 or this < left then left = this end
      if used * 5 >= cap * 4 then near = 1 end
    end
    if ttl <= 0 then
      for k = 3 * i - 1, 3 * i do redis.call('EXPIRE', KEYS[k], in_flight_ttl) end
    end
  end
  if ttl > 0 then
    for k = 3 * i - 2, 3 * i do redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return {0, left, near}
";

/// KEYS as for reserve; ARGV: reserved, actual, close (1 or 0), tokens, then per account
/// cap (-1 for none) and unit. Returns what was charged to the first account.
const SETTLE_SCRIPT: &str = r"
local first = 0
for i = 1, #KEYS / 3 do
  local cap = tonumber(ARGV[3 + 2 * i])
  if ARGV[4 + 2 * i] == '1' then
    redis.call('INCRBY', KEYS[3 * i - 2], ARGV[4])
  else
    local charge = tonumber(ARGV[2])
    if ARGV[3] == '1' then
      charge = 0
      if cap >= 0 then
        local spent = tonumber(redis.call('GET', KEYS[3 * i - 2]) or '0')
        if cap > spent then charge = cap - spent end
      end
    end
    redis.call('INCRBY', KEYS[3 * i - 2], charge)
    if i == 1 then first = charge end
    if tonumber(redis.call('DECRBY', KEYS[3 * i - 1], ARGV[1])) < 0 then
      redis.call('SET', KEYS[3 * i - 1], 0, 'KEEPTTL')
    end
    if tonumber(redis.call('DECR', KEYS[3 * i])) < 0 then
      redis.call('SET', KEYS[3 * i], 0, 'KEEPTTL')
    end
  end
end
return first
";

pub struct RedisSpend {
    connection: redis::aio::ConnectionManager,
    reserve: redis::Script,
    settle: redis::Script,
}

impl RedisSpend {
    pub fn new(connection: redis::aio::ConnectionManager) -> Self {
        Self {
            connection,
            reserve: redis::Script::new(RESERVE_SCRIPT),
            settle: redis::Script::new(SETTLE_SCRIPT),
        }
    }

    fn keys(invocation: &mut redis::ScriptInvocation<'_>, accounts: &[Account]) {
        for a in accounts {
            for part in ["spent", "reserved", "in_flight"] {
                invocation.key(format!("latchkey:spend:{}:{part}", a.id));
            }
        }
    }

    async fn reserve(
        &self,
        accounts: &[Account],
        estimate: u64,
    ) -> Result<Result<Headroom, Refusal>, BudgetError> {
        let mut invocation = self.reserve.prepare_invoke();
        Self::keys(&mut invocation, accounts);
        invocation
            .arg(estimate)
            .arg(MAX_IN_FLIGHT)
            .arg(IN_FLIGHT_TTL_S);
        for a in accounts {
            invocation
                .arg(cap_arg(a))
                .arg(a.seed_micros)
                .arg(a.ttl_s.unwrap_or(0))
                .arg(u8::from(a.unit == Unit::Tokens));
        }
        let mut connection = self.connection.clone();
        let (code, left, near): (i64, i64, i64) = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| BudgetError::new(e.to_string()))?;
        Ok(match code {
            0 => Ok(Headroom {
                left: u64::try_from(left).ok(),
                near_cap: near == 1,
            }),
            -1 => Err(Refusal::TooManyInFlight),
            i => Err(Refusal::CapReached(i as usize - 1)),
        })
    }

    async fn settle(
        &self,
        accounts: &[Account],
        reserved: u64,
        settlement: Settlement,
        tokens: u64,
    ) -> Result<u64, BudgetError> {
        let mut invocation = self.settle.prepare_invoke();
        Self::keys(&mut invocation, accounts);
        let (actual, close) = match settlement {
            Settlement::Charge(actual) => (actual, 0),
            Settlement::Close => (0, 1),
        };
        invocation.arg(reserved).arg(actual).arg(close).arg(tokens);
        for a in accounts {
            invocation
                .arg(cap_arg(a))
                .arg(u8::from(a.unit == Unit::Tokens));
        }
        let mut connection = self.connection.clone();
        invocation
            .invoke_async::<i64>(&mut connection)
            .await
            .map(|charged| charged.max(0) as u64)
            .map_err(|e| BudgetError::new(e.to_string()))
    }
}

fn cap_arg(a: &Account) -> i64 {
    a.cap_micros.map_or(-1, |c| c.min(i64::MAX as u64) as i64)
}

pub enum Spend {
    Local(LocalSpend),
    Redis(RedisSpend),
}

impl Spend {
    /// Whether a request charged to `accounts`, costing `estimate` micro-dollars if
    /// known up front (0 if not), may start; if so it is counted as in flight, and what
    /// the tightest spend cap then leaves is returned.
    pub async fn reserve(
        &self,
        accounts: &[Account],
        estimate: u64,
    ) -> Result<Result<Headroom, Refusal>, BudgetError> {
        match self {
            Spend::Local(local) => Ok(local.reserve(accounts, estimate)),
            Spend::Redis(redis) => redis.reserve(accounts, estimate).await,
        }
    }

    /// Ends a reservation, counting `tokens` against token budgets; returns what was
    /// charged to the first account (the key's).
    pub async fn settle(
        &self,
        accounts: &[Account],
        reserved: u64,
        settlement: Settlement,
        tokens: u64,
    ) -> Result<u64, BudgetError> {
        match self {
            Spend::Local(local) => Ok(local.settle(accounts, reserved, settlement, tokens)),
            Spend::Redis(redis) => redis.settle(accounts, reserved, settlement, tokens).await,
        }
    }

    /// This replica's view of an account's spend (local store only).
    pub fn local_spent(&self, id: &str) -> Option<u64> {
        match self {
            Spend::Local(local) => local.spent(id),
            Spend::Redis(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::money::{to_micros, to_usd};

    fn account(cap: Option<f64>) -> Account {
        Account {
            id: "key:k1".into(),
            cap_micros: cap.map(to_micros),
            seed_micros: 0,
            ttl_s: None,
            unit: Unit::Micros,
            holder: Holder::Key,
            period: None,
        }
    }

    #[test]
    fn a_known_cost_never_exceeds_the_cap() {
        let spend = LocalSpend::default();
        let a = [account(Some(1.0))];
        let price = to_micros(0.3);
        let headroom = spend.reserve(&a, price).unwrap();
        assert_eq!(headroom.left, Some(to_micros(0.7)));
        assert!(!headroom.near_cap, "0.3 of 1.0");
        let headroom = spend.reserve(&a, price).unwrap();
        assert!(!headroom.near_cap, "0.6 of 1.0");
        let headroom = spend.reserve(&a, price).unwrap();
        assert!(headroom.near_cap, "0.9 of 1.0");
        for _ in 0..3 {
            spend.settle(&a, price, Settlement::Charge(0), 0);
        }
        let admitted = (0..10).filter(|_| spend.reserve(&a, price).is_ok()).count();
        assert_eq!(admitted, 3, "0.9 of 1.0 reserved");
        for _ in 0..3 {
            spend.settle(&a, price, Settlement::Charge(price), 0);
        }
        assert_eq!(spend.spent("key:k1"), Some(to_micros(0.9)));
        assert_eq!(spend.reserve(&a, price), Err(Refusal::CapReached(0)));
    }

    #[test]
    fn an_unknown_cost_is_bounded_by_the_requests_in_flight() {
        let spend = LocalSpend::default();
        let a = [account(Some(1.0))];
        let admitted = (0..50).filter(|_| spend.reserve(&a, 0).is_ok()).count();
        assert_eq!(admitted as u64, MAX_IN_FLIGHT);
        assert_eq!(spend.reserve(&a, 0), Err(Refusal::TooManyInFlight));
        // Each response costs 0.3: the cap is crossed, by at most the in-flight ones.
        for _ in 0..MAX_IN_FLIGHT {
            spend.settle(&a, 0, Settlement::Charge(to_micros(0.3)), 0);
        }
        assert_eq!(spend.reserve(&a, 0), Err(Refusal::CapReached(0)));
        assert!(spend.spent("key:k1").unwrap() <= to_micros(1.0) + MAX_IN_FLIGHT * to_micros(0.3));
    }

    #[test]
    fn uncapped_accounts_only_count_and_a_release_charges_nothing() {
        let spend = LocalSpend::default();
        let a = [Account {
            seed_micros: 500,
            ..account(None)
        }];
        for _ in 0..100 {
            assert!(spend.reserve(&a, 0).is_ok());
        }
        spend.settle(&a, 0, Settlement::Charge(0), 0);
        spend.settle(&a, 0, Settlement::Charge(250), 0);
        // Closing an uncapped account charges nothing.
        assert_eq!(spend.settle(&a, 0, Settlement::Close, 0), 0);
        assert_eq!(spend.spent("key:k1"), Some(750));
        assert_eq!(to_micros(0.000_001), 1);
        assert_eq!(to_usd(1_500_000), 1.5);
    }

    #[test]
    fn an_unpriced_response_without_a_reservation_closes_the_account() {
        let spend = LocalSpend::default();
        let a = [account(Some(1.0))];
        spend.reserve(&a, 0).unwrap();
        spend.settle(&a, 0, Settlement::Charge(to_micros(0.25)), 0);
        spend.reserve(&a, 0).unwrap();
        assert_eq!(spend.settle(&a, 0, Settlement::Close, 0), to_micros(0.75));
        assert_eq!(spend.spent("key:k1"), Some(to_micros(1.0)));
        assert_eq!(spend.reserve(&a, 0), Err(Refusal::CapReached(0)));
    }

    #[test]
    fn token_budgets_refuse_once_spent_and_reserve_nothing() {
        let spend = LocalSpend::default();
        let money = account(Some(1.0));
        let tokens = Account {
            id: "tokens:key:k1:day:1".into(),
            cap_micros: Some(1000),
            unit: Unit::Tokens,
            ..account(None)
        };
        let a = [money, tokens];
        // Tokens are not known in advance: many may start while under the budget.
        spend.reserve(&a, 1).unwrap();
        spend.reserve(&a, 1).unwrap();
        spend.settle(&a, 1, Settlement::Charge(1), 600);
        spend.settle(&a, 1, Settlement::Charge(1), 600);
        assert_eq!(spend.spent("tokens:key:k1:day:1"), Some(1200));
        assert_eq!(spend.spent("key:k1"), Some(2));
        assert_eq!(spend.reserve(&a, 1), Err(Refusal::CapReached(1)));
    }

    #[test]
    fn calendar_periods_in_utc() {
        // 2026-12-02T21:00:00Z, a Wednesday.
        let now = 1_796_245_200;
        assert_eq!(Period::Minute.at(now), (now / 60, 60));
        assert_eq!(Period::Day.at(now), (now / 86_400, 3 * 3600));
        // Next Monday 2026-12-07T00:00Z.
        assert_eq!(Period::Week.at(now).1, 4 * 86_400 + 3 * 3600);
        // 2027-01-01T00:00Z.
        assert_eq!(
            Period::Month.at(now),
            (2026 * 12 + 11, 29 * 86_400 + 3 * 3600)
        );
        assert_eq!(Period::Month.at(1_796_245_200 + 30 * 86_400).0, 2027 * 12);
    }

    #[test]
    fn expired_day_accounts_are_forgotten() {
        let spend = LocalSpend::default();
        let day = |n: u32| Account {
            id: format!("credential:c:{n}").into(),
            cap_micros: Some(10),
            seed_micros: 0,
            ttl_s: Some(0),
            unit: Unit::Micros,
            holder: Holder::Credential,
            period: Some(Period::Day),
        };
        for n in 0..5000 {
            spend.reserve(&[day(n)], 1).unwrap();
            spend.settle(&[day(n)], 1, Settlement::Charge(1), 0);
        }
        let held = spend.accounts.lock().unwrap().map.len();
        assert!(held <= 2048, "{held} accounts held");
    }
}
