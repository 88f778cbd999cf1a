//! Secrets the server reads itself (`secret: { mounted }`, `{ aws_secrets_manager }`):
//! a rotation reaches the upstream on the next requests without an apply, and the
//! plaintext never crosses the admin API nor sits in the store.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Stack, Upstream, client, denial, envoy_bin, free_port};

const AGENT_KEY: &str = "lk_serverSecretsAgentKEY00001";

fn policy(upstream: &str, secret: &str) -> String {
    format!(
        r#"
targets:
  - {{ name: vendor, url: "{upstream}" }}
credentials:
  - name: vendor-key
    type: target
    auth: bearer
    secret: {secret}
  - {{ name: agent, type: proxy, keys: [{{ value: {AGENT_KEY} }}] }}
proxies:
  - {{ name: vendor, target: vendor, target_credential: vendor-key, proxy_credentials: [agent], default_effect: allow }}
"#
    )
}

/// What a Kubernetes Secret volume holds: `key` → `..data/key`, `..data` → a
/// timestamped folder; an update writes a new folder and swaps `..data` by rename.
struct SecretVolume<'a> {
    dir: &'a Path,
    version: u32,
}

impl<'a> SecretVolume<'a> {
    fn new(dir: &'a Path, value: &str) -> Self {
        let mut volume = Self { dir, version: 0 };
        volume.write(value);
        std::os::unix::fs::symlink("..data/key", dir.join("key")).unwrap();
        volume
    }

