//! `serve`'s side of the in-process module's channel: each connecting module is pushed
//! the policy, again whenever a new one is put into effect, and its audit records are
//! stored as ext_proc's are.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::base::crypto::MasterKey;
use crate::control::sync::PolicySync;
use crate::dataplane::shared::Shared;
use crate::envoy::module::wire::{BUILD, Batch, MAX_BATCH_FRAME, Push, ToModule, frame};
use crate::store::Store;
use crate::telemetry::audit::Event;

/// What a module's connection needs of the server.
#[derive(Clone)]
pub struct Feed {
    pub shared: Arc<Shared>,
    pub store: Store,
    pub master: Arc<MasterKey>,
    pub sync: Arc<PolicySync>,
}

/// How long a stopping server waits for a module to send what it has queued.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves modules on `listener` (owner-only) until `stopping`; then each module is told
/// (its channel closed from this side), stops deciding, and sends what it has queued,
/// which is stored before this returns.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    feed: Feed,
    stopping: watch::Receiver<bool>,
) {
    let ours = crate::envoy::channel::own_uid().ok();
    let mut connection = 0u64;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let mut stop = stopping.clone();
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "module channel: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The socket is owner-only already; a process of another user that reached it
        // anyway (a socket file it was handed) is not served.
        let theirs = stream.peer_cred().map(|c| c.uid()).ok();
        if theirs.is_none() || theirs != ours {
            tracing::warn!(uid = ?theirs, "module channel: refused a connection from another user");
            continue;
        }
        let feed = feed.clone();
        let stopping = stopping.clone();
        connection += 1;
        let id = connection;
        connections.spawn(async move {
            // Changes wait for this module from now on, until it goes.
            feed.shared.modules.send_modify(|m| {
                m.insert(id, -1);
            });
            let ended = converse(stream, &feed, id, stopping).await;
            feed.shared.modules.send_modify(|m| {
                m.remove(&id);
            });
            match ended {
                Ok(()) => tracing::info!("module channel: a module disconnected"),
                Err(e) => tracing::warn!(error = %e, "module channel: connection ended"),
            }
        });
    }
    // No module may connect now into a backlog nobody reads: its records stay with it.
    drop(listener);
    let _ = std::fs::remove_file(path);
    while connections.join_next().await.is_some() {}
}

/// One module: the policy pushed on connecting and after each change, while its
/// records are read and stored.
async fn converse(
    stream: UnixStream,
    feed: &Feed,
    id: u64,
    mut stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (mut read, mut write) = stream.into_split();
    tracing::info!("module channel: a module connected");
    let mut installs = feed.shared.installs.subscribe();
    let pushing = async {
        // The version this module was last sent.
        let mut sent: Option<i64> = None;
        loop {
            let version = *installs.borrow_and_update();
            let changes =
                sent.and_then(|from| Some((from, feed.shared.key_changes(from, version)?)));
            let message = match changes {
                Some((from, changes)) => ToModule::Keys {
                    from,
                    version,
                    changes,
                },
                None => ToModule::Policy(Box::new(push(feed, version).await?)),
            };
            write.write_all(&frame(&message)?).await?;
            match &message {
                ToModule::Keys { changes, .. } => {
                    tracing::debug!(
                        version,
                        changes = changes.len(),
                        "module channel: key changes sent"
                    )
                }
                ToModule::Policy(_) => tracing::info!(version, "module channel: policy pushed"),
            }
            sent = Some(version);
            let stop = tokio::select! {
                changed = installs.changed() => changed.map(|()| false)?,
                _ = stopping.wait_for(|s| *s) => true,
            };
            if stop {
                write.shutdown().await?;
                return anyhow::Ok(());
            }
        }
    };
    let receiving = async {
        loop {
            let mut length = [0u8; 4];
            if read.read_exact(&mut length).await.is_err() {
                return anyhow::Ok(());
            }
            let length = u32::from_be_bytes(length) as usize;
            anyhow::ensure!(length <= MAX_BATCH_FRAME, "a frame of {length} bytes");
            let mut body = vec![0u8; length];
            read.read_exact(&mut body).await?;
            let batch = Batch::parse(&body).context("a batch of records")?;
            if let Some(version) = batch.version {
                feed.shared.modules.send_modify(|m| {
                    m.insert(id, version);
                });
            }
            store(&feed.shared, batch).await;
        }
    };
    tokio::pin!(receiving);
    tokio::select! {
        received = &mut receiving => received,
        pushed = pushing => {
            pushed?;
            // Stopping: the module sends what it has, then closes.
            tokio::time::timeout(DRAIN, receiving).await.unwrap_or(Ok(()))
        }
    }
}

/// The stored policy, each secret sealed again under a key made for this push alone.
async fn push(feed: &Feed, version: i64) -> anyhow::Result<Push> {
    let mut stored = feed.store.load().await?;
    let channel_key = Zeroizing::new(MasterKey::generate());
    let channel = MasterKey::parse(&channel_key)?;
    for row in &mut stored.credentials {
        if let Some(secret) = row.open_secret(&feed.master)? {
            row.sealed = Some(channel.seal(&row.id, &secret));
            row.master_key_id = Some(channel.id().to_owned());
        }
    }
    let server = feed.sync.secrets().current();
    Ok(Push {
        build: BUILD.to_owned(),
        version,
        shared_budgets: !feed.shared.budgets.is_local(),
        channel_key,
        stored,
        server: (server.values.iter())
            .map(|(source, value)| (source.clone(), value.clone()))
            .collect(),
        server_generation: server.generation,
    })
}

/// A module's records into the metrics and the audit, as ext_proc's go.
async fn store(shared: &Shared, batch: Batch) {
    for record in batch.records {
        let Some((decided, completed)) = record.into_events() else {
            tracing::warn!("module channel: a record with an unknown decision");
            continue;
        };
        let proxy = decided.proxy.clone().unwrap_or_default();
        shared.metrics.record(&proxy, decided.decision);
        if decided.near_cap {
            shared.metrics.record_near_cap(&proxy);
        }
        let elapsed = Duration::from_micros(decided.elapsed_us.into());
        shared.metrics.observe_decision(elapsed);
        shared.audit.record(Event::Decided(decided)).await;
        if let Some(completed) = completed {
            shared.metrics.record_response(completed.status);
            shared.audit.record(Event::Completed(completed)).await;
        }
    }
}
