//! The budgets shared by every replica, in Redis: one Lua script checks and updates
//! every limit of a request atomically, on Redis's clock; the duplicate guard's and
//! the retries' bookkeeping live there too.

use std::time::Duration;

use super::{Admission, BudgetError, Limit};

/// The Redis key of a request the duplicate guard remembers.
fn seen_key(fingerprint: &[u8; 32]) -> String {
    std::iter::once("lk:seen:".to_owned())
        .chain(fingerprint.iter().map(|b| format!("{b:02x}")))
        .collect()
}

/// One lazily connected, self-reconnecting Redis connection for every budget: latchkey
/// starts while Redis is down, refuses limited requests until it is up, and recovers.
pub fn redis_connection(url: &str) -> Result<redis::aio::ConnectionManager, BudgetError> {
    let client = redis::Client::open(url).map_err(|e| BudgetError(e.to_string()))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    redis::aio::ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| BudgetError(e.to_string()))
}

/// Shared by every replica through Redis.
pub struct RedisBudgets {
    connection: redis::aio::ConnectionManager,
    script: redis::Script,
    charge: redis::Script,
}

/// Checks all of a request's limits and updates them only if all admit, on Redis's
/// clock so replicas with skewed clocks agree. KEYS: the limits, then optionally where
/// to remember them for the request's retries (for 2 minutes: twice the shipped route
/// timeout, retries included); ARGV: interval and period (µs) of each.
/// Returns {1, limit index, remaining} or {0, limit index, wait µs}.
/// Times are µs since the epoch, exact in a Lua double, written as integers.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limits = #ARGV / 2
local next = {}
local tight, tight_left = 1, -1
local worst, worst_wait = 0, -1
for i = 1, limits do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local n = tat + interval
  if n - now > period then
    local wait = n - period - now
    if wait > worst_wait then worst, worst_wait = i, wait end
  else
    next[i] = n
    local left = math.floor((period - (n - now)) / interval)
    if tight_left < 0 or left < tight_left then tight, tight_left = i, left end
  end
end
if worst_wait >= 0 then return {0, worst - 1, worst_wait} end
local remembered = {}
for i = 1, limits do
  local ttl_ms = math.ceil(tonumber(ARGV[2 * i]) / 1000)
  redis.call('SET', KEYS[i], string.format('%.0f', next[i]), 'PX', ttl_ms)
  remembered[#remembered + 1] = ARGV[2 * i - 1] .. ' ' .. KEYS[i]
end
if #KEYS > limits then
  redis.call('RPUSH', KEYS[limits + 1], table.concat(remembered, '\n'))
  redis.call('PEXPIRE', KEYS[limits + 1], 120000)
end
return {1, tight - 1, tight_left}
";

/// Counts a request's retries against the limits its admission remembered, admitted or
/// not (a limit in debt refuses until it is paid off), and forgets them. Remembered in a
/// list, one entry per admission: requests that share an id (a client may choose its
/// own) each have theirs charged once. KEYS: where they were remembered; ARGV: the
/// retries. Returns how many limits were charged.
const CHARGE_SCRIPT: &str = r"
local remembered = redis.call('LPOP', KEYS[1])
if not remembered then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local attempts = tonumber(ARGV[1])
local n = 0
for interval, key in string.gmatch(remembered, '(%d+) ([^\n]+)') do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  tat = tat + attempts * tonumber(interval)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  n = n + 1
end
return n
";

/// The Redis key remembering a retriable request's limits.
fn retriable_key(request_id: &str) -> String {
    format!("latchkey:retriable:{request_id}")
}

impl RedisBudgets {
    pub fn new(connection: redis::aio::ConnectionManager) -> Self {
        Self {
            connection,
            script: redis::Script::new(GCRA_SCRIPT),
            charge: redis::Script::new(CHARGE_SCRIPT),
        }
    }

    /// With `retriable`, the limits are remembered under that request id in the same
    /// call, for [`Budgets::charge_retries`].
    pub async fn admit(
        &self,
        limits: &[Limit],
        retriable: Option<&str>,
    ) -> Result<Admission, BudgetError> {
        let mut invocation = self.script.prepare_invoke();
        for limit in limits {
            invocation
                .key(format!("latchkey:rate:{}", limit.key))
                .arg(limit.rate.interval_us())
                .arg(limit.rate.period_us());
        }
        if let Some(id) = retriable {
            invocation.key(retriable_key(id));
        }
        let mut connection = self.connection.clone();
        let (admitted, index, value): (i64, usize, u64) = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| BudgetError(e.to_string()))?;
        let limit = limits.get(index).map_or(0, |l| l.rate.limit);
        Ok(if admitted == 1 {
            Admission::Admitted {
                limit,
                remaining: value.min(u64::from(u32::MAX)) as u32,
            }
        } else {
            Admission::Refused {
                limit,
                retry_after_ms: value.div_ceil(1000),
            }
        })
    }

    /// Forgets a request the duplicate guard remembered ([`super::Budgets::forget`]).
    pub(super) async fn forget(&self, fingerprint: [u8; 32]) {
        let mut connection = self.connection.clone();
        let forgotten: Result<i64, _> = redis::cmd("DEL")
            .arg(seen_key(&fingerprint))
            .query_async(&mut connection)
            .await;
        if let Err(e) = forgotten {
            tracing::warn!(error = %e, "could not forget a refused guarded request");
        }
    }

    /// The duplicate guard, on every replica ([`super::Budgets::first_seen`]).
    pub(super) async fn first_seen(
        &self,
        fingerprint: [u8; 32],
        window_ms: u64,
    ) -> Result<bool, BudgetError> {
        let mut connection = self.connection.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(seen_key(&fingerprint))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(window_ms)
            .query_async(&mut connection)
            .await
            .map_err(|e| BudgetError::new(e.to_string()))?;
        Ok(set.is_some())
    }

    /// Whether Redis answers ([`super::Budgets::ping`]).
    pub(super) async fn ping(&self) -> Result<(), String> {
        let mut connection = self.connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(std::time::Duration::from_secs(2), ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 2 s".into()),
        }
    }

    /// A request's retries against the limits its admission remembered
    /// ([`super::Budgets::charge_retries`]).
    pub(super) async fn charge_retries(&self, request_id: &str, retries: u32) {
        let mut connection = self.connection.clone();
        let charged: Result<i64, _> = self
            .charge
            .key(retriable_key(request_id))
            .arg(retries)
            .invoke_async(&mut connection)
            .await;
        if let Err(e) = charged {
            tracing::warn!(error = %e, request_id, "could not count a request's retries");
        }
    }
}
