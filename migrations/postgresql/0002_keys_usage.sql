-- PostgreSQL's form of ../0002_keys_usage.sql: the install secret comes from gen_random_uuid (the server's
-- strong random source; two UUIDs give 244 random bits) as PostgreSQL has no randomblob. Every node reads the
-- same secret, so a key created on one is recognised by all.

CREATE TABLE install (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    secret BYTEA NOT NULL,
    created_at TEXT NOT NULL
);
INSERT INTO install (id, secret, created_at)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'),
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'));

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'user', 'read-only')),
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    models TEXT NOT NULL DEFAULT '["*"]',
    endpoints TEXT,
    expires_at DOUBLE PRECISION,
    enabled BIGINT NOT NULL DEFAULT 1,
    rpm BIGINT,
    tpm BIGINT,
    max_concurrent BIGINT,
    budget_usd DOUBLE PRECISION,
    budget_tokens BIGINT,
    budget_period TEXT CHECK (budget_period IN ('day', 'week', 'month')),
    metadata TEXT NOT NULL DEFAULT '{}',
    slot BIGINT NOT NULL UNIQUE,        -- two nodes creating keys at once: one insert fails, it takes the next
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);

ALTER TABLE requests ADD COLUMN key_id TEXT;
ALTER TABLE requests ADD COLUMN cached_tokens BIGINT;
ALTER TABLE requests ADD COLUMN input_cost_usd DOUBLE PRECISION;
ALTER TABLE requests ADD COLUMN output_cost_usd DOUBLE PRECISION;
ALTER TABLE requests ADD COLUMN cost_usd DOUBLE PRECISION;
CREATE INDEX requests_key_created ON requests (key_id, created_at);

CREATE TABLE usage_daily (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    backend TEXT NOT NULL,
    backend_model TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model, backend, backend_model)
);
