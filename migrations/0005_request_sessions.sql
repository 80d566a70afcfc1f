-- The session a request belongs to: the Responses WebSocket connection's id (X-Appliance-Session-ID on the
-- handshake, or a generated wsresp_<uuid>), or the X-Appliance-Session-ID an HTTP client sent. NULL for the rest.

ALTER TABLE requests ADD COLUMN session_id TEXT;
CREATE INDEX requests_session_id ON requests (session_id) WHERE session_id IS NOT NULL;
