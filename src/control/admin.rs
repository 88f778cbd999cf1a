//! The admin gRPC service: how policy changes reach a running latchkey. Every call needs
//! `authorization: Bearer <admin token>`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::base::crypto::MasterKey;
use crate::control::items::{self, Edit, ItemError};
use crate::control::sync::PolicySync;
use crate::control::tokens::{Role, TokenName, new_token, require_admin};
use crate::dataplane::pipeline::{Caller, Judgement, Outcome, RequestView, decide_as};
use crate::dataplane::rules::Body;
use crate::dataplane::shared::Shared;
use crate::dataplane::snapshot::KeyChange;
use crate::dataplane::snapshot::Policy;
use crate::pb::admin_server::Admin;
use crate::pb::{
    ApplyRequest, ApplyResponse, ApprovalInfo, Change, CheckRequest, CheckResponse, CheckedRule,
    CreateTokenRequest, CreatedToken, DecideApprovalRequest, DeleteItemRequest, DiagnoseRequest,
    DiagnoseResponse, ExportRequest, ExportResponse, GetItemRequest, IssueKeyRequest, IssuedKey,
    Item, ItemChangeResponse, ListAlertsRequest, ListAlertsResponse, ListApprovalsRequest,
    ListApprovalsResponse, ListItemsRequest, ListItemsResponse, ListKeysRequest, ListKeysResponse,
    ListRequestsRequest, ListRequestsResponse, ListTokensRequest, ListTokensResponse,
    PutItemRequest, RekeyRequest, RekeyResponse, ReleaseKeyRequest, ReleaseKeyResponse,
    ReplayRequest, ReplayResponse, RevokeKeyRequest, RevokeKeyResponse, RevokeTokenRequest,
    RevokeTokenResponse, TelemetryBucket, TelemetryRequest, TelemetryResponse,
    TokenInfo as PbTokenInfo, VerifyAuditRequest, VerifyAuditResponse,
};
use crate::policy::rows::{NewKey, StoredPolicy};
use crate::policy::{Period, PolicyFile, ServerSource};
use crate::store::approvals::DecideError;
use crate::store::requests::{self};
use crate::store::{AlreadyRevoked, Desired, Store, StoreError};

mod alerts;
mod diagnose;
mod keys;
mod replay;
mod verify;
mod wire;

use wire::*;

pub struct AdminService {
    shared: Arc<Shared>,
    store: Store,
    master: Arc<MasterKey>,
    sync: Arc<PolicySync>,
    /// Policies are refused that ext_authz alone could not enforce.
    ext_authz_only: bool,
    /// Where OTLP goes, for `Diagnose`.
    otlp_endpoints: Vec<String>,
    /// One change at a time: each sees the state the previous one left.
    write_lock: Mutex<()>,
}

impl AdminService {
    /// The live policy as a file, for this caller: a viewer sees webhook URLs by scheme
    /// and host only (a hook's path is its token), an admin whole.
    async fn readable<T>(&self, request: &Request<T>) -> Result<PolicyFile, Status> {
        let mut file = self.store.load().await.map_err(internal)?.to_file();
        if require_admin(request).is_err() {
            file.hide_webhook_paths();
        }
        Ok(file)
    }

    /// Takes a change made to the store into this replica's snapshot; the others take
    /// it in through their own `PolicySync`.
    /// The store read again after an admin's change, which then holds for the next
    /// request wherever it is decided (in-process modules included).
    async fn reload(&self) -> Result<(), Status> {
        self.sync.reload().await.map_err(internal)?;
        self.sync.propagated().await;
        Ok(())
    }

