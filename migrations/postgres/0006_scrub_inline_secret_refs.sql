-- Inline secrets (`secret: { value: ... }`) were once kept in clear in the reference
-- beside their sealed copy, by versions that wrote the reference whole. Keep only
-- `sealed: true`; the sealed copy is the secret. (SQLite's 0007 does the same.)
UPDATE credentials SET secret_ref = '{"sealed":true}'
WHERE secret_ref LIKE '{"value":%' OR secret_ref LIKE '{"value" :%' OR secret_ref LIKE '{ "value"%';
