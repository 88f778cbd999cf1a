//! The secrets `latchkey serve` reads itself (DESIGN.md §8): files mounted into its pod
//! and secrets in AWS Secrets Manager. Each is read before a policy naming it is taken in,
//! then kept current: a mounted file is read again every [`POLL`] (a Kubernetes Secret
//! volume swaps a symlink, Vault Agent renames a file over the old one: reading the path
//! again sees either), an AWS secret every `refresh`. A change recompiles the snapshot,
//! so the next request carries the new value. A secret that was read once and then cannot
//! be read keeps its last value (logged and counted): a rotation half done must not stop
//! traffic. One never read refuses its requests (503 `credential_unavailable`).

mod aws;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::dataplane::credentials::ServerSecrets;
use crate::policy::ServerSource;
use crate::policy::rows::StoredPolicy;
use prometheus_client::metrics::counter::Counter;

/// How often mounted files are read again.
pub const POLL: Duration = Duration::from_millis(250);

/// A secret larger than this is not one (a misnamed path, a whole bundle).
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where mounted secrets may be read from unless `LATCHKEY_SECRET_DIRS` says: Kubernetes'
/// and Docker's secret mounts, and latchkey's own folder.
pub const DEFAULT_MOUNTS: &str = "/var/run/secrets:/run/secrets:/etc/latchkey/secrets";

pub struct SecretWatch {
    entries: Mutex<HashMap<ServerSource, Entry>>,
    /// The folders mounted secrets may be read from (canonical); nothing else is read.
    mounts: Vec<PathBuf>,
    current: ArcSwap<ServerSecrets>,
    aws: aws::Client,
    /// `latchkey_secret_read_failures`.
    failures: Counter,
}

struct Entry {
    value: Result<Zeroizing<String>, String>,
    /// When an AWS secret is fetched again; mounted files are read on every poll.
    due: Instant,
    /// Why the last read failed while an earlier value stays in use (logged once).
    stale: Option<String>,
}

impl SecretWatch {
    /// AWS credentials, region and endpoint come from the server's environment, as AWS's
    /// own tools take them; the folders mounted secrets may come from, from
    /// `LATCHKEY_SECRET_DIRS` (colon-separated; default [`DEFAULT_MOUNTS`]).
    pub fn from_env(failures: Counter) -> Self {
        let dirs = std::env::var("LATCHKEY_SECRET_DIRS")
            .ok()
            .filter(|d| !d.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_MOUNTS.to_owned());
        let mounts = dirs
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect();
        Self::new(failures, mounts)
    }

    pub fn new(failures: Counter, mounts: Vec<PathBuf>) -> Self {
        Self {
            mounts: mounts
                .into_iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .collect(),
            entries: Mutex::default(),
            current: ArcSwap::default(),
            aws: aws::Client::from_env(),
            failures,
        }
    }

    /// The values as last read, for a compile.
    pub fn current(&self) -> Arc<ServerSecrets> {
        self.current.load_full()
    }

    /// Reads `sources` now, and returns the ones that could not be read, each with why:
    /// what `apply` checks before it takes a policy naming them.
    pub async fn read(&self, sources: &[ServerSource]) -> Vec<String> {
        let mut read = Vec::with_capacity(sources.len());
        for source in sources {
            read.push((source.clone(), self.fetch(source).await));
        }
        let failed = read
            .iter()
            .filter_map(|(source, value)| Some(format!("{source}: {}", value.as_ref().err()?)))
            .collect();
        self.merge(read);
        failed
    }

    /// Reads `sources` now without keeping them: a dry run's check.
    pub async fn probe(&self, sources: &[ServerSource]) -> Vec<String> {
        let mut failed = Vec::new();
        for source in sources {
            if let Err(why) = self.fetch(source).await {
                failed.push(format!("{source}: {why}"));
            }
        }
        failed
    }

    /// Reads what `stored` names and was never read. What a policy no longer names is
    /// still read: forgetting it would race an `apply` that read it ahead of its commit.
    pub async fn ensure(&self, stored: &StoredPolicy) {
        let missing: Vec<ServerSource> = {
            let entries = self.entries.lock().expect("not poisoned");
            sources(stored)
                .into_iter()
                .filter(|s| !entries.contains_key(s))
                .collect()
        };
        if !missing.is_empty() {
            self.read(&missing).await;
        }
    }

