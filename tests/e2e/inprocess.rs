//! The in-process mode (envoy/envoy-inprocess.yaml): latchkey's data plane inside Envoy
//! as a dynamic module, fed its policy by `latchkey serve`, which stores its audit. What
//! it cannot decide alone goes to ext_proc after it. The data-plane, rules, budgets and
//! audit suites also run in this mode (`make test`); these tests check what is its own.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, MODULE_SOCKET, Mode, Stack, Upstream, client, denial};

const KEY: &str = "lk_inprocessKEY0000000000000001";
const SECRET: &str = "sk_live_INPROCESS_secret";

/// `plain` is decided in process; `bodied` reads bodies, so it and everything bound to
/// its credential (`reader`) go to ext_proc.
fn policy(upstream: &str) -> String {
    format!(
        r#"
targets:
  - name: vendor
    url: {upstream}
credentials:
  - name: vendor-cred
    type: target
    auth: bearer
    secret: {{ env: SECRET }}
  - name: agent
    type: proxy
    keys: [{{ env: KEY }}]
    limits: {{ requests_per_minute: 6 }}
  - name: reader
    type: proxy
proxies:
  - name: plain
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [agent]
    default_effect: allow
  - name: bodied
    target: vendor
    target_credential: vendor-cred
    proxy_credentials: [reader]
    default_effect: allow
rules:
  - proxy: plain
    effect: deny
    path: "^/v1/secret"
    notes: "not that one"
  - proxy: bodied
    effect: deny
    body:
      - pointer: /action
        regex: "^delete$"
"#
    )
}

async fn stack() -> (Stack, Upstream) {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(Mode::InProcess).await;
    stack.apply(
        &policy(&upstream.url()),
        &[("KEY", KEY), ("SECRET", SECRET)],
    );
    (stack, upstream)
}

const EXT_PROC: &str = "http.agents.ext_proc.streams_started";

async fn get(stack: &Stack, path: &str, key: &str) -> reqwest::Response {
    let url = stack.url(path);
    client().get(url).bearer_auth(key).send().await.unwrap()
}

#[tokio::test]
async fn decides_in_envoy_and_hands_on_what_it_cannot() {
    let (stack, upstream) = stack().await;

    // Allowed: the vendor sees the real credential and never the proxy key.
    let ok = get(&stack, "/plain/v1/charges", KEY).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-limit"], "6");
    assert_eq!(ok.headers()["x-ratelimit-remaining"], "5");
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    assert!(!seen[0].dump().contains(KEY), "{}", seen[0].dump());

    // Refused by the module, with latchkey's JSON.
    let (status, kind, _) = denial(get(&stack, "/plain/v1/secret/x", KEY).await).await;
    assert_eq!((status, kind.as_str()), (403, "rule_denied"));
    let (status, kind, _) = denial(get(&stack, "/plain/v1/charges", "lk_wrong").await).await;
    assert_eq!((status, kind.as_str()), (401, "invalid_key"));
    let (status, kind, _) = denial(get(&stack, "/nowhere/v1", KEY).await).await;
    assert_eq!((status, kind.as_str()), (404, "unknown_proxy"));
    // The credential's limit, counted in Envoy: 6 a minute, one used above (refusals
    // count against none).
    for _ in 0..5 {
        assert_eq!(get(&stack, "/plain/v1/charges", KEY).await.status(), 200);
    }
    let limited = get(&stack, "/plain/v1/charges", KEY).await;
    assert!(limited.headers().contains_key("retry-after"));
    let (status, kind, _) = denial(limited).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
    assert_eq!(upstream.take().len(), 5);
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0, "ext_proc was asked");

    // A proxy with a body rule is latchkey serve's, through ext_proc.
    let (_, reader_key) = common::issue_key(&stack, "reader", &[]);
    let post = |action: &'static str| {
        let url = stack.url("/bodied/v1/things");
        let key = reader_key.clone();
        async move {
            let body = serde_json::json!({ "action": action });
            client()
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(post("create").await.status(), 200);
    let (status, kind, _) = denial(post("delete").await).await;
    assert_eq!((status, kind.as_str()), (403, "rule_denied"));
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 2);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );

    // Every request is in the audit, the module's with how they ended.
    let records = stack.records_until(12).await;
    let plain: Vec<_> = records
        .iter()
        .filter(|r| r.proxy.as_deref() == Some("plain"))
        .collect();
    assert_eq!(plain.len(), 9, "{records:#?}");
    let ok = plain.iter().filter(|r| r.decision == "allow").count();
    assert_eq!(ok, 6);
    for r in &plain {
        let want = match r.decision.as_str() {
            "allow" => 200,
            "rule_denied" => 403,
            "invalid_key" => 401,
            "rate_limited" => 429,
            other => panic!("{other}"),
        };
        assert_eq!(r.status, Some(want), "{r:?}");
        assert!(r.latency_ms.is_some(), "{r:?}");
        let upstream = (r.decision == "allow").then_some(200);
        assert_eq!(r.upstream_status, upstream, "{r:?}");
    }
    let unknown = records
        .iter()
        .filter(|r| r.decision == "unknown_proxy")
        .count();
    assert_eq!(unknown, 1);
    // Envoy's access log carried only the two ext_proc decided; the module's own
    // records came over its channel, each once.
    let logged = stack
        .envoy_counter("access_logs.grpc_access_log.logs_written")
        .await;
    assert_eq!(logged, 2);
    let metrics = stack.metrics().await;
    let count = |line: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .map(str::trim)
    };
    assert_eq!(
        count(r#"latchkey_responses_total{class="2xx"}"#),
        Some("7"),
        "{metrics}"
    );
    let allowed = r#"latchkey_decisions_total{proxy="plain",decision="allow"}"#;
    assert_eq!(count(allowed), Some("6"), "{metrics}");
}

