-- Reuse of identical results. request_key: sha256 over what the provider is asked (task, model,
-- rendered prompt, inputs by content or by URL and validators, every parameter including the seed),
-- never the SKU; NULL when an input URL has no checked validators. reuse_of: the SKU of the row whose
-- paid request (or done result) this row shares; such a row is never claimed for a submit, and
-- becomes done when its files are copied from that row's and verified.
ALTER TABLE jobs ADD COLUMN request_key TEXT;
ALTER TABLE jobs ADD COLUMN reuse_of TEXT;
CREATE INDEX jobs_by_request_key ON jobs (request_key, state);