    /// Reads again what is due; whether any value changed (the snapshot must be rebuilt).
    pub async fn refresh(&self) -> bool {
        let now = Instant::now();
        let due: Vec<ServerSource> = {
            let entries = self.entries.lock().expect("not poisoned");
            entries
                .iter()
                .filter(|(source, e)| matches!(source, ServerSource::Mounted(_)) || e.due <= now)
                .map(|(source, _)| source.clone())
                .collect()
        };
        let mut read = Vec::with_capacity(due.len());
        for source in due {
            let value = self.fetch(&source).await;
            read.push((source, value));
        }
        self.merge(read)
    }

    async fn fetch(&self, source: &ServerSource) -> Result<Zeroizing<String>, String> {
        let text = match source {
            ServerSource::Mounted(path) => read_file(path, &self.mounts).await,
            ServerSource::Aws(secret) => self.aws.get_secret(secret).await,
        }?;
        checked(text)
    }

    /// Takes in what was read; whether any value changed.
    fn merge(&self, read: Vec<(ServerSource, Result<Zeroizing<String>, String>)>) -> bool {
        let mut entries = self.entries.lock().expect("not poisoned");
        let mut changed = false;
        for (source, value) in read {
            let due = Instant::now() + refresh_every(&source);
            match (entries.get_mut(&source), value) {
                (Some(entry), Ok(value)) => {
                    entry.due = due;
                    entry.stale = None;
                    let same = matches!(&entry.value, Ok(old) if **old == *value);
                    if !same {
                        tracing::info!(source = %source, "a secret the server reads changed; in effect from the next request");
                        entry.value = Ok(value);
                        changed = true;
                    }
                }
                (Some(entry), Err(why)) => {
                    entry.due = due;
                    self.failures.inc();
                    match &entry.value {
                        Ok(_) if entry.stale.as_ref() == Some(&why) => {}
                        Ok(_) => {
                            tracing::warn!(source = %source, error = %why,
                                "cannot read a secret again; its last value stays in use");
                            entry.stale = Some(why);
                        }
                        Err(old) if *old == why => {}
                        Err(_) => {
                            tracing::error!(source = %source, error = %why, "cannot read a secret; its credential's requests are refused");
                            entry.value = Err(why);
                            changed = true;
                        }
                    }
                }
                (None, value) => {
                    if let Err(why) = &value {
                        self.failures.inc();
                        tracing::error!(source = %source, error = %why, "cannot read a secret; its credential's requests are refused");
                    }
                    entries.insert(
                        source,
                        Entry {
                            value,
                            due,
                            stale: None,
                        },
                    );
                    changed = true;
                }
            }
        }
        if changed {
            let generation = self.current.load().generation + 1;
            self.current.store(Arc::new(ServerSecrets {
                values: entries
                    .iter()
                    .map(|(source, e)| (source.clone(), e.value.clone()))
                    .collect(),
                generation,
            }));
        }
        changed
    }
}

/// Every secret `stored` has the server read.
fn sources(stored: &StoredPolicy) -> Vec<ServerSource> {
    stored
        .credentials
        .iter()
        .filter_map(|c| c.secret_ref.as_ref()?.server_source())
        .collect()
}

fn refresh_every(source: &ServerSource) -> Duration {
    match source {
        ServerSource::Mounted(_) => POLL,
        // Validated when the policy was taken in.
        ServerSource::Aws(secret) => secret
            .refresh_every()
            .unwrap_or(crate::policy::secrets::AWS_DEFAULT_REFRESH),
    }
}

/// A mounted file's text. Following the path each time is what sees a swapped symlink.
/// Only a regular file inside one of `mounts` (symlinks resolved) is read, and at most
/// [`MAX_SECRET_BYTES`] of it: a policy cannot have the server read its master key, a
/// device or a pipe.
async fn read_file(path: &str, mounts: &[PathBuf]) -> Result<Zeroizing<String>, String> {
    use tokio::io::AsyncReadExt;
    let real = tokio::fs::canonicalize(path)
        .await
        .map_err(|e| e.to_string())?;
    if !mounts.iter().any(|m| real.starts_with(m)) {
        return Err(
            "not in a folder the server reads secrets from (LATCHKEY_SECRET_DIRS)".to_owned(),
        );
    }
    let master = std::env::var_os("LATCHKEY_MASTER_KEY_FILE").map(PathBuf::from);
    if master.and_then(|m| std::fs::canonicalize(m).ok()).as_ref() == Some(&real) {
        return Err("the master key is not a credential's secret".to_owned());
    }
    if !tokio::fs::metadata(&real)
        .await
        .map_err(|e| e.to_string())?
        .is_file()
    {
        return Err("not a regular file".to_owned());
    }
    let file = tokio::fs::File::open(&real)
        .await
        .map_err(|e| e.to_string())?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!("a secret is at most {MAX_SECRET_BYTES} bytes"));
    }
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(Zeroizing::new(text.to_owned())),
        Err(_) => Err("not UTF-8 text".into()),
    }
}

