//! `auth: oauth2_client_credentials`: latchkey fetches an access token from the vendor's
//! token endpoint with the client secret it keeps, caches it, and refreshes it before it
//! expires — one fetch in flight per credential however many requests wait. A request
//! that cannot get a token is refused; it is never forwarded without a credential.
//!
//! Token sources outlive policy reloads (issuing a run key reloads the policy): they are
//! shared by key, the credential and a fingerprint of everything that shapes its token.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use crate::policy::ClientAuth;

/// Everything a token request is made of.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenConfig {
    pub token_url: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub client_auth: ClientAuth,
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token endpoint answered {0}")]
    Status(u16),
    #[error("the token endpoint's answer has no usable access_token")]
    BadAnswer,
    #[error("the token endpoint could not be reached: {0}")]
    Unreachable(String),
    #[error("no token within {0:?}")]
    Timeout(Duration),
}

struct Token {
    /// The whole header value, `Bearer …`.
    header: Zeroizing<Vec<u8>>,
    fetched: Instant,
    expires: Instant,
}

impl Token {
    /// Refresh in the last fifth of the lifetime (at most a minute before expiry).
    fn stale(&self, now: Instant) -> bool {
        let life = self.expires.saturating_duration_since(self.fetched);
        let margin = (life / 5).min(Duration::from_secs(60));
        now + margin >= self.expires
    }
}

pub struct TokenSource {
    config: TokenConfig,
    secret: Zeroizing<String>,
    current: ArcSwapOption<Token>,
    /// Held by the one fetch in flight.
    fetching: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSource({}, <redacted>)", self.config.token_url)
    }
}

/// How long a request may wait for a token: Envoy gives latchkey 2 s per message.
const REQUEST_BUDGET: Duration = Duration::from_millis(1500);
/// Without `expires_in`, a token is trusted this long.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Nor longer than this, whatever the server says (`expires_in: 1e19` must not
/// overflow the clock, and a day-old token is refreshed anyway).
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// How long a token the server says lives `expires_in` seconds is used.
fn lifetime(expires_in: Option<u64>) -> Duration {
    expires_in.map_or(DEFAULT_LIFETIME, |s| {
        Duration::from_secs(s).min(MAX_LIFETIME)
    })
}

static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client with the system's roots")
});

static SOURCES: LazyLock<Mutex<HashMap<[u8; 32], Weak<TokenSource>>>> =
    LazyLock::new(Mutex::default);

/// The token source of a credential, shared with the previous policy's if nothing that
/// shapes the token changed.
pub fn source(credential_id: &str, config: TokenConfig, secret: &str) -> Arc<TokenSource> {
    let mut fingerprint = Sha256::new();
    for part in [
        credential_id,
        &config.token_url,
        &config.client_id,
        &config.scopes.join(" "),
        &format!("{:?}", config.client_auth),
        &format!("{:?}", config.params),
        secret,
    ] {
        fingerprint.update((part.len() as u64).to_be_bytes());
        fingerprint.update(part.as_bytes());
    }
    let key: [u8; 32] = fingerprint.finalize().into();
    let mut sources = SOURCES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(live) = sources.get(&key).and_then(Weak::upgrade) {
        return live;
    }
    sources.retain(|_, weak| weak.strong_count() > 0);
    let fresh = Arc::new(TokenSource {
        config,
        secret: Zeroizing::new(secret.to_owned()),
        current: ArcSwapOption::empty(),
        fetching: Arc::default(),
    });
    sources.insert(key, Arc::downgrade(&fresh));
    fresh
}

impl TokenSource {
    /// The `Authorization` value to send: the cached token, or a fresh one. A stale
    /// token is still used while one background fetch replaces it.
    pub async fn header(self: &Arc<Self>) -> Result<Zeroizing<Vec<u8>>, TokenError> {
        let now = Instant::now();
        if let Some(token) = self.current.load_full().filter(|t| now < t.expires) {
            if token.stale(now)
                && let Ok(guard) = self.fetching.clone().try_lock_owned()
            {
                let me = self.clone();
                tokio::spawn(async move {
                    let _one = guard;
                    if let Err(e) = me.fetch_with_retries(Duration::from_secs(30)).await {
                        tracing::warn!(token_url = %me.config.token_url, error = %e, "token refresh failed; the current token is used until it expires");
                    }
                });
            }
            return Ok(token.header.clone());
        }
        let wait = tokio::time::timeout(REQUEST_BUDGET, async {
            let _one = self.fetching.lock().await;
            // Another request's fetch may have finished while this one waited.
            if let Some(token) = self
                .current
                .load_full()
                .filter(|t| Instant::now() < t.expires)
            {
                return Ok(token.header.clone());
            }
            self.fetch_with_retries(REQUEST_BUDGET).await
        });
        wait.await
            .unwrap_or(Err(TokenError::Timeout(REQUEST_BUDGET)))
    }

    async fn fetch_with_retries(&self, budget: Duration) -> Result<Zeroizing<Vec<u8>>, TokenError> {
        let deadline = Instant::now() + budget;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.fetch().await {
                Ok(token) => {
                    let header = token.header.clone();
                    self.current.store(Some(Arc::new(token)));
                    return Ok(header);
                }
                // A refusal is an answer: retrying the same credentials will not help.
                Err(e @ TokenError::Status(400..=499)) => return Err(e),
                Err(e) if Instant::now() + backoff >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "token fetch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    async fn fetch(&self) -> Result<Token, TokenError> {
        let c = &self.config;
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let scope = c.scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        form.extend(c.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut request = CLIENT
            .post(&c.token_url)
            .header("accept", "application/json");
        request = match c.client_auth {
            ClientAuth::Basic => request.basic_auth(
                form_urlencoded::byte_serialize(c.client_id.as_bytes()).collect::<String>(),
                Some(form_urlencoded::byte_serialize(self.secret.as_bytes()).collect::<String>()),
            ),
            ClientAuth::Body => {
                form.push(("client_id", &c.client_id));
                form.push(("client_secret", &self.secret));
                request
            }
        };
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish();
        let fetched = Instant::now();
        let response = request
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| TokenError::Unreachable(e.without_url().to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(TokenError::Status(status.as_u16()));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            token_type: Option<String>,
            expires_in: Option<u64>,
        }
        let answer: Answer = response.json().await.map_err(|_| TokenError::BadAnswer)?;
        let access_token = Zeroizing::new(answer.access_token);
        let usable = !access_token.is_empty()
            && access_token.bytes().all(|b| b.is_ascii_graphic())
            && answer
                .token_type
                .as_deref()
                .is_none_or(|t| t.eq_ignore_ascii_case("bearer"));
        if !usable {
            return Err(TokenError::BadAnswer);
        }
        let lifetime = lifetime(answer.expires_in);
        let mut header = Zeroizing::new(Vec::with_capacity(7 + access_token.len()));
        header.extend_from_slice(b"Bearer ");
        header.extend_from_slice(access_token.as_bytes());
        Ok(Token {
            header,
            fetched,
            expires: fetched + lifetime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_expires_in_is_clamped() {
        let now = Instant::now();
        assert_eq!(lifetime(Some(u64::MAX)), MAX_LIFETIME);
        assert!(now.checked_add(lifetime(Some(u64::MAX))).is_some());
        assert_eq!(lifetime(Some(60)), Duration::from_secs(60));
        assert_eq!(lifetime(None), DEFAULT_LIFETIME);
    }
}
