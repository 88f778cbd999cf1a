-- Rate limits of a proxy credential, across every proxy it uses (JSON, like proxies.limits).
ALTER TABLE credentials ADD COLUMN limits TEXT;
