-- API keys, the per-install secret their hashes are keyed with, cost columns and daily usage rollups.

CREATE TABLE install (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL,               -- HMAC key for API-key hashes; in the database so backups carry it
    created_at TEXT NOT NULL
);
INSERT INTO install (id, secret, created_at) VALUES (1, randomblob(32), datetime('now'));

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,                -- key_<hex>; never secret
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'user', 'read-only')),
    hash TEXT NOT NULL UNIQUE,          -- HMAC-SHA256(install secret, key); the key itself is never stored
    prefix TEXT NOT NULL,               -- the first characters, to recognise a key in listings
    models TEXT NOT NULL DEFAULT '["*"]',   -- JSON list of glob patterns
    endpoints TEXT,                     -- JSON list of path patterns; NULL: everything except /admin
    expires_at REAL,                    -- unix seconds
    enabled INTEGER NOT NULL DEFAULT 1,
    rpm INTEGER,
    tpm INTEGER,
    max_concurrent INTEGER,
    budget_usd REAL,
    budget_tokens INTEGER,
    budget_period TEXT CHECK (budget_period IN ('day', 'week', 'month')),
    metadata TEXT NOT NULL DEFAULT '{}',
    slot INTEGER NOT NULL UNIQUE,       -- row of the live limit counters (shared memory) this key uses
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);

ALTER TABLE requests ADD COLUMN key_id TEXT;
ALTER TABLE requests ADD COLUMN cached_tokens INTEGER;
ALTER TABLE requests ADD COLUMN input_cost_usd REAL;
ALTER TABLE requests ADD COLUMN output_cost_usd REAL;
ALTER TABLE requests ADD COLUMN cost_usd REAL;
CREATE INDEX requests_key_created ON requests (key_id, created_at);

-- One row per UTC day, key, requested model and serving backend model: fed by the buffered writer.
CREATE TABLE usage_daily (
    day TEXT NOT NULL,                  -- YYYY-MM-DD, UTC
    key_id TEXT NOT NULL,               -- 'anonymous' when auth is off
    model TEXT NOT NULL,                -- as requested
    backend TEXT NOT NULL,
    backend_model TEXT NOT NULL,        -- what served (prices attach here)
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model, backend, backend_model)
);
