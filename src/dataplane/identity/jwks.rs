//! Issuers' public keys: read from a file or fetched from a URL, kept in memory, read
//! again when they are old or a token names a key they lack. A token naming an unknown
//! key can force a read at most once per [`FORCED_EVERY_MS`] per source, so an agent
//! sending made-up key ids cannot turn latchkey against the issuer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::base::jwt::{self, Jwk};
use crate::dataplane::snapshot::JwksSource as Source;

/// Keys are read again after this long, to see keys removed as well as added.
const FRESH_MS: i64 = 300_000;
const FORCED_EVERY_MS: i64 = 10_000;
/// The largest key set read.
const MAX_SET_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct KeySets {
    sets: Mutex<HashMap<Source, Arc<KeySet>>>,
    http: std::sync::OnceLock<reqwest::Client>,
}

#[derive(Default)]
struct KeySet {
    state: Mutex<State>,
    /// One read at a time; the others wait for it and use what it read.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Arc<[Jwk]>,
    /// When it was last read (Unix ms), whether or not the read succeeded; 0: never.
    read_ms: i64,
    /// When a token's unknown key last forced a read.
    forced_ms: i64,
    /// Reads so far: a waiter whose read was done meanwhile does not read again.
    reads: u64,
}

impl KeySets {
    /// The keys of `source` that may have signed a token naming `kid`: read first when
    /// never read or old, and again (if allowed) when none is named `kid`.
    pub async fn keys_for(&self, source: &Source, kid: Option<&str>, now_ms: i64) -> Arc<[Jwk]> {
        let set = {
            let mut sets = self.sets.lock().expect("key sets");
            sets.entry(source.clone()).or_default().clone()
        };
        let (keys, read_ms, reads) = set.snapshot();
        if now_ms - read_ms >= FRESH_MS {
            // Read just now: reading again would find the same.
            return self.read(&set, source, reads, now_ms).await;
        }
        if kid.is_none_or(|kid| keys.iter().any(|k| k.kid.as_deref() == Some(kid))) {
            return keys;
        }
        let (_, _, reads) = set.snapshot();
        let may_force = {
            let mut state = set.state.lock().expect("key set");
            let allowed = now_ms - state.forced_ms >= FORCED_EVERY_MS;
            if allowed {
                state.forced_ms = now_ms;
            }
            allowed
        };
        if may_force {
            self.read(&set, source, reads, now_ms).await
        } else {
            keys
        }
    }

    async fn read(&self, set: &KeySet, source: &Source, seen: u64, now_ms: i64) -> Arc<[Jwk]> {
        let _one = set.reading.lock().await;
        let (keys, _, reads) = set.snapshot();
        if reads != seen {
            return keys;
        }
        let read = match self.fetch(source).await {
            Ok(bytes) => jwt::key_set(&bytes),
            Err(e) => Err(e),
        };
        let mut state = set.state.lock().expect("key set");
        state.read_ms = now_ms;
        state.reads += 1;
        match read {
            Ok(keys) => {
                tracing::info!(%source, keys = keys.len(), "identity keys read");
                state.keys = keys.into();
            }
            // The keys read before stay: an issuer briefly unreachable refuses nobody.
            Err(why) => tracing::warn!(%source, %why, "identity keys could not be read"),
        }
        state.keys.clone()
    }

    async fn fetch(&self, source: &Source) -> Result<Vec<u8>, String> {
        match source {
            Source::File(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
                if bytes.len() > MAX_SET_BYTES {
                    return Err("larger than 1 MiB".into());
                }
                Ok(bytes)
            }
            Source::Url(url) => {
                let http = self.http.get_or_init(|| {
                    reqwest::Client::builder()
                        .timeout(FETCH_TIMEOUT)
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                        .expect("an HTTP client")
                });
                let mut response = http.get(url).send().await.map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("status {}", response.status()));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_SET_BYTES {
                        return Err("larger than 1 MiB".into());
                    }
                }
                Ok(body)
            }
        }
    }
}

impl KeySet {
    fn snapshot(&self) -> (Arc<[Jwk]>, i64, u64) {
        let state = self.state.lock().expect("key set");
        (state.keys.clone(), state.read_ms, state.reads)
    }
}