    fn write(&mut self, value: &str) {
        self.version += 1;
        let folder = format!("..2026_12_03_v{}", self.version);
        std::fs::create_dir(self.dir.join(&folder)).unwrap();
        std::fs::write(self.dir.join(&folder).join("key"), format!("{value}\n")).unwrap();
        std::os::unix::fs::symlink(&folder, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
    }

    fn path(&self) -> String {
        self.dir.join("key").to_str().unwrap().to_owned()
    }
}

/// The agent's request through Envoy.
async fn call(stack: &Stack) -> reqwest::Response {
    client()
        .get(stack.url("/vendor/v1/charges"))
        .bearer_auth(AGENT_KEY)
        .send()
        .await
        .unwrap()
}

/// Sends requests until the upstream receives `want`; how long that took. Every
/// request is forwarded: a rotation never refuses one.
async fn until_upstream_sees(stack: &Stack, upstream: &Upstream, want: &str) -> Duration {
    until_forwarded(stack, upstream, want, false).await
}

/// As [`until_upstream_sees`]; `refusing`: requests are refused (503) until then.
async fn until_forwarded(
    stack: &Stack,
    upstream: &Upstream,
    want: &str,
    refusing: bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let response = call(stack).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let seen = upstream.take();
        if refusing && status == 503 && seen.is_empty() {
            assert!(text.contains("credential_unavailable"), "{text}");
        } else {
            assert_eq!(status, 200, "{text}");
            if seen.last().unwrap().header("authorization") == Some(want) {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the upstream never saw {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Neither the database file nor anything the admin API gives holds `secret`.
fn assert_nowhere_but_upstream(stack: &Stack, secret: &str) {
    let db = std::fs::read(stack.db_path()).unwrap();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the store holds the plaintext"
    );
    let export = stack.cli(&["export"], &[]);
    assert!(export.status.success());
    let text = String::from_utf8(export.stdout).unwrap();
    assert!(!text.contains(secret), "export shows the plaintext");
    let item = stack.cli(&["credential", "get", "vendor-key"], &[]);
    assert!(item.status.success());
    assert!(!String::from_utf8_lossy(&item.stdout).contains(secret));
}

#[tokio::test]
async fn a_rotated_mounted_secret_reaches_the_upstream_without_an_apply() {
    let upstream = Upstream::start().await;
    let mounts = tempfile::tempdir().unwrap();
    let dirs = mounts.path().to_str().unwrap().to_owned();
    let stack = Stack::start_configured(|c| c, &[("LATCHKEY_SECRET_DIRS", &dirs)]).await;
    let mount = mounts.path().join("stripe");
    std::fs::create_dir(&mount).unwrap();
    let mut volume = SecretVolume::new(&mount, "sk_mounted_one");
    let secret = format!("{{ mounted: {} }}", volume.path());
    stack.apply(&policy(&upstream.url(), &secret), &[]);

    until_upstream_sees(&stack, &upstream, "Bearer sk_mounted_one").await;
    let export = String::from_utf8(stack.cli(&["export"], &[]).stdout).unwrap();
    assert!(
        export.contains(&format!("mounted: {}", volume.path())),
        "{export}"
    );
    assert_nowhere_but_upstream(&stack, "sk_mounted_one");

    volume.write("sk_mounted_two");
    let took = until_upstream_sees(&stack, &upstream, "Bearer sk_mounted_two").await;
    println!("mounted secret rotation in effect after {took:?}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_nowhere_but_upstream(&stack, "sk_mounted_two");

    // The file gone (a rotation half done): the last value stays in use.
    std::fs::remove_file(mount.join("key")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    until_upstream_sees(&stack, &upstream, "Bearer sk_mounted_two").await;
    assert!(
        stack
            .metrics()
            .await
            .contains("latchkey_secret_read_failures_total")
    );

    // A path the server cannot read is refused at apply, and nothing changes.
    let missing = format!("{{ mounted: {}/nope }}", mount.display());
    let out = stack.try_apply(&policy(&upstream.url(), &missing), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the server cannot read mounted file"), "{err}");
    until_upstream_sees(&stack, &upstream, "Bearer sk_mounted_two").await;

    // A relative path is refused by validation; a file outside LATCHKEY_SECRET_DIRS (the
    // database, the master key…) is never read, even by a dry run.
    let out = stack.try_apply(&policy(&upstream.url(), "{ mounted: key }"), &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("absolute path"));
    let db = format!("{{ mounted: {} }}", stack.db_path().display());
    let out = stack.try_apply(&policy(&upstream.url(), &db), &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("LATCHKEY_SECRET_DIRS"));
    // A viewer cannot have the server read anything, not even in a dry run.
    let viewer = crate::common::json(&stack.cli(
        &[
            "token", "create", "--name", "viewer", "--role", "viewer", "-o", "json",
        ],
        &[],
    ));
    let path = stack.dir.path().join("dry.yaml");
    std::fs::write(&path, policy(&upstream.url(), &secret)).unwrap();
    let out = stack.cli(
        &["apply", "--dry-run", "-f", path.to_str().unwrap()],
        &[("LATCHKEY_ADMIN_TOKEN", viewer["token"].as_str().unwrap())],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("viewer"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_mounted_secret_missing_at_start_refuses_until_it_appears() {
    let upstream = Upstream::start().await;
    let mounts = tempfile::tempdir().unwrap();
    let dirs = mounts.path().to_str().unwrap().to_owned();
    let mut stack = Stack::start_configured(|c| c, &[("LATCHKEY_SECRET_DIRS", &dirs)]).await;
    let path = mounts.path().join("vendor-key");
    std::fs::write(&path, "sk_first\n").unwrap();
    let secret = format!("{{ mounted: {} }}", path.display());
    stack.apply(&policy(&upstream.url(), &secret), &[]);
    until_upstream_sees(&stack, &upstream, "Bearer sk_first").await;

    stack.terminate_latchkey();
    std::fs::remove_file(&path).unwrap();
    stack.start_latchkey().await;
    let response = call(&stack).await;
    let (status, error, _) = denial(response).await;
    assert_eq!((status, error.as_str()), (503, "credential_unavailable"));
    assert!(upstream.take().is_empty(), "nothing was forwarded");

    std::fs::write(&path, "sk_second").unwrap();
    let took = until_forwarded(&stack, &upstream, "Bearer sk_second", true).await;
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

/// moto's Secrets Manager, on a free port, until dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new(envoy_bin().with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server in the virtualenv (make installs it)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while client().get(&endpoint).send().await.is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, endpoint }
    }

    fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("AWS_ACCESS_KEY_ID", "AKIDLATCHKEYTEST"),
            ("AWS_SECRET_ACCESS_KEY", "latchkey-test-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", &self.endpoint),
        ]
    }

    fn secret(&self, command: &str, name: &str, value: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/moto_secrets.py");
        let out = Command::new(envoy_bin().with_file_name("python"))
            .args([script, command, name, value])
            .envs(self.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_aws_secret_is_read_by_the_server_and_refreshed() {
    let moto = Moto::start().await;
    moto.secret(
        "create",
        "prod/vendor",
        r#"{"api_key": "sk_aws_one", "other": 1}"#,
    );
    let upstream = Upstream::start().await;
    let stack = Stack::start_configured(|c| c, &moto.env()).await;
    let secret = "{ aws_secrets_manager: { id: prod/vendor, field: api_key, refresh: 1s } }";
    stack.apply(&policy(&upstream.url(), secret), &[]);
    until_upstream_sees(&stack, &upstream, "Bearer sk_aws_one").await;
    assert_nowhere_but_upstream(&stack, "sk_aws_one");

    moto.secret("put", "prod/vendor", r#"{"api_key": "sk_aws_two"}"#);
    let took = until_upstream_sees(&stack, &upstream, "Bearer sk_aws_two").await;
    println!("AWS secret rotation in effect after {took:?}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");

    for (secret, why) in [
        (
            "{ aws_secrets_manager: { id: prod/none } }",
            "ResourceNotFoundException",
        ),
        (
            "{ aws_secrets_manager: { id: prod/vendor, field: missing } }",
            "no member \"missing\"",
        ),
    ] {
        let out = stack.try_apply(&policy(&upstream.url(), secret), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{err}");
    }
    until_upstream_sees(&stack, &upstream, "Bearer sk_aws_two").await;
}
