//! What the admin service shares between its calls: status mapping, paging, and the
//! conversions between its messages and the store's and the policy's types.

use std::collections::HashMap;

use tonic::Status;
use zeroize::Zeroizing;

use crate::control::items::{ItemError, Kind};
use crate::pb::{ImportedKeys, ItemKind, RequestFilter, RequestRecord, ResolvedSecret};
use crate::store::StoreError;
use crate::store::requests::{Entry, Filter};

pub(super) fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "admin call failed");
    Status::internal(e.to_string())
}

/// One page of `items` (sorted by `key`): those after `token`, at most `size` (0: 100, at
/// most 1000), and the token of the next page (empty on the last).
pub(super) fn page<T>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> &str,
    size: u32,
    token: &str,
) -> (Vec<T>, String) {
    let size = match size {
        0 => 100,
        n => n.min(1000),
    } as usize;
    let mut out: Vec<T> = items
        .into_iter()
        .filter(|i| token.is_empty() || key(i) > token)
        .take(size + 1)
        .collect();
    let next = if out.len() > size {
        out.truncate(size);
        out.last().map(|i| key(i).to_owned()).unwrap_or_default()
    } else {
        String::new()
    };
    (out, next)
}

pub(super) fn item_kind(kind: i32) -> Result<Kind, Status> {
    match ItemKind::try_from(kind) {
        Ok(ItemKind::Target) => Ok(Kind::Target),
        Ok(ItemKind::Credential) => Ok(Kind::Credential),
        Ok(ItemKind::Proxy) => Ok(Kind::Proxy),
        Ok(ItemKind::Rule) => Ok(Kind::Rule),
        _ => Err(Status::invalid_argument(
            "kind: one of target, credential, proxy, rule",
        )),
    }
}

pub(super) fn item_status(e: ItemError) -> Status {
    match e {
        ItemError::NotFound { .. } => Status::not_found(e.to_string()),
        ItemError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        ItemError::Invalid(_) => Status::invalid_argument(format!("nothing changed: {e}")),
    }
}

/// Secrets and imported key hashes as the client resolved them.
type Material = (
    HashMap<String, Zeroizing<String>>,
    HashMap<String, Vec<[u8; 32]>>,
);

pub(super) fn material(
    secrets: Vec<ResolvedSecret>,
    imported: Vec<ImportedKeys>,
) -> Result<Material, Status> {
    let secrets = secrets
        .into_iter()
        .map(|s| (s.credential, Zeroizing::new(s.value)))
        .collect();
    let mut keys: HashMap<String, Vec<[u8; 32]>> = HashMap::new();
    for imported in imported {
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
    Ok((secrets, keys))
}

pub(super) fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(what) => Status::not_found(what),
        StoreError::Conflict(what) => Status::already_exists(what),
        StoreError::Invalid(what) => Status::invalid_argument(format!("nothing changed: {what}")),
        other => internal(other),
    }
}

pub(super) fn filter(f: RequestFilter) -> Result<Filter, Status> {
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(Filter {
        status: some(f.status)
            .map(|s| s.parse())
            .transpose()
            .map_err(Status::invalid_argument)?,
        proxy: some(f.proxy),
        credential: some(f.credential),
        key_id: some(f.key_id),
        label: some(f.label),
        decision: some(f.decision),
        since_ms: f.since_ms,
        until_ms: f.until_ms,
    })
}

/// Unix milliseconds as the API's whole seconds, rounded up: a key shown to expire at
/// `t` is refused from `t` on, never a second before it says.
pub(super) fn seconds_up(ms: i64) -> i64 {
    ms.saturating_add(999).div_euclid(1000)
}

/// The longest TTL a run key may be issued with.
pub(super) const MAX_TTL_S: i64 = 10 * 366 * 86_400;

/// Runs blocking work on this worker thread, moving its other tasks to other workers
/// first where the runtime has them.
pub(super) fn off_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// A held request as the admin API shows it.
pub(super) fn approval_info(r: crate::store::approvals::ApprovalRow) -> crate::pb::ApprovalInfo {
    crate::pb::ApprovalInfo {
        id: r.id,
        proxy: r.proxy,
        credential: r.credential.unwrap_or_default(),
        key_id: r.key_id.unwrap_or_default(),
        run_label: r.run_label.unwrap_or_default(),
        rule_id: r.rule_id,
        method: r.method,
        path: r.path,
        body_summary: r.body_summary,
        status: r.status,
        created_at_ms: r.created_ms,
        expires_at_ms: r.expires_ms,
        decided_by: r.decided_by.unwrap_or_default(),
    }
}

/// A request-log record as the admin API sends it.
pub(super) fn record(e: Entry) -> RequestRecord {
    RequestRecord {
        request_id: e.request_id,
        time_ms: e.time_ms,
        proxy: e.proxy.unwrap_or_default(),
        target: e.target.unwrap_or_default(),
        credential: e.credential.unwrap_or_default(),
        key_id: e.key_id.unwrap_or_default(),
        run_label: e.run_label.unwrap_or_default(),
        method: e.method,
        path: e.path,
        status: e.status.map(u32::from),
        upstream_status: e.upstream_status.map(u32::from),
        decision: e.decision,
        rule_id: e.rule_id.unwrap_or_default(),
        latency_ms: e.latency_ms,
        cost_usd: e.cost_usd,
        bytes_in: e.bytes_in,
        bytes_out: e.bytes_out,
        retries: e.retries,
        model: e.model.unwrap_or_default(),
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        cached_tokens: e.cached_tokens,
        completed: e.completed,
        facts: e.facts.unwrap_or_default(),
        supersedes: e.supersedes.unwrap_or_default(),
        chain: e.link.as_ref().map(|l| l.chain.clone()).unwrap_or_default(),
        chain_position: e.link.as_ref().map_or(0, |l| l.pos),
        prev_hash: e
            .link
            .as_ref()
            .map(|l| l.prev_hash.clone())
            .unwrap_or_default(),
        hash: e.link.map(|l| l.hash).unwrap_or_default(),
    }
}
