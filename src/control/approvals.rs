//! The approval desk the data plane asks about requests an `approve` rule holds, kept in
//! the store so every replica sees the same approvals and each is used once. Only such
//! requests reach the store on their way: they wait for a person anyway.

use crate::dataplane::approval::{Answer, Ask, Asked, Desk};
use crate::store::Store;
use crate::store::approvals::{Held, NewApproval};

pub struct StoreDesk {
    store: Store,
}

impl StoreDesk {
    pub fn new(store: Store) -> Self {
        Self { store }
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
                Held::Pending(id) => Answer::Pending(id),
                Held::Denied(id) => Answer::Denied(id),
                Held::Backlogged(n) => Answer::Backlogged(n),
            })
        })
    }
}
