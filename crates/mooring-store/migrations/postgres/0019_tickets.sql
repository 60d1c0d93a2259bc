-- Field-service tickets (issue 18): opened by playbooks; the body is the server's JSON (devices,
-- sites, installation records, parts). Ids sort by creation time (the server makes them so).
CREATE TABLE tickets (
    id            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    playbook      TEXT NOT NULL,
    alert_id      TEXT NOT NULL,
    title         TEXT NOT NULL,
    open          BOOLEAN NOT NULL,
    created_at_ms BIGINT NOT NULL,
    closed_at_ms  BIGINT,
    closed_by     TEXT,
    body          TEXT NOT NULL
);
CREATE INDEX tickets_open_by_playbook ON tickets (playbook) WHERE open;
CREATE INDEX tickets_by_closed ON tickets (closed_at_ms) WHERE closed_at_ms IS NOT NULL;
