//! The policy's tables: read whole into [`StoredPolicy`], and written as the difference
//! between what is stored and what is desired, in one transaction.

use std::collections::{BTreeMap, HashMap};

use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::{Any, Row, Transaction};

use crate::base::clock::now_unix;
use crate::base::crypto::{self, MasterKey};
use crate::policy::period::Period;
use crate::policy::rows::*;
use crate::policy::{CredentialType, Effect};
use crate::store::{
    Backend, Change, Desired, DesiredCredential, SELECT_VERSION, Store, StoreError,
};

impl Store {
    pub async fn load(&self) -> Result<StoredPolicy, StoreError> {
        Ok(self.load_versioned().await?.1)
    }

    /// The stored policy and the version it is, read from one snapshot of the store: on
    /// PostgreSQL each statement of a transaction would otherwise see every commit made
    /// before it, and five tables read while an apply commits could mix two policies.
    pub async fn load_versioned(&self) -> Result<(i64, StoredPolicy), StoreError> {
        let mut tx = match self.backend() {
            // A deferred transaction reads one snapshot (WAL) from its first read on.
            Backend::Sqlite => self.pool.begin().await?,
            Backend::Postgres => {
                (self.pool)
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
        };
        let version = sqlx::query_scalar(SELECT_VERSION)
            .fetch_one(&mut *tx)
            .await?;
        let stored = load(&mut tx).await?;
        tx.commit().await?;
        Ok((version, stored))
    }

    /// Makes the store match `desired` in one transaction. `check` sees the would-be
    /// state before commit; if it fails, nothing is written. With `dry_run` the changes
    /// are reported and rolled back. Returns the changes and, if any were committed, the
    /// policy version they made.
    pub async fn apply<E>(
        &self,
        desired: &Desired,
        master: &MasterKey,
        dry_run: bool,
        check: impl FnOnce(&StoredPolicy) -> Result<(), E>,
    ) -> Result<Result<(Vec<Change>, Option<i64>), E>, StoreError> {
        self.edit(master, dry_run, |_| Ok(desired), check).await
    }

    /// As `apply`, with what is desired built from the current state inside the same
    /// transaction: an edit of one item cannot lose a concurrent change to another.
    pub async fn edit<E, D: std::borrow::Borrow<Desired>>(
        &self,
        master: &MasterKey,
        dry_run: bool,
        build: impl FnOnce(&StoredPolicy) -> Result<D, E>,
        check: impl FnOnce(&StoredPolicy) -> Result<(), E>,
    ) -> Result<Result<(Vec<Change>, Option<i64>), E>, StoreError> {
        let mut tx = self.begin_write().await?;
        let current = load(&mut tx).await?;
        let desired = match build(&current) {
            Ok(d) => d,
            Err(e) => {
                tx.rollback().await?;
                return Ok(Err(e));
            }
        };
        let changes = write_diff(&mut tx, &current, desired.borrow(), master).await?;
        let after = load(&mut tx).await?;
        if let Err(e) = check(&after) {
            tx.rollback().await?;
            return Ok(Err(e));
        }
        if dry_run || changes.is_empty() {
            tx.rollback().await?;
            return Ok(Ok((changes, None)));
        }
        let version = self.bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(Ok((changes, Some(version))))
    }

    /// Re-seals under `master`'s current key every secret sealed under another (one of
    /// its previous keys), in one transaction. Returns how many were re-sealed.
    pub async fn rekey(&self, master: &MasterKey) -> Result<usize, StoreError> {
        let mut tx = self.begin_write().await?;
        let rows: Vec<(String, String, Vec<u8>, Option<String>)> = sqlx::query_as(
            "SELECT id, name, secret_sealed, master_key_id FROM credentials
             WHERE secret_sealed IS NOT NULL",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut resealed = 0;
        for (id, name, sealed, sealed_with) in rows {
            let sealed_with = sealed_with.unwrap_or_else(|| "unknown".to_owned());
            if sealed_with == master.id() {
                continue;
            }
            let plain = master
                .open(&id, &sealed, &sealed_with)
                .map_err(|source| SecretError { name, source })?;
            sqlx::query(
                "UPDATE credentials SET secret_sealed = $1, master_key_id = $2 WHERE id = $3",
            )
            .bind(master.seal(&id, &plain))
            .bind(master.id())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            resealed += 1;
        }
        if resealed > 0 {
            self.bump_version(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(resealed)
    }
}

fn parse_effect(table: &'static str, s: &str) -> Result<Effect, StoreError> {
    match s {
        "allow" => Ok(Effect::Allow),
        "deny" => Ok(Effect::Deny),
        "approve" => Ok(Effect::Approve),
        other => Err(StoreError::Corrupt {
            table,
            problem: format!("effect {other:?}"),
        }),
    }
}

fn from_json<T: serde::de::DeserializeOwned>(
    table: &'static str,
    text: Option<String>,
) -> Result<Option<T>, StoreError> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            table,
            problem: e.to_string(),
        })
}

fn to_json<T: Serialize>(value: &Option<T>) -> Option<String> {
    value
        .as_ref()
        .map(|v| serde_json::to_string(v).expect("plain data serializes"))
}

async fn load(tx: &mut Transaction<'_, Any>) -> Result<StoredPolicy, StoreError> {
    let mut out = StoredPolicy::default();
    for row in sqlx::query("SELECT name, url FROM targets ORDER BY name")
        .fetch_all(&mut **tx)
        .await?
    {
        out.targets.push(TargetRow {
            name: row.try_get("name")?,
            url: row.try_get("url")?,
        });
    }
    for row in sqlx::query(
        "SELECT id, name, kind, auth, secret_ref, secret_sealed, master_key_id, limits, identity
         FROM credentials ORDER BY name",
    )
    .fetch_all(&mut **tx)
    .await?
    {
        let kind = match row.try_get::<String, _>("kind")?.as_str() {
            "target" => CredentialType::Target,
            "proxy" => CredentialType::Proxy,
            other => {
                return Err(StoreError::Corrupt {
                    table: "credentials",
                    problem: format!("kind {other:?}"),
                });
            }
        };
        out.credentials.push(CredentialRow {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            kind,
            auth: from_json("credentials", row.try_get("auth")?)?,
            secret_ref: from_json("credentials", row.try_get("secret_ref")?)?,
            sealed: row.try_get("secret_sealed")?,
            master_key_id: row.try_get("master_key_id")?,
            limits: from_json("credentials", row.try_get("limits")?)?,
            identity: from_json("credentials", row.try_get("identity")?)?,
        });
    }
    // Streamed, row by row: a policy with 100,000s of keys is never held twice (as
    // database rows and as key rows) at once.
    let mut rows = sqlx::query(
        "SELECT id, credential_id, key_hash, source, label, created_at,
                COALESCE(expires_at_ms,
                         CASE WHEN expires_at > 9000000000000 THEN 9000000000000000
                              ELSE expires_at * 1000 END) AS expires_at_ms,
                revoked_at, quarantined_at, spend_cap_usd, spent_usd, cap_period,
                tokens_per_minute, tokens_per_day
         FROM proxy_keys ORDER BY created_at, id",
    )
    .fetch(&mut **tx);
    while let Some(row) = rows.try_next().await? {
        out.keys.push(KeyRow {
            id: row.try_get("id")?,
            credential_id: row.try_get("credential_id")?,
            hash: row.try_get("key_hash")?,
            policy_sourced: row.try_get::<String, _>("source")? == "policy",
            label: row.try_get("label")?,
            created_at: row.try_get("created_at")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            revoked_at: row.try_get("revoked_at")?,
            quarantined_at: row.try_get("quarantined_at")?,
            spend_cap_usd: row.try_get("spend_cap_usd")?,
            spent_usd: row.try_get("spent_usd")?,
            cap_period: match row.try_get::<Option<String>, _>("cap_period")? {
                None => None,
                Some(name) => match Period::parse(&name) {
                    Some(period) if period != Period::Minute => Some(period),
                    _ => {
                        return Err(StoreError::Corrupt {
                            table: "proxy_keys",
                            problem: format!("unknown cap period {name:?}"),
                        });
                    }
                },
            },
            tokens_per_minute: row
                .try_get::<Option<i64>, _>("tokens_per_minute")?
                .and_then(|n| u64::try_from(n).ok()),
            tokens_per_day: row
                .try_get::<Option<i64>, _>("tokens_per_day")?
                .and_then(|n| u64::try_from(n).ok()),
        });
    }
    drop(rows);
    let mut bindings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rows = sqlx::query("SELECT proxy, credential FROM proxy_bindings ORDER BY credential")
        .fetch(&mut **tx);
    while let Some(row) = rows.try_next().await? {
        bindings
            .entry(row.try_get("proxy")?)
            .or_default()
            .push(row.try_get("credential")?);
    }
    drop(rows);
    let mut rows = sqlx::query(
        "SELECT name, target, target_credential, default_effect, limits, cost, response, guards,
                audit, mcp
         FROM proxies ORDER BY name",
    )
    .fetch(&mut **tx);
    while let Some(row) = rows.try_next().await? {
        let name: String = row.try_get("name")?;
        out.proxies.push(ProxyRow {
            proxy_credentials: bindings.remove(&name).unwrap_or_default(),
            name,
            target: row.try_get("target")?,
            target_credential: row.try_get("target_credential")?,
            default_effect: parse_effect("proxies", &row.try_get::<String, _>("default_effect")?)?,
            limits: from_json("proxies", row.try_get("limits")?)?,
            cost: from_json("proxies", row.try_get("cost")?)?,
            response: from_json("proxies", row.try_get("response")?)?,
            guards: from_json("proxies", row.try_get("guards")?)?,
            audit: from_json("proxies", row.try_get("audit")?)?,
            mcp: from_json("proxies", row.try_get("mcp")?)?,
        });
    }
    drop(rows);
    for row in sqlx::query(
        "SELECT id, credential, proxy, effect, methods, path, conditions, priority, notes, position
         FROM rules ORDER BY position",
    )
    .fetch_all(&mut **tx)
    .await?
    {
        out.rules.push(RuleRow {
            id: row.try_get("id")?,
            credential: row.try_get("credential")?,
            proxy: row.try_get("proxy")?,
            effect: parse_effect("rules", &row.try_get::<String, _>("effect")?)?,
            methods: from_json("rules", Some(row.try_get("methods")?))?.unwrap_or_default(),
            path: row.try_get("path")?,
            conditions: from_json("rules", Some(row.try_get("conditions")?))?.unwrap_or_default(),
            priority: row.try_get("priority")?,
            notes: row.try_get("notes")?,
            position: row.try_get("position")?,
        });
    }
    Ok(out)
}

/// Created, updated and deleted items between two keyed lists.
struct Diff<'a, O, N> {
    created: Vec<&'a N>,
    updated: Vec<(&'a O, &'a N)>,
    deleted: Vec<&'a O>,
}

