"""KV memory: the paged slot pool, the req_to_token table and the prefix caches."""
