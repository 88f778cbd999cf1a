-- Bumped by every change to the policy (apply, key issue, key revoke) in the same
-- transaction: replicas compare it to the version they run to know when to reload.
CREATE TABLE policy_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO policy_version (id, version) VALUES (1, 0);
