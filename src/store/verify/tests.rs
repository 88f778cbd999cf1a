//! Tamper with the stored audit the way someone with the database's password would, on
//! both backends, and see `verify` name what changed.

use std::collections::HashMap;

use super::*;
use crate::store::audit::{Row, Spent};
use crate::store::chain::Chain;
use crate::store::testing;
use crate::telemetry::audit::{Completed, Decided};

fn row(i: usize, completed: bool) -> Row {
    let request_id = format!("r{i}");
    Row {
        decided: Decided {
            request_id: request_id.clone(),
            time_ms: 1_790_000_000_000 + i as i64,
            proxy: Some("openai".into()),
            key_id: Some("key_1".into()),
            method: "POST".into(),
            path: format!("/v1/chat/completions/{i}"),
            decision: "allow",
            ..Decided::default()
        },
        completed: completed.then(|| done(&request_id)),
        cost: Spent::default(),
    }
}

fn done(request_id: &str) -> Completed {
    Completed {
        request_id: request_id.to_owned(),
        status: Some(200),
        upstream_status: Some(200),
        latency_ms: Some(1.25),
        bytes_in: 10,
        bytes_out: 20,
        retries: 0,
    }
}

/// Writes `n` records (the odd ones left open, then completed and one of them charged
/// later, so they move to new links) and closes the chain.
async fn write(store: &Store, signer: &AuditSigner, n: usize) -> Chain {
    let rows: Vec<Row> = (1..=n).map(|i| row(i, i % 2 == 0)).collect();
    let nothing = HashMap::new();
    let chain = Chain::new(signer.clone());
    let (_, chain) = store
        .write_audit(&chain, &rows, &[], &[], &nothing)
        .await
        .unwrap();
    let cost = ("r1".to_owned(), "key_1".into(), 1_500, None);
    let (_, chain) = store
        .write_audit(&chain, &[], &[cost], &[], &nothing)
        .await
        .unwrap();
    let late: Vec<Completed> = (1..=n)
        .filter(|i| i % 2 == 1)
        .map(|i| done(&format!("r{i}")))
        .collect();
    let late: Vec<&Completed> = late.iter().collect();
    let (found, chain) = store
        .write_audit(&chain, &[], &[], &late, &nothing)
        .await
        .unwrap();
    assert!(found.iter().all(|f| *f));
    store.checkpoint_audit(&chain, Kind::Closed).await.unwrap()
}

async fn check(store: &Store, signer: &AuditSigner) -> Report {
    verify(store, &[signer.public_key()], None).await.unwrap()
}

async fn exec(store: &Store, sql: &str) {
    sqlx::query(sql).execute(store.pool()).await.unwrap();
}

fn broken(report: &Report) -> &Broken {
    report.broken.as_ref().expect("a break found")
}

#[tokio::test]
async fn an_intact_audit_verifies_and_amendments_are_links_too() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 10).await;
        let report = check(&store, &signer).await;
        assert!(report.intact, "{label}: {report:?}");
        assert_eq!(report.records, 10, "{label}");
        // Five late completions and a cost each moved a record to a new link.
        assert_eq!(report.superseded, 6, "{label}");
        let chain = &report.chains[0];
        assert!(chain.closed && chain.unsigned == 0, "{label}: {chain:?}");
        assert_eq!(chain.to, 16, "{label}");
        // A checkpoint signed by another key is not taken.
        let stranger = AuditSigner::ephemeral();
        let report = check(&store, &stranger).await;
        assert!(
            broken(&report).reason.contains("signed with key"),
            "{label}: {report:?}"
        );
    }
}

#[tokio::test]
async fn an_edited_record_is_named() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 10).await;
        exec(
            &store,
            "UPDATE requests SET cost_usd = 0 WHERE request_id = 'r1'",
        )
        .await;
        let report = check(&store, &signer).await;
        let b = broken(&report);
        assert_eq!(b.request_id.as_deref(), Some("r1"), "{label}: {b:?}");
        assert!(b.reason.contains("edited"), "{label}: {b:?}");
        assert!(!report.intact);
    }
}

#[tokio::test]
async fn a_deleted_record_is_named_by_its_position() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 10).await;
        let pos: i64 = sqlx::query_scalar("SELECT chain_pos FROM requests WHERE request_id = 'r4'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        exec(&store, "DELETE FROM requests WHERE request_id = 'r4'").await;
        let b = broken(&check(&store, &signer).await).clone();
        assert_eq!(b.position, Some(pos), "{label}: {b:?}");
        assert!(b.reason.contains("deleted"), "{label}: {b:?}");
    }
}

