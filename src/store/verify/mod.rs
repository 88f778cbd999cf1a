//! `latchkey audit verify`: walks every chain of the audit ([`crate::store::chain`]) link
//! by link, a window of positions at a time, and reports the first record that was
//! edited, deleted or inserted behind latchkey's back. Retention's pruning leaves each
//! chain a signed base to start from; `since` starts from the last checkpoint before it.

use sqlx::AnyConnection;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use crate::base::clock::now_unix_ms;
use crate::base::crypto::{self, AuditPublicKey, AuditSigner};
use crate::store::chain::{
    self, CHECKPOINT_COLUMNS, CONTENT_COLUMNS, Checkpoint, Content, Kind, link_hash, read_link,
};
use crate::store::{Backend, Store, StoreError};

/// Positions read per query.
const WINDOW: i64 = 1_000;

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub intact: bool,
    /// Records whose link was checked.
    pub records: u64,
    /// Links left behind by records amended later, checked as links.
    pub superseded: u64,
    /// Checkpoint signatures checked.
    pub checkpoints: u64,
    /// Records written before the audit was chained: not covered.
    pub unchained_before: u64,
    pub chains: Vec<ChainReport>,
    /// The first thing found wrong.
    pub broken: Option<Broken>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChainReport {
    pub chain: String,
    /// Where the walk started: 0, a pruned base, or the last checkpoint before `since`.
    pub from: i64,
    /// The last link.
    pub to: i64,
    pub records: u64,
    /// The newest signed checkpoint, and links after it (signed when the writer next
    /// checkpoints; a replica that died leaves them unsigned).
    pub signed_to: i64,
    pub signed_time_ms: i64,
    pub unsigned: i64,
    /// The writer stopped cleanly and signed its last link.
    pub closed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Broken {
    pub chain: Option<String>,
    pub position: Option<i64>,
    /// The record, when one is to blame.
    pub seq: Option<i64>,
    pub request_id: Option<String>,
    pub reason: String,
}

impl Broken {
    fn at(chain: &str, pos: i64, reason: String) -> Self {
        Self {
            chain: Some(chain.to_owned()),
            position: Some(pos),
            seq: None,
            request_id: None,
            reason,
        }
    }

    fn record(mut self, r: &ChainRow) -> Self {
        self.seq = Some(r.seq);
        self.request_id = Some(r.content.request_id.to_string());
        self
    }
}

/// Verifies every chain; checkpoints must be signed by one of `keys`.
pub async fn verify(
    store: &Store,
    keys: &[AuditPublicKey],
    since_ms: Option<i64>,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    // One snapshot: a writer committing meanwhile (a record moved to a new link, a
    // prune) must not look like tampering.
    let mut tx = store.pool().begin().await?;
    if store.backend() == Backend::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
    }
    let broken = walk_all(&mut tx, keys, since_ms, &mut report).await?;
    tx.rollback().await?;
    report.intact = broken.is_none();
    report.broken = broken;
    Ok(report)
}

async fn walk_all(
    conn: &mut AnyConnection,
    keys: &[AuditPublicKey],
    since_ms: Option<i64>,
    report: &mut Report,
) -> Result<Option<Broken>, StoreError> {
    let chains: Vec<(String, i64)> = sqlx::query_as(
        "SELECT chain, min(time_ms) FROM audit_checkpoints GROUP BY chain ORDER BY 2, 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (chain, _) in &chains {
        if let Some(broken) = walk(conn, keys, chain, since_ms, report).await? {
            return Ok(Some(broken));
        }
    }
    if let Some(broken) = starts_vouch(conn, keys).await? {
        return Ok(Some(broken));
    }
    if let Some(broken) = links_complete(conn).await? {
        return Ok(Some(broken));
    }
    // A record in a chain no checkpoint knows: made up, or its chain's checkpoints went.
    let stray: Option<(i64, String, String)> = sqlx::query_as(
        "SELECT seq, request_id, chain FROM requests WHERE chain IS NOT NULL
           AND chain NOT IN (SELECT chain FROM audit_checkpoints) ORDER BY seq LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((seq, request_id, chain)) = stray {
        return Ok(Some(Broken {
            chain: Some(chain.clone()),
            position: None,
            seq: Some(seq),
            request_id: Some(request_id),
            reason: format!("it claims chain {chain}, which no signed checkpoint knows"),
        }));
    }
    // Records without a link: only those written before the first chain began are
    // expected (an upgrade from an unchained audit).
    let before: Option<i64> =
        sqlx::query_scalar("SELECT min(first_seq) FROM audit_checkpoints WHERE kind = 'start'")
            .fetch_one(&mut *conn)
            .await?;
    let before = before.unwrap_or(i64::MAX);
    report.unchained_before = u64::try_from(
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM requests WHERE chain IS NULL AND seq <= $1",
        )
        .bind(before)
        .fetch_one(&mut *conn)
        .await?,
    )
    .unwrap_or(0);
    let unchained: Option<(i64, String)> = sqlx::query_as(
        "SELECT seq, request_id FROM requests WHERE chain IS NULL AND (seq > $1 OR seq < 1)
         ORDER BY seq LIMIT 1",
    )
    .bind(before)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(unchained.map(|(seq, request_id)| Broken {
        chain: None,
        position: None,
        seq: Some(seq),
        request_id: Some(request_id),
        reason: "it is in no chain: written behind latchkey's back".into(),
    }))
}

