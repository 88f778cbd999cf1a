-- Response safety of a proxy (JSON): credential scrubbing and redacted fields.
ALTER TABLE proxies ADD COLUMN response TEXT;
