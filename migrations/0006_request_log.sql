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
