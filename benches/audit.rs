//! The audit writer's cost per record: requests decided and completed through the real
//! writer into a SQLite file, measured as the process's CPU time (user + system) per
//! record and as records stored per second. Not criterion: the writer batches on its own
//! clock, so what matters is the CPU it takes, not a per-call time. Every record is a
//! link of the writer's hash chain (`store::chain`).

use std::time::Instant;

use latchkey::base::crypto::AuditSigner;
use latchkey::store::{Store, verify};
use latchkey::telemetry::audit::{AuditCounters, AuditLog, Completed, Decided, Event, Outlets};

/// Records written, then verified (`cargo bench`); a thousand as a smoke test.
fn records() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        200_000
    } else {
        1_000
    }
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn event_pair(i: usize) -> [Event; 2] {
    let request_id = format!("req-{i:08}");
    [
        Event::Decided(Decided {
            request_id: request_id.clone(),
            time_ms: 1_790_000_000_000 + i as i64,
            elapsed_us: 40,
            proxy: Some("openai".into()),
            target: Some("openai".into()),
            credential: Some("openai-prod".into()),
            key_id: Some("key_0123456789abcdef".into()),
            run_label: Some("nightly-eval".into()),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            decision: "allow",
            ..Decided::default()
        }),
        Event::Completed(Completed {
            request_id,
            status: Some(200),
            upstream_status: Some(200),
            latency_ms: Some(12.25),
            bytes_in: 512,
            bytes_out: 2048,
            retries: 0,
        }),
    ]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("audit.db").display());
    runtime.block_on(async {
        let store = Store::open(&url).await.unwrap();
        let signer = AuditSigner::ephemeral();
        let (log, writer) = AuditLog::start(
            store.clone(),
            signer.clone(),
            AuditCounters::default(),
            Outlets::default(),
        );
        let records = records();
        let (cpu, wall) = (cpu_seconds(), Instant::now());
        for i in 0..records {
            for event in event_pair(i) {
                log.record(event).await;
            }
        }
        writer.finish().await;
        let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
        let n = records as f64;
        println!(
            "audit writer, SQLite: {records} records in {wall:.2} s ({:.0} records/s), \
             {:.1} µs CPU per record",
            n / wall,
            cpu * 1e6 / n
        );
        let wall = Instant::now();
        let report = verify::verify(&store, &[signer.public_key()], None)
            .await
            .unwrap();
        let wall = wall.elapsed().as_secs_f64();
        assert!(
            report.intact && report.records == records as u64,
            "{report:?}"
        );
        println!(
            "audit verify, SQLite: {records} records in {wall:.2} s ({:.0} records/s)",
            n / wall
        );
    });
    link_cost();
}

/// What chaining adds per record on the writer's side: the content's JSON and its
/// SHA-256 link.
fn link_cost() {
    use latchkey::store::chain::{Chain, Content};
    let mut chain = Chain::new(AuditSigner::ephemeral());
    let content = Content {
        request_id: "req-00000001".into(),
        time_ms: 1_790_000_000_000,
        proxy: Some("openai".into()),
        target: Some("openai".into()),
        credential: Some("openai-prod".into()),
        key_id: Some("key_0123456789abcdef".into()),
        run_label: Some("nightly-eval".into()),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        status: Some(200),
        upstream_status: Some(200),
        decision: "allow".into(),
        rule_id: None,
        latency_ms: Some(12.25),
        cost_usd: None,
        bytes_in: Some(512),
        bytes_out: Some(2048),
        retries: Some(0),
        completed: 1,
        model: None,
        input_tokens: None,
        output_tokens: None,
        cached_tokens: None,
        facts: None,
        supersedes: None,
    };
    let t = Instant::now();
    for _ in 0..100_000 {
        std::hint::black_box(content.json());
    }
    let json_us = t.elapsed().as_secs_f64() * 10.0;
    let t = Instant::now();
    for _ in 0..100_000 {
        std::hint::black_box(chain.link(&content));
    }
    println!(
        "a record's link: {:.2} µs ({json_us:.2} µs of it its content's JSON)",
        t.elapsed().as_secs_f64() * 10.0
    );
}
