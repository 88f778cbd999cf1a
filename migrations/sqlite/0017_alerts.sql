-- Anomaly alerts (`guards.alerts`): what fired, against which baseline, what was done,
-- and whether every webhook took it. A key quarantined by one is refused everywhere until
-- a person releases it.
CREATE TABLE alerts (
    id          TEXT PRIMARY KEY,
    time_ms     BIGINT NOT NULL,
    kind        TEXT NOT NULL,        -- requests | denials | errors | spend_near_cap | new_path
    proxy       TEXT NOT NULL,
    key_id      TEXT,                 -- null: the proxy as a whole
    run_label   TEXT,
    observed    DOUBLE PRECISION NOT NULL,
    baseline    DOUBLE PRECISION NOT NULL,
    threshold   DOUBLE PRECISION NOT NULL,
    message     TEXT NOT NULL,
    quarantined BIGINT NOT NULL,      -- 1: the key was quarantined by it
    delivery    TEXT NOT NULL         -- none | pending | delivered | dead_letter
);
CREATE INDEX alerts_time ON alerts (time_ms);

-- Webhook posts that failed every attempt: kept whole, for a person to read or resend.
CREATE TABLE webhook_dead_letters (
    id        TEXT PRIMARY KEY,
    time_ms   BIGINT NOT NULL,
    webhook   TEXT NOT NULL,          -- scheme and host only: a hook's path is its secret
    event_id  TEXT NOT NULL,          -- the alert's or the approval's id
    payload   TEXT NOT NULL,
    attempts  BIGINT NOT NULL,
    error     TEXT NOT NULL
);
CREATE INDEX webhook_dead_letters_time ON webhook_dead_letters (time_ms);

ALTER TABLE proxy_keys ADD COLUMN quarantined_at BIGINT;
ALTER TABLE proxy_keys ADD COLUMN quarantine_alert TEXT;
