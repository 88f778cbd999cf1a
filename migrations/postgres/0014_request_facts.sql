-- What a replay needs beyond the method and path: the values of the headers and query
-- parameters the rules read, and with a proxy's `audit.body_fields` the body fields they
-- read (JSON; secrets and long values withheld). See dataplane/facts.
ALTER TABLE requests ADD COLUMN facts TEXT;
ALTER TABLE proxies ADD COLUMN audit TEXT;
