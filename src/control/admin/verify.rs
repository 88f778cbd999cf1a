//! `VerifyAudit`: the audit's hash chains walked on the live store
//! ([`crate::store::verify`]), checkpoints checked against the master key's public
//! halves, and the answer shaped for the wire.

use tonic::Status;

use super::AdminService;
use super::wire::store_status;
use crate::base::crypto;
use crate::pb::{AuditBreak, AuditChain, VerifyAuditResponse};
use crate::store::verify;

impl AdminService {
    pub(super) async fn verify_chains(&self, since_ms: i64) -> Result<VerifyAuditResponse, Status> {
        let keys = self.master.audit_public_keys();
        let report = verify::verify(&self.store, &keys, (since_ms > 0).then_some(since_ms))
            .await
            .map_err(store_status)?;
        if let Some(broken) = &report.broken {
            tracing::warn!(
                chain = broken.chain.as_deref().unwrap_or(""),
                seq = broken.seq,
                reason = broken.reason,
                "the audit chain is broken"
            );
        }
        Ok(VerifyAuditResponse {
            intact: report.intact,
            records: report.records,
            superseded: report.superseded,
            checkpoints: report.checkpoints,
            unchained_before: report.unchained_before,
            chains: report
                .chains
                .into_iter()
                .map(|c| AuditChain {
                    chain: c.chain,
                    from: c.from,
                    to: c.to,
                    records: c.records,
                    signed_to: c.signed_to,
                    signed_time_ms: c.signed_time_ms,
                    unsigned: c.unsigned,
                    closed: c.closed,
                })
                .collect(),
            broken: report.broken.map(|b| AuditBreak {
                chain: b.chain.unwrap_or_default(),
                position: b.position,
                seq: b.seq,
                request_id: b.request_id.unwrap_or_default(),
                reason: b.reason,
            }),
            public_keys: keys
                .iter()
                .map(|k| format!("{}:{}", k.id, crypto::hex(&k.key)))
                .collect(),
        })
    }
}