/// A record as a link.
struct ChainRow {
    seq: i64,
    pos: i64,
    prev_hash: String,
    hash: String,
    content: Content<'static>,
}

impl ChainRow {
    fn read(r: &AnyRow) -> Result<Self, sqlx::Error> {
        let link = read_link(r)?.unwrap_or_else(|| chain::Link {
            chain: String::new(),
            pos: -1,
            prev_hash: String::new(),
            hash: String::new(),
        });
        Ok(Self {
            seq: r.try_get("seq")?,
            pos: link.pos,
            prev_hash: link.prev_hash,
            hash: link.hash,
            content: Content::read(r)?,
        })
    }
}

/// One chain, from its base to its last link.
async fn walk(
    conn: &mut AnyConnection,
    keys: &[AuditPublicKey],
    chain: &str,
    since_ms: Option<i64>,
    report: &mut Report,
) -> Result<Option<Broken>, StoreError> {
    // The base: the chain's start, the newest prune, or the last checkpoint before
    // `since`, whichever is furthest along.
    let base = sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints
         WHERE chain = $1 AND (kind IN ('start', 'pruned') OR time_ms <= $2)
         ORDER BY chain_pos DESC, time_ms DESC LIMIT 1"
    ))
    .bind(chain)
    .bind(since_ms.unwrap_or(i64::MIN))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(base) = base.as_ref().map(Checkpoint::read).transpose()?.flatten() else {
        return Ok(Some(Broken::at(
            chain,
            0,
            "the chain's start checkpoint is gone".into(),
        )));
    };
    if let Some(reason) = unsigned(keys, &base) {
        return Ok(Some(Broken::at(chain, base.pos, reason)));
    }
    report.checkpoints += 1;
    let last: (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT max(chain_pos) FROM requests WHERE chain = $1),
                (SELECT max(chain_pos) FROM audit_superseded WHERE chain = $1),
                (SELECT max(chain_pos) FROM audit_checkpoints WHERE chain = $1)",
    )
    .bind(chain)
    .fetch_one(&mut *conn)
    .await?;
    let to = [last.0, last.1, last.2]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
    // Where the chain's writer closed it, if it did: nothing may follow.
    let closed = sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints
         WHERE chain = $1 AND kind = 'closed' ORDER BY chain_pos LIMIT 1"
    ))
    .bind(chain)
    .fetch_optional(&mut *conn)
    .await?;
    let closed = closed.as_ref().map(Checkpoint::read).transpose()?.flatten();
    if let Some(reason) = closed.as_ref().and_then(|cp| unsigned(keys, cp)) {
        return Ok(Some(Broken::at(chain, closed.map_or(0, |c| c.pos), reason)));
    }
    let closed_at = closed.map(|cp| cp.pos);
    // Records at positions retention pruned: a prune cut short leaves some (the next
    // deletes them); anything else there was put there.
    let below: Option<(i64, String)> = sqlx::query_as(
        "SELECT seq, request_id FROM requests WHERE chain = $1 AND chain_pos <=
           (SELECT max(chain_pos) FROM audit_checkpoints WHERE chain = $1 AND kind = 'pruned')
         ORDER BY seq LIMIT 1",
    )
    .bind(chain)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((seq, request_id)) = below {
        return Ok(Some(Broken {
            chain: Some(chain.to_owned()),
            position: None,
            seq: Some(seq),
            request_id: Some(request_id),
            reason: "it sits where retention pruned the chain: inserted (or a prune was cut short)"
                .into(),
        }));
    }
    let mut seen = ChainReport {
        chain: chain.to_owned(),
        from: base.pos,
        to,
        signed_to: base.pos,
        signed_time_ms: base.time_ms,
        closed: closed_at.is_some(),
        ..ChainReport::default()
    };
    let mut head = base.hash.clone();
    let mut lo = base.pos;
    while lo < to {
        let hi = (lo + WINDOW).min(to);
        let columns = format!("seq, chain, chain_pos, prev_hash, hash, {CONTENT_COLUMNS}");
        let mut rows = Vec::new();
        for r in window(conn, &columns, "requests", chain, lo, hi).await? {
            match ChainRow::read(&r) {
                Ok(row) => rows.push(row),
                Err(_) => {
                    let seq = r.try_get::<i64, _>("seq").ok();
                    let reason = "a field holds a value of a type latchkey never writes: edited";
                    return Ok(Some(Broken {
                        seq,
                        ..Broken::at(chain, -1, reason.into())
                    }));
                }
            }
        }
        let columns = "chain_pos, prev_hash, hash";
        let superseded: Vec<(i64, String, String)> =
            window(conn, columns, "audit_superseded", chain, lo, hi)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<_, sqlx::Error>>()?;
        let checkpoints: Vec<Checkpoint> =
            window(conn, CHECKPOINT_COLUMNS, "audit_checkpoints", chain, lo, hi)
                .await?
                .iter()
                .map(Checkpoint::read)
                .filter_map(Result::transpose)
                .collect::<Result<_, _>>()?;
        let (mut r, mut s, mut c) = (0, 0, 0);
        for pos in lo + 1..=hi {
            let here_r = rows[r..].iter().take_while(|x| x.pos == pos).count();
            let here_s = superseded[s..].iter().take_while(|x| x.0 == pos).count();
            if closed_at.is_some_and(|closed| pos > closed) {
                let reason = "it was added after the chain's writer closed it".to_owned();
                let broken = Broken::at(chain, pos, reason);
                return Ok(Some(match rows.get(r).filter(|x| x.pos == pos) {
                    Some(row) => broken.record(row),
                    None => broken,
                }));
            }
            match (here_r, here_s) {
                (0, 0) => {
                    let reason = format!("the record at position {pos} is missing: deleted");
                    return Ok(Some(Broken::at(chain, pos, reason)));
                }
                (1, 0) => {
                    let row = &rows[r];
                    if row.prev_hash != head {
                        let reason = "it does not follow the record before it: inserted, or moved"
                            .to_owned();
                        return Ok(Some(Broken::at(chain, pos, reason).record(row)));
                    }
                    if link_hash(&head, chain, pos, &row.content.json()) != row.hash {
                        let reason = "its fields no longer match its hash: edited".to_owned();
                        return Ok(Some(Broken::at(chain, pos, reason).record(row)));
                    }
                    head.clone_from(&row.hash);
                    seen.records += 1;
                }
                (0, 1) => {
                    let (_, prev, hash) = &superseded[s];
                    if *prev != head {
                        let reason = format!(
                            "the superseded link at position {pos} does not follow the one before it"
                        );
                        return Ok(Some(Broken::at(chain, pos, reason)));
                    }
                    head.clone_from(hash);
                    report.superseded += 1;
                }
                _ => {
                    let reason =
                        format!("{} records claim position {pos}: inserted", here_r + here_s);
                    let broken = Broken::at(chain, pos, reason);
                    // The newest row is the likelier intruder.
                    return Ok(Some(
                        match rows[r..r + here_r].iter().max_by_key(|x| x.seq) {
                            Some(row) => broken.record(row),
                            None => broken,
                        },
                    ));
                }
            }
            while let Some(cp) = checkpoints.get(c).filter(|cp| cp.pos == pos) {
                if let Some(reason) = unsigned(keys, cp) {
                    return Ok(Some(Broken::at(chain, pos, reason)));
                }
                if cp.hash != head {
                    let reason = format!(
                        "the links up to position {pos} are not those the checkpoint signed at {} vouches for: rewritten",
                        cp.time_ms
                    );
                    let broken = Broken::at(chain, pos, reason);
                    return Ok(Some(match rows.get(r).filter(|x| x.pos == pos) {
                        Some(row) => broken.record(row),
                        None => broken,
                    }));
                }
                report.checkpoints += 1;
                seen.signed_to = cp.pos;
                seen.signed_time_ms = cp.time_ms;
                c += 1;
            }
            r += here_r;
            s += here_s;
        }
        lo = hi;
    }
    seen.unsigned = seen.to - seen.signed_to;
    report.records += seen.records;
    report.chains.push(seen);
    Ok(None)
}

