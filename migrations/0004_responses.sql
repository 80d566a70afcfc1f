-- Stored Responses (POST /v1/responses with store, the default): what GET, input_items and a later
-- previous_response_id need. Written before the final event is sent, so any worker can continue them.

CREATE TABLE responses (
    id TEXT PRIMARY KEY,                -- resp_...
    key_id TEXT,                        -- owner; another key cannot read or continue it
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,           -- responses.keep_days after creation
    status TEXT NOT NULL,
    input_items TEXT NOT NULL,          -- JSON: this request's input, as items with ids
    conversation TEXT NOT NULL,         -- JSON: every item of the chain up to and including this response
    response TEXT NOT NULL              -- JSON: the Response object
);
CREATE INDEX responses_expires_at ON responses (expires_at);
