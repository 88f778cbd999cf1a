//! The admin gRPC service: how policy changes reach a running latchkey. Every call needs
//! `authorization: Bearer <admin token>`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::crypto::{self, MasterKey};
use crate::pb::admin_server::Admin;
use crate::pb::{ApplyRequest, ApplyResponse, Change};
use crate::policy::Policy;
use crate::policy_file::PolicyFile;
use crate::state::Shared;
use crate::store::{Desired, Store};

pub struct AdminService {
    shared: Arc<Shared>,
    store: Store,
    master: Arc<MasterKey>,
    /// One apply at a time: each sees the state the previous one left.
    apply_lock: Mutex<()>,
}

impl AdminService {
    pub fn new(shared: Arc<Shared>, store: Store, master: Arc<MasterKey>) -> Self {
        Self {
            shared,
            store,
            master,
            apply_lock: Mutex::new(()),
        }
    }
}

/// Checks the bearer token of every admin call against the configured one (by hash, in
/// constant time). Without a configured token the admin API refuses everything.
#[derive(Clone)]
pub struct AdminAuth {
    token_hash: Option<[u8; 32]>,
}

impl AdminAuth {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token_hash: token
                .filter(|t| !t.is_empty())
                .map(|t| crypto::hash_key(t.as_bytes())),
        }
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token_hash else {
            return Err(Status::unauthenticated(
                "the admin API is disabled: start serve with LATCHKEY_ADMIN_TOKEN set",
            ));
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <admin token>`")
            })?;
        if crypto::ct_eq(&crypto::hash_key(presented.trim().as_bytes()), expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("wrong admin token"))
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let req = request.into_inner();
        let file = PolicyFile::parse(&req.policy_yaml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let secrets: HashMap<String, Zeroizing<String>> = req
            .secrets
            .into_iter()
            .map(|s| (s.credential, Zeroizing::new(s.value)))
            .collect();
        let mut keys: HashMap<String, Vec<[u8; 32]>> = HashMap::new();
        for imported in req.keys {
            let hashes = imported
                .sha256
                .iter()
                .map(|h| <[u8; 32]>::try_from(h.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    Status::invalid_argument(format!(
                        "keys of credential {:?}: a SHA-256 hash is 32 bytes",
                        imported.credential
                    ))
                })?;
            keys.entry(imported.credential).or_default().extend(hashes);
        }
        let desired = Desired::new(&file, secrets, keys).map_err(Status::invalid_argument)?;

        let _one_at_a_time = self.apply_lock.lock().await;
        let mut compiled = None;
        let result = self
            .store
            .apply(&desired, &self.master, req.dry_run, |after| {
                compiled = Some(Policy::compile(after, &self.master)?);
                Ok::<_, crate::policy::CompileError>(())
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "apply failed");
                Status::internal(format!("apply failed, nothing changed: {e}"))
            })?;
        let changes = result.map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !req.dry_run && !changes.is_empty() {
            let policy = compiled.expect("compiled before commit");
            self.shared.policy.store(Arc::new(policy));
            tracing::info!(changes = changes.len(), "policy applied");
        }
        Ok(Response::new(ApplyResponse {
            changes: changes
                .into_iter()
                .map(|c| Change {
                    kind: c.kind.to_owned(),
                    name: c.name,
                    action: c.action.to_owned(),
                })
                .collect(),
        }))
    }
}
