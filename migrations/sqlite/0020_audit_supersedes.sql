-- An amended record's new link names the link it replaced (hashed with the record), and a
-- superseded link the one it had replaced: every superseded link must be named once, so a
-- record cannot be deleted and passed off as amended.
ALTER TABLE requests ADD COLUMN supersedes TEXT;
ALTER TABLE audit_superseded ADD COLUMN supersedes TEXT;
CREATE INDEX requests_supersedes ON requests (supersedes) WHERE supersedes IS NOT NULL;
CREATE INDEX audit_superseded_supersedes ON audit_superseded (supersedes)
    WHERE supersedes IS NOT NULL;
