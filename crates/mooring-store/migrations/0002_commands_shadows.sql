-- Mooring schema v2: commands (one row per device command), fleet command parents, shadows.
-- Never edit a shipped migration: add 0003_*.sql instead.

-- A fleet command: the selector it was sent to and how many device commands it fanned out to.
CREATE TABLE command_parents (
    id            TEXT    NOT NULL PRIMARY KEY,
    selector      TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    params        TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    total         INTEGER NOT NULL
) STRICT;

-- One command for one device. `seq` orders a device's commands (delivery order, listings).
-- `history` is a JSON array of [state, at_ms]; `params` and `result_output` are JSON text.
CREATE TABLE commands (
    seq                INTEGER NOT NULL PRIMARY KEY,
    id                 TEXT    NOT NULL UNIQUE,
    device_id          TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name               TEXT    NOT NULL,
    params             TEXT    NOT NULL,
    state              TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'acknowledged',
                                   'succeeded', 'failed', 'expired', 'canceled')),
    attempts           INTEGER NOT NULL,
    max_attempts       INTEGER NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    expires_at_ms      INTEGER NOT NULL,
    next_attempt_at_ms INTEGER NOT NULL,
    parent_id          TEXT,
    idempotency_key    TEXT,
    history            TEXT    NOT NULL,
    result_succeeded   INTEGER,
    result_output      TEXT
) STRICT;
CREATE INDEX commands_by_device_seq ON commands (device_id, seq);
CREATE INDEX commands_by_device_state_seq ON commands (device_id, state, seq);
CREATE UNIQUE INDEX commands_by_device_idempotency_key ON commands (device_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX commands_by_parent_state ON commands (parent_id, state) WHERE parent_id IS NOT NULL;
CREATE INDEX commands_by_state_expiry ON commands (state, expires_at_ms);
CREATE INDEX commands_by_state_next_attempt ON commands (state, next_attempt_at_ms);

-- Device shadows: desired and reported JSON objects and a version bumped on every change.
CREATE TABLE shadows (
    device_id     TEXT    NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    desired       TEXT    NOT NULL,
    reported      TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;
