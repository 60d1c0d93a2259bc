-- Mooring PostgreSQL schema v1: devices and tokens. Applied once, inside one transaction under
-- an advisory lock, by PgStore::connect (src/postgres.rs). Never edit a shipped migration: add
-- 0002_*.sql instead.
--
-- Ids are COLLATE "C" so ORDER BY and keyset pagination (`id > $1`) are byte order, the same
-- as SQLite's, whatever the database's default collation. Times are unix milliseconds.

-- Registered devices. `tags` is a JSON object of string -> string.
CREATE TABLE devices (
    id                TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    tags              JSONB  NOT NULL,
    created_at_ms     BIGINT NOT NULL,
    cert_sha256       TEXT   NOT NULL,
    cert_serial       TEXT   NOT NULL,
    cert_not_after_ms BIGINT NOT NULL,
    last_seen_ms      BIGINT
);
-- find_device_by_cert: the smallest id of a certificate.
CREATE INDEX devices_by_cert_sha256 ON devices (cert_sha256, id);

-- API tokens. Only the SHA-256 of the secret is stored.
CREATE TABLE tokens (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    name          TEXT   NOT NULL,
    role          TEXT   NOT NULL CHECK (role IN ('admin', 'service')),
    token_sha256  TEXT   NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);
