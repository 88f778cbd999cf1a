//! `serve`'s side of the in-process module's channel: each connecting module is pushed
//! the policy, again whenever a new one is put into effect, and its audit records are
//! stored as ext_proc's are.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::base::crypto::MasterKey;
use crate::control::sync::PolicySync;
use crate::dataplane::denial::Kind;
use crate::dataplane::shared::{PROPAGATION, Shared};
use crate::dataplane::snapshot::KeyChange;
use crate::envoy::module::wire::{BEAT, BUILD, Batch, MAX_BATCH_FRAME, Push, ToModule, frame};
use crate::store::Store;
use crate::telemetry::audit::{Decided, Event};

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

/// A process whose module went without taking up a push (one of another build, left
/// loaded in an Envoy not restarted, drops each push and reconnects) waits this long
/// before its next, doubling each time up to [`MAX_BACKOFF`]: a whole policy is not
/// loaded and sealed again for it five times a second.
const BACKOFF: Duration = Duration::from_millis(200);
/// Under [`SILENCE`](crate::envoy::module::wire::SILENCE): a module waiting longer for
/// its push would take this side for hung, hang up, and wait longer the next time.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The processes whose modules went without taking up a push, by pid: how many times in
/// a row.
#[derive(Default)]
struct Strikes(std::sync::Mutex<HashMap<i32, u32>>);

impl Strikes {
    fn wait(&self, pid: Option<i32>) -> Duration {
        let strikes = known(pid).and_then(|p| self.lock().get(&p).copied());
        match strikes.unwrap_or(0) {
            0 => Duration::ZERO,
            n => BACKOFF
                .saturating_mul(1 << (n - 1).min(16))
                .min(MAX_BACKOFF),
        }
    }

    fn ended(&self, pid: Option<i32>, took_up: bool) {
        let Some(pid) = known(pid) else { return };
        let mut strikes = self.lock();
        if took_up {
            strikes.remove(&pid);
            return;
        }
        // Processes come and go: the table is a cache, never a leak.
        if strikes.len() >= 1024 {
            strikes.clear();
        }
        *strikes.entry(pid).or_default() += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `serve` could not build the policy's push (the store, or a secret it cannot open).
#[derive(Debug, thiserror::Error)]
#[error("could not build the policy push")]
struct Unpushed;

fn unpushed(ended: &anyhow::Result<()>) -> bool {
    ended
        .as_ref()
        .is_err_and(|e| e.downcast_ref::<Unpushed>().is_some())
}

/// A peer's pid, if it tells one process from another: across pid namespaces (Envoy in
/// a container of its own) every peer is pid 0, and none is held back for another.
fn known(pid: Option<i32>) -> Option<i32> {
    pid.filter(|p| *p > 0)
}

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
    let strikes = Arc::new(Strikes::default());
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
        let peer = stream.peer_cred().ok();
        let theirs = peer.map(|c| c.uid());
        if theirs.is_none() || theirs != ours {
            tracing::warn!(uid = ?theirs, "module channel: refused a connection from another user");
            continue;
        }
        let pid = peer.and_then(|c| c.pid());
        connection += 1;
        connections.spawn(attend(
            stream,
            feed.clone(),
            connection,
            pid,
            strikes.clone(),
            stopping.clone(),
        ));
    }
    // No module may connect now into a backlog nobody reads: its records stay with it.
    drop(listener);
    let _ = std::fs::remove_file(path);
    while connections.join_next().await.is_some() {}
}

