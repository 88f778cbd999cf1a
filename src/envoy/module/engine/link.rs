//! The engine's link to `latchkey serve`: one connection at a time over its Unix socket,
//! kept up by a thread of its own. The policy comes in (whole, as key changes, and
//! beats between them), the audit goes out (the outbox's thread); a `serve` that goes,
//! or says nothing for [`SILENCE`], leaves every request to ext_proc until it is back.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::base::crypto::MasterKey;
use crate::dataplane::credentials::ServerSecrets;
use crate::dataplane::snapshot::{KeyChange, Policy};
use crate::envoy::module::outbox::Outbox;
use crate::envoy::module::wire::{BUILD, Push, SILENCE, ToModule, read_body};

use super::{Engine, Loaded, Log};

impl Engine {
    /// Connects to `serve` at `socket`, and keeps reconnecting, on threads of its own;
    /// once per process.
    pub fn connect(&'static self, socket: PathBuf, log: Log) {
        if self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        std::thread::Builder::new()
            .name("latchkey-policy".into())
            .spawn(move || self.stay_connected(&socket, log))
            .expect("a thread for the policy channel");
    }

    fn stay_connected(&'static self, socket: &Path, log: Log) {
        let mut said = false;
        loop {
            match UnixStream::connect(socket).and_then(ours) {
                Ok(stream) => {
                    said = false;
                    log(false, "connected to latchkey serve");
                    if let Err(e) = self.converse(stream, log, SILENCE) {
                        log(true, &format!("lost latchkey serve: {e}"));
                    }
                }
                Err(e) if !said => {
                    said = true;
                    let at = socket.display();
                    log(
                        true,
                        &format!("cannot reach latchkey serve at {at}: {e}; retrying"),
                    );
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One connection: policies read here, records written by a thread of their own,
    /// until `serve` goes or says nothing for `silence`.
    fn converse(&'static self, stream: UnixStream, log: Log, silence: Duration) -> io::Result<()> {
        stream.set_read_timeout(Some(silence))?;
        let writer = stream.try_clone()?;
        // Until this `serve`'s first push names its build, nothing is sent: it might be
        // one that could not read the batches, and would lose them.
        self.outbox.connected();
        let closed = Arc::new(AtomicBool::new(false));
        let sending = {
            let closed = closed.clone();
            let outbox: &'static Outbox = &self.outbox;
            std::thread::Builder::new()
                .name("latchkey-audit".into())
                .spawn(move || outbox.send_until(writer, &closed))?
        };
        let mut reader = io::BufReader::new(&stream);
        let read = loop {
            match read_body(&mut reader) {
                Ok(Some(body)) => {
                    if let Err(e) = self.take(&body, log) {
                        break Err(e);
                    }
                }
                Ok(None) => break Err(io::Error::other("latchkey serve closed the channel")),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break Err(io::Error::other(format!(
                        "latchkey serve said nothing for {} s",
                        silence.as_secs_f64()
                    )));
                }
                Err(e) => break Err(e),
            }
        };
        // Without `serve`, no change (a revocation made on another replica) would
        // reach this policy: from now on every request goes to ext_proc, which fails
        // closed while `serve` is away, as in the ext_proc mode.
        self.loaded.store(None);
        // What is queued still goes, on a `serve` that is stopping: it reads until the
        // module is done.
        closed.store(true, Ordering::Release);
        self.outbox.wake();
        let _ = sending.join();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        read
    }

    /// One frame from `serve` put into effect: a policy, or changes of keys to the one
    /// in force. Changes to a policy other than the one they follow end the connection:
    /// the next one starts with the whole policy.
    fn take(&self, body: &[u8], log: Log) -> io::Result<()> {
        let version = match serde_json::from_slice::<ToModule>(body) {
            Ok(ToModule::Policy(push)) => {
                let version = push.version;
                self.outbox.peer(push.build == BUILD);
                // Until it is compiled (seconds, with 100,000 keys), `serve`, which has it
                // in force already, decides: the policy it replaces may hold a key revoked
                // since (on another replica), and a request the module hands on counts
                // against the limits counted here (sent below).
                self.loaded.store(None);
                if push.build == BUILD {
                    // Before anything is decided by it: the limits `serve` counted, this
                    // module's among them, are not started afresh by an Envoy restarted.
                    self.budgets.take_up(&push.counts);
                    // `serve` has the records of the requests counted here that ended,
                    // not of those still open, which an agent could hold open across the
                    // push: it is sent this module's counts, now that nothing more is
                    // counted here. (When their records come, it counts the open ones
                    // once more: over, not under.)
                    self.outbox.send_counts(self.budgets.in_use());
                }
                // A panic compiling must not end the channel with the old policy still in
                // force.
                let loaded = std::panic::catch_unwind(move || load(*push))
                    .unwrap_or_else(|_| Err("the compile panicked".to_owned()));
                self.put(loaded, version, log);
                version
            }
            // Nothing to take up, nothing to tell: the read it ends was the point.
            Ok(ToModule::Beat) => return Ok(()),
            // Counts `serve` made while this module compiled; a beat too.
            Ok(ToModule::Counts(counts)) => {
                self.budgets.take_up(&counts);
                return Ok(());
            }
            Ok(ToModule::Keys {
                from,
                version,
                changes,
            }) => {
                match self.loaded.load_full() {
                    // The push before was refused: nothing is decided here, nothing
                    // changes.
                    None => {}
                    Some(loaded) => {
                        let next = (loaded.version == from)
                            .then(|| {
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    loaded.changed(&changes, version)
                                }))
                            })
                            .and_then(Result::ok)
                            .flatten();
                        let Some(next) = next else {
                            return Err(io::Error::other(format!(
                                "key changes from version {from} do not apply to version {}",
                                loaded.version
                            )));
                        };
                        self.loaded.store(Some(Arc::new(next)));
                    }
                }
                version
            }
            // Another build's `serve`: what it pushes is not read.
            Err(e) => {
                let (build, version) = ToModule::foreign(body);
                self.outbox.peer(false);
                let build = build.unwrap_or_else(|| "unknown".to_owned());
                // Where it could not be read, not what was there: serde's message quotes
                // the value it met, and a push carries every secret of the policy.
                let at = format!(
                    "{:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                );
                self.refuse(
                    &format!("a push from latchkey build {build}, not {BUILD}: {at}"),
                    log,
                );
                // Dealt with, refused, if the push names its version.
                let Some(version) = version else {
                    return Ok(());
                };
                version
            }
        };
        // Told once the version is in force (or refused), never before.
        self.outbox.taken_up(version);
        Ok(())
    }

    fn put(&self, loaded: Result<Loaded, String>, version: i64, log: Log) {
        match loaded {
            Ok(loaded) => {
                let local = loaded.local.len();
                self.loaded.store(Some(Arc::new(loaded)));
                log(
                    false,
                    &format!(
                        "policy version {version} in force; {local} proxies decided in process"
                    ),
                );
            }
            Err(e) => self.refuse(&format!("policy version {version}: {e}"), log),
        }
    }

    /// Not the policy `serve` runs: nothing is decided here until one is taken up
    /// (ext_proc decides meanwhile).
    fn refuse(&self, why: &str, log: Log) {
        self.loaded.store(None);
        log(
            true,
            &format!("refused {why}; ext_proc decides every request"),
        );
    }
}

impl Loaded {
    /// The policy in force with `changes` made, as version `version`; `None` if one of
    /// them needs a compile.
    fn changed(&self, changes: &[KeyChange], version: i64) -> Option<Loaded> {
        let mut policy = self.policy.clone();
        for change in changes {
            policy = policy.changed(change)?.ok()?;
        }
        Some(Loaded {
            policy,
            local: self.local.clone(),
            version,
        })
    }
}

/// The peer is `serve`'s only if it runs as the user this process runs as: another user
/// on the host cannot stand in and push a policy. Asked of the connection itself, not of
/// the socket's file: a name swapped between a check of the file and the connect (a
/// socket of another user's, then a link to a file of ours) would pass that check.
fn ours(stream: UnixStream) -> io::Result<UnixStream> {
    let ours = crate::envoy::channel::own_uid()?;
    let theirs = latchkey_sys::peer_uid(&stream)?;
    if ours == theirs {
        Ok(stream)
    } else {
        Err(io::Error::other(format!(
            "the socket's peer runs as uid {theirs}, not {ours}"
        )))
    }
}

/// A pushed policy, compiled as `serve` compiles it.
pub(super) fn load(push: Push) -> Result<Loaded, String> {
    if push.build != BUILD {
        return Err(format!(
            "pushed by latchkey {}, and this module is {BUILD}",
            push.build
        ));
    }
    let channel = MasterKey::parse(&push.channel_key).map_err(|e| e.to_string())?;
    let server = ServerSecrets {
        values: push.server.into_iter().collect(),
        generation: push.server_generation,
    };
    let policy = Policy::compile(&push.stored, &channel, &server).map_err(|e| e.to_string())?;
    let local = Arc::new(policy.in_process(push.shared_budgets));
    Ok(Loaded {
        policy,
        local,
        version: push.version,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::envoy::module::engine::Verdict;
    use crate::envoy::module::engine::tests::{AGENT, ask, engine, push};
    use crate::envoy::module::wire::frame;
    use crate::policy::rows::KeyRow;

    /// A frame's body as `serve` writes it.
    fn body(message: &ToModule) -> Vec<u8> {
        frame(message).unwrap()[4..].to_vec()
    }

    fn keys(from: i64, version: i64, changes: Vec<KeyChange>) -> Vec<u8> {
        body(&ToModule::Keys {
            from,
            version,
            changes,
        })
    }

    #[test]
    fn a_push_from_another_build_is_refused() {
        let mut other = push();
        other.build = "0.0.9/wire-0".into();
        let Err(refused) = load(other) else {
            panic!("loaded")
        };
        assert!(
            refused.contains("pushed by latchkey 0.0.9/wire-0"),
            "{refused}"
        );
    }

    #[test]
    fn key_changes_apply_to_the_version_they_follow_and_no_other() {
        fn quiet(_: bool, _: &str) {}
        let engine = engine();
        let stored = push().stored;
        let credential = stored
            .credentials
            .iter()
            .find(|c| c.name == "agent")
            .unwrap();
        let agent = (stored.keys.iter())
            .find(|k| k.credential_id == credential.id)
            .unwrap();
        let new_key = "lk_agentKEY0000000000000002";
        let issued = KeyRow {
            id: "k-new".into(),
            hash: crate::base::crypto::hash_key(new_key.as_bytes()).to_vec(),
            policy_sourced: false,
            ..agent.clone()
        };
        let issue = keys(7, 8, vec![KeyChange::Issued(issued)]);
        assert!(matches!(
            ask(engine, "/api/v1/x", new_key, false).0,
            Verdict::Deny { status: 401, .. }
        ));
        engine.take(&issue, quiet).unwrap();
        assert_eq!(engine.version(), Some(8));
        assert!(matches!(
            ask(engine, "/api/v1/x", new_key, false).0,
            Verdict::Forward { .. }
        ));

        let revoke = keys(
            8,
            10,
            vec![
                KeyChange::Quarantined("k-new".into()),
                KeyChange::Revoked(agent.id.clone()),
            ],
        );
        engine.take(&revoke, quiet).unwrap();
        assert_eq!(engine.version(), Some(10));
        for key in [new_key, AGENT] {
            assert!(
                matches!(ask(engine, "/api/v1/x", key, false).0, Verdict::Deny { .. }),
                "{key}"
            );
        }
        // Told to `serve` as any version is.
        assert_eq!(engine.outbox.taken_up.load(Ordering::Acquire), 10);

        // Changes that follow another version than the one in force: the channel ends, and
        // the next one starts with the whole policy.
        let release = keys(9, 11, vec![KeyChange::Released("k-new".into())]);
        assert!(engine.take(&release, quiet).is_err());
        assert_eq!(engine.version(), Some(10));
        assert!(matches!(
            ask(engine, "/api/v1/x", new_key, false).0,
            Verdict::Deny { .. }
        ));
        // The whole policy replaces whatever was changed.
        engine
            .take(&body(&ToModule::Policy(Box::new(push()))), quiet)
            .unwrap();
        assert_eq!(engine.version(), Some(7));
    }

    #[test]
    fn a_push_this_build_cannot_read_is_refused_by_its_build() {
        fn log(_: bool, message: &str) {
            SAID.with(|s| s.borrow_mut().push(message.to_owned()));
        }
        thread_local! { static SAID: std::cell::RefCell<Vec<String>> = Default::default(); }
        let engine = engine();
        // A value where this build expects another type: serde's message would quote it.
        let older = br#"{"Policy":{"build":"0.0.9/wire-2","version":12,"shared_budgets":"sk_live_quoted"}}"#;
        engine.take(older, log).unwrap();
        assert_eq!(engine.version(), None, "nothing is decided by it");
        assert_eq!(engine.outbox.taken_up.load(Ordering::Acquire), 12);
        assert!(!engine.outbox.peer_ok.load(Ordering::Acquire));
        let said = SAID.with(|s| s.borrow().join("\n"));
        assert!(said.contains("from latchkey build 0.0.9/wire-2"), "{said}");
        assert!(said.contains("error at line 1"), "{said}");
        assert!(!said.contains("sk_live_quoted"), "{said}");
    }

    /// `serve` is told from another user by the connection's peer, not by the socket
    /// file: a listener of another user's is refused even where its file is ours to name.
    #[test]
    fn a_peer_of_another_user_is_not_serve() {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(ours(a).is_ok());
        if crate::envoy::channel::own_uid().unwrap() != 0 {
            eprintln!("skipped the other user's listener: only root can run one");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let path = dir.path().join("module.sock");
        let listen = "import socket, sys, time\n\
            s = socket.socket(socket.AF_UNIX)\n\
            s.bind(sys.argv[1]); s.listen(1); print('ready', flush=True)\n\
            c, _ = s.accept(); time.sleep(10)\n";
        let mut other = std::process::Command::new("python3")
            .args(["-c", listen])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(other.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let refused = UnixStream::connect(&path).and_then(ours);
        let _ = other.kill();
        let _ = other.wait();
        let error = refused.expect_err("refused").to_string();
        assert!(error.contains("uid 65534"), "{error}");
    }

    /// While a whole policy compiles, `serve` decides: the one it replaces is not
    /// decided by a moment longer than it takes to read the push.
    #[test]
    fn while_a_whole_policy_compiles_serve_decides() {
        fn quiet(_: bool, _: &str) {}
        let engine = engine();
        let mut bigger = push();
        bigger.version = 8;
        let credential = (bigger.stored.credentials.iter())
            .find(|c| c.name == "agent")
            .unwrap()
            .id
            .clone();
        let template = (bigger.stored.keys.iter())
            .find(|k| k.credential_id == credential)
            .unwrap()
            .clone();
        // Enough keys that the compile takes a while.
        for i in 0..20_000 {
            let key = format!("lk_agentKEY{i:016}");
            bigger.stored.keys.push(KeyRow {
                id: format!("k-{i}"),
                hash: crate::base::crypto::hash_key(key.as_bytes()).to_vec(),
                ..template.clone()
            });
        }
        let frame = body(&ToModule::Policy(Box::new(bigger)));
        let taking = std::thread::spawn(move || engine.take(&frame, quiet));
        let mut seen = Vec::new();
        while seen.last() != Some(&Some(8)) {
            let version = engine.version();
            if seen.last() != Some(&version) {
                seen.push(version);
            }
        }
        taking.join().unwrap().unwrap();
        // (Some(7) first unless the push was read before the first look.)
        assert!(
            seen.ends_with(&[None, Some(8)]) && seen.len() <= 3,
            "{seen:?}"
        );
    }

    /// Counts `serve` made while a whole policy compiled here are taken up after it.
    #[test]
    fn counts_serve_sends_after_a_compile_are_taken_up() {
        fn quiet(_: bool, _: &str) {}
        let engine = engine();
        assert!(matches!(
            ask(engine, "/api/v1/x", AGENT, false).0,
            Verdict::Forward { .. }
        ));
        let counts: Vec<(String, u64)> = (engine.budgets.in_use().into_iter())
            .map(|(key, tat)| (key, tat + 600_000_000))
            .collect();
        assert_eq!(counts.len(), 1);
        engine
            .take(&body(&ToModule::Counts(counts)), quiet)
            .unwrap();
        let (Verdict::Deny { status, .. }, _) = ask(engine, "/api/v1/x", AGENT, false) else {
            panic!("limited")
        };
        assert_eq!(status, 429);
        assert_eq!(engine.version(), Some(7), "a beat, nothing else");
    }

    /// A whole policy to compile: `serve` decides meanwhile, and is sent the counts made
    /// here first, those of requests still open among them (their records come when
    /// they end).
    #[test]
    fn a_push_sends_serve_the_counts_made_here() {
        fn quiet(_: bool, _: &str) {}
        let engine = engine();
        assert!(matches!(
            ask(engine, "/api/v1/x", AGENT, false).0,
            Verdict::Forward { .. }
        ));
        let made = engine.budgets.in_use();
        assert_eq!(made.len(), 1);
        assert!(engine.outbox.counts.lock().unwrap().is_empty());
        (engine.take(&body(&ToModule::Policy(Box::new(push()))), quiet)).unwrap();
        let sent: Vec<(String, u64)> = (engine.outbox.counts.lock().unwrap().iter())
            .map(|c| (c.key.clone(), c.until_us))
            .collect();
        assert_eq!(sent, made);
    }

    /// A `serve` that keeps the socket open and says nothing (hung, or stuck making a
    /// push) is taken for gone: its last policy stops being decided by.
    #[test]
    fn a_serve_that_goes_quiet_is_taken_for_hung() {
        use std::io::Write;
        fn quiet(_: bool, _: &str) {}
        let engine: &'static Engine = Box::leak(Box::new(Engine::new()));
        let (module, mut serve) = UnixStream::pair().unwrap();
        let silence = Duration::from_secs(1);
        let conversing = std::thread::spawn(move || engine.converse(module, quiet, silence));
        let policy = frame(&ToModule::Policy(Box::new(push()))).unwrap();
        serve.write_all(&policy).unwrap();
        // Beats, twice `silence` in all, keep it in force.
        let beating = Instant::now();
        while beating.elapsed() < 2 * silence {
            std::thread::sleep(Duration::from_millis(100));
            serve.write_all(&frame(&ToModule::Beat).unwrap()).unwrap();
            if engine.version().is_some() {
                assert_eq!(engine.version(), Some(7));
            }
        }
        assert_eq!(engine.version(), Some(7));
        assert_eq!(engine.outbox.taken_up.load(Ordering::Acquire), 7);
        let ended = conversing.join().unwrap().unwrap_err().to_string();
        assert!(ended.contains("said nothing for 1 s"), "{ended}");
        assert_eq!(engine.version(), None);
        drop(serve);
    }
}
