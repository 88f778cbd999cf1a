//! Posting alerts and requests for approval to a proxy's webhooks: JSON as is, or a
//! Slack-compatible `{"text"}`; each post retried with backoff, and one that fails every
//! attempt kept whole in the dead-letter log (`latchkey alerts --dead-letters`).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;

use crate::policy::{Webhook, WebhookFormat};
use crate::store::Store;
use crate::store::alerts::DeadLetter;

/// The wait before each retry: 4 attempts of at most 5 s each, 25 s in all at worst.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(4),
];
const TIMEOUT: Duration = Duration::from_secs(5);
/// Posts under way at once; more wait their turn.
const IN_FLIGHT: usize = 32;

/// An event to post: its id, the JSON form and the one line a chat shows.
#[derive(Clone)]
pub struct Post {
    pub event_id: String,
    pub json: serde_json::Value,
    pub text: String,
}

#[derive(Clone)]
pub struct Poster {
    client: reqwest::Client,
    store: Store,
    dead_letters: Counter,
    slots: Arc<Semaphore>,
}

impl Poster {
    pub fn new(store: Store, dead_letters: Counter) -> Self {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            // A hook that redirects is posted nowhere else: its answer is its answer.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with default TLS builds");
        Self {
            client,
            store,
            dead_letters,
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Posts to every hook at once (a dead one delays no other); true when each took it
    /// (answered 2xx).
    pub async fn post(&self, hooks: &[Webhook], post: &Post) -> bool {
        let mut posts = tokio::task::JoinSet::new();
        for hook in hooks {
            let (me, hook, post) = (self.clone(), hook.clone(), post.clone());
            posts.spawn(async move { me.post_one(&hook, &post).await });
        }
        let mut all = true;
        while let Some(delivered) = posts.join_next().await {
            all &= delivered.unwrap_or(false);
        }
        all
    }

    async fn post_one(&self, hook: &Webhook, post: &Post) -> bool {
        let body = match hook.format {
            WebhookFormat::Json => post.json.clone(),
            WebhookFormat::Slack => serde_json::json!({ "text": slack_escaped(&post.text) }),
        };
        let mut error = String::new();
        for attempt in 0..=BACKOFF.len() {
            if attempt > 0 {
                tokio::time::sleep(BACKOFF[attempt - 1]).await;
            }
            // A slot per attempt, not across the waits: a dead hook holds none.
            let slot = self.slots.acquire().await;
            let sent = self.client.post(&hook.url).json(&body).send().await;
            drop(slot);
            match sent {
                Ok(answer) if answer.status().is_success() => return true,
                Ok(answer) => error = format!("answered {}", answer.status().as_u16()),
                // The error names the URL, whose path may be the hook's secret.
                Err(e) => error = describe(e),
            }
        }
        self.dead_letters.inc();
        tracing::warn!(webhook = %hook.shown(), event = %post.event_id, error = %error,
            "webhook post failed every attempt; kept in the dead-letter log");
        let letter = DeadLetter {
            id: crate::base::crypto::random_id("dl"),
            time_ms: crate::base::clock::now_unix_ms(),
            webhook: hook.shown(),
            event_id: post.event_id.clone(),
            payload: body.to_string(),
            attempts: BACKOFF.len() as i64 + 1,
            error,
        };
        if let Err(e) = self.store.dead_letter(&letter).await {
            tracing::error!(error = %e, event = %post.event_id, "could not keep a dead letter");
        }
        false
    }
}

/// Slack reads `<…>` as links and mentions (`<!channel>` pings everyone) and `&` as an
/// entity: text an agent chose (a path, a label) is shown, never obeyed.
fn slack_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// What went wrong, without the URL.
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_text_cannot_mention_or_link() {
        assert_eq!(
            slack_escaped("first request to /<!channel>/a&b <https://x|y>"),
            "first request to /&lt;!channel&gt;/a&amp;b &lt;https://x|y&gt;"
        );
    }
}