/// `columns` of `table`'s rows at positions `lo` (excluded) to `hi` of `chain`, in order.
async fn window(
    conn: &mut AnyConnection,
    columns: &str,
    table: &str,
    chain: &str,
    lo: i64,
    hi: i64,
) -> Result<Vec<AnyRow>, StoreError> {
    Ok(sqlx::query(&format!(
        "SELECT {columns} FROM {table}
         WHERE chain = $1 AND chain_pos > $2 AND chain_pos <= $3 ORDER BY chain_pos"
    ))
    .bind(chain)
    .bind(lo)
    .bind(hi)
    .fetch_all(&mut *conn)
    .await?)
}

/// Why `cp` is not a checkpoint one of `keys` signed, if it is not.
fn unsigned(keys: &[AuditPublicKey], cp: &Checkpoint) -> Option<String> {
    let Some(key) = keys.iter().find(|k| k.id == cp.key_id) else {
        return Some(format!(
            "the checkpoint at position {} is signed with key {}, neither the master key's nor a previous one's",
            cp.pos, cp.key_id
        ));
    };
    let signed =
        crypto::unhex(&cp.signature).is_some_and(|sig| key.verifies(cp.message().as_bytes(), &sig));
    (!signed).then(|| format!("the checkpoint at position {} has a bad signature", cp.pos))
}

