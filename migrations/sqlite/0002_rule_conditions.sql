-- Header, query and JSON-body conditions of a rule, as JSON: {"headers":{},"query":{},"body":[]}.
ALTER TABLE rules ADD COLUMN conditions TEXT NOT NULL DEFAULT '{}';
