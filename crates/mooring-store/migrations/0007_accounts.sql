-- Mooring schema v7: accounts and access (issue 14). Tokens get the new roles, a scope (a fleet
-- selector), an expiry and a last-used time; users, their login sessions, login throttling
-- counters and the audit log.
-- Never edit a shipped migration: add 0008_*.sql instead.
CREATE TABLE tokens_v7 (
    id              TEXT    NOT NULL PRIMARY KEY,
    name            TEXT    NOT NULL,
    role            TEXT    NOT NULL
        CHECK (role IN ('admin', 'operator', 'installer', 'viewer', 'service')),
    token_sha256    TEXT    NOT NULL UNIQUE,
    created_at_ms   INTEGER NOT NULL,
    scope           TEXT,
    expires_at_ms   INTEGER,
    last_used_at_ms INTEGER
) STRICT;
INSERT INTO tokens_v7 (id, name, role, token_sha256, created_at_ms)
    SELECT id, name, role, token_sha256, created_at_ms FROM tokens;
DROP TABLE tokens;
ALTER TABLE tokens_v7 RENAME TO tokens;

CREATE TABLE users (
    id                         TEXT    NOT NULL PRIMARY KEY,
    email                      TEXT    NOT NULL UNIQUE,
    role                       TEXT    NOT NULL
        CHECK (role IN ('admin', 'operator', 'installer', 'viewer', 'service')),
    scope                      TEXT,
    password_hash              TEXT,
    password_set_sha256        TEXT    UNIQUE,
    password_set_expires_at_ms INTEGER,
    disabled                   INTEGER NOT NULL CHECK (disabled IN (0, 1)),
    oidc_subject               TEXT    UNIQUE,
    created_at_ms              INTEGER NOT NULL,
    updated_at_ms              INTEGER NOT NULL
) STRICT;

CREATE TABLE user_sessions (
    id_sha256       TEXT    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_sha256     TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    last_used_at_ms INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    source          TEXT    NOT NULL,
    user_agent      TEXT    NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX user_sessions_by_user ON user_sessions (user_id, last_used_at_ms);
CREATE INDEX user_sessions_by_last_used ON user_sessions (last_used_at_ms);
CREATE INDEX user_sessions_by_expiry ON user_sessions (expires_at_ms);

CREATE TABLE login_failures (
    key             TEXT    NOT NULL PRIMARY KEY,
    window_start_ms INTEGER NOT NULL,
    count           INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX login_failures_by_window ON login_failures (window_start_ms);

CREATE TABLE audit_log (
    id     INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    source TEXT    NOT NULL,
    node   TEXT    NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT    NOT NULL
) STRICT;
CREATE INDEX audit_log_by_at ON audit_log (at_ms);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX audit_log_by_action ON audit_log (action, id);
