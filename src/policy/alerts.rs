//! A proxy's anomaly alerts and webhooks (`guards.alerts`, `guards.webhooks`): when a key
//! or the proxy departs from its own baseline, a person is told, and the key can be
//! quarantined on the spot.

use serde::{Deserialize, Serialize};

/// What counts as a departure, and what happens then. Rates are compared with a rolling
/// baseline of the same key (or the whole proxy): an alert fires when the count over the
/// last `window` reaches `factor` × the baseline's count per window and at least `min`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    /// The span counts are taken over, e.g. `1m` (10s to 1h; default 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// How long the baseline remembers, e.g. `1h` (at least 2 windows, at most 7d;
    /// default 1h). Paths seen in this first span are learned, not alerted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// Requests surge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Surge>,
    /// Denials by latchkey surge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<Surge>,
    /// The vendor's 4xx and 5xx answers reach this share of the window's answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Share>,
    /// A key's spend passes 80 % of its cap (a run key's, the credential's or the proxy's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spend_near_cap: bool,
    /// A path shape the proxy has not seen before (ids and numbers read as `*`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_paths: bool,
    /// A key whose requests, denials or errors fire is quarantined: refused 403
    /// `quarantined` on every replica until `latchkey key release ID`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quarantine: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Surge {
    /// Times the baseline, e.g. 5.
    pub factor: f64,
    /// The floor: fewer than this in a window never fires.
    pub min: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// 0 to 1, e.g. 0.5.
    pub share: f64,
    /// Fewer answers than this in a window never fire.
    pub min: u32,
}

/// Where a proxy's alerts and requests for approval are posted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://` or `https://`.
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The event as JSON.
    #[default]
    Json,
    /// `{"text": …}`, which Slack's and compatible incoming webhooks take.
    Slack,
}

/// `Alerts` with its durations read, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpans {
    pub window_ms: u64,
    pub baseline_ms: u64,
}

fn span(field: &str, text: Option<&str>, default: u64, range: (u64, u64)) -> Result<u64, String> {
    let Some(text) = text else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text).map_err(|e| format!("{field}: {text:?}: {e}"))?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < range.0 || ms > range.1 || d.subsec_nanos() != 0 {
        return Err(format!(
            "{field}: {text:?} is not whole seconds from {} to {}",
            humantime::format_duration(std::time::Duration::from_millis(range.0)),
            humantime::format_duration(std::time::Duration::from_millis(range.1)),
        ));
    }
    Ok(ms)
}

impl Alerts {
    /// The durations, checked, and every threshold in range.
    pub fn spans(&self) -> Result<AlertSpans, String> {
        let window_ms = span(
            "window",
            self.window.as_deref(),
            60_000,
            (10_000, 3_600_000),
        )?;
        let baseline_ms = span(
            "baseline",
            self.baseline.as_deref(),
            3_600_000,
            (10_000, 7 * 86_400_000),
        )?;
        if baseline_ms < 2 * window_ms {
            return Err("baseline: at least two windows".to_owned());
        }
        for (name, surge) in [("requests", &self.requests), ("denials", &self.denials)] {
            if let Some(s) = surge {
                if !(s.factor.is_finite() && (1.0..=1000.0).contains(&s.factor)) {
                    return Err(format!("{name}: factor is 1 to 1000"));
                }
                if s.min == 0 {
                    return Err(format!("{name}: min is at least 1"));
                }
            }
        }
        if let Some(e) = &self.errors {
            if !(e.share.is_finite() && e.share > 0.0 && e.share <= 1.0) {
                return Err("errors: share is over 0, at most 1".to_owned());
            }
            if e.min == 0 {
                return Err("errors: min is at least 1".to_owned());
            }
        }
        let fires = self.requests.is_some()
            || self.denials.is_some()
            || self.errors.is_some()
            || self.spend_near_cap
            || self.new_paths;
        if !fires {
            return Err("nothing to alert on".to_owned());
        }
        if self.quarantine
            && self.requests.is_none()
            && self.denials.is_none()
            && self.errors.is_none()
        {
            return Err("quarantine: on requests, denials or errors, and none is set".to_owned());
        }
        Ok(AlertSpans {
            window_ms,
            baseline_ms,
        })
    }
}

impl Webhook {
    pub fn validate(&self) -> Result<(), String> {
        // Errors name the hook by scheme and host only.
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("url: {} is not http(s)://host/…", self.shown()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("url: no user or password in it; put a token in the path".to_owned());
        }
        Ok(())
    }

    /// The URL without its path and query, which for Slack-style hooks are the secret:
    /// what logs, rows and errors name.
    pub fn shown(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(u) => format!(
                "{}://{}{}/…",
                u.scheme(),
                u.host_str().unwrap_or_default(),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ),
            Err(_) => "(not a URL)".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alerts(yaml: &str) -> Result<AlertSpans, String> {
        serde_norway::from_str::<Alerts>(yaml)
            .map_err(|e| e.to_string())?
            .spans()
    }

    #[test]
    fn spans_and_thresholds_are_checked() {
        let ok = alerts("requests: { factor: 5, min: 30 }").unwrap();
        assert_eq!((ok.window_ms, ok.baseline_ms), (60_000, 3_600_000));
        let ok = alerts("window: 10s\nbaseline: 20s\nnew_paths: true").unwrap();
        assert_eq!((ok.window_ms, ok.baseline_ms), (10_000, 20_000));
        for (yaml, why) in [
            ("window: 1s\nnew_paths: true", "window"),
            ("window: 1500ms\nnew_paths: true", "window"),
            ("window: 10m\nbaseline: 15m\nnew_paths: true", "two windows"),
            ("requests: { factor: 0.5, min: 3 }", "factor"),
            ("requests: { factor: .nan, min: 3 }", "factor"),
            ("denials: { factor: 5, min: 0 }", "min"),
            ("errors: { share: 1.5, min: 3 }", "share"),
            ("errors: { share: 0, min: 3 }", "share"),
            ("quarantine: true", "nothing"),
            ("quarantine: true\nnew_paths: true", "quarantine"),
            ("{}", "nothing"),
            ("requests: { factor: 5 }", "min"),
            ("request: { factor: 5, min: 1 }", "unknown field"),
        ] {
            let e = alerts(yaml).unwrap_err();
            assert!(e.contains(why), "{yaml}: {e}");
        }
    }

    #[test]
    fn webhooks_are_http_and_shown_without_their_path() {
        let hook = |url: &str| Webhook {
            url: url.to_owned(),
            format: WebhookFormat::Slack,
        };
        let slack = hook("https://hooks.example/services/T0/B0/SECRET?x=1");
        slack.validate().unwrap();
        assert_eq!(slack.shown(), "https://hooks.example/…");
        assert_eq!(hook("http://127.0.0.1:9/h").shown(), "http://127.0.0.1:9/…");
        for bad in [
            "ftp://x/y",
            "file:///etc/passwd",
            "https://u:p@h/x",
            "not a url",
        ] {
            assert!(hook(bad).validate().is_err(), "{bad}");
        }
    }
}
