-- Observability: request and answer bodies (only with [log] store_bodies = true, cut to max_body_kb),
-- cache hits in the daily rollups (the status page's hit rate), and indexes for /admin/requests filters.

CREATE TABLE request_bodies (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,           -- with created_at, names the requests row (ids sent by clients may repeat)
    created_at REAL NOT NULL,
    request BLOB,                       -- the JSON body the client sent
    response BLOB,                      -- the whole answer the client got; NULL for streams
    truncated INTEGER NOT NULL DEFAULT 0    -- 1 when either was cut to max_body_kb
);
CREATE INDEX request_bodies_request ON request_bodies (request_id, created_at);
CREATE INDEX request_bodies_created_at ON request_bodies (created_at);

ALTER TABLE usage_daily ADD COLUMN cache_hits INTEGER NOT NULL DEFAULT 0;

CREATE INDEX requests_model ON requests (model);
CREATE INDEX requests_status ON requests (status);

-- Requests per minute, in total (backend '') and per backend that was asked (not cache hits, not 429s):
-- fed by the buffered writer, so the status page's hour of traffic is 60 rows, whatever the load.
CREATE TABLE traffic_minute (
    minute INTEGER NOT NULL,            -- unix seconds // 60, UTC
    backend TEXT NOT NULL,              -- '' for every request
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,  -- status >= 400, or a stream that ended in an error event
    tokens INTEGER NOT NULL DEFAULT 0,  -- prompt + completion
    PRIMARY KEY (minute, backend)
);
