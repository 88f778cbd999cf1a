//! Keys issued through the CLI, their spend, and the metric families the dashboard
//! charts.

use std::path::Path;
use std::time::Duration;

use super::*;

/// Metric families whose series appear only once priced LLM calls were made.
pub const LLM_FAMILIES: [&str; 3] = [
    "latchkey_llm_tokens",
    "latchkey_spend_micro_usd",
    "latchkey_pricing_exceptions",
];

/// Every `latchkey_*` family the shipped Grafana dashboard charts that starts with one
/// of `prefixes`, checked against a `/metrics` text.
pub fn assert_dashboard_families(metrics: &str, prefixes: &[&str]) {
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json"),
    )
    .unwrap();
    let names = regex::Regex::new(r"latchkey_[a-z_]+").unwrap();
    let mut checked = 0;
    for name in names.find_iter(&dashboard).map(|m| m.as_str()) {
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "the dashboard charts {name}, which /metrics does not have"
        );
        checked += 1;
    }
    assert!(checked >= prefixes.len(), "{prefixes:?}");
}

/// A key of `credential` issued through the CLI with `flags`: its id and the key.
pub fn issue_key(stack: &Stack, credential: &str, flags: &[&str]) -> (String, String) {
    let mut args = vec!["key", "issue", "--credential", credential, "--json"];
    args.extend_from_slice(flags);
    let k = json(&stack.cli(&args, &[]));
    (
        k["id"].as_str().unwrap().to_owned(),
        k["key"].as_str().unwrap().to_owned(),
    )
}

/// A key's spend as the store has it (`key list`).
pub fn recorded_spend(stack: &Stack, id: &str) -> f64 {
    let list = json(&stack.cli(&["key", "list", "--json"], &[]));
    list.as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap()["spent_usd"]
        .as_f64()
        .unwrap()
}

/// A key's recorded spend once it has settled at `expected` (spend is written off the
/// request path), or what it was after 3 s.
pub async fn settled_spend(stack: &Stack, id: &str, expected: f64) -> f64 {
    let mut spent = f64::NAN;
    for _ in 0..60 {
        spent = recorded_spend(stack, id);
        if (spent - expected).abs() < 1e-9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    spent
}
