//! Step 1, route: the first path segment names the proxy; the rest, normalized, is the
//! upstream path that the rules check and that is forwarded, byte for byte.

use std::borrow::Cow;

use crate::dataplane::denial::Denial;

/// The longest `:path` latchkey accepts; Envoy's own default limit is larger.
const MAX_PATH_LEN: usize = 8 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub proxy: Cow<'a, str>,
    /// Starts with `/`; no dot segments, no empty segments.
    pub path: Cow<'a, str>,
    /// The raw query after `?`, forwarded unchanged.
    pub query: Option<&'a str>,
}

pub fn route(raw: &str) -> Result<Route<'_>, Denial> {
    if raw.len() > MAX_PATH_LEN {
        return Err(Denial::InvalidRequest("path too long"));
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err(Denial::InvalidRequest("path must start with /"));
    }
    if path
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'\\' || b == b'#' || b >= 0x80)
    {
        return Err(Denial::InvalidRequest("path holds a forbidden character"));
    }
    // Encoded separators and dots would mean one thing to the rules and another to an
    // upstream that decodes them.
    let encoded = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c') | (b'2', b'e') | (b'0', b'0')
            )
    });
    if encoded {
        return Err(Denial::InvalidRequest(
            "path holds an encoded slash, backslash, dot or NUL",
        ));
    }
    // Servlet containers and Spring drop `;params` from every segment (`/v1;x/admin` is
    // `/v1/admin` to them), and `..;` climbs: no rule can judge what such a path means.
    if path.contains(';') || contains_ignore_case(path, "%3b") {
        return Err(Denial::InvalidRequest("path holds ;parameters"));
    }
    if double_encoded(path)
        || path.match_indices('%').any(|(i, _)| {
            !path.as_bytes()[i..]
                .get(1..3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
        })
    {
        return Err(DOUBLE_ENCODED);
    }
    if let Some(query) = query {
        check_query(query)?;
    }
    // `%61dmin` is `admin` to every upstream: decoded here, so that a rule on `admin`
    // sees it whatever Envoy's normalization settings are.
    match decode_unreserved(path) {
        Cow::Borrowed(path) => normalize(path, query),
        Cow::Owned(path) => {
            // `%25%32%65` decodes to `%252e`: an escaped escape made by the decoding.
            if double_encoded(&path) {
                return Err(DOUBLE_ENCODED);
            }
            let route = normalize(&path, query)?;
            Ok(Route {
                proxy: Cow::Owned(route.proxy.into_owned()),
                path: Cow::Owned(route.path.into_owned()),
                query,
            })
        }
    }
}

const DOUBLE_ENCODED: Denial =
    Denial::InvalidRequest("path holds a double-encoded or malformed escape");

/// Whether `%25` comes before hex digits: it decodes to an escape an upstream may decode
/// again.
fn double_encoded(path: &str) -> bool {
    path.as_bytes().windows(5).any(|w| {
        w[0] == b'%' && w[1] == b'2' && w[2] == b'5' && w[3..].iter().all(u8::is_ascii_hexdigit)
    })
}

