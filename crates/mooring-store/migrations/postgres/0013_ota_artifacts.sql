-- OTA artifacts (issue 17): one row per uploaded file, its signed manifest (the exact bytes the
-- signature covers), and how many bytes of it are stored so far (an upload is resumable). A
-- version is unique across the fleet's artifacts.
CREATE TABLE ota_artifacts (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    version       TEXT COLLATE "C" NOT NULL UNIQUE,
    sha256        TEXT   NOT NULL,
    size          BIGINT NOT NULL,
    compatible    JSONB  NOT NULL,
    notes         TEXT,
    manifest      BYTEA  NOT NULL,
    signature     TEXT,
    state         TEXT   NOT NULL,
    stored_bytes  BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    created_by    TEXT   NOT NULL
);

-- The bytes of the cluster's artifacts: a chunk table (bytea rows as uploaded, keyed by offset),
-- not large objects: a chunk is written in the same transaction model as everything else, goes
-- with its artifact (ON DELETE CASCADE), and backs up with pg_dump like any table.
CREATE TABLE ota_artifact_chunks (
    artifact_id  TEXT COLLATE "C" NOT NULL REFERENCES ota_artifacts (id) ON DELETE CASCADE,
    offset_bytes BIGINT NOT NULL,
    data         BYTEA  NOT NULL,
    PRIMARY KEY (artifact_id, offset_bytes)
);

-- Deployments of an artifact to a selection of devices. An artifact a deployment names cannot
-- be deleted (the foreign key, and `artifact_in_use`).
CREATE TABLE ota_deployments (
    id              TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    artifact_id     TEXT COLLATE "C" NOT NULL REFERENCES ota_artifacts (id),
    selector        TEXT    NOT NULL,
    allow_downgrade BOOLEAN NOT NULL,
    created_by      TEXT    NOT NULL,
    created_at_ms   BIGINT  NOT NULL,
    canceled_at_ms  BIGINT
);
CREATE INDEX ota_deployments_by_artifact ON ota_deployments (artifact_id);

-- Each device's update of a deployment, as its reports tell it (the newest `seq` wins): state,
-- reason, download progress, what it runs now; the `mooring.update` command that carries it.
CREATE TABLE ota_device_updates (
    deployment_id   TEXT COLLATE "C" NOT NULL REFERENCES ota_deployments (id) ON DELETE CASCADE,
    device_id       TEXT COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    artifact_id     TEXT COLLATE "C" NOT NULL,
    version         TEXT   NOT NULL,
    command_id      TEXT,
    state           TEXT   NOT NULL,
    reason          TEXT,
    progress_pct    INTEGER,
    running_version TEXT,
    seq             BIGINT,
    updated_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX ota_device_updates_by_device ON ota_device_updates (device_id, updated_at_ms);
