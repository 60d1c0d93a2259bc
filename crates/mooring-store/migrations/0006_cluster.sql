-- Mooring schema v6: what a cluster's nodes coordinate through the database (issue 13), also
-- used by a single node: node heartbeats, leases for once-only work, which node holds each
-- device's session, and values created once (the fleet PKI on a shared database).
-- Never edit a shipped migration: add 0007_*.sql instead.
CREATE TABLE cluster_nodes (
    node_id      TEXT PRIMARY KEY NOT NULL,
    heartbeat_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE cluster_leases (
    name          TEXT PRIMARY KEY NOT NULL,
    holder        TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE device_sessions (
    device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    node_id   TEXT NOT NULL,
    since_ms  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX device_sessions_by_node ON device_sessions (node_id);

CREATE TABLE cluster_values (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
