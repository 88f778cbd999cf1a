//! The audit's hash chain. Each replica's writer keeps a chain of its own: every record it
//! writes is a link, `hash = SHA-256(prev_hash "\n" chain "\n" position "\n" content)`,
//! where content is the record's stored fields as a compact JSON array
//! ([`Content::json`]). A record amended later (its completion or cost arrives after it
//! was written) moves to a new link of the amending writer's chain; its old link stays in
//! `audit_superseded`, so the chain it left has no hole. Every few seconds, on shutdown and
//! when retention prunes, a checkpoint signed with a key derived from the master key
//! vouches for a chain's head: a row edited, deleted or inserted behind latchkey's back
//! breaks a link, and rewriting every link after it breaks the signed checkpoint.
//! Verification is in `store/verify`, which reads what this writes.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row as _, Transaction};

use crate::base::clock::now_unix_ms;
use crate::base::crypto::{self, AuditSigner};
use crate::store::StoreError;

/// The previous hash of a chain's first link.
pub const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How often a writer signs its chain's head while it writes.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// The columns a record's hash covers, in the order [`Content::json`] writes them.
pub const CONTENT_COLUMNS: &str = "request_id, time_ms, proxy, target, credential, key_id,
    run_label, method, path, status, upstream_status, decision, rule_id, latency_ms,
    cost_usd, bytes_in, bytes_out, retries, completed, model, input_tokens, output_tokens,
    cached_tokens, facts, supersedes";
pub const CONTENT_LEN: usize = 25;

/// What a record's link covers: every stored field but the row number and the link.
#[derive(Debug, Clone, PartialEq)]
pub struct Content<'a> {
    pub request_id: Cow<'a, str>,
    pub time_ms: i64,
    pub proxy: Option<Cow<'a, str>>,
    pub target: Option<Cow<'a, str>>,
    pub credential: Option<Cow<'a, str>>,
    pub key_id: Option<Cow<'a, str>>,
    pub run_label: Option<Cow<'a, str>>,
    pub method: Cow<'a, str>,
    pub path: Cow<'a, str>,
    pub status: Option<i64>,
    pub upstream_status: Option<i64>,
    pub decision: Cow<'a, str>,
    pub rule_id: Option<Cow<'a, str>>,
    pub latency_ms: Option<f64>,
    pub cost_usd: Option<f64>,
    pub bytes_in: Option<i64>,
    pub bytes_out: Option<i64>,
    pub retries: Option<i64>,
    pub completed: i64,
    pub model: Option<Cow<'a, str>>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub facts: Option<Cow<'a, str>>,
    /// For a record amended after it was written: the hash of the link it left.
    pub supersedes: Option<Cow<'a, str>>,
}

