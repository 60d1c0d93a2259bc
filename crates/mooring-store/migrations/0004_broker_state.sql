-- Mooring schema v4: broker state that survives restarts (retained messages, persistent MQTT
-- sessions and their queued / unacknowledged messages). Values are opaque to the store: the
-- broker owns their encoding (mooring-broker/src/persist.rs).
-- Never edit a shipped migration: add 0005_*.sql instead.
CREATE TABLE broker_retained (
    topic TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE broker_sessions (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE broker_messages (
    session TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    value   BLOB NOT NULL,
    PRIMARY KEY (session, seq)
) WITHOUT ROWID;