    /// One change of the policy: what is desired is built from the current state in the
    /// write transaction, compiled and checked before commit, then put into effect.
    /// `reads`: the secrets the change has the server read, read first; a change naming
    /// one the server cannot read is refused.
    async fn commit(
        &self,
        dry_run: bool,
        reads: &[ServerSource],
        build: impl FnOnce(&StoredPolicy) -> Result<Desired, Status>,
    ) -> Result<Vec<Change>, Status> {
        // A dry run reads them to report, without the server keeping them in view.
        let unreadable = match dry_run {
            true => self.sync.secrets().probe(reads).await,
            false => self.sync.secrets().read(reads).await,
        };
        if !unreadable.is_empty() {
            return Err(Status::invalid_argument(format!(
                "nothing changed: the server cannot read {}",
                unreadable.join("; ")
            )));
        }
        let _one_at_a_time = self.write_lock.lock().await;
        let server = self.sync.secrets().current();
        let mut compiled = None;
        let result = self
            .store
            .edit(&self.master, dry_run, build, |after| {
                // Decrypting every secret and compiling every regex is blocking work:
                // the worker thread hands its other tasks on while it runs.
                let policy = off_runtime(|| Policy::compile(after, &self.master, &server))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if self.ext_authz_only
                    && let Some(obstacle) = policy.ext_authz_obstacle()
                {
                    return Err(Status::invalid_argument(obstacle));
                }
                compiled = Some(policy);
                Ok(())
            })
            .await
            .map_err(|e| match e {
                StoreError::Invalid(_) => store_status(e),
                other => {
                    tracing::error!(error = %other, "apply failed");
                    Status::internal(format!("apply failed, nothing changed: {other}"))
                }
            })?;
        let (changes, version) = result?;
        if let Some(version) = version {
            let policy = compiled.expect("compiled before commit");
            self.sync.install_compiled(policy, version).await;
            self.sync.propagated().await;
            tracing::info!(changes = changes.len(), version, "policy applied");
        }
        Ok(changes
            .into_iter()
            .map(|c| Change {
                kind: c.kind.to_owned(),
                name: c.name,
                action: c.action.to_owned(),
            })
            .collect())
    }

    async fn put_item(
        &self,
        request: Request<PutItemRequest>,
        create: bool,
    ) -> Result<Response<ItemChangeResponse>, Status> {
        let reads =
            items::server_sources(item_kind(request.get_ref().kind)?, &request.get_ref().spec);
        // Having the server read a file or an AWS secret is an admin's to ask, even in
        // a dry run.
        if !request.get_ref().dry_run || !reads.is_empty() {
            require_admin(&request)?;
        }
        let req = request.into_inner();
        let kind = item_kind(req.kind)?;
        let (secrets, keys) = material(req.secrets, req.keys)?;
        let changes = self
            .commit(req.dry_run, &reads, |current| {
                let mut file = current.to_file();
                let edit = if create {
                    Edit::Create(&req.spec)
                } else {
                    Edit::Update(&req.spec)
                };
                items::edit(&mut file, kind, edit).map_err(item_status)?;
                file.validate()
                    .map_err(|e| Status::invalid_argument(format!("nothing changed: {e}")))?;
                items::desired(file, secrets, keys).map_err(Status::invalid_argument)
            })
            .await?;
        Ok(Response::new(ItemChangeResponse { changes }))
    }

