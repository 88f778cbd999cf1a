-- The store on PostgreSQL: the same tables as the SQLite migrations build, in one step.
-- Names are the references a policy file uses; foreign keys are deferred so one apply can
-- move references in any order inside its transaction. Integers are BIGINT and reals
-- DOUBLE PRECISION so both databases decode to the same Rust types.

CREATE TABLE targets (
    name TEXT PRIMARY KEY,
    url  TEXT NOT NULL
);

CREATE TABLE credentials (
    id            TEXT PRIMARY KEY,      -- random; the AEAD associated data of its secret
    name          TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL CHECK (kind IN ('target', 'proxy')),
    auth          TEXT,                  -- JSON: how a target secret is injected
    secret_ref    TEXT,                  -- JSON: where the secret came from (env/file/value)
    secret_sealed BYTEA,                 -- nonce || AES-256-GCM ciphertext || tag
    master_key_id TEXT,                  -- fingerprint of the master key that sealed it
    limits        TEXT                   -- JSON: a proxy credential's limits
);

CREATE TABLE proxy_keys (
    id            TEXT PRIMARY KEY,
    credential_id TEXT NOT NULL REFERENCES credentials(id) ON DELETE CASCADE
                  DEFERRABLE INITIALLY DEFERRED,
    key_hash      BYTEA NOT NULL UNIQUE, -- SHA-256 of the key; the key itself is never stored
    source        TEXT NOT NULL CHECK (source IN ('policy', 'issued')),
    label         TEXT,
    created_at    BIGINT NOT NULL,       -- unix seconds
    expires_at    BIGINT,
    revoked_at    BIGINT,
    spend_cap_usd DOUBLE PRECISION,
    spent_usd     DOUBLE PRECISION NOT NULL DEFAULT 0
);

CREATE TABLE proxies (
    name              TEXT PRIMARY KEY,
    target            TEXT NOT NULL REFERENCES targets(name) DEFERRABLE INITIALLY DEFERRED,
    target_credential TEXT NOT NULL REFERENCES credentials(name) DEFERRABLE INITIALLY DEFERRED,
    default_effect    TEXT NOT NULL CHECK (default_effect IN ('allow', 'deny')),
    limits            TEXT,              -- JSON
    cost              TEXT               -- JSON
);

CREATE TABLE proxy_bindings (
    proxy      TEXT NOT NULL REFERENCES proxies(name) ON DELETE CASCADE
               DEFERRABLE INITIALLY DEFERRED,
    credential TEXT NOT NULL REFERENCES credentials(name) ON DELETE CASCADE
               DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (proxy, credential)
);

CREATE TABLE rules (
    id         TEXT PRIMARY KEY,
    credential TEXT REFERENCES credentials(name) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    proxy      TEXT REFERENCES proxies(name) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    effect     TEXT NOT NULL CHECK (effect IN ('allow', 'deny')),
    methods    TEXT NOT NULL,            -- JSON array; empty = any method
    path       TEXT,                     -- regex on the upstream path
    priority   BIGINT NOT NULL,
    notes      TEXT,
    position   BIGINT NOT NULL,          -- order in the file: breaks priority ties
    conditions TEXT NOT NULL DEFAULT '{}',
    CHECK ((credential IS NULL) <> (proxy IS NULL))
);

CREATE TABLE requests (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      TEXT NOT NULL,
    time_ms         BIGINT NOT NULL,
    proxy           TEXT,
    target          TEXT,
    credential      TEXT,
    key_id          TEXT,
    run_label       TEXT,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    status          BIGINT,
    upstream_status BIGINT,
    decision        TEXT NOT NULL,
    rule_id         TEXT,
    latency_ms      DOUBLE PRECISION,
    cost_usd        DOUBLE PRECISION,
    bytes_in        BIGINT,
    bytes_out       BIGINT,
    retries         BIGINT,
    completed       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX requests_request_id ON requests (request_id);
CREATE INDEX requests_time ON requests (time_ms);
CREATE INDEX requests_proxy_time ON requests (proxy, time_ms);
