-- Rules and alerts (issue 18). Rule and alert ids sort by creation time (the server makes them
-- so). An alert is open while firing or acknowledged; at most one open alert per rule and
-- device (`device_id` '' for an alert about no one device).
CREATE TABLE rules (
    id            TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL UNIQUE,
    when_text     TEXT NOT NULL,
    selector      TEXT,
    scope         TEXT,
    then_text     TEXT NOT NULL,
    enabled       BOOLEAN NOT NULL,
    created_by    TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE alerts (
    id                 TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    rule_id            TEXT NOT NULL,
    rule_name          TEXT NOT NULL,
    device_id          TEXT NOT NULL,
    severity           TEXT NOT NULL,
    state              TEXT NOT NULL,
    detail             TEXT NOT NULL,
    count              BIGINT NOT NULL,
    first_fired_ms     BIGINT NOT NULL,
    last_fired_ms      BIGINT NOT NULL,
    acknowledged_at_ms BIGINT,
    acknowledged_by    TEXT,
    resolved_at_ms     BIGINT,
    resolved_by        TEXT
);
CREATE UNIQUE INDEX alerts_open ON alerts (rule_id, device_id) WHERE state <> 'resolved';
CREATE INDEX alerts_by_resolved ON alerts (resolved_at_ms) WHERE resolved_at_ms IS NOT NULL;
