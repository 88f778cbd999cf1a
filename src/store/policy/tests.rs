use zeroize::Zeroizing;

use super::*;
use crate::base::crypto::hash_key;
use crate::store::testing;

const POLICY: &str = r#"
targets:
  - { name: vendor, url: "https://api.vendor.example/v1" }
credentials:
  - { name: vendor-cred, type: target, auth: bearer, secret: { env: S } }
  - { name: inline-cred, type: target, auth: bearer, secret: { value: sk_inline_CLEAR_77 } }
  - name: agent
    type: proxy
    keys: [{ env: K }]
    limits: { requests_per_minute: 5 }
proxies:
  - name: api
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: deny
    limits: { requests_per_day: 100 }
    cost: { per_request_usd: 0.01 }
rules:
  - { credential: agent, effect: allow, methods: [GET], path: "^/x", priority: 3, notes: n }
  - proxy: api
    effect: deny
    body: [{ pointer: /amount, gt: 10 }]
"#;

fn desired(policy: &str, secret: &str) -> Desired {
    let file = crate::policy::PolicyFile::parse(policy).unwrap();
    Desired::new(
        &file,
        [
            ("vendor-cred".to_owned(), Zeroizing::new(secret.to_owned())),
            (
                "inline-cred".to_owned(),
                Zeroizing::new("sk_inline_CLEAR_77".to_owned()),
            ),
        ]
        .into(),
        [("agent".to_owned(), vec![hash_key(b"lk_key")])].into(),
    )
    .unwrap()
}

async fn apply(store: &Store, master: &MasterKey, d: &Desired) -> (Vec<Change>, Option<i64>) {
    store
        .apply(d, master, false, |_| Ok::<_, ()>(()))
        .await
        .unwrap()
        .unwrap()
}

/// The same behaviour on both backends: apply, re-apply, change, keys, versions.
#[tokio::test]
async fn sqlite_and_postgres_store_the_same_policy_the_same_way() {
    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let mut loaded = Vec::new();
    for (label, _scratch, store) in testing::stores().await {
        assert_eq!(store.version().await.unwrap(), 0, "{label}");
        let (changes, version) = apply(&store, &master, &desired(POLICY, "sk_1")).await;
        assert!(!changes.is_empty() && version == Some(1), "{label}");
        let (again, version) = apply(&store, &master, &desired(POLICY, "sk_1")).await;
        assert!(
            again.is_empty() && version.is_none(),
            "{label}: re-apply is a no-op"
        );
        let (rotated, version) = apply(&store, &master, &desired(POLICY, "sk_2")).await;
        assert_eq!(
            rotated.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["credential vendor-cred: updated"],
            "{label}"
        );
        assert_eq!(version, Some(2));
        // Read in one snapshot with the policy it labels.
        let (version, stored) = store.load_versioned().await.unwrap();
        assert_eq!((version, stored.credentials.len()), (2, 3), "{label}");

        let (issued, issue_version) = store
            .issue_key(&NewKey {
                credential: "agent",
                hash: hash_key(b"lk_run"),
                label: Some("run-1"),
                expires_at_ms: Some(4_000_000_000_000),
                cap_period: None,
                tokens_per_minute: None,
                tokens_per_day: None,
                spend_cap_usd: Some(2.5),
            })
            .await
            .unwrap();
        let id = issued.id.clone();
        assert_eq!(issue_version, 3, "{label}");
        // An alert quarantines the key once; a release lets it through again.
        use crate::store::alerts::{Released, sample};
        let alert = sample(Some(&id), true);
        assert_eq!(
            store.record_alert(&alert).await.unwrap(),
            Some(4),
            "{label}"
        );
        let again = sample(Some(&id), true);
        assert_eq!(store.record_alert(&again).await.unwrap(), None, "{label}");
        let quarantined =
            |s: &StoredPolicy| s.keys.iter().find(|k| k.id == id).unwrap().quarantined_at;
        assert_eq!(quarantined(&store.load().await.unwrap()), Some(1_000));
        assert_eq!(store.release_key(&id).await.unwrap(), Released::Now(5));
        assert_eq!(
            store.release_key(&id).await.unwrap(),
            Released::NotQuarantined
        );
        assert!(store.release_key("key_nope").await.is_err());
        assert_eq!(quarantined(&store.load().await.unwrap()), None);
        assert_eq!(store.revoke_key(&id).await.unwrap(), Ok(6), "{label}");
        assert_eq!(
            store.revoke_key(&id).await.unwrap(),
            Err(crate::store::AlreadyRevoked),
            "{label}: already"
        );
        assert!(matches!(
            store.revoke_key("key_nope").await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            store.version().await.unwrap(),
            6,
            "{label}: issue, quarantine, release, revoke"
        );

        let stored = store.load().await.unwrap();
        let cred = stored
            .credentials
            .iter()
            .find(|c| c.name == "vendor-cred")
            .unwrap();
        assert_eq!(&**cred.open_secret(&master).unwrap().unwrap(), b"sk_2");
        let run = stored.keys.iter().find(|k| k.id == id).unwrap();
        // What the issue returned is the row as stored.
        assert_eq!(
            format!(
                "{:?}",
                KeyRow {
                    revoked_at: None,
                    quarantined_at: None,
                    ..run.clone()
                }
            ),
            format!("{issued:?}"),
            "{label}"
        );
        assert!(run.revoked_at.is_some() && run.label.as_deref() == Some("run-1"));
        assert_eq!(run.spend_cap_usd, Some(2.5));
        // An inline secret is sealed like the others; its reference keeps no copy.
        let refs: Vec<Option<String>> = sqlx::query_scalar("SELECT secret_ref FROM credentials")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert!(
            refs.iter()
                .flatten()
                .all(|r| !r.contains("sk_inline_CLEAR_77")),
            "{label}: {refs:?}"
        );
        // Compiles on both: every column decodes to what the compiler expects.
        crate::dataplane::snapshot::Policy::compile(&stored, &master, &Default::default()).unwrap();
        let mut summary: Vec<String> = stored
            .rules
            .iter()
            .map(|r| format!("{r:?}"))
            .chain(stored.proxies.iter().map(|p| format!("{p:?}")))
            .chain(stored.targets.iter().map(|t| format!("{t:?}")))
            .collect();
        summary.sort();
        loaded.push(summary);
    }
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0], loaded[1], "both backends load the same policy");
}

