-- Inline secrets (`secret: { value: ... }`) used to be kept in clear in the reference
-- beside their sealed copy. Keep only `sealed: true`; the sealed copy is the secret.
UPDATE credentials SET secret_ref = '{"sealed":true}'
WHERE secret_ref LIKE '{"value":%';
