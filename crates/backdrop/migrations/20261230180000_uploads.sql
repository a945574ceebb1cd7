-- Local input files uploaded to a provider's storage, by content: the same bytes are not uploaded
-- twice while their URL lives. `storage` is the storage endpoint (its REST base), so URLs from the
-- simulator are never handed to the real service. Times are unix milliseconds.
CREATE TABLE uploads (
    sha256       TEXT    NOT NULL,
    storage      TEXT    NOT NULL,
    url          TEXT    NOT NULL,
    bytes        INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    uploaded_at  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (sha256, storage)
);
