//! `ListKeys`: every key of the store without its secret, a page at a time.

use std::collections::HashMap;

use tonic::Status;

use super::AdminService;
use super::wire::{internal, page, seconds_up};
use crate::pb::{KeyInfo, ListKeysRequest, ListKeysResponse};
use crate::policy::Period;

impl AdminService {
    pub(super) async fn keys(&self, req: ListKeysRequest) -> Result<ListKeysResponse, Status> {
        let stored = self.store.load().await.map_err(internal)?;
        let names: HashMap<&str, &str> = stored
            .credentials
            .iter()
            .map(|c| (c.id.as_str(), c.name.as_str()))
            .collect();
        if !req.credential.is_empty() && !names.values().any(|n| *n == req.credential) {
            return Err(Status::not_found(format!(
                "no proxy credential named {:?}",
                req.credential
            )));
        }
        let mut keys: Vec<_> = stored
            .keys
            .iter()
            .filter_map(|k| {
                let credential = *names.get(k.credential_id.as_str())?;
                (req.credential.is_empty() || credential == req.credential).then(|| KeyInfo {
                    id: k.id.clone(),
                    credential: credential.to_owned(),
                    source: if k.policy_sourced { "policy" } else { "issued" }.to_owned(),
                    label: k.label.clone().unwrap_or_default(),
                    created_at: k.created_at,
                    expires_at: k.expires_at_ms.map(seconds_up),
                    revoked_at: k.revoked_at,
                    spend_cap_usd: k.spend_cap_usd,
                    spent_usd: k.spent_usd,
                    cap_period: k
                        .cap_period
                        .map(Period::name)
                        .unwrap_or_default()
                        .to_owned(),
                    tokens_per_minute: k.tokens_per_minute,
                    tokens_per_day: k.tokens_per_day,
                    quarantined_at_ms: k.quarantined_at,
                })
            })
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        let (keys, next_page_token) = page(keys, |k| &k.id, req.page_size, &req.page_token);
        Ok(ListKeysResponse {
            keys,
            next_page_token,
        })
    }
}
