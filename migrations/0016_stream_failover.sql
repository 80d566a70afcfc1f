-- Mid-stream failover (README "Mid-stream failover"): a stream whose backend failed after its first token and
-- went on on another target records where it failed and where it went on.

ALTER TABLE requests ADD COLUMN failover TEXT;  -- JSON {"from": "backend/model", "to": ..., "at_token": n}; NULL: none