/// Splits off the proxy and resolves dot and empty segments.
fn normalize<'a>(path: &'a str, query: Option<&'a str>) -> Result<Route<'a>, Denial> {
    let raw_segments: Vec<&str> = path[1..].split('/').collect();
    let last = raw_segments.len() - 1;
    let normal = raw_segments
        .iter()
        .enumerate()
        .all(|(i, s)| !(*s == "." || *s == ".." || (s.is_empty() && i != last)));
    let (proxy, upstream) = if normal {
        let proxy = raw_segments[0];
        let rest = &path[1 + proxy.len()..];
        (
            proxy,
            Cow::Borrowed(if rest.is_empty() { "/" } else { rest }),
        )
    } else {
        let mut segments: Vec<&str> = Vec::with_capacity(raw_segments.len());
        for seg in &raw_segments {
            match *seg {
                "" | "." => {}
                ".." => {
                    if segments.pop().is_none() {
                        return Err(Denial::InvalidRequest("path climbs above its root"));
                    }
                }
                s => segments.push(s),
            }
        }
        let Some((&proxy, rest)) = segments.split_first() else {
            return Err(Denial::UnknownProxy(String::new()));
        };
        let mut p = String::with_capacity(path.len());
        for s in rest {
            p.push('/');
            p.push_str(s);
        }
        // As RFC 3986 resolves them, "/a/b/.." and "/a/b/" both end in a slash.
        if p.is_empty() || matches!(raw_segments[last], "" | "." | "..") {
            p.push('/');
        }
        (proxy, Cow::Owned(p))
    };
    if proxy.is_empty() {
        return Err(Denial::UnknownProxy(String::new()));
    }
    Ok(Route {
        proxy: Cow::Borrowed(proxy),
        path: upstream,
        query,
    })
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// `%XX` escapes of unreserved characters (letters, digits, `-`, `_`, `~`; dots are
/// refused above) decoded: RFC 3986 makes the two spellings the same URI.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let unreserved = |w: &[u8]| -> Option<u8> {
        if w[0] != b'%' {
            return None;
        }
        let hex = std::str::from_utf8(&w[1..3]).ok()?;
        let byte = u8::from_str_radix(hex, 16).ok()?;
        (byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~')).then_some(byte)
    };
    let bytes = path.as_bytes();
    if !bytes.windows(3).any(|w| unreserved(w).is_some()) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i..i + 3).and_then(unreserved) {
            Some(byte) => {
                out.push(char::from(byte));
                i += 3;
            }
            None => {
                out.push(char::from(bytes[i]));
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// Query parameters that frameworks (Rails, Laravel, Express's method-override, Symfony)
/// read as the method to act on: a POST the rules allowed would become a DELETE.
const METHOD_OVERRIDES: [&str; 5] = [
    "_method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "_httpmethod",
];

fn check_query(query: &str) -> Result<(), Denial> {
    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
        let name = name.trim().to_ascii_lowercase().replace('_', "-");
        if METHOD_OVERRIDES.iter().any(|m| m.replace('_', "-") == name) {
            return Err(Denial::InvalidRequest(
                "the query names a method override (_method)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (String, String, Option<String>) {
        let r = route(raw).unwrap();
        (
            r.proxy.into_owned(),
            r.path.into_owned(),
            r.query.map(Into::into),
        )
    }

    #[test]
    fn splits_proxy_path_and_query() {
        assert_eq!(
            ok("/stripe-billing/v1/charges?limit=3&x=%20"),
            (
                "stripe-billing".into(),
                "/v1/charges".into(),
                Some("limit=3&x=%20".into())
            )
        );
        assert_eq!(ok("/p"), ("p".into(), "/".into(), None));
        assert_eq!(ok("/p/"), ("p".into(), "/".into(), None));
        assert_eq!(ok("/p/a/"), ("p".into(), "/a/".into(), None));
        assert_eq!(ok("/p/a%20b"), ("p".into(), "/a%20b".into(), None));
    }

    #[test]
    fn normalizes_dot_and_empty_segments() {
        assert_eq!(ok("/p//a///b").1, "/a/b");
        assert_eq!(ok("/p/a/./b").1, "/a/b");
        assert_eq!(ok("/p/a/../b").1, "/b");
        assert_eq!(ok("//p/a").0, "p");
        // Climbing out of a proxy lands in another one: that proxy's rules then apply.
        assert_eq!(ok("/p/../q/x"), ("q".into(), "/x".into(), None));
        assert_eq!(ok("/p/a/..").1, "/");
        assert_eq!(ok("/p/a/b/..").1, "/a/");
    }

    #[test]
    fn decodes_escaped_unreserved_characters() {
        assert_eq!(ok("/p/v1/%61dmin").1, "/v1/admin");
        assert_eq!(ok("/p/v1/%7Euser%2Dx%5f%30").1, "/v1/~user-x_0");
        assert_eq!(ok("/%70/x").0, "p");
        // Reserved and other characters keep their escapes.
        assert_eq!(ok("/p/a%20b%3Fc%25").1, "/a%20b%3Fc%25");
        assert_eq!(ok("/p/v1/charges?method=card").2.unwrap(), "method=card");
    }

    #[test]
    fn refuses_tricks() {
        for raw in [
            "/p/../../etc",
            "/p/a%2fb",
            "/p/a%2Fb",
            "/p/a%5Cb",
            "/p/%2e%2e/q",
            "/p/%2E",
            "/p/a%00",
            "/p/a\\b",
            "/p/a b",
            "/p/a#f",
            "p/a",
            "/p/\u{e9}",
            "/p/v1/charges/..;/admin",
            "/p/v1/charges/..;jsessionid=1/admin",
            "/p/v1/.;/admin",
            "/p/v1/..%3b/admin",
            "/p/v1/..%3B/admin",
            "/p/v1;x/admin",
            "/p/v1/charges;jsessionid=1",
            "/p/v1/%252e%252e/admin",
            "/p/v1/%%32%65",
            "/p/v1/%zz",
            "/p/v1/%4",
            "/p/v1/charges?_method=DELETE",
            "/p/v1/charges?a=1&_METHOD=delete",
            "/p/v1/charges?x_http_method_override=DELETE",
            "/p/v1/charges?X-HTTP-Method-Override=DELETE",
            "/p/v1/charges?%5Fmethod=DELETE",
            "/p/v1/%25%32%65%25%32%65/admin",
            "/a/%25%61aa",
        ] {
            assert!(
                matches!(route(raw), Err(Denial::InvalidRequest(_))),
                "{raw}: {:?}",
                route(raw)
            );
        }
        assert!(matches!(route("/"), Err(Denial::UnknownProxy(_))));
        assert!(route(&format!("/p/{}", "a".repeat(MAX_PATH_LEN))).is_err());
    }

    proptest::proptest! {
        /// Whatever the agent sends, what is forwarded has no dot segment (with or
        /// without parameters), no escaped unreserved character, and routes to itself.
        #[test]
        fn forwarded_paths_are_canonical(raw in "/[a-z]{1,3}(/(\\.|\\.\\.|%|%2|%25|%2[eE]|%3[bB]|%6[1-9]|;|[a-z]|%20|\\?|_method|=|&)*){0,6}") {
            if let Ok(r) = route(&raw) {
                proptest::prop_assert!(r.path.starts_with('/'));
                for segment in r.path.split('/') {
                    proptest::prop_assert!(segment != "." && segment != "..", "{raw} -> {}", r.path);
                    proptest::prop_assert!(!segment.contains(';'), "{raw} -> {}", r.path);
                }
                proptest::prop_assert!(matches!(decode_unreserved(&r.path), Cow::Borrowed(_)));
                // Decoding once more changes nothing a rule could have missed.
                let decoded = percent_encoding::percent_decode_str(&r.path).decode_utf8_lossy();
                proptest::prop_assert!(
                    decoded.split('/').all(|s| s != "." && s != "..") && !decoded.contains(';') && !decoded.contains('\\'),
                    "{raw} -> {}", r.path
                );
                let again = format!("/{}{}", r.proxy, r.path);
                let second = route(&again).unwrap();
                proptest::prop_assert_eq!(second.path, r.path.clone());
                proptest::prop_assert_eq!(second.proxy, r.proxy.clone());
            }
        }
    }
}
