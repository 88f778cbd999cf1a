-- A run key's spend cap may reset each UTC day, week or month; and a key may have LLM
-- token budgets (per minute, per day).
ALTER TABLE proxy_keys ADD COLUMN cap_period TEXT;
ALTER TABLE proxy_keys ADD COLUMN tokens_per_minute BIGINT;
ALTER TABLE proxy_keys ADD COLUMN tokens_per_day BIGINT;
