-- Only records still waiting for their completion (and a cost, which always comes
-- before the completion) are looked up by request id. Most records are written already complete and stay out of this index: a
-- random request id put every record's insert on a page of its own, the audit writer's
-- largest cost.
DROP INDEX requests_request_id;
CREATE INDEX requests_open ON requests (request_id) WHERE completed = 0;
