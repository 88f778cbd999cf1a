-- A key's expiry to the millisecond: a `--ttl 2s` key is refused 2 s after issue, not
-- up to a second later. `expires_at` (seconds, rounded up) stays for display.
ALTER TABLE proxy_keys ADD COLUMN expires_at_ms BIGINT;
UPDATE proxy_keys SET expires_at_ms = expires_at * 1000 WHERE expires_at IS NOT NULL;
