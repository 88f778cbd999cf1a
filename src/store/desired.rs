//! What `apply` asks the store for: a policy file with its secrets resolved, as rows;
//! and what it reports back.

use std::collections::HashMap;

use serde::Serialize;
use zeroize::Zeroizing;

use crate::policy::rows::*;
use crate::policy::{CredentialType, Limits, PolicyFile, SecretRef};

/// What a policy file asks for, with its secrets already resolved by the client.
pub struct Desired {
    pub targets: Vec<TargetRow>,
    pub credentials: Vec<DesiredCredential>,
    pub proxies: Vec<ProxyRow>,
    pub rules: Vec<RuleRow>,
}

pub struct DesiredCredential {
    pub name: String,
    pub kind: CredentialType,
    pub auth: Option<AuthSpec>,
    pub secret_ref: Option<SecretRef>,
    /// `None` for a target credential whose file says `sealed: true`: keep what is held.
    pub secret: Option<Zeroizing<String>>,
    pub key_hashes: Vec<[u8; 32]>,
    /// `keys: [{ sealed: true }]`: keep the imported keys as they are.
    pub keep_keys: bool,
    pub limits: Option<Limits>,
    pub identity: Option<crate::policy::Identity>,
}

impl DesiredCredential {
    /// `sealed: true`: the secret latchkey holds is kept (a secret the server reads is
    /// neither given nor kept).
    pub(super) fn keeps_secret(&self) -> bool {
        self.kind == CredentialType::Target
            && self.secret.is_none()
            && (self.secret_ref.as_ref()).is_none_or(|s| s.server_source().is_none())
    }
}

impl Desired {
    /// Joins a validated file with the secrets and key hashes its client resolved.
    pub fn new(
        file: &PolicyFile,
        mut secrets: HashMap<String, Zeroizing<String>>,
        mut keys: HashMap<String, Vec<[u8; 32]>>,
    ) -> Result<Self, String> {
        let mut credentials = Vec::new();
        for c in &file.credentials {
            let held_or_read = c
                .secret
                .as_ref()
                .is_some_and(|s| s.is_sealed() || s.server_source().is_some());
            let secret = match c.kind {
                CredentialType::Target if held_or_read => None,
                CredentialType::Target => Some(secrets.remove(&c.name).ok_or_else(|| {
                    format!("credential {:?}: its secret was not provided", c.name)
                })?),
                CredentialType::Proxy => None,
            };
            let keep_keys = c.keys.iter().flatten().any(SecretRef::is_sealed);
            let mut key_hashes = keys.remove(&c.name).unwrap_or_default();
            let expected = if keep_keys {
                0
            } else {
                c.keys.as_ref().map_or(0, Vec::len)
            };
            if key_hashes.len() != expected {
                return Err(format!(
                    "credential {:?}: {expected} keys in the file, {} provided",
                    c.name,
                    key_hashes.len()
                ));
            }
            key_hashes.sort();
            key_hashes.dedup();
            let (secret_ref, session_token) = c.stored_references();
            credentials.push(DesiredCredential {
                name: c.name.clone(),
                kind: c.kind,
                auth: c.auth.map(|kind| AuthSpec {
                    kind,
                    header: c.header.clone(),
                    prefix: c.prefix.clone(),
                    username: c.username.clone(),
                    param: c.param.clone(),
                    token_url: c.token_url.clone(),
                    client_id: c.client_id.clone(),
                    scopes: c.scopes.clone(),
                    client_auth: c.client_auth,
                    token_params: c.token_params.clone(),
                    access_key_id: c.access_key_id.clone(),
                    region: c.region.clone(),
                    service: c.service.clone(),
                    session_token,
                    unsigned_payload: c.unsigned_payload,
                }),
                // An inline value is sealed like any secret: never kept in the reference.
                secret_ref,
                secret,
                key_hashes,
                keep_keys,
                limits: c.limits.clone(),
                identity: c.identity.clone(),
            });
        }
        if let Some(name) = secrets.keys().chain(keys.keys()).next() {
            return Err(format!(
                "material was provided for {name:?}, which the file does not define as such"
            ));
        }
        Ok(Self {
            targets: file
                .targets
                .iter()
                .map(|t| TargetRow {
                    name: t.name.clone(),
                    url: t.url.clone(),
                })
                .collect(),
            credentials,
            proxies: file
                .proxies
                .iter()
                .map(|p| {
                    let mut bound = p.proxy_credentials.clone();
                    bound.sort();
                    ProxyRow {
                        name: p.name.clone(),
                        target: p.target.clone(),
                        target_credential: p.target_credential.clone(),
                        proxy_credentials: bound,
                        default_effect: p.default_effect,
                        limits: p.limits.clone(),
                        cost: p.cost.clone(),
                        response: p.response.clone(),
                        guards: p.guards.clone(),
                        audit: p.audit.clone(),
                        mcp: (p.protocol == crate::policy::Protocol::Mcp)
                            .then(|| p.mcp.clone().unwrap_or_default()),
                    }
                })
                .collect(),
            rules: file
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| RuleRow {
                    id: r.id(),
                    credential: r.credential.clone(),
                    proxy: r.proxy.clone(),
                    effect: r.effect,
                    methods: r
                        .methods
                        .iter()
                        .flatten()
                        .map(|m| m.to_ascii_uppercase())
                        .collect(),
                    path: r.path.clone(),
                    conditions: RuleConditions {
                        // Header names match case-insensitively: store them lower-case.
                        headers: r
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect(),
                        query: r.query.clone(),
                        body: r.body.clone(),
                        mcp: r.mcp.clone(),
                    },
                    priority: r.priority,
                    notes: r.notes.clone(),
                    position: i as i64,
                })
                .collect(),
        })
    }
}

/// One line of an apply's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: &'static str,
    pub name: String,
    pub action: &'static str,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.name, self.action)
    }
}
