//! The wall clock, in Unix seconds and milliseconds: what budgets, expiries and the
//! audit are dated by.

pub fn now_unix() -> i64 {
    now_unix_ms().div_euclid(1000)
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