/// Each chain's start names the newest checkpoint there was when it began: a chain
/// deleted whole is missed by the chain that began after it.
async fn starts_vouch(
    conn: &mut AnyConnection,
    keys: &[AuditPublicKey],
) -> Result<Option<Broken>, StoreError> {
    let starts: Vec<Checkpoint> = sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE kind = 'start' ORDER BY time_ms"
    ))
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(Checkpoint::read)
    .filter_map(Result::transpose)
    .collect::<Result<_, _>>()?;
    for start in starts {
        // Signed, always: what it says of the records before the chains is relied on.
        if let Some(reason) = unsigned(keys, &start) {
            return Ok(Some(Broken::at(&start.chain, 0, reason)));
        }
        let Some((after, pos, hash)) = start.after else {
            continue;
        };
        let (found, pruned_to): (i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM audit_checkpoints
                     WHERE chain = $1 AND chain_pos = $2 AND hash = $3),
                    (SELECT max(chain_pos) FROM audit_checkpoints
                     WHERE chain = $1 AND kind = 'pruned')",
        )
        .bind(&after)
        .bind(pos)
        .bind(&hash)
        .fetch_one(&mut *conn)
        .await?;
        if found == 0 && pruned_to.is_none_or(|p| p < pos) {
            let reason = format!(
                "chain {after}, which this chain's start vouches for up to position {pos}, is gone or rewritten"
            );
            return Ok(Some(Broken::at(&start.chain, 0, reason)));
        }
    }
    Ok(None)
}

