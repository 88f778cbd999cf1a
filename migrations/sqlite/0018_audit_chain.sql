-- The tamper-evident audit: each record carries a link of its replica's hash chain (the
-- chain's id, its position, the previous link's hash and its own), a record amended later
-- (completed, charged) moves to a new link and leaves its old one in `audit_superseded`,
-- and signed checkpoints vouch for a chain's head now and then.
ALTER TABLE requests ADD COLUMN chain TEXT;
ALTER TABLE requests ADD COLUMN chain_pos INTEGER;
ALTER TABLE requests ADD COLUMN prev_hash TEXT;
ALTER TABLE requests ADD COLUMN hash TEXT;
CREATE INDEX requests_chain ON requests (chain, chain_pos);

CREATE TABLE audit_superseded (
    chain       TEXT NOT NULL,
    chain_pos   INTEGER NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    request_seq INTEGER NOT NULL      -- the record, now at a later link
);
CREATE INDEX audit_superseded_chain ON audit_superseded (chain, chain_pos);

CREATE TABLE audit_checkpoints (
    chain          TEXT NOT NULL,
    chain_pos      INTEGER NOT NULL,  -- the link vouched for; 0 is the chain's start
    hash           TEXT NOT NULL,
    time_ms        INTEGER NOT NULL,
    kind           TEXT NOT NULL,     -- start | periodic | closed | pruned
    after_chain    TEXT,              -- start: the newest checkpoint there was
    after_pos      INTEGER,
    after_hash     TEXT,
    first_seq      INTEGER,           -- start: records up to here predate the chains
    cutoff_ms      INTEGER,           -- pruned: the retention cutoff
    key_id         TEXT NOT NULL,
    signature      TEXT NOT NULL
);
CREATE INDEX audit_checkpoints_chain ON audit_checkpoints (chain, chain_pos);
CREATE INDEX audit_checkpoints_time ON audit_checkpoints (time_ms);