impl Content<'_> {
    /// Read from a row selected with [`CONTENT_COLUMNS`].
    pub fn read(r: &AnyRow) -> Result<Content<'static>, sqlx::Error> {
        let text = |name: &str| -> Result<Option<Cow<'static, str>>, sqlx::Error> {
            Ok(r.try_get::<Option<String>, _>(name)?.map(Cow::Owned))
        };
        Ok(Content {
            request_id: Cow::Owned(r.try_get("request_id")?),
            time_ms: r.try_get("time_ms")?,
            proxy: text("proxy")?,
            target: text("target")?,
            credential: text("credential")?,
            key_id: text("key_id")?,
            run_label: text("run_label")?,
            method: Cow::Owned(r.try_get("method")?),
            path: Cow::Owned(r.try_get("path")?),
            status: r.try_get("status")?,
            upstream_status: r.try_get("upstream_status")?,
            decision: Cow::Owned(r.try_get("decision")?),
            rule_id: text("rule_id")?,
            latency_ms: r.try_get("latency_ms")?,
            cost_usd: r.try_get("cost_usd")?,
            bytes_in: r.try_get("bytes_in")?,
            bytes_out: r.try_get("bytes_out")?,
            retries: r.try_get("retries")?,
            completed: r.try_get("completed")?,
            model: text("model")?,
            input_tokens: r.try_get("input_tokens")?,
            output_tokens: r.try_get("output_tokens")?,
            cached_tokens: r.try_get("cached_tokens")?,
            facts: text("facts")?,
            supersedes: text("supersedes")?,
        })
    }

    /// Binds the fields in [`CONTENT_COLUMNS`] order.
    pub fn bind<'q>(
        &'q self,
        q: Query<'q, Any, AnyArguments<'q>>,
    ) -> Query<'q, Any, AnyArguments<'q>> {
        q.bind(self.request_id.as_ref())
            .bind(self.time_ms)
            .bind(self.proxy.as_deref())
            .bind(self.target.as_deref())
            .bind(self.credential.as_deref())
            .bind(self.key_id.as_deref())
            .bind(self.run_label.as_deref())
            .bind(self.method.as_ref())
            .bind(self.path.as_ref())
            .bind(self.status)
            .bind(self.upstream_status)
            .bind(self.decision.as_ref())
            .bind(self.rule_id.as_deref())
            .bind(self.latency_ms)
            .bind(self.cost_usd)
            .bind(self.bytes_in)
            .bind(self.bytes_out)
            .bind(self.retries)
            .bind(self.completed)
            .bind(self.model.as_deref())
            .bind(self.input_tokens)
            .bind(self.output_tokens)
            .bind(self.cached_tokens)
            .bind(self.facts.as_deref())
            .bind(self.supersedes.as_deref())
    }

    /// The compact JSON array a link hashes: strings, integers and nulls only, so any
    /// language writes it byte for byte alike. The two decimals go in as integers: the
    /// latency in microseconds, the cost in micro-dollars.
    pub fn json(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push('[');
        let text = |out: &mut String, s: Option<&str>| match s {
            Some(s) => out.push_str(&serde_json::to_string(s).expect("a string serializes")),
            None => out.push_str("null"),
        };
        let int = |out: &mut String, n: Option<i64>| match n {
            Some(n) => write!(out, "{n}").expect("to a String"),
            None => out.push_str("null"),
        };
        let scaled = |v: Option<f64>, by: f64| v.map(|v| (v * by).round() as i64);
        // Typed by its length: a column added to CONTENT_COLUMNS and not here fails to build.
        let fields: [Field; CONTENT_LEN] = [
            Field::Text(Some(&self.request_id)),
            Field::Int(Some(self.time_ms)),
            Field::Text(self.proxy.as_deref()),
            Field::Text(self.target.as_deref()),
            Field::Text(self.credential.as_deref()),
            Field::Text(self.key_id.as_deref()),
            Field::Text(self.run_label.as_deref()),
            Field::Text(Some(&self.method)),
            Field::Text(Some(&self.path)),
            Field::Int(self.status),
            Field::Int(self.upstream_status),
            Field::Text(Some(&self.decision)),
            Field::Text(self.rule_id.as_deref()),
            Field::Int(scaled(self.latency_ms, 1e3)),
            Field::Int(scaled(self.cost_usd, 1e6)),
            Field::Int(self.bytes_in),
            Field::Int(self.bytes_out),
            Field::Int(self.retries),
            Field::Int(Some(self.completed)),
            Field::Text(self.model.as_deref()),
            Field::Int(self.input_tokens),
            Field::Int(self.output_tokens),
            Field::Int(self.cached_tokens),
            Field::Text(self.facts.as_deref()),
            Field::Text(self.supersedes.as_deref()),
        ];
        for (i, field) in fields.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match field {
                Field::Text(s) => text(&mut out, s),
                Field::Int(n) => int(&mut out, n),
            }
        }
        out.push(']');
        out
    }
}

enum Field<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
}

/// A link's hash.
pub fn link_hash(prev: &str, chain: &str, pos: i64, content: &str) -> String {
    let mut position = [0u8; 20];
    let position = {
        use std::io::Write as _;
        let mut cursor = std::io::Cursor::new(&mut position[..]);
        write!(cursor, "{pos}").expect("an i64 fits in 20 bytes");
        let len = cursor.position() as usize;
        &position[..len]
    };
    crypto::sha256_hex(&[
        prev.as_bytes(),
        b"\n",
        chain.as_bytes(),
        b"\n",
        position,
        b"\n",
        content.as_bytes(),
    ])
}

