-- Guardrails (issue 16): a key's own guardrails, and each request's outcome per guardrail in the request log.

ALTER TABLE api_keys ADD COLUMN guardrails TEXT;      -- JSON array of names, e.g. ["pii"]; NULL: none
ALTER TABLE requests ADD COLUMN guardrails TEXT;      -- JSON object, e.g. {"pii": "redacted"}; NULL: none applied