    pub fn new(
        shared: Arc<Shared>,
        store: Store,
        master: Arc<MasterKey>,
        sync: Arc<PolicySync>,
        ext_authz_only: bool,
        otlp_endpoints: Vec<String>,
    ) -> Self {
        Self {
            shared,
            store,
            master,
            sync,
            ext_authz_only,
            otlp_endpoints,
            write_lock: Mutex::new(()),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let dry_run = request.get_ref().dry_run;
        if !dry_run {
            require_admin(&request)?;
        }
        let file = PolicyFile::parse(&request.get_ref().policy_yaml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Having the server read a file or an AWS secret is an admin's to ask, even in a
        // dry run.
        if dry_run && !file.server_sources().is_empty() {
            require_admin(&request)?;
        }
        let req = request.into_inner();
        let (secrets, keys) = material(req.secrets, req.keys)?;
        let desired = Desired::new(&file, secrets, keys).map_err(Status::invalid_argument)?;
        let changes = self
            .commit(req.dry_run, &file.server_sources(), |_| Ok(desired))
            .await?;
        Ok(Response::new(ApplyResponse { changes }))
    }

    async fn create_item(
        &self,
        request: Request<PutItemRequest>,
    ) -> Result<Response<ItemChangeResponse>, Status> {
        self.put_item(request, true).await
    }

    async fn update_item(
        &self,
        request: Request<PutItemRequest>,
    ) -> Result<Response<ItemChangeResponse>, Status> {
        self.put_item(request, false).await
    }

    async fn delete_item(
        &self,
        request: Request<DeleteItemRequest>,
    ) -> Result<Response<ItemChangeResponse>, Status> {
        if !request.get_ref().dry_run {
            require_admin(&request)?;
        }
        let req = request.into_inner();
        let kind = item_kind(req.kind)?;
        let changes = self
            .commit(req.dry_run, &[], |current| {
                let mut file = current.to_file();
                items::edit(&mut file, kind, Edit::Delete(&req.name)).map_err(item_status)?;
                // What still refers to the item stops the delete, named.
                file.validate()
                    .map_err(|e| Status::failed_precondition(format!("nothing changed: {e}")))?;
                items::desired(file, HashMap::new(), HashMap::new())
                    .map_err(Status::invalid_argument)
            })
            .await?;
        Ok(Response::new(ItemChangeResponse { changes }))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<Item>, Status> {
        let file = self.readable(&request).await?;
        let req = request.into_inner();
        let kind = item_kind(req.kind)?;
        let (name, spec) = items::list(&file, kind)
            .into_iter()
            .find(|(name, _)| *name == req.name)
            .ok_or_else(|| {
                item_status(ItemError::NotFound {
                    kind: kind.as_str(),
                    name: req.name.clone(),
                })
            })?;
        Ok(Response::new(Item {
            kind: req.kind,
            name,
            spec_json: spec.to_string(),
        }))
    }

    async fn list_items(
        &self,
        request: Request<ListItemsRequest>,
    ) -> Result<Response<ListItemsResponse>, Status> {
        let file = self.readable(&request).await?;
        let req = request.into_inner();
        let kind = item_kind(req.kind)?;
        let (items, next_page_token) = page(
            items::list(&file, kind),
            |(name, _)| name,
            req.page_size,
            &req.page_token,
        );
        let items = items
            .into_iter()
            .map(|(name, spec)| Item {
                kind: req.kind,
                name,
                spec_json: spec.to_string(),
            })
            .collect();
        Ok(Response::new(ListItemsResponse {
            items,
            next_page_token,
        }))
    }

    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let req = request.into_inner();
        let policy = self.shared.policy.load();
        if req.method.is_empty() {
            return Err(Status::invalid_argument("method: required"));
        }
        if !req.credential.is_empty() && policy.credential_index(&req.credential).is_none() {
            return Err(Status::not_found(format!(
                "no proxy credential named {:?}",
                req.credential
            )));
        }
        let slash = if req.path.starts_with('/') { "" } else { "/" };
        let path = format!("/{}{slash}{}", req.proxy, req.path);
        let mut headers: Vec<(String, Vec<u8>)> = req
            .headers
            .into_iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.into_bytes()))
            .collect();
        let caller = if !req.key.is_empty() {
            headers.retain(|(n, _)| !crate::dataplane::names::CARRIERS.contains(&n.as_str()));
            headers.push(("x-latchkey-key".into(), req.key.into_bytes()));
            Caller::Key
        } else if !req.credential.is_empty() {
            Caller::Credential(&req.credential)
        } else {
            Caller::Anyone
        };
        let pairs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let view = RequestView {
            method: &req.method,
            path: &path,
            headers: &pairs,
            body: Some(req.body.as_deref().unwrap_or_default()),
        };
        // A body to explain is JSON unless the check names another content type.
        let content_type = pairs
            .iter()
            .find(|(k, _)| *k == "content-type")
            .map_or(&b"application/json"[..], |(_, v)| *v);
        let body = req
            .body
            .as_deref()
            .map_or(Body::Empty, |b| Body::parse(b, Some(content_type)));
        let decision = match decide_as(
            &policy,
            &view,
            &body,
            caller,
            crate::base::clock::now_unix_ms(),
        ) {
            Judgement::Decided(decision) => decision,
            Judgement::NeedBody(_) => {
                return Err(Status::internal(
                    "the decision asked for a body it was given",
                ));
            }
        };
        let subject = &decision.subject;
        let rule = subject
            .rule_id
            .as_deref()
            .and_then(|id| policy.rule(id))
            .map(|r| CheckedRule {
                id: r.id.to_string(),
                effect: r.effect.as_str().to_owned(),
                priority: r.priority,
                notes: r.notes.as_deref().unwrap_or_default().to_owned(),
            });
        let proxy = subject.proxy.as_deref().and_then(|p| policy.proxy(p));
        let default_effect = proxy
            .map(|p| p.default_effect.as_str().to_owned())
            .unwrap_or_default();
        let guards = proxy.map_or_else(Vec::new, |p| p.guards.explain(&req.method));
        let (allowed, kind, status, message) = match &decision.outcome {
            Outcome::Forward(_) => (true, "allow".to_owned(), 0, "would be forwarded".to_owned()),
            Outcome::Deny(d) => (
                false,
                d.kind().to_string(),
                u32::from(d.http_status()),
                d.to_string(),
            ),
        };
        Ok(Response::new(CheckResponse {
            allowed,
            decision: kind,
            status,
            message,
            credential: subject.credential.as_deref().unwrap_or_default().to_owned(),
            rule,
            default_effect,
            guards,
        }))
    }

