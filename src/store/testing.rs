//! Stores for tests: a fresh SQLite file and, where PostgreSQL answers, a fresh database
//! of its own (dropped afterwards), so one set of tests covers both backends.

use crate::store::Store;

/// Keeps a test's database alive; drops the PostgreSQL one when the test ends.
pub struct Scratch {
    _dir: tempfile::TempDir,
    postgres: Option<(String, String)>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.postgres.take() else {
            return;
        };
        // A runtime of its own: this may run inside a finished test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}

pub fn postgres_admin_url() -> String {
    std::env::var("LATCHKEY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// `(label, scratch, store)` for SQLite and PostgreSQL.
pub async fn stores() -> Vec<(&'static str, Scratch, Store)> {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let sqlite = Store::open(&url).await.unwrap();
    let mut out = vec![(
        "sqlite",
        Scratch {
            _dir: dir,
            postgres: None,
        },
        sqlite,
    )];
    let admin_url = postgres_admin_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (set LATCHKEY_TEST_POSTGRES to use another)");
    let name = format!(
        "lk_test_{}",
        crate::base::crypto::hex(&crate::base::crypto::random_bytes::<6>())
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let db_url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => unreachable!("a database URL has a path"),
    };
    let postgres = Store::open(&db_url).await.unwrap();
    out.push((
        "postgres",
        Scratch {
            _dir: tempfile::tempdir().unwrap(),
            postgres: Some((admin_url, name)),
        },
        postgres,
    ));
    out
}

/// A small policy for unit tests: one proxy `api` with a bearer secret, the key
/// `lk_agentKEY0000000000000001` of credential `agent`, and one rule allowing reads
/// under `/v1/`.
pub const POLICY: &str = r#"
targets:
  - { name: vendor, url: "https://api.vendor.example" }
credentials:
  - { name: vendor-key, type: target, auth: bearer, secret: { value: sk_vendor_1234 } }
  - { name: agent, type: proxy, keys: [{ value: lk_agentKEY0000000000000001 }] }
proxies:
  - { name: api, target: vendor, target_credential: vendor-key, proxy_credentials: [agent], default_effect: deny }
rules:
  - { proxy: api, id: reads, effect: allow, methods: [GET], path: "^/v1/" }
"#;
