-- Rollouts (issue 19): one deployment sent in waves, each gated on the health of the devices it
-- updated. A rollout goes with its deployment (deleting the deployment deletes the rollout, its
-- devices and its event log). `seed` is the server's u64 with the same bits; `spec` and `gate`
-- are the server's JSON.
CREATE TABLE rollouts (
    id                   TEXT    NOT NULL PRIMARY KEY,
    deployment_id        TEXT    NOT NULL UNIQUE
                                 REFERENCES ota_deployments (id) ON DELETE CASCADE,
    artifact_id          TEXT    NOT NULL,
    selector             TEXT    NOT NULL,
    spec                 TEXT    NOT NULL,
    seed                 INTEGER NOT NULL,
    state                TEXT    NOT NULL,
    wave                 INTEGER NOT NULL,
    reason               TEXT,
    gate                 TEXT,
    window_started_at_ms INTEGER,
    rollback_of          TEXT,
    created_by           TEXT    NOT NULL,
    created_at_ms        INTEGER NOT NULL,
    updated_at_ms        INTEGER NOT NULL,
    revision             INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
-- Newest first (`list_rollouts`).
CREATE INDEX rollouts_by_created ON rollouts (created_at_ms, id);
-- What the rollout controller drives (`active_rollouts`). Only those rows are indexed.
CREATE INDEX rollouts_active ON rollouts (id) WHERE state IN ('running', 'paused');

-- A rollout's devices: its wave, its place in the random order (rank, below 2^63), and once
-- started (its update added to the deployment) when and from what version. A deleted device
-- leaves its rollouts.
CREATE TABLE rollout_devices (
    rollout_id    TEXT    NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    device_id     TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    wave          INTEGER NOT NULL,
    rank          INTEGER NOT NULL,
    started_at_ms INTEGER,
    from_version  TEXT,
    deferred      TEXT,
    baseline      TEXT,
    PRIMARY KEY (rollout_id, device_id)
) STRICT, WITHOUT ROWID;
-- Devices not started yet, by rank (`waiting_rollout_devices`: a range scan in order, the wave
-- read from the index). Only those rows are indexed.
CREATE INDEX rollout_devices_waiting ON rollout_devices (rollout_id, rank, device_id, wave)
    WHERE started_at_ms IS NULL;
-- Devices started, by time (`count_rollout_started_since`).
CREATE INDEX rollout_devices_started ON rollout_devices (rollout_id, started_at_ms)
    WHERE started_at_ms IS NOT NULL;
-- For the device's deletion (the foreign key).
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id);

-- A rollout's event log: seq 1, 2, ... per rollout, the newest kept.
CREATE TABLE rollout_events (
    rollout_id TEXT    NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    detail     TEXT    NOT NULL,
    PRIMARY KEY (rollout_id, seq)
) STRICT, WITHOUT ROWID;