/// An identity on a proxy credential, an MCP proxy and a rule's `mcp` condition are
/// stored and exported as given, on both backends, and re-applying them changes nothing.
#[tokio::test]
async fn identities_and_mcp_proxies_round_trip() {
    let policy = r#"
targets:
  - { name: docs, url: "https://mcp.docs.example" }
credentials:
  - { name: vendor-cred, type: target, auth: bearer, secret: { env: S } }
  - { name: inline-cred, type: target, auth: bearer, secret: { value: sk_inline_CLEAR_77 } }
  - name: agent
    type: proxy
    keys: [{ env: K }]
    identity:
      issuer: https://issuer.example
      audience: latchkey
      jwks: { file: /etc/latchkey/jwks.json }
      subject: "system:serviceaccount:agents:*"
      claims: { team: research }
      max_ttl: 30m
      max_spend_cap_usd: 5
proxies:
  - name: docs
    target: docs
    target_credential: vendor-cred
    proxy_credentials: [agent]
    protocol: mcp
    mcp:
      tools:
        - { name: "search_*", requests_per_minute: 30, price_usd: 0.002 }
rules:
  - { proxy: docs, id: no-deletes, effect: deny, mcp: { tools: ["delete_*"] } }
"#;
    let master = MasterKey::parse(&MasterKey::generate()).unwrap();
    let given = crate::policy::PolicyFile::parse(policy).unwrap();
    for (label, _scratch, store) in testing::stores().await {
        apply(&store, &master, &desired(policy, "sk_1")).await;
        let (again, version) = apply(&store, &master, &desired(policy, "sk_1")).await;
        assert!(again.is_empty() && version.is_none(), "{label}: {again:?}");
        let exported = store.load().await.unwrap().to_file();
        let agent = exported
            .credentials
            .iter()
            .find(|c| c.name == "agent")
            .unwrap();
        assert_eq!(agent.identity, given.credentials[2].identity, "{label}");
        assert_eq!(exported.proxies[0].protocol, crate::policy::Protocol::Mcp);
        assert_eq!(exported.proxies[0].mcp, given.proxies[0].mcp, "{label}");
        assert_eq!(exported.rules[0].mcp, given.rules[0].mcp, "{label}");
        // Back to plain HTTP: the MCP settings go with it.
        let plain = policy
            .replace("    protocol: mcp\n", "")
            .replace(
                "    mcp:\n      tools:\n        - { name: \"search_*\", requests_per_minute: 30, price_usd: 0.002 }\n",
                "",
            )
            .replace("mcp: { tools: [\"delete_*\"] }", "methods: [DELETE]");
        let (changed, _) = apply(&store, &master, &desired(&plain, "sk_1")).await;
        assert!(!changed.is_empty(), "{label}");
        let exported = store.load().await.unwrap().to_file();
        assert_eq!(exported.proxies[0].protocol, crate::policy::Protocol::Http);
        assert_eq!(exported.proxies[0].mcp, None, "{label}");
    }
}
