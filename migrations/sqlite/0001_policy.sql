-- The policy store. Names are the references a policy file uses; foreign keys are
-- deferred so one apply can move references in any order inside its transaction.

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
    secret_sealed BLOB,                  -- nonce || AES-256-GCM ciphertext || tag
    master_key_id TEXT                   -- fingerprint of the master key that sealed it
);

CREATE TABLE proxy_keys (
    id            TEXT PRIMARY KEY,
    credential_id TEXT NOT NULL REFERENCES credentials(id) ON DELETE CASCADE
                  DEFERRABLE INITIALLY DEFERRED,
    key_hash      BLOB NOT NULL UNIQUE,  -- SHA-256 of the key; the key itself is never stored
    source        TEXT NOT NULL CHECK (source IN ('policy', 'issued')),
    label         TEXT,
    created_at    INTEGER NOT NULL,      -- unix seconds
    expires_at    INTEGER,
    revoked_at    INTEGER,
    spend_cap_usd REAL
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
    priority   INTEGER NOT NULL,
    notes      TEXT,
    position   INTEGER NOT NULL,         -- order in the file: breaks priority ties
    CHECK ((credential IS NULL) <> (proxy IS NULL))
);