    async fn issue_key(
        &self,
        request: Request<IssueKeyRequest>,
    ) -> Result<Response<IssuedKey>, Status> {
        require_admin(&request)?;
        let req = request.into_inner();
        if let Some(cap) = req.spend_cap_usd
            && !(cap.is_finite() && cap >= 0.0)
        {
            return Err(Status::invalid_argument(
                "spend_cap_usd: a non-negative amount",
            ));
        }
        let ttl = req
            .ttl_seconds
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        if ttl == Some(0) {
            return Err(Status::invalid_argument("ttl_seconds: must be positive"));
        }
        if ttl.is_some_and(|t| t > MAX_TTL_S) {
            return Err(Status::invalid_argument(
                "ttl_seconds: at most ten years (a key without --ttl does not expire)",
            ));
        }
        // Kept to the millisecond: the key is refused once its TTL has passed, not later.
        let expires_at_ms =
            ttl.map(|t| crate::base::clock::now_unix_ms().saturating_add(t.saturating_mul(1000)));
        // A cap resets each day, week or month; a minute is a token budget's period only.
        let cap_period = match (req.cap_period.as_str(), Period::parse(&req.cap_period)) {
            ("", _) => None,
            (_, Some(period)) if period != Period::Minute => Some(period),
            (other, _) => {
                return Err(Status::invalid_argument(format!(
                    "cap_period {other:?}: day, week or month"
                )));
            }
        };
        if cap_period.is_some() && req.spend_cap_usd.is_none() {
            return Err(Status::invalid_argument(
                "cap_period needs a spend cap to reset",
            ));
        }
        if req.tokens_per_minute == Some(0) || req.tokens_per_day == Some(0) {
            return Err(Status::invalid_argument("a token budget is at least 1"));
        }
        let key = crate::base::crypto::new_proxy_key();
        let label = (!req.label.is_empty()).then_some(req.label.as_str());
        let _one_at_a_time = self.write_lock.lock().await;
        let new = NewKey {
            credential: &req.credential,
            hash: crate::base::crypto::hash_key(key.as_bytes()),
            label,
            expires_at_ms,
            spend_cap_usd: req.spend_cap_usd,
            cap_period,
            tokens_per_minute: req.tokens_per_minute,
            tokens_per_day: req.tokens_per_day,
        };
        let row = crate::control::keys::issue(&self.store, &self.sync, &new)
            .await
            .map_err(|e| match e {
                crate::control::keys::IssueError::Store(e) => store_status(e),
                other => internal(other),
            })?;
        let id = row.id;
        tracing::info!(key_id = %id, credential = %req.credential, "key issued");
        Ok(Response::new(IssuedKey {
            id,
            key,
            credential: req.credential,
            expires_at: expires_at_ms.map(seconds_up),
            spend_cap_usd: req.spend_cap_usd,
            label: req.label,
        }))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        Ok(Response::new(self.keys(request.into_inner()).await?))
    }

