-- When the provider accepted the row's current request, or answered it with its result: its output
-- URLs cannot have been made before, so they work at least until this time plus the provider's URL
-- lifetime (seedance 24 h, fal 7 days). `status` lists paid rows not yet downloaded by that deadline.
ALTER TABLE jobs ADD COLUMN accepted_at INTEGER;
