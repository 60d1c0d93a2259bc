-- Mooring PostgreSQL schema v2: telemetry (points partitioned by UTC day), commands, shadows and
-- broker state, so PgStore is a full Store. Never edit a shipped migration: add 0003_*.sql instead.
--
-- The semantics are the SQLite backend's (migrations/0001..0005); see src/postgres/*.rs. Ids are
-- COLLATE "C" (byte order, as in SQLite); names that may hold any character (metric names, broker
-- topics and keys) are BYTEA (their UTF-8). Times are BIGINT unix milliseconds. JSON
-- documents (command params, history and output, shadow documents) are `json`, which keeps the
-- text exactly as written (key order included), as SQLite's TEXT columns do.

-- One row per (device, metric). The metric '' (never a valid metric name) is the device's
-- dedupe-key series. Ids are given in first-seen order (a device's batches are serialised by a
-- lock, src/postgres/telemetry.rs), which orders ties between metrics in queries. Series outlive
-- retention (the latest values refer to them); they go with their device. A metric name is its
-- UTF-8 as BYTEA: text cannot hold U+0000, which a device's JSON key can (SQLite stores it).
CREATE TABLE telemetry_series (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    metric    BYTEA NOT NULL,
    UNIQUE (device_id, metric)
);

-- Points, partitioned by time: one partition per UTC day, telemetry_points_d<day> with day =
-- ts_ms / 86400000, created on demand (for days near the present) by the store and dropped
-- whole by retention. Points of any other day land in telemetry_points_default, so a device
-- cannot make the store create tables without bound. `id` orders ties at one timestamp
-- (insertion order). Booleans are 0.0 / 1.0 with is_bool. No foreign key, as in SQLite: an
-- in-flight point of a deleted device must not fail its batch.
CREATE SEQUENCE telemetry_points_id_seq AS BIGINT;
CREATE TABLE telemetry_points (
    series_id BIGINT           NOT NULL,
    ts_ms     BIGINT           NOT NULL,
    id        BIGINT           NOT NULL DEFAULT nextval('telemetry_points_id_seq'),
    value     DOUBLE PRECISION NOT NULL,
    is_bool   BOOLEAN          NOT NULL,
    PRIMARY KEY (series_id, ts_ms, id)
) PARTITION BY RANGE (ts_ms);
ALTER SEQUENCE telemetry_points_id_seq OWNED BY telemetry_points.id;
-- Retention's row deletes (the partition straddling the cutoff, the default partition).
CREATE INDEX telemetry_points_by_ts ON telemetry_points (ts_ms);
CREATE TABLE telemetry_points_default PARTITION OF telemetry_points DEFAULT;

-- Dedupe keys: (the device's '' series, seq) is stored once, whatever the partitions do.
-- `seq` is the device's u64 bit-cast to BIGINT; ts_ms is the record's, so retention prunes a
-- key with its points (in bounded row deletes: this table is not partitioned, so the key stays
-- unique across all time).
CREATE TABLE telemetry_seq (
    series_id BIGINT NOT NULL,
    seq       BIGINT NOT NULL,
    ts_ms     BIGINT NOT NULL,
    PRIMARY KEY (series_id, seq)
);
CREATE INDEX telemetry_seq_by_ts ON telemetry_seq (ts_ms);

-- Newest point per series, maintained in the batch's transaction, so `latest` is O(metrics).
-- Survives retention (it is the last known value).
CREATE TABLE telemetry_latest (
    series_id BIGINT           NOT NULL PRIMARY KEY,
    ts_ms     BIGINT           NOT NULL,
    value     DOUBLE PRECISION NOT NULL,
    is_bool   BOOLEAN          NOT NULL
);

-- A fleet command: the selector it was sent to and how many device commands it fanned out to.
CREATE TABLE command_parents (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    selector      TEXT   NOT NULL,
    name          TEXT   NOT NULL,
    params        JSON   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    total         BIGINT NOT NULL
);

-- One command for one device. `seq` orders a device's commands (delivery order, listings).
-- `history` is a JSON array of [state, at_ms].
CREATE TABLE commands (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                 TEXT COLLATE "C" NOT NULL UNIQUE,
    device_id          TEXT COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name               TEXT   NOT NULL,
    params             JSON   NOT NULL,
    state              TEXT   NOT NULL CHECK (state IN ('queued', 'delivered', 'acknowledged',
                                  'succeeded', 'failed', 'expired', 'canceled')),
    attempts           BIGINT NOT NULL,
    max_attempts       BIGINT NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    expires_at_ms      BIGINT NOT NULL,
    next_attempt_at_ms BIGINT NOT NULL,
    parent_id          TEXT COLLATE "C",
    idempotency_key    TEXT COLLATE "C",
    history            JSON   NOT NULL,
    result_succeeded   BOOLEAN,
    result_output      JSON,
    result_timeout_ms  BIGINT NOT NULL
);
CREATE INDEX commands_by_device_seq ON commands (device_id, seq);
CREATE INDEX commands_by_device_state_seq ON commands (device_id, state, seq);
CREATE UNIQUE INDEX commands_by_device_idempotency_key ON commands (device_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX commands_by_parent_state ON commands (parent_id, state) WHERE parent_id IS NOT NULL;
CREATE INDEX commands_by_state_expiry ON commands (state, expires_at_ms, seq);
CREATE INDEX commands_by_state_next_attempt ON commands (state, next_attempt_at_ms, seq);

-- Device shadows: desired and reported JSON objects and a version bumped on every change.
CREATE TABLE shadows (
    device_id     TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    desired       JSON   NOT NULL,
    reported      JSON   NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Broker state that survives restarts: retained messages, persistent sessions and their queued /
-- unacknowledged messages. Values are opaque to the store (mooring-broker owns their encoding).
-- Topics and keys are their UTF-8 as BYTEA (byte order, as SQLite's): text cannot hold U+0000,
-- which the MQTT library lets through, and one client's topic must not fail a whole batch.
CREATE TABLE broker_retained (
    topic BYTEA NOT NULL PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE broker_sessions (
    key   BYTEA NOT NULL PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE broker_messages (
    session BYTEA  NOT NULL,
    seq     BIGINT NOT NULL,
    value   BYTEA  NOT NULL,
    PRIMARY KEY (session, seq)
);