    async fn revoke_key(
        &self,
        request: Request<RevokeKeyRequest>,
    ) -> Result<Response<RevokeKeyResponse>, Status> {
        require_admin(&request)?;
        let id = request.into_inner().id;
        let _one_at_a_time = self.write_lock.lock().await;
        let revoked = self.store.revoke_key(&id).await.map_err(store_status)?;
        let already_revoked = match revoked {
            Ok(version) => {
                self.sync
                    .keys_changed(version, KeyChange::Revoked(id.clone()))
                    .await
                    .map_err(internal)?;
                false
            }
            // Revoked before: the running snapshot holds it so (or reloads see to it).
            Err(AlreadyRevoked) => {
                self.reload().await?;
                true
            }
        };
        tracing::info!(key_id = %id, "key revoked");
        Ok(Response::new(RevokeKeyResponse { already_revoked }))
    }

    async fn list_requests(
        &self,
        request: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let req = request.into_inner();
        let filter = filter(req.filter.unwrap_or_default())?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(requests::MAX_LIMIT),
        };
        let page = match req.page.as_str() {
            "" => None,
            token => Some(requests::Cursor::parse(token).ok_or_else(|| {
                Status::invalid_argument("page: a next_page token from a previous answer")
            })?),
        };
        let entries = requests::list(&self.store, &filter, limit, page)
            .await
            .map_err(internal)?;
        let next_page = match entries.last() {
            Some(last) if entries.len() == limit as usize => requests::Cursor::of(last).token(),
            _ => String::new(),
        };
        let records = entries.into_iter().map(record).collect();
        Ok(Response::new(ListRequestsResponse { records, next_page }))
    }

    async fn telemetry(
        &self,
        request: Request<TelemetryRequest>,
    ) -> Result<Response<TelemetryResponse>, Status> {
        let req = request.into_inner();
        let width_ms = match req.interval.as_str() {
            "hour" | "" => 3_600_000,
            "day" => 86_400_000,
            other => {
                return Err(Status::invalid_argument(format!(
                    "interval: \"hour\" or \"day\", not {other:?}"
                )));
            }
        };
        let filter = filter(req.filter.unwrap_or_default())?;
        let buckets = requests::telemetry(&self.store, &filter, width_ms)
            .await
            .map_err(internal)?
            .into_iter()
            .map(|b| TelemetryBucket {
                start_ms: b.start_ms,
                requests: b.requests,
                decisions: b.decisions.into_iter().collect(),
                status_classes: b.status_classes.into_iter().collect(),
                p50_latency_ms: b.p50_latency_ms,
                p95_latency_ms: b.p95_latency_ms,
                cost_usd: b.cost_usd,
                models: (b.models.into_iter())
                    .map(|(model, used)| {
                        let usage = crate::pb::ModelUsage {
                            requests: used.requests,
                            input_tokens: used.input_tokens,
                            cached_tokens: used.cached_tokens,
                            output_tokens: used.output_tokens,
                            cost_usd: used.cost_usd,
                        };
                        (model, usage)
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(TelemetryResponse { buckets }))
    }

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<ExportResponse>, Status> {
        let file = self.readable(&request).await?;
        let policy_yaml = serde_norway::to_string(&file).map_err(internal)?;
        Ok(Response::new(ExportResponse { policy_yaml }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreatedToken>, Status> {
        require_admin(&request)?;
        let req = request.into_inner();
        let role = Role::parse(&req.role).ok_or_else(|| {
            Status::invalid_argument(format!("role: \"admin\" or \"viewer\", not {:?}", req.role))
        })?;
        if req.name.trim().is_empty() {
            return Err(Status::invalid_argument("name: required"));
        }
        let token = new_token();
        let info = self
            .store
            .create_admin_token(&req.name, role, &token)
            .await
            .map_err(store_status)?;
        self.reload().await?;
        tracing::info!(id = %info.id, name = %info.name, role = role.as_str(), "admin token created");
        Ok(Response::new(CreatedToken {
            id: info.id,
            token,
            name: info.name,
            role: role.as_str().to_owned(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        require_admin(&request)?;
        let req = request.into_inner();
        let mut tokens: Vec<PbTokenInfo> = self
            .store
            .list_admin_tokens()
            .await
            .map_err(store_status)?
            .into_iter()
            .map(|t| PbTokenInfo {
                id: t.id,
                name: t.name,
                role: t.role.as_str().to_owned(),
                created_at: t.created_at,
                revoked_at: t.revoked_at,
            })
            .collect();
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        let (tokens, next_page_token) = page(tokens, |t| &t.id, req.page_size, &req.page_token);
        Ok(Response::new(ListTokensResponse {
            tokens,
            next_page_token,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        require_admin(&request)?;
        let id = request.into_inner().id;
        let already_revoked = self
            .store
            .revoke_admin_token(&id)
            .await
            .map_err(store_status)?;
        self.reload().await?;
        tracing::info!(id = %id, "admin token revoked");
        Ok(Response::new(RevokeTokenResponse { already_revoked }))
    }

    async fn diagnose(
        &self,
        request: Request<DiagnoseRequest>,
    ) -> Result<Response<DiagnoseResponse>, Status> {
        let role = request
            .extensions()
            .get::<Role>()
            .map_or("unknown", |r| r.as_str());
        Ok(Response::new(self.diagnosis(role).await))
    }

    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 1000,
            n => n.min(1000),
        };
        let rows = self
            .store
            .list_approvals(req.all, crate::base::clock::now_unix_ms(), i64::from(limit))
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListApprovalsResponse {
            approvals: rows.into_iter().map(approval_info).collect(),
        }))
    }

    async fn decide_approval(
        &self,
        request: Request<DecideApprovalRequest>,
    ) -> Result<Response<ApprovalInfo>, Status> {
        require_admin(&request)?;
        let by =
            (request.extensions().get::<TokenName>()).map_or("unknown".to_owned(), |c| c.0.clone());
        let req = request.into_inner();
        let row = self
            .store
            .decide_approval(&req.id, req.approve, &by, crate::base::clock::now_unix_ms())
            .await
            .map_err(|e| match e {
                DecideError::NotPending(_) => Status::failed_precondition(e.to_string()),
                DecideError::Store(e) => store_status(e),
            })?;
        tracing::info!(approval = %row.id, status = %row.status, by = %by, proxy = %row.proxy,
            method = %row.method, path = %row.path, "approval decided");
        Ok(Response::new(approval_info(row)))
    }

    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        Ok(Response::new(self.alerts(request.into_inner()).await?))
    }

    async fn release_key(
        &self,
        request: Request<ReleaseKeyRequest>,
    ) -> Result<Response<ReleaseKeyResponse>, Status> {
        require_admin(&request)?;
        let released = self.release(&request.into_inner().id).await?;
        Ok(Response::new(ReleaseKeyResponse {
            not_quarantined: !released,
        }))
    }

    async fn replay(
        &self,
        request: Request<ReplayRequest>,
    ) -> Result<Response<ReplayResponse>, Status> {
        Ok(Response::new(
            self.replay_draft(request.into_inner()).await?,
        ))
    }

    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        Ok(Response::new(
            self.verify_chains(request.into_inner().since_ms).await?,
        ))
    }

    async fn rekey(
        &self,
        request: Request<RekeyRequest>,
    ) -> Result<Response<RekeyResponse>, Status> {
        require_admin(&request)?;
        let _one_at_a_time = self.write_lock.lock().await;
        let resealed = self.store.rekey(&self.master).await.map_err(store_status)?;
        self.reload().await?;
        tracing::info!(
            resealed,
            master_key_id = self.master.id(),
            "secrets re-sealed"
        );
        Ok(Response::new(RekeyResponse {
            resealed: u32::try_from(resealed).unwrap_or(u32::MAX),
            master_key_id: self.master.id().to_owned(),
        }))
    }
}
