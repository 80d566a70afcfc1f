-- Fair admission (README "Fair admission"): a key's share weight when requests wait for a backend at capacity.
-- NULL: [admission] default_weight.

ALTER TABLE api_keys ADD COLUMN weight REAL CHECK (weight IS NULL OR weight > 0);
