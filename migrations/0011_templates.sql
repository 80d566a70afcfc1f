-- Prompt templates (appliance/core/templates.py): a template is an id and its immutable, numbered versions.
-- A version is never changed; a new one is added (latest = highest number). Deleting a template deletes all.

CREATE TABLE templates (
    id TEXT PRIMARY KEY,                -- a slug: [a-z0-9][a-z0-9_.-]{0,63}
    latest_version INTEGER NOT NULL,    -- the highest version number, the one a request gets when it names none
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL            -- when the latest version was added
);

CREATE TABLE template_versions (
    template_id TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version INTEGER NOT NULL,           -- 1, 2, ...
    messages TEXT NOT NULL,             -- JSON: chat messages whose text may hold {{variable}} placeholders
    variables TEXT NOT NULL,            -- JSON: name -> {"default": ..., "description": ...}; no default: required
    description TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (template_id, version)
);

-- The template a request used, as "id@version" (NULL for the many that use none).
ALTER TABLE requests ADD COLUMN template TEXT;
