//! Compiling the stored policy into the snapshot the request path reads, one part per
//! function. Decrypting secrets and compiling regexes is the slow part; a change of keys
//! alone (a run key issued or revoked) reuses it and rebuilds only the key table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::base::crypto::MasterKey;
use crate::base::money::to_micros;
use crate::dataplane::budget::{Limit, Rate};
use crate::dataplane::credentials::{ServerSecrets, oauth2, sigv4};
use crate::dataplane::redact::Guard;
use crate::dataplane::rules::{Rule, RuleList};
use crate::dataplane::snapshot::{
    AlertRule, CLUSTER_PLAIN, CLUSTER_TLS, Caps, CompileError, Compiled, CostSpec, Injection,
    JwksSource, KeyBudgets, KeyChange, KeyEntry, McpProxy, McpTool, Policy, Proxy, RetryHeaders,
    RunawayGuards, Secret, Trust, Upstream,
};
use crate::policy::rows::{AuthSpec, CredentialRow, KeyRow, ProxyRow, StoredPolicy};
use crate::policy::{AuthKind, CredentialType, Limits, TargetUrl};

impl Policy {
    /// Builds the snapshot, decrypting every target secret: a wrong master key fails here,
    /// at start-up or at apply, never on a request.
    pub fn compile(
        stored: &StoredPolicy,
        master: &MasterKey,
        server: &ServerSecrets,
    ) -> Result<Self, CompileError> {
        let compiled = Compiled::compile(stored, master, server)?;
        let keys = key_table(stored, &compiled.credential_ids)?;
        Ok(Policy {
            compiled: Arc::new(compiled),
            keys: Arc::new(keys),
            issued: Arc::default(),
        })
    }

    /// The snapshot of `stored`, this one's compiled part reused when only keys changed
    /// (nothing decrypted or compiled again: the key table alone is rebuilt).
    pub fn recompile(
        &self,
        stored: &StoredPolicy,
        master: &MasterKey,
        server: &ServerSecrets,
    ) -> Result<Self, CompileError> {
        if source_digest(stored) != self.compiled.source
            || server.generation != self.compiled.server_generation
        {
            return Self::compile(stored, master, server);
        }
        Ok(Policy {
            compiled: self.compiled.clone(),
            keys: Arc::new(key_table(stored, &self.compiled.credential_ids)?),
            issued: Arc::default(),
        })
    }

    /// This snapshot with one more key, issued here: the key table is not rebuilt. `None`
    /// when the key's credential is not in this snapshot, or enough keys were issued
    /// since the table was built that a rebuild is due.
    pub fn with_issued(&self, row: &KeyRow) -> Option<Result<Self, CompileError>> {
        let &credential = self
            .compiled
            .credential_ids
            .get(row.credential_id.as_str())?;
        if self.issued.len() >= MAX_ISSUED {
            return None;
        }
        let mut issued: foldhash::HashMap<u128, KeyEntry> = self
            .issued
            .iter()
            .map(|(prefix, k)| (*prefix, k.copy()))
            .collect();
        Some(entry(row, credential).map(|(prefix, key)| {
            issued.insert(prefix, key);
            Policy {
                compiled: self.compiled.clone(),
                keys: self.keys.clone(),
                issued: Arc::new(issued),
            }
        }))
    }
}

impl Policy {
    /// This snapshot with `change` made. Revoking and quarantining take effect on this
    /// snapshot at once (and on every one sharing its key table). `None` where only a
    /// compile can (see [`Policy::with_issued`]).
    pub fn changed(&self, change: &KeyChange) -> Option<Result<Self, CompileError>> {
        match change {
            KeyChange::Issued(row) => return self.with_issued(row),
            KeyChange::Revoked(id) => self.revoke(id),
            KeyChange::Quarantined(id) => self.set_quarantined(id, true),
            KeyChange::Released(id) => self.set_quarantined(id, false),
        };
        Some(Ok(self.clone()))
    }
}

