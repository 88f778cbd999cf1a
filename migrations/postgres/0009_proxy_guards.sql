-- A proxy's runaway guards (JSON): the duplicate window, derived idempotency keys.
ALTER TABLE proxies ADD COLUMN guards TEXT;