/// Every chained record has a whole link, and every superseded link was left by exactly
/// one record that names it (its new link's hash covers the name): a record deleted and
/// its link passed off as superseded is found. A link left by a record retention has
/// since pruned is named by nothing any more, which is expected.
async fn links_complete(conn: &mut AnyConnection) -> Result<Option<Broken>, StoreError> {
    let partial: Option<(i64, String)> = sqlx::query_as(
        "SELECT seq, request_id FROM requests WHERE chain IS NOT NULL
           AND (chain_pos IS NULL OR chain_pos < 1 OR prev_hash IS NULL OR hash IS NULL)
         ORDER BY seq LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((seq, request_id)) = partial {
        return Ok(Some(Broken {
            chain: None,
            position: None,
            seq: Some(seq),
            request_id: Some(request_id),
            reason: "its chain link is incomplete: edited".into(),
        }));
    }
    let pruned_seq: Option<i64> =
        sqlx::query_scalar("SELECT max(first_seq) FROM audit_checkpoints WHERE kind = 'pruned'")
            .fetch_one(&mut *conn)
            .await?;
    let orphan: Option<(String, i64)> = sqlx::query_as(
        "SELECT s.chain, s.chain_pos FROM audit_superseded s
         WHERE s.request_seq > $1
           AND (SELECT count(*) FROM requests r WHERE r.supersedes = s.hash)
             + (SELECT count(*) FROM audit_superseded t WHERE t.supersedes = s.hash) <> 1
         ORDER BY s.chain, s.chain_pos LIMIT 1",
    )
    .bind(pruned_seq.unwrap_or(0))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(orphan.map(|(chain, pos)| {
        let reason = format!(
            "the link at position {pos} claims to be superseded, but no record names it: a record deleted"
        );
        Broken::at(&chain, pos, reason)
    }))
}

/// Prunes the chained records past retention: for each chain, everything up to its last
/// checkpoint before `cutoff_ms`, which becomes a signed base the chain verifies from.
/// (A record goes with the link it sits at, whose time is after its decision: a record
/// amended late is kept until its new link is pruned.) Returns the records deleted.
pub async fn prune(store: &Store, signer: &AuditSigner, cutoff_ms: i64) -> Result<u64, StoreError> {
    let chains: Vec<String> = sqlx::query_scalar("SELECT DISTINCT chain FROM audit_checkpoints")
        .fetch_all(store.pool())
        .await?;
    let mut deleted = 0;
    for chain in chains {
        let last = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints
             WHERE chain = $1 AND time_ms < $2 ORDER BY chain_pos DESC LIMIT 1"
        ))
        .bind(&chain)
        .bind(cutoff_ms)
        .fetch_optional(store.pool())
        .await?;
        let Some(last) = last.as_ref().map(Checkpoint::read).transpose()?.flatten() else {
            continue;
        };
        if last.pos == 0 {
            continue;
        }
        if last.kind != Kind::Pruned {
            let deleting: Option<i64> = sqlx::query_scalar(
                "SELECT max(seq) FROM requests WHERE chain = $1 AND chain_pos <= $2",
            )
            .bind(&chain)
            .bind(last.pos)
            .fetch_one(store.pool())
            .await?;
            // The base first, in a transaction with the checkpoints it replaces: a prune
            // cut short leaves records a verification skips, never a chain without a base.
            let base = Checkpoint {
                time_ms: now_unix_ms(),
                kind: Kind::Pruned,
                after: None,
                // The newest record it deletes: links those records left elsewhere are
                // named by nothing once they are gone.
                first_seq: deleting,
                cutoff_ms: Some(cutoff_ms),
                ..last.clone()
            }
            .sign(signer);
            let mut tx = store.pool().begin().await?;
            base.insert(&mut tx).await?;
            sqlx::query(
                "DELETE FROM audit_checkpoints WHERE chain = $1 AND kind <> 'start'
                   AND (chain_pos < $2 OR (chain_pos = $2 AND kind = 'pruned' AND time_ms < $3))",
            )
            .bind(&chain)
            .bind(last.pos)
            .bind(base.time_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        loop {
            let done = sqlx::query(
                "DELETE FROM requests WHERE seq IN
                   (SELECT seq FROM requests WHERE chain = $1 AND chain_pos <= $2 LIMIT 5000)",
            )
            .bind(&chain)
            .bind(last.pos)
            .execute(store.pool())
            .await?;
            deleted += done.rows_affected();
            if done.rows_affected() < 5000 {
                break;
            }
        }
        sqlx::query("DELETE FROM audit_superseded WHERE chain = $1 AND chain_pos <= $2")
            .bind(&chain)
            .bind(last.pos)
            .execute(store.pool())
            .await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests;