/// The secret in a text as tools write it: without its trailing line break. Empty, or
/// holding a line break or NUL (which no header or query can carry), it is refused.
fn checked(text: Zeroizing<String>) -> Result<Zeroizing<String>, String> {
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err("empty".into());
    }
    if secret.contains(['\r', '\n', '\0']) {
        return Err("holds a line break or NUL".into());
    }
    Ok(Zeroizing::new(secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_in(dir: &std::path::Path) -> SecretWatch {
        SecretWatch::new(Counter::default(), vec![dir.to_owned()])
    }

    fn value(watch: &SecretWatch, source: &ServerSource) -> Result<String, String> {
        match &watch.current().values[source] {
            Ok(v) => Ok(v.to_string()),
            Err(e) => Err(e.clone()),
        }
    }

    #[tokio::test]
    async fn a_swapped_symlink_is_seen_and_a_vanished_file_keeps_the_last_value() {
        // What a Kubernetes Secret volume does: `key` -> `..data/key`, `..data` a symlink
        // to a timestamped folder, swapped by rename on update.
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::fs::create_dir(at("v1")).unwrap();
        std::fs::write(at("v1/key"), "sk_one\n").unwrap();
        std::os::unix::fs::symlink("v1", at("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", at("key")).unwrap();
        let source = ServerSource::Mounted(at("key").to_str().unwrap().to_owned());
        let watch = watch_in(dir.path());

        assert!(watch.read(std::slice::from_ref(&source)).await.is_empty());
        assert_eq!(value(&watch, &source).unwrap(), "sk_one");
        let first = watch.current().generation;
        assert!(!watch.refresh().await, "nothing changed");

        std::fs::create_dir(at("v2")).unwrap();
        std::fs::write(at("v2/key"), "sk_two").unwrap();
        std::os::unix::fs::symlink("v2", at("..data_tmp")).unwrap();
        std::fs::rename(at("..data_tmp"), at("..data")).unwrap();
        assert!(watch.refresh().await);
        assert_eq!(value(&watch, &source).unwrap(), "sk_two");
        assert!(watch.current().generation > first);

        std::fs::remove_file(at("key")).unwrap();
        assert!(!watch.refresh().await, "the last value stays");
        assert_eq!(value(&watch, &source).unwrap(), "sk_two");
    }

    #[tokio::test]
    async fn an_unreadable_empty_or_multiline_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("missing", None),
            ("empty", Some("\n")),
            ("two-lines", Some("sk_a\nsk_b\n")),
            ("nul", Some("sk_a\0")),
        ];
        let watch = watch_in(dir.path());
        for (name, text) in cases {
            let path = dir.path().join(name);
            if let Some(text) = text {
                std::fs::write(&path, text).unwrap();
            }
            let source = ServerSource::Mounted(path.to_str().unwrap().to_owned());
            let failed = watch.read(std::slice::from_ref(&source)).await;
            assert_eq!(failed.len(), 1, "{name}");
            assert!(value(&watch, &source).is_err(), "{name}");
        }
        // Outside the mounts (the master key, /etc, a device), or not a regular file.
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        for (path, why) in [
            ("/etc/hostname", "LATCHKEY_SECRET_DIRS"),
            ("/dev/zero", "LATCHKEY_SECRET_DIRS"),
            (fifo.to_str().unwrap(), "not a regular file"),
        ] {
            let failed = watch.read(&[ServerSource::Mounted(path.to_owned())]).await;
            assert!(
                failed.len() == 1 && failed[0].contains(why),
                "{path}: {failed:?}"
            );
        }
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(MAX_SECRET_BYTES as usize + 1)).unwrap();
        let source = ServerSource::Mounted(big.to_str().unwrap().to_owned());
        assert_eq!(watch.read(&[source]).await.len(), 1);
    }
}
