-- The response cache shared by all workers (each worker keeps a small LRU in front of it), and the
-- request log's cache outcome.

CREATE TABLE response_cache (
    key TEXT PRIMARY KEY,               -- sha256 hex of the canonical request (see appliance/core/cache.py)
    scope TEXT,                         -- key id the entry belongs to; NULL when entries are shared
    endpoint TEXT NOT NULL,             -- chat/completions, completions or embeddings
    model TEXT NOT NULL,                -- backend/model that served the answer
    body BLOB NOT NULL,                 -- the answer JSON as the backend sent it (no gateway usage extras)
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    estimated INTEGER NOT NULL DEFAULT 0,   -- token counts estimated by the gateway, not reported by the backend
    size INTEGER NOT NULL,              -- bytes counted against cache.max_mb (body plus a fixed row overhead)
    created_at REAL NOT NULL,           -- unix seconds
    expires_at REAL NOT NULL,           -- unix seconds; swept in the background
    hits INTEGER NOT NULL DEFAULT 0,
    last_hit_at REAL                    -- unix seconds; NULL until the first hit (eviction then uses created_at)
);
CREATE INDEX response_cache_expires_at ON response_cache (expires_at);

ALTER TABLE requests ADD COLUMN cache TEXT;     -- HIT, MISS, BYPASS; NULL when the request was not cacheable
