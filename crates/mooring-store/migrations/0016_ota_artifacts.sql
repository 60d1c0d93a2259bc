-- OTA artifacts (issue 17): one row per uploaded file, its signed manifest (the exact bytes the
-- signature covers), and how many bytes of it are stored so far (an upload is resumable). A
-- version is unique across the fleet's artifacts.
CREATE TABLE ota_artifacts (
    id            TEXT    NOT NULL PRIMARY KEY,
    version       TEXT    NOT NULL UNIQUE,
    sha256        TEXT    NOT NULL,
    size          INTEGER NOT NULL,
    compatible    TEXT    NOT NULL,
    notes         TEXT,
    manifest      BLOB    NOT NULL,
    signature     TEXT,
    state         TEXT    NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    created_by    TEXT    NOT NULL
) STRICT, WITHOUT ROWID;

-- The bytes of artifacts when the database holds them (a cluster, the simulator): chunks as
-- uploaded, keyed by their offset. The embedded server keeps files in <data>/artifacts instead.
CREATE TABLE ota_artifact_chunks (
    artifact_id  TEXT    NOT NULL REFERENCES ota_artifacts (id) ON DELETE CASCADE,
    offset_bytes INTEGER NOT NULL,
    data         BLOB    NOT NULL,
    PRIMARY KEY (artifact_id, offset_bytes)
) STRICT, WITHOUT ROWID;

-- Deployments of an artifact to a selection of devices. An artifact a deployment names cannot
-- be deleted (the foreign key, and `artifact_in_use`).
CREATE TABLE ota_deployments (
    id              TEXT    NOT NULL PRIMARY KEY,
    artifact_id     TEXT    NOT NULL REFERENCES ota_artifacts (id),
    selector        TEXT    NOT NULL,
    allow_downgrade INTEGER NOT NULL,
    created_by      TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    canceled_at_ms  INTEGER
) STRICT, WITHOUT ROWID;
CREATE INDEX ota_deployments_by_artifact ON ota_deployments (artifact_id);

-- Each device's update of a deployment, as its reports tell it (the newest `seq` wins): state,
-- reason, download progress, what it runs now; the `mooring.update` command that carries it.
CREATE TABLE ota_device_updates (
    deployment_id   TEXT    NOT NULL REFERENCES ota_deployments (id) ON DELETE CASCADE,
    device_id       TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    artifact_id     TEXT    NOT NULL,
    version         TEXT    NOT NULL,
    command_id      TEXT,
    state           TEXT    NOT NULL,
    reason          TEXT,
    progress_pct    INTEGER,
    running_version TEXT,
    seq             INTEGER,
    updated_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX ota_device_updates_by_device ON ota_device_updates (device_id, updated_at_ms);
