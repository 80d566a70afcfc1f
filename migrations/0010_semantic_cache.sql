-- The semantic cache (appliance/core/cache.py): an entry stored for a chat request it may answer also holds
-- where it may be found by similarity and the vector it is compared by. Both live and go with the entry.

ALTER TABLE response_cache ADD COLUMN context TEXT;  -- sha256 of the request without its last user message
                                                     -- (route, parameters, tools, conversation, key scope and
                                                     -- embedding model): only entries of one context compare
ALTER TABLE response_cache ADD COLUMN vector BLOB;   -- the last user message's embedding: float32, unit length
CREATE INDEX response_cache_context ON response_cache (context, created_at) WHERE context IS NOT NULL;
