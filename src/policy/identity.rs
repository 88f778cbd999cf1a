//! Workload identity on a proxy credential: which signed tokens (JWTs, such as a
//! Kubernetes projected service-account token) stand for the credential, and the run keys
//! such a token may mint.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default and the longest `max_ttl` of a run key minted from a token.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);
const LONGEST_MAX_TTL: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The token's `iss`, exactly.
    pub issuer: String,
    /// One of the token's `aud`, exactly.
    pub audience: String,
    /// Where the issuer's public keys are.
    pub jwks: JwksSource,
    /// The token's `sub`, as a glob: `*` any run of characters, `?` one.
    pub subject: String,
    /// Further string claims the token must carry, each a glob.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
    /// The longest TTL a run key minted from a token may have (default 1h, at most 7d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<String>,
    /// The largest spend cap a minted run key may have; when set, every minted key is
    /// capped (by this, unless it asks for less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spend_cap_usd: Option<f64>,
}

/// The issuer's JSON Web Key Set: a file `latchkey serve` reads, or an HTTPS URL it fetches
/// (plain HTTP only on the loopback address).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwksSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl Identity {
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (field, value, max) in [
            ("issuer", &self.issuer, 512),
            ("audience", &self.audience, 512),
            ("subject", &self.subject, 512),
        ] {
            if value.is_empty() || value.len() > max {
                return Err(format!("identity.{field}: 1 to {max} characters"));
            }
        }
        match (&self.jwks.file, &self.jwks.url) {
            (Some(file), None) if !file.is_empty() => {}
            (None, Some(url)) => check_jwks_url(url)?,
            _ => return Err("identity.jwks: exactly one of `file` or `url`".into()),
        }
        for name in self.claims.keys() {
            if matches!(name.as_str(), "iss" | "aud" | "sub" | "exp" | "nbf" | "iat") {
                return Err(format!(
                    "identity.claims: {name:?} is checked by its own field"
                ));
            }
        }
        self.max_ttl()?;
        if let Some(cap) = self.max_spend_cap_usd
            && !(cap.is_finite() && cap >= 0.0)
        {
            return Err("identity.max_spend_cap_usd: a non-negative amount".into());
        }
        Ok(())
    }

    /// The longest TTL of a minted run key.
    pub fn max_ttl(&self) -> Result<Duration, String> {
        let Some(text) = &self.max_ttl else {
            return Ok(DEFAULT_MAX_TTL);
        };
        let ttl = humantime::parse_duration(text)
            .map_err(|e| format!("identity.max_ttl: {text:?}: {e}"))?;
        if ttl < Duration::from_secs(1) || ttl > LONGEST_MAX_TTL {
            return Err(format!("identity.max_ttl: {text:?} is not from 1s to 7d"));
        }
        Ok(ttl)
    }
}

/// HTTPS, or HTTP to the loopback address: keys fetched in the clear from elsewhere could
/// be swapped for an attacker's on the way.
fn check_jwks_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("identity.jwks.url: {e}"))?;
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || (host.trim_start_matches('[').trim_end_matches(']'))
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" if !host.is_empty() => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "identity.jwks.url {url:?}: https, or http on the loopback address"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::glob_regex;

    #[test]
    fn globs_match_whole_values() {
        let re = glob_regex("system:serviceaccount:agents:*").unwrap();
        assert!(re.is_match("system:serviceaccount:agents:runner"));
        assert!(!re.is_match("system:serviceaccount:agents-evil:x"));
        assert!(!re.is_match("xsystem:serviceaccount:agents:runner"));
        let re = glob_regex("search_?.v1").unwrap();
        assert!(re.is_match("search_a.v1"));
        assert!(!re.is_match("search_a-v1"));
        assert!(glob_regex("a\nb*").unwrap().is_match("a\nbc\nd"));
    }

    #[test]
    fn jwks_urls_are_https_or_loopback() {
        assert!(check_jwks_url("https://issuer.example/keys").is_ok());
        assert!(check_jwks_url("http://127.0.0.1:8080/keys").is_ok());
        assert!(check_jwks_url("http://localhost/keys").is_ok());
        assert!(check_jwks_url("http://issuer.example/keys").is_err());
        assert!(check_jwks_url("file:///etc/keys").is_err());
    }
}
