//! A policy file as the store would hold it, built in memory: for tests and benchmarks
//! that want the snapshot of a YAML policy without a database. Secrets and keys are
//! resolved (inline values, variables, files) and sealed as `apply` seals them.

use std::collections::HashMap;
use std::path::Path;

use zeroize::Zeroizing;

use crate::base::crypto::{MasterKey, hash_key};
use crate::policy::PolicyFile;
use crate::policy::rows::{CredentialRow, KeyRow, StoredPolicy};
use crate::store::Desired;

pub fn stored(yaml: &str, master: &MasterKey) -> Result<StoredPolicy, String> {
    let file = PolicyFile::parse(yaml).map_err(|e| e.to_string())?;
    let base = Path::new(".");
    let mut secrets = HashMap::new();
    for c in file.target_secrets() {
        secrets.insert(c.name.clone(), Zeroizing::new(c.resolve_secret(base)?));
    }
    let mut keys = HashMap::new();
    for (name, refs) in file.imported_keys() {
        let hashes = refs
            .iter()
            .map(|k| k.resolve(base).map(|k| hash_key(k.as_bytes())))
            .collect::<Result<Vec<_>, _>>()?;
        keys.insert(name.to_owned(), hashes);
    }
    let desired = Desired::new(&file, secrets, keys)?;
    let id = |name: &str| format!("cred_{name}");
    let key_rows = desired.credentials.iter().flat_map(|c| {
        c.key_hashes.iter().enumerate().map(|(i, hash)| KeyRow {
            id: format!("key_{}_{i}", c.name),
            credential_id: id(&c.name),
            hash: hash.to_vec(),
            policy_sourced: true,
            label: None,
            created_at: 0,
            expires_at_ms: None,
            revoked_at: None,
            quarantined_at: None,
            spend_cap_usd: None,
            spent_usd: 0.0,
            cap_period: None,
            tokens_per_minute: None,
            tokens_per_day: None,
        })
    });
    Ok(StoredPolicy {
        keys: key_rows.collect(),
        credentials: desired
            .credentials
            .iter()
            .map(|c| CredentialRow {
                id: id(&c.name),
                name: c.name.clone(),
                kind: c.kind,
                auth: c.auth.clone(),
                secret_ref: c.secret_ref.clone(),
                sealed: (c.secret.as_ref()).map(|s| master.seal(&id(&c.name), s.as_bytes())),
                master_key_id: Some(master.id().to_owned()),
                limits: c.limits.clone(),
                identity: c.identity.clone(),
            })
            .collect(),
        targets: desired.targets,
        proxies: desired.proxies,
        rules: desired.rules,
    })
}
