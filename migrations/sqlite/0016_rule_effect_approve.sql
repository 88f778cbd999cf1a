-- Rules may hold a request for a person: `effect: approve`. SQLite cannot change a CHECK
-- constraint, so the table is rebuilt with the same columns and rows.
CREATE TABLE rules_new (
    id         TEXT PRIMARY KEY,
    credential TEXT REFERENCES credentials(name) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    proxy      TEXT REFERENCES proxies(name) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    effect     TEXT NOT NULL CHECK (effect IN ('allow', 'deny', 'approve')),
    methods    TEXT NOT NULL,            -- JSON array; empty = any method
    path       TEXT,                     -- regex on the upstream path
    priority   INTEGER NOT NULL,
    notes      TEXT,
    position   INTEGER NOT NULL,         -- order in the file: breaks priority ties
    conditions TEXT NOT NULL DEFAULT '{}',
    CHECK ((credential IS NULL) <> (proxy IS NULL))
);
INSERT INTO rules_new (id, credential, proxy, effect, methods, path, priority, notes, position,
                       conditions)
SELECT id, credential, proxy, effect, methods, path, priority, notes, position, conditions
FROM rules;
DROP TABLE rules;
ALTER TABLE rules_new RENAME TO rules;
