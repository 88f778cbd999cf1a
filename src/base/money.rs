//! Money and what it buys: micro-dollars (budgets count whole ones, so sums are exact),
//! LLM tokens, and their prices.

/// USD as micro-dollars, rounded; never negative.
pub fn to_micros(usd: f64) -> u64 {
    (usd * 1e6).round().max(0.0) as u64
}

/// Micro-dollars as USD.
pub fn to_usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

/// Tokens one call consumed. `input` excludes the cached input, priced apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input + self.cached_input + self.output
    }
}

/// USD per million tokens (which is micro-dollars per token), as the policy file gives
/// it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Cached input; the input price where the table gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
}

/// What `usage` costs at `price`, in micro-dollars.
pub fn price(usage: &Usage, price: &Price) -> u64 {
    let micros = usage.input as f64 * price.input
        + usage.cached_input as f64 * price.cached_input.unwrap_or(price.input)
        + usage.output as f64 * price.output;
    micros.round().max(0.0) as u64
}
