//! Step 1, route: the first path segment names the proxy; the rest, normalized, is the
//! upstream path that the rules check and that is forwarded, byte for byte.

use std::borrow::Cow;

use crate::denial::Denial;

/// The longest `:path` latchkey accepts; Envoy's own default limit is larger.
const MAX_PATH_LEN: usize = 8 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub proxy: &'a str,
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
        proxy,
        path: upstream,
        query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (String, String, Option<String>) {
        let r = route(raw).unwrap();
        (r.proxy.into(), r.path.into_owned(), r.query.map(Into::into))
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
}
