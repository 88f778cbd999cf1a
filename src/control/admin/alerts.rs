//! `ListAlerts` and `ReleaseKey`: what the anomaly alerts fired, and a person letting a
//! key they quarantined through again.

use tonic::Status;

use super::AdminService;
use super::wire::{internal, store_status};
use crate::dataplane::snapshot::KeyChange;
use crate::pb::{AlertInfo, DeadLetterInfo, ListAlertsRequest, ListAlertsResponse};
use crate::store::alerts::Released;

impl AdminService {
    pub(super) async fn alerts(
        &self,
        req: ListAlertsRequest,
    ) -> Result<ListAlertsResponse, Status> {
        let limit = i64::from(match req.limit {
            0 => 1000,
            n => n.min(1000),
        });
        if req.dead_letters {
            let rows =
                (self.store.list_dead_letters(req.since_ms, limit).await).map_err(store_status)?;
            return Ok(ListAlertsResponse {
                alerts: Vec::new(),
                dead_letters: rows
                    .into_iter()
                    .map(|d| DeadLetterInfo {
                        id: d.id,
                        time_ms: d.time_ms,
                        webhook: d.webhook,
                        event_id: d.event_id,
                        payload: d.payload,
                        attempts: d.attempts,
                        error: d.error,
                    })
                    .collect(),
            });
        }
        let proxy = (!req.proxy.is_empty()).then_some(req.proxy.as_str());
        let rows =
            (self.store.list_alerts(req.since_ms, proxy, limit).await).map_err(store_status)?;
        Ok(ListAlertsResponse {
            alerts: rows
                .into_iter()
                .map(|a| AlertInfo {
                    id: a.id,
                    time_ms: a.time_ms,
                    kind: a.kind,
                    proxy: a.proxy,
                    key_id: a.key_id.unwrap_or_default(),
                    run_label: a.run_label.unwrap_or_default(),
                    observed: a.observed,
                    baseline: a.baseline,
                    threshold: a.threshold,
                    message: a.message,
                    quarantined: a.quarantined,
                    delivery: a.delivery,
                })
                .collect(),
            dead_letters: Vec::new(),
        })
    }

    /// Whether the key was quarantined; it is not any more, on this replica at once and
    /// on the others when they hear of the new version.
    pub(super) async fn release(&self, id: &str) -> Result<bool, Status> {
        let _one_at_a_time = self.write_lock.lock().await;
        match self.store.release_key(id).await.map_err(store_status)? {
            Released::Now(version) => {
                self.sync
                    .keys_changed(version, KeyChange::Released(id.to_owned()))
                    .await
                    .map_err(internal)?;
                tracing::info!(key_id = %id, "key released from quarantine");
                Ok(true)
            }
            Released::NotQuarantined => Ok(false),
        }
    }
}