#[tokio::test]
async fn a_change_holds_for_the_next_request() {
    let (stack, _upstream) = stack().await;
    a_change_holds(&stack).await;
}

/// A key issued, then revoked through the CLI, holds in Envoy for the next request.
async fn a_change_holds(stack: &Stack) {
    let (id, key) = common::issue_key(stack, "agent", &[]);
    assert_eq!(get(stack, "/plain/v1/a", &key).await.status(), 200);
    let revoked = stack.cli(&["key", "revoke", &id], &[]);
    assert!(revoked.status.success(), "{revoked:?}");
    let (status, kind, _) = denial(get(stack, "/plain/v1/a", &key).await).await;
    assert_eq!((status, kind.as_str()), (401, "revoked_key"));
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0);
}

/// A module that never answers (one of another build, left loaded in an Envoy that was
/// not restarted) holds up no change past its first seconds, while one that answers
/// (this build's, however long it takes to compile) is waited for; and one that hangs up
/// on each push is pushed the whole policy less and less often, not five times a second.
/// Envoy's own module is served as before.
#[tokio::test]
async fn a_module_that_never_answers_holds_up_nothing_and_is_pushed_less_often() {
    use latchkey::envoy::module::wire::Batch;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let (stack, _upstream) = stack().await;
    let socket = stack.dir.path().join(MODULE_SOCKET);
    let pushed = || {
        let mut channel = UnixStream::connect(&socket).unwrap();
        channel
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut length = [0u8; 4];
        channel.read_exact(&mut length).expect("a push");
        channel
    };
    let silent = pushed();
    // What this build's module says at once: nothing in force yet.
    let mut answering = pushed();
    let hello = Batch {
        records: Vec::new(),
        version: Some(-1),
        counts: Vec::new(),
    };
    answering.write_all(&hello.frame()).unwrap();
    // Past how long a change waits for a module.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let started = Instant::now();
    common::issue_key(&stack, "agent", &[]);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(4500), "issue took {took:?}");
    drop(answering);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    a_change_holds(&stack).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "issue and revoke took {took:?}"
    );
    drop(silent);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut waits = Vec::new();
    for _ in 0..3 {
        let connected = Instant::now();
        drop(pushed());
        waits.push(connected.elapsed());
        // serve sees the hang-up before the next call.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // At least 200 ms, then twice that: a hang-up serve had not seen yet when the next
    // call came would leave a strike out, never add one.
    assert!(waits[0] >= Duration::from_millis(150), "{waits:?}");
    assert!(waits[2] >= Duration::from_millis(350), "{waits:?}");
    a_change_holds(&stack).await;
}

/// An agent that used up its limit gets no fresh one by having Envoy restarted (its
/// admin port is on the loopback the agent reaches Envoy on): `serve` counted what the
/// module let through, from its records, and the module starts from those counts.
#[tokio::test]
async fn an_envoy_restart_starts_no_limit_afresh() {
    let (mut stack, upstream) = stack().await;
    // Six a day: no request comes free again while Envoy restarts, however slowly.
    let daily = policy(&upstream.url()).replace("requests_per_minute: 6", "requests_per_day: 6");
    stack.apply(&daily, &[("KEY", KEY), ("SECRET", SECRET)]);
    for _ in 0..6 {
        assert_eq!(get(&stack, "/plain/v1/a", KEY).await.status(), 200);
    }
    let (status, kind, _) = denial(get(&stack, "/plain/v1/a", KEY).await).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0, "decided in process");
    // The records reach `serve` (every 50 ms), then Envoy goes.
    stack.records_until(7).await;
    stack.restart_envoy().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.log("envoy").contains("in force") {
        assert!(
            Instant::now() < deadline,
            "no policy in the restarted Envoy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, kind, _) = denial(get(&stack, "/plain/v1/a", KEY).await).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limited"));
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0, "decided in process");
}

