-- The request log: one row per request the gateway answered (no prompt or completion text).
CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,           -- X-Request-ID (client-supplied ids may repeat)
    created_at REAL NOT NULL,           -- unix seconds, when the request arrived
    endpoint TEXT NOT NULL,             -- e.g. /v1/chat/completions
    model TEXT,                         -- as the client named it
    backend TEXT,                       -- backend that answered (or failed)
    backend_model TEXT,                 -- model name sent to that backend
    status INTEGER NOT NULL,            -- HTTP status the client got
    error_code TEXT,                    -- our error code when status >= 400 or a stream failed
    stream INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL,
    overhead_ms REAL,
    ttft_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    estimated INTEGER NOT NULL DEFAULT 0 -- token counts estimated by the gateway, not reported by the backend
);
CREATE INDEX requests_created_at ON requests (created_at);
