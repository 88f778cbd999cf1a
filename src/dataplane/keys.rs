//! Step 2, authenticate: find the proxy key in whichever carrier the agent's SDK uses,
//! and check it against the snapshot by hash.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::base::crypto::hash_key;
use crate::dataplane::denial::Denial;
use crate::dataplane::snapshot::{KeyEntry, Policy};

const MIN_KEY_LEN: usize = 16;
const MAX_KEY_LEN: usize = 512;
/// Different characters a key must have: `aaaaaaaaaaaaaaaa` is 16 long and guessable.
const MIN_DISTINCT: usize = 8;

/// Whether `key` could be a proxy key: 16 to 512 printable characters, at least 8 of
/// them different. Checked where keys are imported (the CLI, which hashes them) and
/// again by the server whenever one is presented, since the server only ever holds
/// hashes: a weak imported key never authenticates.
pub fn strong_enough(key: &[u8]) -> bool {
    let mut seen = [false; 128];
    let mut distinct = 0;
    for &b in key {
        if !b.is_ascii_graphic() {
            return false;
        }
        if !std::mem::replace(&mut seen[usize::from(b)], true) {
            distinct += 1;
        }
    }
    (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) && distinct >= MIN_DISTINCT
}

/// The key a header carries, if it carries one (`name` is lower-case). The names are
/// `names::CARRIERS`, each of which forwarding strips: a unit test holds the two equal.
fn carried<'a>(name: &str, value: &'a [u8]) -> Option<Cow<'a, [u8]>> {
    match name {
        "x-api-key" | "x-latchkey-key" | "api-key" | "x-goog-api-key" => {
            Some(Cow::Borrowed(value.trim_ascii()))
        }
        "authorization" | "proxy-authorization" => {
            let value = value.trim_ascii();
            let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
            let rest = rest.trim_ascii();
            if scheme.eq_ignore_ascii_case(b"bearer") {
                Some(Cow::Borrowed(rest))
            } else if scheme.eq_ignore_ascii_case(b"basic") {
                // The password of Basic auth; an undecodable value is a malformed key.
                let decoded = BASE64.decode(rest).unwrap_or_default();
                let password = match decoded.iter().position(|&b| b == b':') {
                    Some(i) => decoded[i + 1..].to_vec(),
                    None => Vec::new(),
                };
                Some(Cow::Owned(password))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The one proxy key the request presents. Two different keys are refused: which one
/// was meant is not ours to guess.
pub fn presented<'a>(headers: &[(&str, &'a [u8])]) -> Result<Cow<'a, [u8]>, Denial> {
    let mut found: Option<Cow<'a, [u8]>> = None;
    for (name, value) in headers {
        let Some(key) = carried(name, value) else {
            continue;
        };
        match &found {
            Some(k) if k.as_ref() != key.as_ref() => {
                return Err(Denial::InvalidKey("different keys in different headers"));
            }
            Some(_) => {}
            None => found = Some(key),
        }
    }
    let key = found.ok_or(Denial::MissingKey)?;
    // A workload's token is longer than any key; `identity` verifies it.
    if !strong_enough(&key) && !crate::base::jwt::looks_like(&key) {
        return Err(Denial::InvalidKey("malformed"));
    }
    Ok(key)
}

/// The live key entry for `key` at `now_ms` (Unix milliseconds), or why there is none.
pub fn authenticate<'p>(
    policy: &'p Policy,
    key: &[u8],
    now_ms: i64,
) -> Result<&'p KeyEntry, Denial> {
    let entry = policy
        .key(&hash_key(key))
        .ok_or(Denial::InvalidKey("unknown key"))?;
    if entry.revoked.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Denial::RevokedKey);
    }
    if entry.expires_at_ms.is_some_and(|t| t <= now_ms) {
        return Err(Denial::ExpiredKey);
    }
    if entry.quarantined.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Denial::Quarantined(entry.id.clone()));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::names::CARRIERS;

    const KEY: &str = "lk_abcdefghijklmnopqrstuvwx";

    fn present(headers: &[(&str, &str)]) -> Result<String, Denial> {
        let h: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        presented(&h).map(|k| String::from_utf8(k.into_owned()).unwrap())
    }

    /// A header read for a key but not stripped would take the key to the vendor; one
    /// stripped but not read would refuse an SDK that sends the key there.
    #[test]
    fn the_headers_read_for_a_key_are_the_ones_stripped() {
        let value = format!("Bearer {KEY}");
        let near = [
            "cookie",
            "x-api-keys",
            "api_key",
            "x-goog-api",
            "authorization-x",
        ];
        for name in CARRIERS.iter().chain(&near) {
            let carrier = CARRIERS.contains(name);
            assert_eq!(carried(name, value.as_bytes()).is_some(), carrier, "{name}");
        }
    }

    #[test]
    fn every_carrier_works() {
        let basic = format!("Basic {}", BASE64.encode(format!("user:{KEY}")));
        let basic_no_user = format!("basic {}", BASE64.encode(format!(":{KEY}")));
        let bearer = format!("Bearer {KEY}");
        let bearer_lower = format!("bearer  {KEY} ");
        for h in [
            ("authorization", bearer.as_str()),
            ("authorization", bearer_lower.as_str()),
            ("authorization", basic.as_str()),
            ("authorization", basic_no_user.as_str()),
            ("proxy-authorization", bearer.as_str()),
            ("x-api-key", KEY),
            ("x-latchkey-key", KEY),
            ("api-key", KEY),
            ("x-goog-api-key", KEY),
        ] {
            assert_eq!(present(&[("accept", "*/*"), h]).unwrap(), KEY, "{h:?}");
        }
    }

    #[test]
    fn missing_malformed_and_conflicting() {
        assert_eq!(present(&[("accept", "x")]), Err(Denial::MissingKey));
        assert_eq!(
            present(&[("authorization", "Digest abc")]),
            Err(Denial::MissingKey)
        );
        assert_eq!(
            present(&[("x-api-key", "short")]),
            Err(Denial::InvalidKey("malformed"))
        );
        assert_eq!(
            present(&[("authorization", "Basic !!!")]),
            Err(Denial::InvalidKey("malformed"))
        );
        assert_eq!(
            present(&[("x-api-key", &"a".repeat(600))]),
            Err(Denial::InvalidKey("malformed"))
        );
        for weak in [
            "aaaaaaaaaaaaaaaaaaaa",
            "0000000000000000",
            "abababababababab",
        ] {
            assert_eq!(
                present(&[("x-api-key", weak)]),
                Err(Denial::InvalidKey("malformed")),
                "{weak}"
            );
        }
        let other = "lk_zzzzzzzzzzzzzzzzzzzzzzzz";
        assert!(matches!(
            present(&[("x-api-key", KEY), ("x-latchkey-key", other)]),
            Err(Denial::InvalidKey(_))
        ));
        assert_eq!(
            present(&[("x-api-key", KEY), ("x-latchkey-key", KEY)]).unwrap(),
            KEY
        );
    }
}