#[tokio::test]
async fn the_last_record_deleted_is_missed_by_the_closing_checkpoint() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 4).await;
        exec(
            &store,
            "DELETE FROM requests WHERE seq = (SELECT seq FROM requests ORDER BY chain_pos DESC LIMIT 1)",
        )
        .await;
        let b = broken(&check(&store, &signer).await).clone();
        assert!(b.reason.contains("deleted"), "{label}: {b:?}");
    }
}

#[tokio::test]
async fn an_inserted_record_is_named_chained_or_not() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 6).await;
        // Without a link.
        exec(
            &store,
            "INSERT INTO requests (request_id, time_ms, method, path, decision)
             VALUES ('forged', 1790000000500, 'GET', '/v1/x', 'allow')",
        )
        .await;
        let b = broken(&check(&store, &signer).await).clone();
        assert_eq!(b.request_id.as_deref(), Some("forged"), "{label}: {b:?}");
        assert!(b.reason.contains("no chain"), "{label}: {b:?}");
        exec(&store, "DELETE FROM requests WHERE request_id = 'forged'").await;
        assert!(check(&store, &signer).await.intact, "{label}");
        // With a copy of another record's link.
        exec(
            &store,
            "INSERT INTO requests (request_id, time_ms, method, path, decision, completed,
                                   chain, chain_pos, prev_hash, hash)
             SELECT 'forged', time_ms, method, path, decision, completed, chain, chain_pos,
                    prev_hash, hash FROM requests WHERE request_id = 'r2'",
        )
        .await;
        let b = broken(&check(&store, &signer).await).clone();
        assert_eq!(b.request_id.as_deref(), Some("forged"), "{label}: {b:?}");
        assert!(b.reason.contains("claim position"), "{label}: {b:?}");
    }
}

#[tokio::test]
async fn rewriting_every_link_after_an_edit_breaks_the_signed_checkpoint() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        let rows: Vec<Row> = (1..=6).map(|i| row(i, true)).collect();
        let chain = Chain::new(signer.clone());
        let (_, chain) = store
            .write_audit(&chain, &rows, &[], &[], &HashMap::new())
            .await
            .unwrap();
        store.checkpoint_audit(&chain, Kind::Closed).await.unwrap();
        // Edit r3 and recompute its link and every one after it, as the hash is public.
        exec(
            &store,
            "UPDATE requests SET status = 500 WHERE request_id = 'r3'",
        )
        .await;
        let rows = sqlx::query(&format!(
            "SELECT seq, chain, chain_pos, prev_hash, hash, {CONTENT_COLUMNS} FROM requests
             WHERE chain_pos >= 3 ORDER BY chain_pos"
        ))
        .fetch_all(store.pool())
        .await
        .unwrap();
        let mut prev: String = sqlx::query_scalar("SELECT hash FROM requests WHERE chain_pos = 2")
            .fetch_one(store.pool())
            .await
            .unwrap();
        for r in &rows {
            let row = ChainRow::read(r).unwrap();
            let hash = link_hash(&prev, &chain.id, row.pos, &row.content.json());
            sqlx::query("UPDATE requests SET prev_hash = $1, hash = $2 WHERE seq = $3")
                .bind(&prev)
                .bind(&hash)
                .bind(row.seq)
                .execute(store.pool())
                .await
                .unwrap();
            prev = hash;
        }
        let b = broken(&check(&store, &signer).await).clone();
        assert!(b.reason.contains("rewritten"), "{label}: {b:?}");
        assert_eq!(b.position, Some(6), "{label}: {b:?}");
    }
}

