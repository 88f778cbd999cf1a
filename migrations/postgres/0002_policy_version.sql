-- Bumped by every change to the policy (apply, key issue, key revoke) in the same
-- transaction, which also notifies `latchkey_policy`: replicas reload on the
-- notification and compare the version on a timer as a safety net.
CREATE TABLE policy_version (
    id      BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO policy_version (id, version) VALUES (1, 0);
