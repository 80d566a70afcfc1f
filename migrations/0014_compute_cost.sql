-- What a local model costs (README "What a local model costs"): each request's share of its backend's busy
-- seconds times the backend's cost_per_hour, beside the token prices, in the request log and the daily rollups;
-- and what a key's budget counts: token prices (as before), compute, or both.

ALTER TABLE requests ADD COLUMN compute_cost_usd REAL;  -- NULL: no backend with a cost_per_hour ran it
ALTER TABLE usage_daily ADD COLUMN compute_cost_usd REAL NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN budget_counts TEXT NOT NULL DEFAULT 'price'
    CHECK (budget_counts IN ('price', 'compute', 'both'));
