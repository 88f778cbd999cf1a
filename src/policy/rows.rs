//! The rows the policy is stored as: what the store reads and writes and the snapshot
//! is compiled from. Plain data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::base::crypto::{CryptoError, MasterKey};
use crate::policy::file::{
    AuditFacts, AuthKind, BodyCondition, Cost, CredentialType, Effect, Guards, Limits, PolicyFile,
    ResponseSafety, SecretRef, ValueCondition,
};
use crate::policy::period::Period;

/// A credential's sealed secret that does not open with the master key.
#[derive(Debug, thiserror::Error)]
#[error("credential {name:?}: {source}")]
pub struct SecretError {
    pub name: String,
    #[source]
    pub source: CryptoError,
}

/// How a target secret is injected: the `auth` fields of a target credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthSpec {
    pub kind: AuthKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<crate::policy::file::ClientAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_params: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Where the session token came from; the token itself is sealed with the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<SecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsigned_payload: Option<bool>,
}

impl AuthSpec {
    /// An auth of this kind with none of its optional fields.
    pub fn of(kind: AuthKind) -> Self {
        Self {
            kind,
            header: None,
            prefix: None,
            username: None,
            param: None,
            token_url: None,
            client_id: None,
            scopes: None,
            client_auth: None,
            token_params: None,
            access_key_id: None,
            region: None,
            service: None,
            session_token: None,
            unsigned_payload: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRow {
    pub name: String,
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRow {
    pub id: String,
    pub name: String,
    pub kind: CredentialType,
    pub auth: Option<AuthSpec>,
    pub secret_ref: Option<SecretRef>,
    pub sealed: Option<Vec<u8>>,
    pub master_key_id: Option<String>,
    pub limits: Option<Limits>,
    pub identity: Option<crate::policy::Identity>,
}

impl CredentialRow {
    /// The credential's secret, decrypted; `None` for a credential without one.
    pub fn open_secret(
        &self,
        master: &MasterKey,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, SecretError> {
        let Some(sealed) = &self.sealed else {
            return Ok(None);
        };
        let sealed_with = self.master_key_id.as_deref().unwrap_or("unknown");
        master
            .open(&self.id, sealed, sealed_with)
            .map(Some)
            .map_err(|source| SecretError {
                name: self.name.clone(),
                source,
            })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRow {
    pub id: String,
    pub credential_id: String,
    pub hash: Vec<u8>,
    pub policy_sourced: bool,
    pub label: Option<String>,
    pub created_at: i64,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    pub revoked_at: Option<i64>,
    /// Unix milliseconds; refused (`quarantined`) until released.
    pub quarantined_at: Option<i64>,
    pub spend_cap_usd: Option<f64>,
    pub spent_usd: f64,
    pub cap_period: Option<Period>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

/// A run key to issue: its hash only, never the key.
pub struct NewKey<'a> {
    pub credential: &'a str,
    pub hash: [u8; 32],
    pub label: Option<&'a str>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    pub spend_cap_usd: Option<f64>,
    pub cap_period: Option<Period>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyRow {
    pub name: String,
    pub target: String,
    pub target_credential: String,
    /// Sorted, so comparison ignores the order in the file.
    pub proxy_credentials: Vec<String>,
    pub default_effect: Effect,
    pub limits: Option<Limits>,
    pub cost: Option<Cost>,
    pub response: Option<ResponseSafety>,
    pub guards: Option<Guards>,
    pub audit: Option<AuditFacts>,
    /// Set on MCP proxies (`protocol: mcp`), and only on them.
    pub mcp: Option<crate::policy::McpSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRow {
    pub id: String,
    pub credential: Option<String>,
    pub proxy: Option<String>,
    pub effect: Effect,
    /// Upper-case; empty means any method.
    pub methods: Vec<String>,
    pub path: Option<String>,
    pub conditions: RuleConditions,
    pub priority: i64,
    pub notes: Option<String>,
    pub position: i64,
}

/// A rule's header, query and body conditions, stored together as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleConditions {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, ValueCondition>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, ValueCondition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body: Vec<BodyCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<crate::policy::McpCondition>,
}

/// Everything the store holds, as loaded in one read.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPolicy {
    pub targets: Vec<TargetRow>,
    pub credentials: Vec<CredentialRow>,
    pub keys: Vec<KeyRow>,
    pub proxies: Vec<ProxyRow>,
    pub rules: Vec<RuleRow>,
}

impl StoredPolicy {
    /// The policy as a file that `apply` takes back unchanged: secrets by reference
    /// (`env`/`file`) or `sealed: true`, imported keys as `[{ sealed: true }]`, rules in
    /// their order with their ids. Run keys are not policy and are not in it.
    pub fn to_file(&self) -> PolicyFile {
        use crate::policy::file::{CredentialSpec, ProxySpec, RuleSpec, TargetSpec};
        let imported: std::collections::HashSet<&str> = self
            .keys
            .iter()
            .filter(|k| k.policy_sourced)
            .map(|k| k.credential_id.as_str())
            .collect();
        let mut rules: Vec<&RuleRow> = self.rules.iter().collect();
        rules.sort_by_key(|r| r.position);
        PolicyFile {
            targets: self
                .targets
                .iter()
                .map(|t| TargetSpec {
                    name: t.name.clone(),
                    url: t.url.clone(),
                })
                .collect(),
            credentials: self
                .credentials
                .iter()
                .map(|c| {
                    let auth = c.auth.clone();
                    let a = auth.as_ref();
                    CredentialSpec {
                        name: c.name.clone(),
                        kind: c.kind,
                        auth: a.map(|a| a.kind),
                        secret: match c.kind {
                            CredentialType::Target => Some(
                                c.secret_ref
                                    .as_ref()
                                    .map_or_else(SecretRef::sealed, SecretRef::stored_form),
                            ),
                            CredentialType::Proxy => None,
                        },
                        header: a.and_then(|a| a.header.clone()),
                        prefix: a.and_then(|a| a.prefix.clone()),
                        username: a.and_then(|a| a.username.clone()),
                        param: a.and_then(|a| a.param.clone()),
                        token_url: a.and_then(|a| a.token_url.clone()),
                        client_id: a.and_then(|a| a.client_id.clone()),
                        scopes: a.and_then(|a| a.scopes.clone()),
                        client_auth: a.and_then(|a| a.client_auth),
                        token_params: a.and_then(|a| a.token_params.clone()),
                        access_key_id: a.and_then(|a| a.access_key_id.clone()),
                        region: a.and_then(|a| a.region.clone()),
                        service: a.and_then(|a| a.service.clone()),
                        session_token: a.and_then(|a| a.session_token.clone()),
                        unsigned_payload: a.and_then(|a| a.unsigned_payload),
                        keys: imported
                            .contains(c.id.as_str())
                            .then(|| vec![SecretRef::sealed()]),
                        limits: c.limits.clone(),
                        identity: c.identity.clone(),
                    }
                })
                .collect(),
            proxies: self
                .proxies
                .iter()
                .map(|p| ProxySpec {
                    name: p.name.clone(),
                    target: p.target.clone(),
                    target_credential: p.target_credential.clone(),
                    proxy_credentials: p.proxy_credentials.clone(),
                    default_effect: p.default_effect,
                    limits: p.limits.clone(),
                    cost: p.cost.clone(),
                    response: p.response.clone(),
                    guards: p.guards.clone(),
                    audit: p.audit.clone(),
                    protocol: match p.mcp {
                        Some(_) => crate::policy::Protocol::Mcp,
                        None => crate::policy::Protocol::Http,
                    },
                    mcp: p.mcp.clone().filter(|m| *m != Default::default()),
                })
                .collect(),
            rules: rules
                .into_iter()
                .map(|r| RuleSpec {
                    id: Some(r.id.clone()),
                    credential: r.credential.clone(),
                    proxy: r.proxy.clone(),
                    effect: r.effect,
                    methods: (!r.methods.is_empty()).then(|| r.methods.clone()),
                    path: r.path.clone(),
                    headers: r.conditions.headers.clone(),
                    query: r.conditions.query.clone(),
                    body: r.conditions.body.clone(),
                    mcp: r.conditions.mcp.clone(),
                    priority: r.priority,
                    notes: r.notes.clone(),
                })
                .collect(),
        }
    }
}
