//! Target URLs.

/// A target URL split into what routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    pub tls: bool,
    /// `host` or `host:port`, as the upstream's `Host` header.
    pub authority: String,
    /// The base path without a trailing slash ("" for none).
    pub base_path: String,
}

impl TargetUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} must start with https:// or http://"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.strip_prefix('[') {
            // An IPv6 literal: [addr] or [addr]:port.
            Some(v6) => match v6.split_once(']') {
                Some((addr, "")) => (addr, None),
                Some((addr, port)) => (addr, Some(port.strip_prefix(':').unwrap_or(port))),
                None => ("", None),
            },
            None => match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let v6 = authority.starts_with('[');
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || (v6 && b == b':'));
        if !host_ok {
            return Err(format!("{url:?} has no valid host"));
        }
        if let Some(p) = port
            && p.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(format!("{url:?} has an invalid port"));
        }
        if path.contains(['?', '#', '%', '\\']) || path.split('/').any(|s| s == "." || s == "..") {
            return Err(format!(
                "{url:?}: the base path may not hold a query, fragment, escapes or dot segments"
            ));
        }
        Ok(Self {
            tls,
            authority: authority.to_ascii_lowercase(),
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }
}
