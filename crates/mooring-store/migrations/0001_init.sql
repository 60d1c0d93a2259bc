-- Mooring schema v1. Applied once, inside one transaction, by the SQLite backend at open.
-- Never edit a shipped migration: add 0002_*.sql instead.

-- Registered devices. `tags` is a JSON object of string -> string.
CREATE TABLE devices (
    id                TEXT    NOT NULL PRIMARY KEY,
    tags              TEXT    NOT NULL,
    created_at_ms     INTEGER NOT NULL,
    cert_sha256       TEXT    NOT NULL,
    cert_serial       TEXT    NOT NULL,
    cert_not_after_ms INTEGER NOT NULL,
    last_seen_ms      INTEGER
) STRICT;
CREATE INDEX devices_by_cert_sha256 ON devices (cert_sha256);

-- API tokens. Only the SHA-256 of the secret is stored.
CREATE TABLE tokens (
    id            TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'service')),
    token_sha256  TEXT    NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
) STRICT;

-- Telemetry points. No foreign key to devices on purpose: one record for a device deleted
-- while its telemetry was in flight must not fail the whole group-commit batch; such orphans
-- are removed by retention. Booleans are stored as 0.0 / 1.0 with is_bool = 1.
CREATE TABLE telemetry (
    id        INTEGER NOT NULL PRIMARY KEY,
    device_id TEXT    NOT NULL,
    metric    TEXT    NOT NULL,
    ts_ms     INTEGER NOT NULL,
    value     REAL    NOT NULL,
    is_bool   INTEGER NOT NULL CHECK (is_bool IN (0, 1))
) STRICT;
CREATE INDEX telemetry_by_device_metric_ts ON telemetry (device_id, metric, ts_ms);
CREATE INDEX telemetry_by_device_ts ON telemetry (device_id, ts_ms);
CREATE INDEX telemetry_by_ts ON telemetry (ts_ms);

-- Dedupe keys: a (device_id, seq) seen once is never stored again. `seq` is the device's u64
-- bit-cast to i64. ts_ms is the record's timestamp, so retention prunes keys with their points.
CREATE TABLE telemetry_seq (
    device_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX telemetry_seq_by_ts ON telemetry_seq (ts_ms);

-- Newest point per (device, metric), maintained in the same transaction as the insert so that
-- `latest` is one index range scan. Survives retention (it is the last known value).
CREATE TABLE telemetry_latest (
    device_id TEXT    NOT NULL,
    metric    TEXT    NOT NULL,
    ts_ms     INTEGER NOT NULL,
    value     REAL    NOT NULL,
    is_bool   INTEGER NOT NULL CHECK (is_bool IN (0, 1)),
    PRIMARY KEY (device_id, metric)
) STRICT, WITHOUT ROWID;