/// While a module compiles a whole policy, `serve` decides in its place, and must count
/// what the module let through that is still open (a record comes when its request
/// ends, and an agent can hold requests open): the module sends its counts as it
/// starts to compile, and `serve` holds to them.
#[tokio::test]
async fn counts_a_module_sends_as_it_compiles_hold_in_serve() {
    use latchkey::envoy::module::wire::{Batch, Count, ToModule, read_body};
    use std::io::Write;
    const READER: &str = "lk_inprocessREADER0000000000002";
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(Mode::InProcess).await;
    // `bodied` is decided by `serve` (it reads bodies); its caller has a limit.
    let reader = "  - name: reader\n    type: proxy\n";
    let limited = policy(&upstream.url()).replace(
        reader,
        &format!(
            "{reader}    keys: [{{ env: READER }}]\n    limits: {{ requests_per_day: 100 }}\n"
        ),
    );
    stack.apply(
        &limited,
        &[("KEY", KEY), ("SECRET", SECRET), ("READER", READER)],
    );
    assert_eq!(get(&stack, "/bodied/v1/a", READER).await.status(), 200);
    // A module on `serve`'s socket is pushed the policy, with `serve`'s count of it.
    let socket = stack.dir.path().join(MODULE_SOCKET);
    let mut channel = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    channel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = read_body(&mut channel).unwrap().expect("a push");
    let ToModule::Policy(push) = serde_json::from_slice::<ToModule>(&body).unwrap() else {
        panic!("a push first")
    };
    let [(key, _)] = &push.counts[..] else {
        panic!("one limit in use: {:?}", push.counts)
    };
    // The module's count: the day's 100 used up (a limit admits while its next free
    // moment is less than its period ahead).
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let counts = Batch {
        records: Vec::new(),
        version: None,
        counts: vec![Count {
            key: key.clone(),
            until_us: now_us + 86_400_000_000,
        }],
    };
    channel.write_all(&counts.frame()).unwrap();
    // At most 40 tries, so that `serve`'s own count (100 a day) never refuses.
    for tries in 1.. {
        let response = get(&stack, "/bodied/v1/a", READER).await;
        if response.status() == 429 {
            let (_, kind, _) = denial(response).await;
            assert_eq!(kind, "rate_limited");
            break;
        }
        assert_eq!(response.status(), 200);
        assert!(tries < 40, "serve did not hold to the counts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Between pushes `serve` says it is there: a module that hears nothing for
/// `SILENCE` takes `serve` for hung and stops deciding by its last policy.
#[tokio::test]
async fn serve_beats_between_pushes() {
    use latchkey::envoy::module::wire::{BEAT, Batch, SILENCE, ToModule, read_body};
    use std::io::Write;
    let (stack, _upstream) = stack().await;
    let socket = stack.dir.path().join(MODULE_SOCKET);
    let mut channel = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    channel.set_read_timeout(Some(SILENCE)).unwrap();
    let mut answering = channel.try_clone().unwrap();
    let mut next = || {
        let body = read_body(&mut channel).unwrap().expect("a frame");
        serde_json::from_slice::<ToModule>(&body).unwrap()
    };
    let ToModule::Policy(push) = next() else {
        panic!("a push first")
    };
    // Beats go to a module that answered: this build's says at once what it has.
    let hello = Batch {
        records: Vec::new(),
        version: Some(-1),
        counts: Vec::new(),
    };
    answering.write_all(&hello.frame()).unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        assert!(matches!(next(), ToModule::Beat));
    }
    let took = started.elapsed();
    assert!(
        took >= BEAT * 2 && took < BEAT * 5,
        "three beats in {took:?}"
    );
    // Compiled: `serve`'s counts come once, in place of the next beat.
    let compiled = Batch {
        records: Vec::new(),
        version: Some(push.version),
        counts: Vec::new(),
    };
    answering.write_all(&compiled.frame()).unwrap();
    // (The first may be a beat already on its way.)
    let counts: Vec<bool> = (0..3)
        .map(|_| matches!(next(), ToModule::Counts(_)))
        .collect();
    assert!(
        counts == [true, false, false] || counts == [false, true, false],
        "counts among the next frames: {counts:?}"
    );
}

#[tokio::test]
async fn no_record_is_lost_when_envoy_stops() {
    let (mut stack, _upstream) = stack().await;
    const N: usize = 300;
    let sent = futures_util::future::join_all((0..N).map(|i| {
        let (url, key) = match i % 3 {
            0 => (stack.url("/plain/v1/charges"), KEY),
            1 => (stack.url("/plain/v1/secret"), KEY),
            _ => (stack.url("/plain/v1/charges"), "lk_nobody"),
        };
        async move {
            client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    }))
    .await;
    let answered: HashSet<u16> = sent.iter().map(|s| s.as_u16()).collect();
    assert!(
        answered.is_subset(&[200, 401, 403, 429].into()),
        "{answered:?}"
    );
    // Straight away, while records are still queued in Envoy.
    let exit = stack.stop_envoy();
    assert!(exit.success() || exit.code().is_some(), "{exit:?}");
    let log = std::fs::read_to_string(stack.dir.path().join("envoy.log")).unwrap();
    assert!(
        log.contains(&format!("{N} requests decided in process, {N} recorded")),
        "{log}"
    );
    stack.records_until(N).await;
}

#[tokio::test]
async fn the_channel_is_owner_only_and_the_envoy_build_and_config_pinned() {
    let (stack, _upstream) = stack().await;
    let socket = stack.dir.path().join(MODULE_SOCKET);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // `--mode validate` builds the config without connecting anywhere.
    let validate_config = |envoy: &std::path::Path, config: &str| {
        Command::new(envoy)
            .current_dir(stack.dir.path())
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", common::modules_dir())
            .args(["--mode", "validate", "-c", config])
            .output()
            .unwrap()
    };
    let validate = |envoy: &std::path::Path| validate_config(envoy, "envoy.yaml");
    let genuine = validate(&common::envoy_bin_file());
    assert!(
        genuine.status.success(),
        "{}",
        String::from_utf8_lossy(&genuine.stderr)
    );

    // A config of an earlier release, whose routes match no mark this module sets, is
    // refused too, rather than loaded to answer every decided request 500.
    let config = std::fs::read_to_string(stack.dir.path().join("envoy.yaml")).unwrap();
    for (release, mark) in [
        ("earlier", r#", "mark": "cluster""#),
        ("hand-on header", r#", "hand_on": "metadata""#),
    ] {
        let earlier = config.replace(mark, "");
        assert_ne!(earlier, config, "{release}");
        std::fs::write(stack.dir.path().join("earlier.yaml"), earlier).unwrap();
        let refused = validate_config(&common::envoy_bin_file(), "earlier.yaml");
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{release}: {said}");
        assert!(
            said.contains(r#""mark": "cluster", "hand_on": "metadata""#),
            "{release}: {said}"
        );
    }

    // Another build of Envoy (here: the same binary with its revision changed) is
    // refused, and the config with it.
    let mut binary = std::fs::read(common::envoy_bin_file()).unwrap();
    let revision = latchkey::envoy::module::pin::ENVOY_REVISION.as_bytes();
    let at = memchr::memmem::find(&binary, revision).unwrap();
    binary[at] = if binary[at] == b'0' { b'1' } else { b'0' };
    let other = stack.dir.path().join("other-envoy");
    std::fs::write(&other, binary).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let refused = validate(&other);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("refusing to load: this module is built for Envoy 1.40.0"),
        "{said}"
    );
}

/// Envoy's router acts on retry and timeout headers; an agent's must steer nothing on a
/// handed-on request either: this one asks for 4 tries of a 200 and a 1 ms timeout.
#[tokio::test]
async fn a_handed_on_request_cannot_steer_envoys_router() {
    let (stack, upstream) = stack().await;
    let (_, reader_key) = common::issue_key(&stack, "reader", &[]);
    let response = client()
        .post(stack.url("/bodied/v1/things"))
        .bearer_auth(&reader_key)
        .header("x-envoy-retry-on", "retriable-status-codes")
        .header("x-envoy-retriable-status-codes", "200")
        .header("x-envoy-max-retries", "3")
        .header("x-envoy-upstream-rq-timeout-ms", "1")
        .header("x-envoy-upstream-rq-per-try-timeout-ms", "1")
        .header(HAND_ON, "1")
        .json(&serde_json::json!({ "action": "create" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 1);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].header("x-envoy-max-retries").is_none());
    // Nor does a hand-on header of the agent's reach the vendor: `serve` removes it.
    assert!(seen[0].header(HAND_ON).is_none(), "{seen:#?}");
}

/// The header the module once handed requests on with (it marks the dynamic metadata
/// now), and the kind of header an agent would try to be handed on with.
const HAND_ON: &str = "x-latchkey-hand-on";

/// A hand-on header sent by an agent gets it nothing: the module decides the request all
/// the same and removes the header, which never reaches the vendor.
#[tokio::test]
async fn the_hand_on_mark_sent_by_an_agent_gets_it_nothing() {
    let (stack, upstream) = stack().await;
    let marked = |path: &str, key: &str| {
        let request = client().get(stack.url(path)).bearer_auth(key);
        request.header(HAND_ON, "1").send()
    };
    // Decided in Envoy all the same: the header is one of latchkey's, removed.
    assert_eq!(
        marked("/plain/v1/charges", KEY).await.unwrap().status(),
        200
    );
    let (status, kind, _) = denial(marked("/plain/v1/secret/x", KEY).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (403, "rule_denied"));
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0);
    let seen = upstream.take();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].header(HAND_ON).is_none(), "{seen:#?}");
}

/// Only a request the module decided, or one `latchkey serve` allowed, is routed: with
/// the module's filter gone from the chain (as if it let a request through undecided), a
/// request naming Envoy's cluster and the vendor's address itself goes nowhere, and so
/// does one with a hand-on header: only the module's mark makes the ext_proc filter.
#[tokio::test]
async fn a_request_nothing_allowed_goes_nowhere() {
    let upstream = Upstream::start().await;
    let cut = common::without_filter(
        "envoy.filters.http.dynamic_modules",
        "envoy.filters.http.composite",
    );
    let stack = Stack::start_full(Mode::InProcess, cut, &[]).await;
    stack.apply(
        &policy(&upstream.url()),
        &[("KEY", KEY), ("SECRET", SECRET)],
    );
    common::goes_nowhere(&stack, &upstream).await;
    let marked = client()
        .get(stack.url("/plain/v1/charges"))
        .bearer_auth(KEY)
        .header(HAND_ON, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status(), 500);
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0);
    assert!(upstream.take().is_empty());
}

/// An alert's quarantine holds in Envoy's module even while the store cannot take it:
/// `serve` has it in force, and sends it to the module as a key change on the version
/// the module runs, until the store has it.
#[tokio::test]
async fn a_quarantine_the_store_could_not_take_holds_in_envoy() {
    let upstream = Upstream::start().await;
    let stack = Stack::start_in(Mode::InProcess).await;
    // The alerts suite's watched proxy, its webhooks all unreachable.
    let nowhere = format!("http://127.0.0.1:{}", common::free_port());
    let policy = crate::alerts::policy(&upstream.url(), &nowhere, &nowhere, &nowhere);
    stack.apply(&policy, &[]);
    let (_, key) = common::issue_key(&stack, "agent", &[]);
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", stack.db_path().display()))
        .await
        .unwrap();
    let sql = |statement: &'static str| sqlx::query(statement).execute(&db);
    sql("ALTER TABLE alerts RENAME TO alerts_away")
        .await
        .unwrap();

    // A loop on the key, decided in Envoy, until the alert's quarantine refuses it.
    let started = Instant::now();
    let refused = loop {
        let response = get(&stack, "/watched/v1/items", &key).await;
        if response.status() != 200 {
            break response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never refused in Envoy"
        );
    };
    let (status, kind, _) = denial(refused).await;
    assert_eq!((status, kind.as_str()), (403, "quarantined"));
    assert!(stack.log("latchkey").contains("could not store an alert"));
    for _ in 0..3 {
        assert_eq!(get(&stack, "/watched/v1/items", &key).await.status(), 403);
    }
    // A whole policy pushed meanwhile (a change applied), then a key issued: the
    // quarantine holds through both, from the first request after each.
    let elsewhere = format!("http://127.0.0.1:{}", common::free_port());
    let changed = crate::alerts::policy(&upstream.url(), &elsewhere, &nowhere, &nowhere);
    stack.apply(&changed, &[]);
    assert_eq!(get(&stack, "/watched/v1/items", &key).await.status(), 403);
    common::issue_key(&stack, "agent", &[]);
    assert_eq!(get(&stack, "/watched/v1/items", &key).await.status(), 403);

    // The store back: it takes the alert on the next try, and the key stays refused.
    sql("ALTER TABLE alerts_away RENAME TO alerts")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM alerts")
            .fetch_one(&db)
            .await
            .unwrap();
        if stored == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the alert never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&stack, "/watched/v1/items", &key).await.status(), 403);
    assert_eq!(stack.envoy_counter(EXT_PROC).await, 0, "decided in Envoy");
}
