-- Rules may hold a request for a person: `effect: approve`.
ALTER TABLE rules DROP CONSTRAINT rules_effect_check;
ALTER TABLE rules ADD CONSTRAINT rules_effect_check CHECK (effect IN ('allow', 'deny', 'approve'));