/// One module's connection: held back first if its process's module took up nothing
/// the last time, then conversed with until it ends.
async fn attend(
    stream: UnixStream,
    feed: Feed,
    id: u64,
    pid: Option<i32>,
    strikes: Arc<Strikes>,
    mut stopping: watch::Receiver<bool>,
) {
    let wait = strikes.wait(pid);
    if !wait.is_zero() {
        tracing::warn!(
            ?pid,
            ?wait,
            "module channel: a module that took up no policy is back; it waits"
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
    // Changes wait for this module from now on, until it goes.
    feed.shared.modules.send_modify(|m| {
        m.insert(id, -1);
    });
    // Unless it never says a word: a module of this build answers the first push at
    // once, however long it then takes to compile it; one of another build refuses
    // every push, decides nothing, and would hold up every change for as long as a
    // change waits. It counts again if it ever takes a version up.
    let heard = AtomicBool::new(false);
    let unheard = async {
        tokio::time::sleep(PROPAGATION).await;
        if !heard.load(Ordering::Acquire) {
            tracing::warn!(
                ?pid,
                "module channel: a module answered nothing (another latchkey build?); changes no longer wait for it"
            );
            feed.shared
                .modules
                .send_if_modified(|m| m.remove(&id).is_some());
        }
        std::future::pending().await
    };
    let ended = tokio::select! {
        ended = converse(stream, &feed, id, &heard, stopping) => ended,
        never = unheard => never,
    };
    let mut took_up = false;
    feed.shared.modules.send_modify(|m| {
        took_up = m.remove(&id).is_some_and(|v| v >= 0);
    });
    // A push this side could not build (the store away) is no strike of the module's: it
    // would come back to a wait of up to 30 s once the store is.
    if !unpushed(&ended) {
        strikes.ended(pid, took_up);
    }
    match ended {
        Ok(()) => tracing::info!("module channel: a module disconnected"),
        Err(e) => tracing::warn!(error = format!("{e:#}"), "module channel: connection ended"),
    }
}

/// One module: the policy pushed on connecting and after each change, while its
/// records are read and stored.
async fn converse(
    stream: UnixStream,
    feed: &Feed,
    id: u64,
    heard: &AtomicBool,
    mut stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (mut read, mut write) = stream.into_split();
    tracing::info!("module channel: a module connected");
    let mut installs = feed.shared.installs.subscribe();
    let mut held = feed.shared.held.subscribe();
    let pushing = async {
        // The version this module was last sent.
        let mut sent: Option<i64> = None;
        // Between pushes, that this side is there: a module that hears nothing for
        // `SILENCE` stops deciding. None while a push is being made: a `serve` stuck
        // making one (the store away) is not there for the module either.
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + BEAT, BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                None => ToModule::Policy(Box::new(push(feed, version).await.context(Unpushed)?)),
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
                ToModule::Beat | ToModule::Counts(_) => {}
            }
            // Once the module has compiled a whole policy, the counts this side made while
            // it did (deciding what it handed on meanwhile) go to it with a beat.
            let mut recount = matches!(message, ToModule::Policy(_));
            sent = Some(version);
            // Until the next version: the quarantines held here (the store did not take
            // them) go on the version just sent. A push has them already; sent again
            // all the same, for one held after the push was read.
            beat.reset();
            let mut tell_held = true;
            let stop = loop {
                if std::mem::take(&mut tell_held) {
                    let holding: Vec<KeyChange> = (held.borrow_and_update().iter())
                        .map(|key| KeyChange::Quarantined(key.clone()))
                        .collect();
                    if !holding.is_empty() {
                        let message = ToModule::Keys {
                            from: version,
                            version,
                            changes: holding,
                        };
                        write.write_all(&frame(&message)?).await?;
                    }
                }
                let beat_now = tokio::select! {
                    changed = installs.changed() => break changed.map(|()| false)?,
                    changed = held.changed() => {
                        changed?;
                        tell_held = true;
                        false
                    }
                    // Only to a module that answered: one of an older build cannot read a
                    // beat, and would log it as a refused push every second.
                    _ = beat.tick() => heard.load(Ordering::Acquire),
                    _ = stopping.wait_for(|s| *s) => break true,
                };
                if beat_now {
                    let compiled = feed.shared.modules.borrow().get(&id) == Some(&version);
                    let message = if recount && compiled {
                        recount = false;
                        ToModule::Counts(feed.shared.budgets.in_use())
                    } else {
                        ToModule::Beat
                    };
                    write.write_all(&frame(&message)?).await?;
                }
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
            let mut batch = Batch::parse(&body).context("a batch of records")?;
            heard.store(true, Ordering::Release);
            if let Some(version) = batch.version {
                feed.shared.modules.send_modify(|m| {
                    m.insert(id, version);
                });
            }
            // The module's counts, as it stops deciding to compile a push: requests it
            // let through that are still open count here too, while this process decides
            // in its place. (After the records before them, which are counted as stored.)
            let counts: Vec<(String, u64)> = (batch.counts.drain(..))
                .map(|c| (c.key, c.until_us))
                .collect();
            store(&feed.shared, batch).await;
            feed.shared.budgets.take_up(&counts);
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
    // Quarantines the store has not taken go in it: the module never runs without them.
    let held = feed.shared.held.borrow().clone();
    let now = crate::base::clock::now_unix_ms();
    for key in
        (stored.keys.iter_mut()).filter(|k| k.quarantined_at.is_none() && held.contains(&k.id))
    {
        key.quarantined_at = Some(now);
    }
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
        counts: feed.shared.budgets.in_use(),
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
        if decided.decision == Kind::Allow.as_str() {
            count(shared, &decided);
        }
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

/// A request a module let through counts here too, against the limits the policy in
/// force gives it: what this replica decides of the same limits (whatever the module
/// hands on) and what it tells a module that connects (one in an Envoy restarted)
/// follow it.
fn count(shared: &Shared, decided: &Decided) {
    let policy = shared.policy.load();
    let Some(proxy) = decided.proxy.as_deref().and_then(|name| policy.proxy(name)) else {
        return;
    };
    let credential = (decided.credential.as_deref()).and_then(|name| policy.credential_index(name));
    // When it was decided, not when its record came (at the request's end, in a
    // batch): counted later, a long request would hold the limit longer here than in
    // the module, and a push would hand that on.
    let mut limits = policy.request_limits(proxy, credential).peekable();
    if limits.peek().is_some() {
        shared.budgets.count(limits, decided.time_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_serve_could_not_build_is_no_strike_of_the_module() {
        let store_away: anyhow::Result<Push> = Err(anyhow::anyhow!("pool timed out"));
        let ended = store_away.context(Unpushed).map(drop);
        assert!(unpushed(&ended));
        let hung_up: anyhow::Result<()> = Err(std::io::Error::other("broken pipe").into());
        assert!(!unpushed(&hung_up) && !unpushed(&Ok(())));

        let strikes = Strikes::default();
        assert_eq!(strikes.wait(Some(7)), Duration::ZERO);
        strikes.ended(Some(7), false);
        strikes.ended(Some(7), false);
        assert_eq!(strikes.wait(Some(7)), BACKOFF * 2);
        for _ in 0..64 {
            strikes.ended(Some(7), false);
        }
        assert_eq!(strikes.wait(Some(7)), MAX_BACKOFF);
        // Across pid namespaces every peer is pid 0: none is held back for another.
        strikes.ended(Some(0), false);
        assert_eq!(strikes.wait(Some(0)), Duration::ZERO);
        strikes.ended(Some(7), true);
        assert_eq!(strikes.wait(Some(7)), Duration::ZERO);
    }
}
