-- Files (/v1/files) and Batches (/v1/batches), run by the appliance's own batch runner.
-- File bytes live on disk under data_dir/files/, one file per id; these rows are their metadata.

CREATE TABLE files (
    id TEXT PRIMARY KEY,                -- file-...
    owner_key_id TEXT NOT NULL,         -- the key that uploaded it (or the batch's key, for batch output)
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,                 -- NULL: kept until deleted
    status TEXT NOT NULL DEFAULT 'processed'
);
CREATE INDEX files_owner_created ON files (owner_key_id, created_at, id);
CREATE INDEX files_expires_at ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE batches (
    id TEXT PRIMARY KEY,                -- batch_...
    owner_key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL DEFAULT '24h',
    status TEXT NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress', 'finalizing',
                                           'completed', 'expired', 'cancelling', 'cancelled')),
    output_file_id TEXT,
    error_file_id TEXT,
    errors_json TEXT,
    metadata_json TEXT,
    output_expires_s INTEGER,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    expires_at INTEGER NOT NULL,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batches_owner_created ON batches (owner_key_id, created_at DESC, id DESC);
CREATE INDEX batches_active ON batches (status)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- One row per input line: its result is written once, in the same transaction as the batch's counters,
-- so output holds exactly one line per custom_id whatever restarts happen in between.
CREATE TABLE batch_requests (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,              -- 1-based line number in the input file
    custom_id TEXT NOT NULL,
    body_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'expired')),
    attempts INTEGER NOT NULL DEFAULT 0,  -- also the fencing token of a claim: a stale runner's result is dropped
    lease_until INTEGER,
    backend_id TEXT,
    request_id TEXT,
    status_code INTEGER,
    response_json TEXT,
    error_json TEXT,
    finished_at INTEGER,
    PRIMARY KEY (batch_id, line),
    UNIQUE (batch_id, custom_id)
) WITHOUT ROWID;
CREATE INDEX batch_requests_todo ON batch_requests (batch_id, state, line);

-- Exactly one batch runner per data dir: whoever holds this row (renewed while it runs).
CREATE TABLE runner_lease (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);

-- Ledger rows of batch lines name their batch (NULL for interactive requests).
ALTER TABLE requests ADD COLUMN batch_id TEXT;
