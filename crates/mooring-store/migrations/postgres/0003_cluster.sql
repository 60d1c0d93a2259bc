-- Mooring PostgreSQL schema v3: what a cluster's nodes coordinate through the database (issue
-- 13): node heartbeats, leases for once-only work, which node holds each device's session, and
-- values created once (the fleet PKI). Never edit a shipped migration: add a new one instead.
CREATE TABLE cluster_nodes (
    node_id      TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL
);

CREATE TABLE cluster_leases (
    name          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    holder        TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

CREATE TABLE device_sessions (
    device_id TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    node_id   TEXT   NOT NULL,
    since_ms  BIGINT NOT NULL
);
CREATE INDEX device_sessions_by_node ON device_sessions (node_id);

CREATE TABLE cluster_values (
    key   TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    value BYTEA NOT NULL
);
