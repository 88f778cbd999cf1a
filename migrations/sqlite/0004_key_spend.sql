-- What each key's requests have cost so far (USD), kept current off the request path.
ALTER TABLE proxy_keys ADD COLUMN spent_usd REAL NOT NULL DEFAULT 0;
