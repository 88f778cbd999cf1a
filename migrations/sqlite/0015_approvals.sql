-- Requests held for a person by rules with `effect: approve`: what the person sees (never
-- a body value), and what they decided. An approval lets exactly its request (the
-- fingerprint: caller, method, path, query, body) through once, before it expires.
CREATE TABLE approvals (
    id           TEXT PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    proxy        TEXT NOT NULL,
    credential   TEXT,
    key_id       TEXT,
    run_label    TEXT,
    rule_id      TEXT NOT NULL,
    method       TEXT NOT NULL,
    path         TEXT NOT NULL,
    body_summary TEXT NOT NULL,
    status       TEXT NOT NULL,       -- pending | approved | denied | used
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    decided_by   TEXT,
    decided_ms   BIGINT,
    used_ms      BIGINT
);
CREATE INDEX approvals_fingerprint ON approvals (fingerprint, status);
CREATE INDEX approvals_created ON approvals (created_ms);
