-- The request log: one row per request latchkey decided, allowed or denied. The decision
-- is written first; Envoy's access log completes the row (status, latency, bytes) when
-- the response is done. `seq` orders rows; `request_id` joins the two halves.
CREATE TABLE requests (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL,
    time_ms         INTEGER NOT NULL,   -- unix milliseconds of the decision
    proxy           TEXT,
    target          TEXT,
    credential      TEXT,
    key_id          TEXT,
    run_label       TEXT,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,      -- the upstream path, without the query
    status          INTEGER,            -- what the agent got; NULL until known
    upstream_status INTEGER,            -- NULL when never forwarded or no answer came
    decision        TEXT NOT NULL,      -- 'allow' or the denial's type
    rule_id         TEXT,
    latency_ms      REAL,
    cost_usd        REAL,
    bytes_in        INTEGER,
    bytes_out       INTEGER,
    retries         INTEGER,
    completed       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX requests_request_id ON requests (request_id);
CREATE INDEX requests_time ON requests (time_ms);
CREATE INDEX requests_proxy_time ON requests (proxy, time_ms);
