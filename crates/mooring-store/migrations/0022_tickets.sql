-- Field-service tickets (issue 18): opened by playbooks; the body is the server's JSON (devices,
-- sites, installation records, parts). Ids sort by creation time (the server makes them so).
CREATE TABLE tickets (
    id            TEXT PRIMARY KEY NOT NULL,
    playbook      TEXT NOT NULL,
    alert_id      TEXT NOT NULL,
    title         TEXT NOT NULL,
    open          INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    closed_at_ms  INTEGER,
    closed_by     TEXT,
    body          TEXT NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX tickets_open_by_playbook ON tickets (playbook) WHERE open = 1;
CREATE INDEX tickets_by_closed ON tickets (closed_at_ms) WHERE closed_at_ms IS NOT NULL;
