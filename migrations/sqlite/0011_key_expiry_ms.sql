-- A key's expiry to the millisecond: a `--ttl 2s` key is refused 2 s after issue, not
-- up to a second later. `expires_at` (seconds, rounded up) stays for display.
ALTER TABLE proxy_keys ADD COLUMN expires_at_ms INTEGER;
-- (Expiries past the year 285,000 stay far in the future rather than overflow.)
UPDATE proxy_keys
SET expires_at_ms = CASE WHEN expires_at > 9000000000000 THEN 9000000000000000
                         ELSE expires_at * 1000 END
WHERE expires_at IS NOT NULL;
