-- The product's name from the catalog's `name` column, for reports only: it is not part of the
-- fingerprint, so a renamed product is not generated again.
ALTER TABLE jobs ADD COLUMN name TEXT;
