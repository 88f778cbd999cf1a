-- Workload identity on proxy credentials (JWTs that stand for the credential), and MCP
-- proxies (`protocol: mcp` with per-tool limits and prices): JSON, NULL when unset.
ALTER TABLE credentials ADD COLUMN identity TEXT;
ALTER TABLE proxies ADD COLUMN mcp TEXT;