/// A link as stored: where it is and what it hashes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub chain: String,
    pub pos: i64,
    pub prev_hash: String,
    pub hash: String,
}

/// One writer's chain: its id, its last link and when its head was last signed. The
/// writer keeps the committed state; a transaction works on a copy, kept if it commits.
#[derive(Debug, Clone)]
pub struct Chain {
    pub id: String,
    pub pos: i64,
    pub head: String,
    started: bool,
    signed_pos: i64,
    signed_at: Instant,
    signer: AuditSigner,
}

impl Chain {
    /// A new chain; it starts (a signed start checkpoint) with its first write.
    pub fn new(signer: AuditSigner) -> Self {
        Self {
            id: crypto::random_id("chain"),
            pos: 0,
            head: ZERO.to_owned(),
            started: false,
            signed_pos: 0,
            signed_at: Instant::now(),
            signer,
        }
    }

    /// The next link, for `content`.
    pub fn link(&mut self, content: &Content) -> Link {
        self.pos += 1;
        let hash = link_hash(&self.head, &self.id, self.pos, &content.json());
        let prev_hash = std::mem::replace(&mut self.head, hash.clone());
        Link {
            chain: self.id.clone(),
            pos: self.pos,
            prev_hash,
            hash,
        }
    }

    /// Links written since the last checkpoint.
    pub fn unsigned(&self) -> bool {
        self.pos > self.signed_pos
    }

    pub fn checkpoint_due(&self) -> bool {
        self.unsigned() && self.signed_at.elapsed() >= CHECKPOINT_EVERY
    }

