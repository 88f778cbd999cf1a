//! The approval desk the data plane asks about requests an `approve` rule holds, kept in
//! the store so every replica sees the same approvals and each is used once. Only such
//! requests reach the store on their way: they wait for a person anyway. A new request
//! for approval is posted to the proxy's webhooks, in the background.

use crate::control::alerts::webhook::{Post, Poster};
use crate::dataplane::approval::{Answer, Ask, Asked, Desk};
use crate::store::Store;
use crate::store::approvals::{APPROVAL_TTL_MS, Held, NewApproval};

pub struct StoreDesk {
    store: Store,
    poster: Poster,
}

impl StoreDesk {
    pub fn new(store: Store, poster: Poster) -> Self {
        Self { store, poster }
    }

    /// Tells the proxy's webhooks a request waits, with what an approver sees.
    fn announce(&self, ask: &Ask, id: &str, now_ms: i64) {
        if ask.webhooks.is_empty() {
            return;
        }
        let who = ask
            .key_id
            .as_deref()
            .or(ask.credential.as_deref())
            .unwrap_or("-");
        let label = ask
            .run_label
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let post = Post {
            event_id: id.to_owned(),
            json: serde_json::json!({
                "type": "latchkey.approval",
                "approval": {
                    "id": id,
                    "proxy": &*ask.proxy,
                    "credential": ask.credential.as_deref(),
                    "key_id": ask.key_id.as_deref(),
                    "run_label": ask.run_label.as_deref(),
                    "rule_id": &*ask.rule_id,
                    "method": ask.method,
                    "path": ask.path,
                    "body": ask.body_summary,
                    "created_ms": now_ms,
                    "expires_ms": now_ms + APPROVAL_TTL_MS,
                    "approve": format!("latchkey approvals approve {id}"),
                    "deny": format!("latchkey approvals deny {id}"),
                }
            }),
            text: format!(
                "latchkey: {} {} on proxy {} by {who}{label} waits for approval (rule {}). Body: {}. \
                 `latchkey approvals approve {id}` or `latchkey approvals deny {id}`.",
                ask.method, ask.path, ask.proxy, ask.rule_id, ask.body_summary
            ),
        };
        let (poster, hooks) = (self.poster.clone(), ask.webhooks.clone());
        tokio::spawn(async move { poster.post(&hooks, &post).await });
    }
}

impl Desk for StoreDesk {
    fn ask<'a>(&'a self, ask: &'a Ask, now_ms: i64) -> Asked<'a> {
        Box::pin(async move {
            let fingerprint: String = ask.fingerprint.iter().map(|b| format!("{b:02x}")).collect();
            let new = NewApproval {
                fingerprint: &fingerprint,
                proxy: &ask.proxy,
                credential: ask.credential.as_deref(),
                key_id: ask.key_id.as_deref(),
                run_label: ask.run_label.as_deref(),
                rule_id: &ask.rule_id,
                method: &ask.method,
                path: &ask.path,
                body_summary: &ask.body_summary,
            };
            let held = self
                .store
                .hold(&new, now_ms)
                .await
                .map_err(|e| e.to_string())?;
            Ok(match held {
                Held::Approved => {
                    tracing::info!(proxy = %ask.proxy, method = %ask.method, path = %ask.path,
                        "an approved request goes");
                    Answer::Approved
                }
                Held::Created(id) => {
                    self.announce(ask, &id, now_ms);
                    Answer::Pending(id)
                }
                Held::Pending(id) => Answer::Pending(id),
                Held::Denied(id) => Answer::Denied(id),
                Held::Backlogged(n) => Answer::Backlogged(n),
            })
        })
    }
}