/// Keys issued on a replica before its key table is rebuilt from the store: each issue
/// copies the ones before it.
const MAX_ISSUED: usize = 256;

fn invalid(s: String) -> CompileError {
    CompileError::Invalid(s)
}

/// A digest of everything but the keys, as stored: the rows' own printing, which holds
/// sealed secrets (never plain ones) and has no unordered maps, so equal rows print the
/// same.
fn source_digest(stored: &StoredPolicy) -> [u8; 32] {
    let printed = format!(
        "{:?}{:?}{:?}{:?}",
        stored.targets, stored.credentials, stored.proxies, stored.rules
    );
    Sha256::digest(printed.as_bytes()).into()
}

impl Compiled {
    fn compile(
        stored: &StoredPolicy,
        master: &MasterKey,
        server: &ServerSecrets,
    ) -> Result<Self, CompileError> {
        let credentials = Credentials::compile(stored, master, server)?;
        let (credential_rules, mut proxy_rules, rules_by_id) = rules(stored, &credentials.names)?;
        let targets: HashMap<&str, &str> = stored
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.url.as_str()))
            .collect();
        let mut proxies =
            foldhash::HashMap::with_capacity_and_hasher(stored.proxies.len(), Default::default());
        for p in &stored.proxies {
            let rules = RuleList::new(proxy_rules.remove(p.name.as_str()).unwrap_or_default())
                .map_err(|e| invalid(format!("rules of proxy {:?}: {e}", p.name)))?;
            let proxy = proxy(p, rules, &targets, &credentials, &credential_rules)?;
            proxies.insert(Box::from(p.name.as_str()), proxy);
        }
        Ok(Compiled {
            proxies,
            credential_ids: credentials
                .by_id
                .iter()
                .map(|(id, i)| (Box::from(*id), *i))
                .collect(),
            credential_index: (credentials.names.iter())
                .enumerate()
                .map(|(i, name)| (name.clone(), i as u32))
                .collect(),
            credentials: credentials.names,
            credential_rules,
            credential_limits: credentials.limits,
            credential_caps: credentials.caps,
            rules_by_id,
            source: source_digest(stored),
            server_generation: server.generation,
            unavailable: credentials.unavailable,
            trusts: credentials.trusts,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// Numbers each compilation.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The proxy credentials (by index) and the target credentials' injections.
struct Credentials<'a> {
    names: Vec<Arc<str>>,
    trusts: Vec<Trust>,
    limits: Vec<Box<[Limit]>>,
    caps: Vec<Caps>,
    index: HashMap<&'a str, u32>,
    by_id: HashMap<&'a str, u32>,
    injections: HashMap<&'a str, Arc<Injection>>,
    /// The forms of each secret a proxy scrubs from responses.
    echoes: HashMap<&'a str, Vec<Zeroizing<Vec<u8>>>>,
    /// Server-read secrets that could not be read, by credential.
    unavailable: Vec<(Arc<str>, String)>,
}

impl<'a> Credentials<'a> {
    fn compile(
        stored: &'a StoredPolicy,
        master: &MasterKey,
        server: &ServerSecrets,
    ) -> Result<Self, CompileError> {
        let mut out = Credentials {
            names: Vec::new(),
            trusts: Vec::new(),
            limits: Vec::new(),
            caps: Vec::new(),
            index: HashMap::new(),
            by_id: HashMap::new(),
            injections: HashMap::new(),
            echoes: HashMap::new(),
            unavailable: Vec::new(),
        };
        // Only the credentials a proxy scrubs need their echoed forms.
        let scrubbed: HashSet<&str> = stored
            .proxies
            .iter()
            .filter(|p| p.response.as_ref().is_some_and(|r| r.scrub_credential))
            .map(|p| p.target_credential.as_str())
            .collect();
        for c in &stored.credentials {
            match c.kind {
                CredentialType::Proxy => {
                    let i = out.names.len() as u32;
                    out.names.push(Arc::from(c.name.as_str()));
                    out.limits
                        .push(limits("credential", &c.name, c.limits.as_ref()));
                    let given = c.limits.clone().unwrap_or_default();
                    out.caps.push(Caps {
                        spend: (given.spend_caps().into_iter())
                            .map(|(p, usd)| (p, to_micros(usd)))
                            .collect(),
                        tokens: given.token_budgets(),
                    });
                    out.index.insert(&c.name, i);
                    out.by_id.insert(&c.id, i);
                    if let Some(identity) = &c.identity {
                        out.trusts.push(
                            trust(i, identity)
                                .map_err(|e| invalid(format!("credential {:?}: {e}", c.name)))?,
                        );
                    }
                }
                CredentialType::Target => {
                    let plain = match server_read(c, server) {
                        Some(Ok(value)) => Some(Zeroizing::new(value.as_bytes().to_vec())),
                        Some(Err(why)) => {
                            out.unavailable.push((Arc::from(c.name.as_str()), why));
                            out.injections
                                .insert(&c.name, Arc::new(Injection::Unavailable));
                            continue;
                        }
                        None => c.open_secret(master)?,
                    };
                    let (Some(auth), Some(plain)) = (&c.auth, plain) else {
                        return Err(invalid(format!(
                            "credential {:?} has no auth or secret",
                            c.name
                        )));
                    };
                    let secret = std::str::from_utf8(&plain).map_err(|_| {
                        invalid(format!("credential {:?}: secret is not UTF-8", c.name))
                    })?;
                    let injection = injection(c, auth, secret)?;
                    if scrubbed.contains(c.name.as_str()) {
                        out.echoes
                            .insert(&c.name, echoed_forms(auth.kind, secret, &injection));
                    }
                    out.injections.insert(&c.name, Arc::new(injection));
                }
            }
        }
        Ok(out)
    }
}

/// An MCP proxy's per-tool settings, compiled.
fn mcp_proxy(spec: &crate::policy::McpSpec) -> Result<McpProxy, String> {
    let tools = (spec.tools.iter())
        .map(|t| {
            Ok(McpTool {
                entry: t.name.as_str().into(),
                matches: crate::policy::glob_regex(&t.name)?,
                per_minute: t.requests_per_minute.map(Rate::per_minute),
                per_day: t.requests_per_day.map(Rate::per_day),
                cost: (t.price_usd)
                    .map(|usd| Arc::new(CostSpec::PerRequest(crate::base::money::to_micros(usd)))),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(McpProxy { tools })
}

/// A proxy credential's `identity`, compiled.
fn trust(credential: u32, identity: &crate::policy::Identity) -> Result<Trust, String> {
    let glob = crate::policy::glob_regex;
    let source = match (&identity.jwks.file, &identity.jwks.url) {
        (Some(file), _) => JwksSource::File(file.into()),
        (None, Some(url)) => JwksSource::Url(url.clone()),
        (None, None) => return Err("identity.jwks: a file or a url".into()),
    };
    Ok(Trust {
        credential,
        issuer: identity.issuer.as_str().into(),
        audience: identity.audience.as_str().into(),
        source,
        subject: glob(&identity.subject)?,
        claims: (identity.claims.iter())
            .map(|(name, g)| Ok((name.as_str().into(), glob(g)?)))
            .collect::<Result<_, String>>()?,
        max_ttl_ms: identity.max_ttl()?.as_millis() as i64,
        max_spend_cap_usd: identity.max_spend_cap_usd,
    })
}

/// A target credential's secret as the server read it, when the server reads it: the
/// value, or why there is none.
fn server_read<'s>(
    c: &CredentialRow,
    server: &'s ServerSecrets,
) -> Option<Result<&'s str, String>> {
    let source = c.secret_ref.as_ref()?.server_source()?;
    Some(match server.values.get(&source) {
        Some(Ok(value)) => Ok(value.as_str()),
        Some(Err(why)) => Err(format!("{source}: {why}")),
        None => Err(format!("{source}: not read yet")),
    })
}

/// How a target credential's secret reaches the upstream.
fn injection(c: &CredentialRow, auth: &AuthSpec, secret: &str) -> Result<Injection, CompileError> {
    let header = |name: &str, value: String| Injection::Header {
        name: name.to_ascii_lowercase(),
        value: Secret(Zeroizing::new(value.into_bytes())),
    };
    let injection = match auth.kind {
        AuthKind::Bearer => header("authorization", format!("Bearer {secret}")),
        AuthKind::Header => header(
            auth.header.as_deref().unwrap_or_default(),
            format!("{}{secret}", auth.prefix.as_deref().unwrap_or_default()),
        ),
        AuthKind::Basic => {
            let user = auth.username.as_deref().unwrap_or_default();
            let pair = Zeroizing::new(format!("{user}:{secret}"));
            header("authorization", format!("Basic {}", BASE64.encode(&*pair)))
        }
        AuthKind::Query => Injection::Query {
            param: utf8_percent_encode(auth.param.as_deref().unwrap_or_default(), QUERY_SAFE)
                .to_string(),
            value: Secret(Zeroizing::new(
                utf8_percent_encode(secret, QUERY_SAFE)
                    .to_string()
                    .into_bytes(),
            )),
        },
        AuthKind::Oauth2ClientCredentials => Injection::OAuth2(oauth2::source(
            &c.id,
            oauth2::TokenConfig {
                token_url: auth.token_url.clone().unwrap_or_default(),
                client_id: auth.client_id.clone().unwrap_or_default(),
                scopes: auth.scopes.clone().unwrap_or_default(),
                client_auth: auth.client_auth.unwrap_or_default(),
                params: auth.token_params.clone().unwrap_or_default(),
            },
            secret,
        )),
        AuthKind::AwsSigv4 => {
            let (secret, token) = match secret.split_once('\n') {
                Some((s, t)) => (s, Some(t)),
                None => (secret, None),
            };
            crate::policy::secrets::check_aws_secrets(secret, token)
                .map_err(|e| invalid(format!("credential {:?}: {e}", c.name)))?;
            Injection::SigV4(sigv4::Signer::new(
                auth.access_key_id.as_deref().unwrap_or_default(),
                secret,
                token,
                auth.region.as_deref().unwrap_or_default(),
                auth.service.as_deref().unwrap_or_default(),
                auth.unsigned_payload.unwrap_or(false),
            ))
        }
    };
    if let Injection::Header { value, .. } = &injection
        && value
            .expose()
            .iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0)
    {
        return Err(invalid(format!(
            "credential {:?}: secret holds a line break or NUL",
            c.name
        )));
    }
    Ok(injection)
}

/// The key table. Sized once: growing a table of 100,000s of keys leaves its smaller
/// copies behind as freed but resident memory.
fn key_table(
    stored: &StoredPolicy,
    credential_ids: &HashMap<Box<str>, u32>,
) -> Result<foldhash::HashMap<u128, KeyEntry>, CompileError> {
    let mut keys =
        foldhash::HashMap::with_capacity_and_hasher(stored.keys.len(), Default::default());
    for k in &stored.keys {
        let Some(&credential) = credential_ids.get(k.credential_id.as_str()) else {
            continue;
        };
        let (prefix, key) = entry(k, credential)?;
        keys.insert(prefix, key);
    }
    Ok(keys)
}

/// One key as the table holds it, under the first 16 bytes of its hash.
fn entry(k: &KeyRow, credential: u32) -> Result<(u128, KeyEntry), CompileError> {
    let hash: [u8; 32] = k
        .hash
        .as_slice()
        .try_into()
        .map_err(|_| invalid(format!("key {} has a malformed hash", k.id)))?;
    let prefix = u128::from_be_bytes(hash[..16].try_into().expect("16 bytes"));
    let key = KeyEntry {
        hash,
        id: Arc::from(k.id.as_str()),
        credential,
        label: k.label.as_deref().map(Arc::from),
        expires_at_ms: k.expires_at_ms,
        revoked: AtomicBool::new(k.revoked_at.is_some()),
        quarantined: AtomicBool::new(k.quarantined_at.is_some()),
        spend_cap_micros: k.spend_cap_usd.map(to_micros),
        budgets: KeyBudgets::of(k),
        spent_micros: to_micros(k.spent_usd),
    };
    Ok((prefix, key))
}

/// Each rule compiled once: the credentials' rule lists (by credential index), the
/// proxies' rules (by proxy name, for [`proxy`]) and every rule by id.
#[allow(clippy::type_complexity)]
fn rules<'a>(
    stored: &'a StoredPolicy,
    credentials: &[Arc<str>],
) -> Result<
    (
        Vec<RuleList>,
        HashMap<&'a str, Vec<Arc<Rule>>>,
        HashMap<Arc<str>, Arc<Rule>>,
    ),
    CompileError,
> {
    let mut credential_rules: HashMap<&str, Vec<Arc<Rule>>> = HashMap::new();
    let mut proxy_rules: HashMap<&str, Vec<Arc<Rule>>> = HashMap::new();
    let mut rules_by_id = HashMap::new();
    for r in &stored.rules {
        let rule = Arc::new(Rule::compile(r).map_err(|e| invalid(format!("rule {}: {e}", r.id)))?);
        rules_by_id.insert(rule.id.clone(), rule.clone());
        let owner = match (&r.credential, &r.proxy) {
            (Some(c), _) => credential_rules.entry(c).or_default(),
            (None, Some(p)) => proxy_rules.entry(p).or_default(),
            (None, None) => return Err(invalid(format!("rule {} has no owner", r.id))),
        };
        owner.push(rule);
    }
    let credential_rules = credentials
        .iter()
        .map(|name| {
            RuleList::new(credential_rules.remove(name.as_ref()).unwrap_or_default())
                .map_err(|e| invalid(format!("rules of credential {name:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((credential_rules, proxy_rules, rules_by_id))
}

/// One proxy: its upstream, injection, bound credentials, rules and limits.
fn proxy(
    p: &ProxyRow,
    rules: RuleList,
    targets: &HashMap<&str, &str>,
    credentials: &Credentials<'_>,
    credential_rules: &[RuleList],
) -> Result<Proxy, CompileError> {
    let url = targets
        .get(p.target.as_str())
        .ok_or_else(|| invalid(format!("proxy {:?}: no target {:?}", p.name, p.target)))?;
    let url = TargetUrl::parse(url).map_err(invalid)?;
    let injection = credentials
        .injections
        .get(p.target_credential.as_str())
        .cloned()
        .ok_or_else(|| {
            invalid(format!(
                "proxy {:?}: no target credential {:?}",
                p.name, p.target_credential
            ))
        })?;
    let mut bound = HashSet::new();
    for c in &p.proxy_credentials {
        let Some(&index) = credentials.index.get(c.as_str()) else {
            return Err(invalid(format!(
                "proxy {:?}: no proxy credential {c:?}",
                p.name
            )));
        };
        bound.insert(index);
    }
    let guards = RunawayGuards {
        duplicate_window_ms: (p.guards.as_ref())
            .and_then(|g| g.duplicate_window().ok().flatten())
            .map(|w| w.as_millis() as u64),
        idempotency_key: p.guards.as_ref().is_some_and(|g| g.idempotency_key),
        retries: (p.guards.as_ref())
            .and_then(|g| g.retries.as_ref())
            .map(|r| RetryHeaders::new(r, p.cost.is_some())),
        alerts: (p.guards.as_ref())
            .and_then(|g| g.alerts.as_ref())
            .map(|a| {
                let spans = a
                    .spans()
                    .map_err(|e| invalid(format!("proxy {:?}: {e}", p.name)))?;
                Ok::<_, CompileError>(Arc::new(AlertRule {
                    spec: a.clone(),
                    window_ms: spans.window_ms,
                    baseline_ms: spans.baseline_ms,
                }))
            })
            .transpose()?,
        webhooks: (p.guards.as_ref())
            .map(|g| g.webhooks.as_slice())
            .unwrap_or_default()
            .into(),
    };
    let needs_body = p.mcp.is_some()
        || injection.signs_body()
        || guards.duplicate_window_ms.is_some()
        || guards.idempotency_key
        || p.cost.as_ref().is_some_and(|c| c.tokens.is_some())
        || rules.needs_body()
        || bound
            .iter()
            .any(|&c| credential_rules[c as usize].needs_body());
    let echoes = &credentials.echoes;
    Ok(Proxy {
        name: Arc::from(p.name.as_str()),
        target: Arc::from(p.target.as_str()),
        upstream: Upstream {
            cluster: if url.tls { CLUSTER_TLS } else { CLUSTER_PLAIN },
            authority: url.authority,
            base_path: url.base_path,
        },
        injection,
        default_effect: p.default_effect,
        rules,
        bound,
        needs_body,
        limits: limits("proxy", &p.name, p.limits.as_ref()),
        timeout_ms: (p.limits.as_ref())
            .and_then(|l| l.upstream_timeout_s)
            .map(|s| u64::from(s) * 1000),
        guards,
        keep_body_fields: p.audit.as_ref().is_some_and(|a| a.body_fields),
        mcp: (p.mcp.as_ref())
            .map(|spec| mcp_proxy(spec).map(Arc::new))
            .transpose()
            .map_err(|e| invalid(format!("proxy {:?}: mcp: {e}", p.name)))?,
        cost: p
            .cost
            .as_ref()
            .and_then(CostSpec::from_policy)
            .map(Arc::new),
        response: p
            .response
            .as_ref()
            .map(|spec| {
                let forms = echoes.get(p.target_credential.as_str()).cloned();
                Guard::new(spec, forms.unwrap_or_default())
                    .map(Arc::new)
                    .map_err(|e| invalid(format!("proxy {:?}: response: {e}", p.name)))
            })
            .transpose()?,
    })
}

/// Characters left as they are in a query parameter.
const QUERY_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A target secret in every form it travels upstream, so an echo of any is caught: as
/// given, and as the injection carries it (Basic's base64 pair, a query's encoding, an
/// AWS secret and session token).
fn echoed_forms(kind: AuthKind, secret: &str, injection: &Injection) -> Vec<Zeroizing<Vec<u8>>> {
    let bytes = |s: &[u8]| Zeroizing::new(s.to_vec());
    match (kind, injection) {
        (_, Injection::SigV4(signer)) => signer.secrets().map(bytes).collect(),
        (AuthKind::Basic, Injection::Header { value, .. }) => {
            let pair = value.expose().strip_prefix(b"Basic ").unwrap_or_default();
            vec![bytes(secret.as_bytes()), bytes(pair)]
        }
        (_, Injection::Query { value, .. }) => {
            vec![bytes(secret.as_bytes()), bytes(value.expose())]
        }
        _ => vec![bytes(secret.as_bytes())],
    }
}

/// The budget limits a `limits:` block sets, with their store keys.
fn limits(owner: &str, name: &str, limits: Option<&Limits>) -> Box<[Limit]> {
    let Some(limits) = limits else {
        return Box::default();
    };
    [
        ("minute", limits.requests_per_minute.map(Rate::per_minute)),
        ("day", limits.requests_per_day.map(Rate::per_day)),
    ]
    .into_iter()
    .filter_map(|(period, rate)| {
        Some(Limit {
            key: Arc::from(format!("{owner}:{name}:{period}")),
            rate: rate?,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::crypto::hash_key;
    use crate::store::{memory, testing};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn run_key(stored: &StoredPolicy, key: &str) -> KeyRow {
        KeyRow {
            id: "key_run".into(),
            label: Some("run".into()),
            policy_sourced: false,
            hash: hash_key(key.as_bytes()).to_vec(),
            ..stored.keys[0].clone()
        }
    }

    /// Issuing and revoking a key recompiles nothing else; any other change does.
    #[test]
    fn a_change_of_keys_alone_reuses_the_compiled_part() {
        let master = MasterKey::parse(&MasterKey::generate()).unwrap();
        let mut stored = memory::stored(testing::POLICY, &master).unwrap();
        let first = Policy::compile(&stored, &master, &Default::default()).unwrap();
        let run = hash_key(b"lk_runKEY000000000000000001");
        assert!(first.key(&run).is_none());

        stored
            .keys
            .push(run_key(&stored, "lk_runKEY000000000000000001"));
        let issued = first
            .recompile(&stored, &master, &Default::default())
            .unwrap();
        assert!(Arc::ptr_eq(&issued.compiled, &first.compiled));
        assert_eq!(issued.key(&run).unwrap().label.as_deref(), Some("run"));

        stored.keys.last_mut().unwrap().revoked_at = Some(1);
        let revoked = issued
            .recompile(&stored, &master, &Default::default())
            .unwrap();
        assert!(Arc::ptr_eq(&revoked.compiled, &first.compiled));
        assert!(
            revoked
                .key(&run)
                .unwrap()
                .revoked
                .load(std::sync::atomic::Ordering::Relaxed)
        );

        // Issued here: in effect at once, the key table itself untouched; revoked in
        // place.
        let second = hash_key(b"lk_runKEY000000000000000002");
        let mut row = run_key(&stored, "lk_runKEY000000000000000002");
        row.id = "key_run2".into();
        let here = revoked.with_issued(&row).unwrap().unwrap();
        assert!(
            Arc::ptr_eq(&here.keys, &revoked.keys) && Arc::ptr_eq(&here.compiled, &first.compiled)
        );
        assert!(here.key(&second).is_some() && revoked.key(&second).is_none());
        assert!(here.revoke("key_run2"));
        assert!(
            here.key(&second)
                .unwrap()
                .revoked
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        assert!(!here.revoke("key_nope"));
        row.credential_id = "cred_gone".into();
        assert!(
            here.with_issued(&row).is_none(),
            "an unknown credential reloads"
        );

        stored.rules[0].path = Some("^/v2/".into());
        let changed = revoked
            .recompile(&stored, &master, &Default::default())
            .unwrap();
        assert!(!Arc::ptr_eq(&changed.compiled, &first.compiled));
        assert_eq!(
            changed.rule("reads").unwrap().path.as_deref(),
            Some("^/v2/")
        );
    }

    /// A replica that cannot compile still stops what the store stops, and counts a
    /// quarantine as a stop (its modules are sent the policy again for it).
    #[test]
    fn revocations_and_quarantines_hold_without_a_compile() {
        let master = MasterKey::parse(&MasterKey::generate()).unwrap();
        let mut stored = memory::stored(testing::POLICY, &master).unwrap();
        let running = Policy::compile(&stored, &master, &Default::default()).unwrap();
        let hash: [u8; 32] = stored.keys[0].hash.clone().try_into().unwrap();
        let stopped = |p: &Policy| {
            let k = p.key(&hash).unwrap();
            let get = |b: &AtomicBool| b.load(Ordering::Relaxed);
            (get(&k.revoked), get(&k.quarantined))
        };
        assert_eq!(running.apply_revocations(&stored), 0);

        stored.keys[0].quarantined_at = Some(1);
        assert_eq!(running.apply_revocations(&stored), 1);
        assert_eq!(stopped(&running), (false, true));
        assert_eq!(running.apply_revocations(&stored), 0, "stopped once");

        stored.keys[0].revoked_at = Some(2);
        assert_eq!(running.apply_revocations(&stored), 1);
        assert_eq!(stopped(&running), (true, true));

        // A release waits for a compile.
        stored.keys[0].quarantined_at = None;
        assert_eq!(running.apply_revocations(&stored), 0);
        assert_eq!(stopped(&running), (true, true));
    }
}