#[tokio::test]
async fn pruning_leaves_a_base_that_verifies_and_a_chain_deleted_whole_is_missed() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        let first = write(&store, &signer, 8).await;
        let deleted = prune(&store, &signer, now_unix_ms() + 1_000).await.unwrap();
        assert_eq!(deleted, 8, "{label}");
        let report = check(&store, &signer).await;
        assert!(report.intact, "{label}: {report:?}");
        assert_eq!(report.records, 0, "{label}");
        // A later chain verifies and names the first's end as what came before it.
        let second = write(&store, &signer, 4).await;
        let report = check(&store, &signer).await;
        assert!(report.intact, "{label}: {report:?}");
        assert_eq!(report.records, 4, "{label}");
        // Pruning again, with nothing new to prune in the first chain, stays green.
        prune(&store, &signer, now_unix_ms() - 60_000)
            .await
            .unwrap();
        assert!(check(&store, &signer).await.intact, "{label}");
        // The first chain deleted whole (its base too) is missed by the second's start.
        for table in ["audit_checkpoints", "audit_superseded", "requests"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE chain = $1"))
                .bind(&first.id)
                .execute(store.pool())
                .await
                .unwrap();
        }
        let b = broken(&check(&store, &signer).await).clone();
        assert_eq!(
            b.chain.as_deref(),
            Some(second.id.as_str()),
            "{label}: {b:?}"
        );
        assert!(b.reason.contains("is gone"), "{label}: {b:?}");
    }
}

#[tokio::test]
async fn since_starts_at_the_last_checkpoint_before_it() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 6).await;
        let later = now_unix_ms() + 1_000;
        let report = verify(&store, &[signer.public_key()], Some(later))
            .await
            .unwrap();
        assert!(report.intact, "{label}: {report:?}");
        assert_eq!(
            report.records, 0,
            "{label}: all before the closing checkpoint"
        );
        let report = verify(&store, &[signer.public_key()], Some(0))
            .await
            .unwrap();
        assert_eq!(report.records, 6, "{label}");
    }
}

#[tokio::test]
async fn a_record_deleted_and_passed_off_as_amended_is_found() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 6).await;
        // r2 was complete when written: it has never moved. Keep its link as if it had.
        exec(
            &store,
            "INSERT INTO audit_superseded (chain, chain_pos, prev_hash, hash, request_seq)
             SELECT chain, chain_pos, prev_hash, hash, seq FROM requests WHERE request_id = 'r2'",
        )
        .await;
        exec(&store, "DELETE FROM requests WHERE request_id = 'r2'").await;
        let b = broken(&check(&store, &signer).await).clone();
        assert!(b.reason.contains("no record names it"), "{label}: {b:?}");
    }
}

#[tokio::test]
async fn a_record_with_half_a_link_or_a_made_up_row_number_is_found() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        write(&store, &signer, 4).await;
        exec(
            &store,
            "UPDATE requests SET chain_pos = NULL WHERE request_id = 'r2'",
        )
        .await;
        let b = broken(&check(&store, &signer).await).clone();
        assert!(
            b.reason.contains("incomplete") || b.reason.contains("missing"),
            "{label}: {b:?}"
        );
    }
    let (_label, _scratch, store) = testing::stores().await.remove(0);
    let signer = AuditSigner::ephemeral();
    write(&store, &signer, 2).await;
    // Below every row number the chains started after: passed off as from before them.
    exec(
        &store,
        "INSERT INTO requests (seq, request_id, time_ms, method, path, decision)
         VALUES (-5, 'forged-old', 1, 'GET', '/x', 'allow')",
    )
    .await;
    let b = broken(&check(&store, &signer).await).clone();
    assert_eq!(b.request_id.as_deref(), Some("forged-old"), "{b:?}");
}

#[tokio::test]
async fn nothing_may_follow_a_closed_chain_even_once_pruned() {
    for (label, _scratch, store) in testing::stores().await {
        let signer = AuditSigner::ephemeral();
        let chain = write(&store, &signer, 3).await;
        prune(&store, &signer, now_unix_ms() + 1_000).await.unwrap();
        assert!(check(&store, &signer).await.intact, "{label}");
        // A record appended after the close, its link computed as the writer would.
        let appended = row(9, true);
        let content = crate::store::audit::content(&appended);
        let pos = chain.pos + 1;
        let hash = link_hash(&chain.head, &chain.id, pos, &content.json());
        let sql = format!(
            "INSERT INTO requests ({CONTENT_COLUMNS}, chain, chain_pos, prev_hash, hash)
             VALUES ({})",
            (1..=chain::CONTENT_LEN + 4)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let q = content
            .bind(sqlx::query(&sql))
            .bind(&chain.id)
            .bind(pos)
            .bind(&chain.head)
            .bind(&hash);
        q.execute(store.pool()).await.unwrap();
        let b = broken(&check(&store, &signer).await).clone();
        assert!(b.reason.contains("closed"), "{label}: {b:?}");
    }
}
