-- Per-key upstream credentials (BYOK): a key's own API key for some backends, used instead of the backend's
-- configured api_key for that key's requests. Sealed with Fernet (appliance/accounts/credentials.py); the
-- Fernet key is a file in the data dir, not in this database, so a copy of the database alone reveals none.
ALTER TABLE api_keys ADD COLUMN upstream_keys TEXT NOT NULL DEFAULT '{}';  -- JSON: backend name -> Fernet token