fn diff<'a, O, N>(
    old: &'a [O],
    new: &'a [N],
    old_key: impl Fn(&O) -> &str,
    new_key: impl Fn(&N) -> &str,
    same: impl Fn(&O, &N) -> bool,
) -> Diff<'a, O, N> {
    let by_name: HashMap<&str, &O> = old.iter().map(|o| (old_key(o), o)).collect();
    let mut d = Diff {
        created: Vec::new(),
        updated: Vec::new(),
        deleted: Vec::new(),
    };
    for n in new {
        match by_name.get(new_key(n)) {
            None => d.created.push(n),
            Some(&o) if !same(o, n) => d.updated.push((o, n)),
            Some(_) => {}
        }
    }
    let wanted: std::collections::HashSet<&str> = new.iter().map(&new_key).collect();
    d.deleted = old
        .iter()
        .filter(|o| !wanted.contains(old_key(o)))
        .collect();
    d
}

fn change(kind: &'static str, name: &str, action: &'static str) -> Change {
    Change {
        kind,
        name: name.to_owned(),
        action,
    }
}

async fn write_diff(
    tx: &mut Transaction<'_, Any>,
    current: &StoredPolicy,
    desired: &Desired,
    master: &MasterKey,
) -> Result<Vec<Change>, StoreError> {
    let mut changes = Vec::new();

    let targets = diff(
        &current.targets,
        &desired.targets,
        |t| &t.name,
        |t| &t.name,
        |a, b| a == b,
    );
    for t in &targets.deleted {
        sqlx::query("DELETE FROM targets WHERE name = $1")
            .bind(&t.name)
            .execute(&mut **tx)
            .await?;
        changes.push(change("target", &t.name, "deleted"));
    }
    for t in targets
        .created
        .iter()
        .chain(targets.updated.iter().map(|(_, n)| n))
    {
        sqlx::query(
            "INSERT INTO targets (name, url) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET url = excluded.url",
        )
        .bind(&t.name)
        .bind(&t.url)
        .execute(&mut **tx)
        .await?;
    }
    changes.extend(
        targets
            .created
            .iter()
            .map(|t| change("target", &t.name, "created")),
    );
    changes.extend(
        targets
            .updated
            .iter()
            .map(|(t, _)| change("target", &t.name, "updated")),
    );

    // A credential is unchanged only if its secret still decrypts to the same value.
    let mut same_secret = HashMap::new();
    for c in &current.credentials {
        let Some(want) = desired.credentials.iter().find(|d| d.name == c.name) else {
            continue;
        };
        let same = match (c.open_secret(master)?, &want.secret) {
            (Some(plain), Some(secret)) => crypto::ct_eq(&plain, secret.as_bytes()),
            // `sealed: true`: what is held is what is wanted.
            (Some(_), None) => want.keeps_secret(),
            (None, None) => true,
            _ => false,
        };
        same_secret.insert(c.name.as_str(), same);
    }
    let creds = diff(
        &current.credentials,
        &desired.credentials,
        |c| &c.name,
        |c| &c.name,
        |o, n| {
            o.kind == n.kind
                && o.auth == n.auth
                // A kept secret keeps its reference too (where it first came from).
                && (n.keeps_secret() || o.secret_ref == n.secret_ref)
                && o.limits == n.limits
                && o.identity == n.identity
                && same_secret.get(o.name.as_str()) == Some(&true)
        },
    );
    let mut ids: HashMap<&str, String> = current
        .credentials
        .iter()
        .map(|c| (c.name.as_str(), c.id.clone()))
        .collect();
    // A change of type is a new credential: its issued keys must not survive it.
    let (retyped, updated): (Vec<_>, Vec<_>) =
        creds.updated.iter().partition(|(o, n)| o.kind != n.kind);
    for c in creds.deleted.iter().chain(retyped.iter().map(|(o, _)| o)) {
        sqlx::query("DELETE FROM credentials WHERE id = $1")
            .bind(&c.id)
            .execute(&mut **tx)
            .await?;
        ids.remove(c.name.as_str());
    }
    changes.extend(
        creds
            .deleted
            .iter()
            .map(|c| change("credential", &c.name, "deleted")),
    );
    for c in creds.created.iter().chain(retyped.iter().map(|(_, n)| n)) {
        if c.keeps_secret() {
            return Err(StoreError::Invalid(format!(
                "credential {:?}: `secret: {{ sealed: true }}` keeps the secret latchkey holds, and it holds none",
                c.name
            )));
        }
        let id = crypto::random_id("cred");
        insert_credential(tx, &id, c, master).await?;
        changes.push(change("credential", &c.name, "created"));
        ids.insert(&c.name, id);
    }
    for (o, n) in &updated {
        if n.keeps_secret() {
            if o.sealed.is_none() {
                return Err(StoreError::Invalid(format!(
                    "credential {:?}: `secret: {{ sealed: true }}` keeps the secret latchkey holds, and it holds none",
                    n.name
                )));
            }
            sqlx::query(
                "UPDATE credentials SET auth = $1, limits = $2, identity = $3 WHERE id = $4",
            )
            .bind(to_json(&n.auth))
            .bind(to_json(&n.limits))
            .bind(to_json(&n.identity))
            .bind(&o.id)
            .execute(&mut **tx)
            .await?;
            changes.push(change("credential", &n.name, "updated"));
            continue;
        }
        let sealed = n.secret.as_ref().map(|s| master.seal(&o.id, s.as_bytes()));
        sqlx::query(
            "UPDATE credentials SET auth = $1, secret_ref = $2, secret_sealed = $3, master_key_id = $4,
                                    limits = $5, identity = $6
             WHERE id = $7",
        )
        .bind(to_json(&n.auth))
        .bind(to_json(&n.secret_ref))
        .bind(sealed)
        .bind(n.secret.as_ref().map(|_| master.id()))
        .bind(to_json(&n.limits))
        .bind(to_json(&n.identity))
        .bind(&o.id)
        .execute(&mut **tx)
        .await?;
        changes.push(change("credential", &n.name, "updated"));
    }

    // Imported keys are matched by hash; keys issued at run time are never touched here.
    let existing: HashMap<&[u8], &KeyRow> = current
        .keys
        .iter()
        .filter(|k| k.policy_sourced)
        .map(|k| (k.hash.as_slice(), k))
        .collect();
    let mut kept = std::collections::HashSet::new();
    for c in &desired.credentials {
        let cred_id = &ids[c.name.as_str()];
        if c.keep_keys {
            kept.extend(
                existing
                    .values()
                    .filter(|k| &k.credential_id == cred_id)
                    .map(|k| k.id.as_str()),
            );
        }
        for hash in &c.key_hashes {
            match existing.get(hash.as_slice()) {
                Some(k) if &k.credential_id == cred_id => {
                    kept.insert(k.id.as_str());
                }
                _ => {
                    let id = crypto::random_id("key");
                    sqlx::query(
                        "INSERT INTO proxy_keys (id, credential_id, key_hash, source, created_at)
                         VALUES ($1, $2, $3, 'policy', $4)
                         ON CONFLICT (key_hash) DO UPDATE SET
                           id = excluded.id, credential_id = excluded.credential_id,
                           source = 'policy', revoked_at = NULL, expires_at = NULL,
                           expires_at_ms = NULL",
                    )
                    .bind(&id)
                    .bind(cred_id)
                    .bind(hash.as_slice())
                    .bind(now_unix())
                    .execute(&mut **tx)
                    .await?;
                    changes.push(change("key", &format!("{}/{id}", c.name), "created"));
                }
            }
        }
    }
    for k in existing.values().filter(|k| !kept.contains(k.id.as_str())) {
        let live = sqlx::query("DELETE FROM proxy_keys WHERE id = $1")
            .bind(&k.id)
            .execute(&mut **tx)
            .await?;
        if live.rows_affected() > 0 {
            let owner = current
                .credentials
                .iter()
                .find(|c| c.id == k.credential_id)
                .map_or("?", |c| c.name.as_str());
            changes.push(change("key", &format!("{owner}/{}", k.id), "deleted"));
        }
    }

    let proxies = diff(
        &current.proxies,
        &desired.proxies,
        |p| &p.name,
        |p| &p.name,
        |a, b| a == b,
    );
    for p in &proxies.deleted {
        sqlx::query("DELETE FROM proxies WHERE name = $1")
            .bind(&p.name)
            .execute(&mut **tx)
            .await?;
        changes.push(change("proxy", &p.name, "deleted"));
    }
    for p in proxies
        .created
        .iter()
        .chain(proxies.updated.iter().map(|(_, n)| n))
    {
        sqlx::query(
            "INSERT INTO proxies (name, target, target_credential, default_effect, limits, cost,
               response, guards, audit, mcp)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (name) DO UPDATE SET target = excluded.target,
               target_credential = excluded.target_credential,
               default_effect = excluded.default_effect,
               limits = excluded.limits, cost = excluded.cost, response = excluded.response,
               guards = excluded.guards, audit = excluded.audit, mcp = excluded.mcp",
        )
        .bind(&p.name)
        .bind(&p.target)
        .bind(&p.target_credential)
        .bind(p.default_effect.as_str())
        .bind(to_json(&p.limits))
        .bind(to_json(&p.cost))
        .bind(to_json(&p.response))
        .bind(to_json(&p.guards))
        .bind(to_json(&p.audit))
        .bind(to_json(&p.mcp))
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM proxy_bindings WHERE proxy = $1")
            .bind(&p.name)
            .execute(&mut **tx)
            .await?;
        for c in &p.proxy_credentials {
            sqlx::query("INSERT INTO proxy_bindings (proxy, credential) VALUES ($1, $2)")
                .bind(&p.name)
                .bind(c)
                .execute(&mut **tx)
                .await?;
        }
    }
    changes.extend(
        proxies
            .created
            .iter()
            .map(|p| change("proxy", &p.name, "created")),
    );
    changes.extend(
        proxies
            .updated
            .iter()
            .map(|(p, _)| change("proxy", &p.name, "updated")),
    );

    let rules = diff(
        &current.rules,
        &desired.rules,
        |r| &r.id,
        |r| &r.id,
        |a, b| a == b,
    );
    for r in &rules.deleted {
        sqlx::query("DELETE FROM rules WHERE id = $1")
            .bind(&r.id)
            .execute(&mut **tx)
            .await?;
        changes.push(change("rule", &r.id, "deleted"));
    }
    for r in rules
        .created
        .iter()
        .chain(rules.updated.iter().map(|(_, n)| n))
    {
        sqlx::query(
            "INSERT INTO rules (id, credential, proxy, effect, methods, path, conditions,
                                priority, notes, position)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET credential = excluded.credential,
               proxy = excluded.proxy, effect = excluded.effect, methods = excluded.methods,
               path = excluded.path, conditions = excluded.conditions,
               priority = excluded.priority, notes = excluded.notes,
               position = excluded.position",
        )
        .bind(&r.id)
        .bind(&r.credential)
        .bind(&r.proxy)
        .bind(r.effect.as_str())
        .bind(serde_json::to_string(&r.methods).expect("strings serialize"))
        .bind(&r.path)
        .bind(serde_json::to_string(&r.conditions).expect("plain data serializes"))
        .bind(r.priority)
        .bind(&r.notes)
        .bind(r.position)
        .execute(&mut **tx)
        .await?;
    }
    changes.extend(
        rules
            .created
            .iter()
            .map(|r| change("rule", &r.id, "created")),
    );
    changes.extend(
        rules
            .updated
            .iter()
            .map(|(r, _)| change("rule", &r.id, "updated")),
    );
    Ok(changes)
}

async fn insert_credential(
    tx: &mut Transaction<'_, Any>,
    id: &str,
    c: &DesiredCredential,
    master: &MasterKey,
) -> Result<(), StoreError> {
    let kind = match c.kind {
        CredentialType::Target => "target",
        CredentialType::Proxy => "proxy",
    };
    sqlx::query(
        "INSERT INTO credentials (id, name, kind, auth, secret_ref, secret_sealed, master_key_id,
                                  limits, identity)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(&c.name)
    .bind(kind)
    .bind(to_json(&c.auth))
    .bind(to_json(&c.secret_ref))
    .bind(c.secret.as_ref().map(|s| master.seal(id, s.as_bytes())))
    .bind(c.secret.as_ref().map(|_| master.id()))
    .bind(to_json(&c.limits))
    .bind(to_json(&c.identity))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