    /// Starts the chain if this is its first write: a start checkpoint naming the newest
    /// checkpoint of any chain (so a chain deleted whole is missed by the next one) and
    /// the last record written before any chain.
    pub async fn begin(&mut self, tx: &mut Transaction<'_, Any>) -> Result<(), StoreError> {
        if self.started {
            return Ok(());
        }
        let after: Option<(String, i64, String)> = sqlx::query_as(
            "SELECT chain, chain_pos, hash FROM audit_checkpoints
             ORDER BY time_ms DESC, chain_pos DESC LIMIT 1",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let first_seq: Option<i64> =
            sqlx::query_scalar("SELECT max(seq) FROM requests WHERE chain IS NULL")
                .fetch_one(&mut **tx)
                .await?;
        let start = Checkpoint {
            chain: self.id.clone(),
            pos: 0,
            hash: ZERO.to_owned(),
            time_ms: now_unix_ms(),
            kind: Kind::Start,
            after,
            first_seq: Some(first_seq.unwrap_or(0)),
            cutoff_ms: None,
            key_id: String::new(),
            signature: String::new(),
        };
        start.sign(&self.signer).insert(tx).await?;
        self.started = true;
        Ok(())
    }

    /// Signs the head as `kind` (periodic, or closed when the writer stops).
    pub async fn checkpoint(
        &mut self,
        tx: &mut Transaction<'_, Any>,
        kind: Kind,
    ) -> Result<(), StoreError> {
        let checkpoint = Checkpoint {
            chain: self.id.clone(),
            pos: self.pos,
            hash: self.head.clone(),
            time_ms: now_unix_ms(),
            kind,
            after: None,
            first_seq: None,
            cutoff_ms: None,
            key_id: String::new(),
            signature: String::new(),
        };
        checkpoint.sign(&self.signer).insert(tx).await?;
        self.signed_pos = self.pos;
        self.signed_at = Instant::now();
        Ok(())
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// A new chain by the same signer, for a writer whose transaction failed: whether
    /// it committed is not known, so its positions are not reused.
    pub fn restart(&self) -> Self {
        Self::new(self.signer.clone())
    }
}

/// Moves an amended record to a new link: `amended` is the row after its update,
/// selected with `seq`, the link columns and [`CONTENT_COLUMNS`]. Its old link, if it had
/// one, is kept as superseded.
pub async fn relink(
    tx: &mut Transaction<'_, Any>,
    chain: &mut Chain,
    amended: &AnyRow,
) -> Result<(), StoreError> {
    let seq: i64 = amended.try_get("seq")?;
    let mut content = Content::read(amended)?;
    let old = read_link(amended)?;
    if let Some(old) = &old {
        sqlx::query(
            "INSERT INTO audit_superseded (chain, chain_pos, prev_hash, hash, request_seq,
                                           supersedes)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&old.chain)
        .bind(old.pos)
        .bind(&old.prev_hash)
        .bind(&old.hash)
        .bind(seq)
        .bind(content.supersedes.as_deref())
        .execute(&mut **tx)
        .await?;
    }
    content.supersedes = old.map(|l| Cow::Owned(l.hash));
    let link = chain.link(&content);
    sqlx::query(
        "UPDATE requests SET chain = $1, chain_pos = $2, prev_hash = $3, hash = $4,
                             supersedes = $5
         WHERE seq = $6",
    )
    .bind(&link.chain)
    .bind(link.pos)
    .bind(&link.prev_hash)
    .bind(&link.hash)
    .bind(content.supersedes.as_deref())
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A row's link, if it has one (records written before the chains have none).
pub fn read_link(r: &AnyRow) -> Result<Option<Link>, sqlx::Error> {
    let chain: Option<String> = r.try_get("chain")?;
    let Some(chain) = chain else { return Ok(None) };
    Ok(Some(Link {
        chain,
        pos: r.try_get::<Option<i64>, _>("chain_pos")?.unwrap_or(-1),
        prev_hash: r
            .try_get::<Option<String>, _>("prev_hash")?
            .unwrap_or_default(),
        hash: r.try_get::<Option<String>, _>("hash")?.unwrap_or_default(),
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Start,
    Periodic,
    Closed,
    Pruned,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Periodic => "periodic",
            Kind::Closed => "closed",
            Kind::Pruned => "pruned",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Kind::Start, Kind::Periodic, Kind::Closed, Kind::Pruned]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A signed statement that a chain's link at `pos` hashed to `hash` at `time_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub chain: String,
    pub pos: i64,
    pub hash: String,
    pub time_ms: i64,
    pub kind: Kind,
    /// A start's newest checkpoint of any chain then: chain, position, hash.
    pub after: Option<(String, i64, String)>,
    /// A start's last record written before any chain.
    pub first_seq: Option<i64>,
    /// A prune's retention cutoff.
    pub cutoff_ms: Option<i64>,
    pub key_id: String,
    /// Ed25519, hex.
    pub signature: String,
}

pub const CHECKPOINT_COLUMNS: &str = "chain, chain_pos, hash, time_ms, kind, after_chain,
    after_pos, after_hash, first_seq, cutoff_ms, key_id, signature";

impl Checkpoint {
    /// What is signed: every field, one a line.
    pub fn message(&self) -> String {
        let after = self
            .after
            .as_ref()
            .map(|(c, p, h)| format!("{c}:{p}:{h}"))
            .unwrap_or_default();
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        format!(
            "latchkey audit checkpoint v1\n{}\n{}\n{}\n{}\n{}\n{after}\n{}\n{}",
            self.chain,
            self.pos,
            self.hash,
            self.time_ms,
            self.kind.as_str(),
            opt(self.first_seq),
            opt(self.cutoff_ms)
        )
    }

    pub fn sign(mut self, signer: &AuditSigner) -> Self {
        self.key_id = signer.public_key().id;
        self.signature = crypto::hex(&signer.sign(self.message().as_bytes()));
        self
    }

    pub async fn insert(&self, tx: &mut Transaction<'_, Any>) -> Result<(), StoreError> {
        let (after_chain, after_pos, after_hash) = match &self.after {
            Some((c, p, h)) => (Some(c.as_str()), Some(*p), Some(h.as_str())),
            None => (None, None, None),
        };
        sqlx::query(&format!(
            "INSERT INTO audit_checkpoints ({CHECKPOINT_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&self.chain)
        .bind(self.pos)
        .bind(&self.hash)
        .bind(self.time_ms)
        .bind(self.kind.as_str())
        .bind(after_chain)
        .bind(after_pos)
        .bind(after_hash)
        .bind(self.first_seq)
        .bind(self.cutoff_ms)
        .bind(&self.key_id)
        .bind(&self.signature)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Read from a row selected with [`CHECKPOINT_COLUMNS`]; `None` for an unknown kind.
    pub fn read(r: &AnyRow) -> Result<Option<Self>, sqlx::Error> {
        let Some(kind) = Kind::parse(&r.try_get::<String, _>("kind")?) else {
            return Ok(None);
        };
        let after_chain: Option<String> = r.try_get("after_chain")?;
        let after_pos: Option<i64> = r.try_get("after_pos")?;
        let after_hash: Option<String> = r.try_get("after_hash")?;
        Ok(Some(Self {
            chain: r.try_get("chain")?,
            pos: r.try_get("chain_pos")?,
            hash: r.try_get("hash")?,
            time_ms: r.try_get("time_ms")?,
            kind,
            after: after_chain
                .zip(after_pos)
                .zip(after_hash)
                .map(|((c, p), h)| (c, p, h)),
            first_seq: r.try_get("first_seq")?,
            cutoff_ms: r.try_get("cutoff_ms")?,
            key_id: r.try_get("key_id")?,
            signature: r.try_get("signature")?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> Content<'static> {
        Content {
            request_id: "req-1".into(),
            time_ms: 1_790_000_000_123,
            proxy: Some("openai".into()),
            target: None,
            credential: Some("cred \"quoted\"\n".into()),
            key_id: None,
            run_label: None,
            method: "POST".into(),
            path: "/v1/ünïcode".into(),
            status: Some(200),
            upstream_status: None,
            decision: "allow".into(),
            rule_id: None,
            latency_ms: Some(12.3456),
            cost_usd: Some(0.1 + 0.2),
            bytes_in: Some(10),
            bytes_out: None,
            retries: Some(0),
            completed: 1,
            model: None,
            input_tokens: Some(5),
            output_tokens: None,
            cached_tokens: None,
            facts: None,
            supersedes: None,
        }
    }

    #[test]
    fn content_is_a_compact_array_of_strings_integers_and_nulls() {
        let json = content().json();
        assert_eq!(
            json,
            r#"["req-1",1790000000123,"openai",null,"cred \"quoted\"\n",null,null,"POST","/v1/ünïcode",200,null,"allow",null,12346,300000,10,null,0,1,null,5,null,null,null,null]"#
        );
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.len(), CONTENT_LEN);
    }

    #[test]
    fn links_chain_and_any_change_changes_the_hash() {
        let mut chain = Chain::new(AuditSigner::ephemeral());
        let a = chain.link(&content());
        let b = chain.link(&content());
        assert_eq!((a.pos, b.pos), (1, 2));
        assert_eq!(a.prev_hash, ZERO);
        assert_eq!(b.prev_hash, a.hash);
        assert_eq!(a.hash, link_hash(ZERO, &chain.id, 1, &content().json()));
        assert_ne!(a.hash, b.hash, "the position is hashed");
        let mut edited = content();
        edited.status = Some(201);
        assert_ne!(link_hash(ZERO, &chain.id, 1, &edited.json()), a.hash);
    }

    #[test]
    fn a_checkpoint_verifies_and_any_field_changed_does_not() {
        let signer = AuditSigner::ephemeral();
        let cp = Checkpoint {
            chain: "chain_1".into(),
            pos: 7,
            hash: ZERO.into(),
            time_ms: 5,
            kind: Kind::Start,
            after: Some(("chain_0".into(), 3, ZERO.into())),
            first_seq: Some(0),
            cutoff_ms: None,
            key_id: String::new(),
            signature: String::new(),
        }
        .sign(&signer);
        let public = signer.public_key();
        let sig = |c: &Checkpoint| base16(&c.signature);
        assert!(public.verifies(cp.message().as_bytes(), &sig(&cp)));
        let mut moved = cp.clone();
        moved.pos = 8;
        assert!(!public.verifies(moved.message().as_bytes(), &sig(&moved)));
        let mut relabelled = cp.clone();
        relabelled.kind = Kind::Pruned;
        assert!(!public.verifies(relabelled.message().as_bytes(), &sig(&relabelled)));
    }

    fn base16(s: &str) -> Vec<u8> {
        crypto::unhex(s).unwrap()
    }
}
