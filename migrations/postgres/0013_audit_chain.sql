-- The tamper-evident audit: each record carries a link of its replica's hash chain (the
-- chain's id, its position, the previous link's hash and its own), a record amended later
-- (completed, charged) moves to a new link and leaves its old one in `audit_superseded`,
-- and signed checkpoints vouch for a chain's head now and then.
ALTER TABLE requests ADD COLUMN chain TEXT;
ALTER TABLE requests ADD COLUMN chain_pos BIGINT;
ALTER TABLE requests ADD COLUMN prev_hash TEXT;
ALTER TABLE requests ADD COLUMN hash TEXT;
CREATE INDEX requests_chain ON requests (chain, chain_pos);

CREATE TABLE audit_superseded (
    chain       TEXT NOT NULL,
    chain_pos   BIGINT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    request_seq BIGINT NOT NULL      -- the record, now at a later link
);
CREATE INDEX audit_superseded_chain ON audit_superseded (chain, chain_pos);

CREATE TABLE audit_checkpoints (
    chain          TEXT NOT NULL,
    chain_pos      BIGINT NOT NULL,  -- the link vouched for; 0 is the chain's start
    hash           TEXT NOT NULL,
    time_ms        BIGINT NOT NULL,
    kind           TEXT NOT NULL,     -- start | periodic | closed | pruned
    after_chain    TEXT,              -- start: the newest checkpoint there was
    after_pos      BIGINT,
    after_hash     TEXT,
    first_seq      BIGINT,           -- start: records up to here predate the chains
    cutoff_ms      BIGINT,           -- pruned: the retention cutoff
    key_id         TEXT NOT NULL,
    signature      TEXT NOT NULL
);
CREATE INDEX audit_checkpoints_chain ON audit_checkpoints (chain, chain_pos);
CREATE INDEX audit_checkpoints_time ON audit_checkpoints (time_ms);
