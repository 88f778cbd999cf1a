-- Inline secrets (`secret: { value: ... }`) used to be kept in clear in the reference
-- beside their sealed copy. Keep only a marker; the sealed copy is the secret.
UPDATE credentials SET secret_ref = '{"value":"<sealed>"}'
WHERE secret_ref LIKE '{"value":%';
