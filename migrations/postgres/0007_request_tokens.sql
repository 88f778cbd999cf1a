-- LLM calls: the model the request named and the tokens the answer reported.
ALTER TABLE requests ADD COLUMN model TEXT;
ALTER TABLE requests ADD COLUMN input_tokens BIGINT;
ALTER TABLE requests ADD COLUMN output_tokens BIGINT;
ALTER TABLE requests ADD COLUMN cached_tokens BIGINT;
