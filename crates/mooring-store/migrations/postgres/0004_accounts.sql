-- Mooring PostgreSQL schema v4: accounts and access (issue 14), as SQLite's migration 0007.
-- Tokens get the new roles, a scope (a fleet selector), an expiry and a last-used time; users,
-- their login sessions, login-throttling counters and the audit log. Never edit a shipped
-- migration: add a new one instead.
--
-- Ids, emails, hashes and keys are COLLATE "C" (byte order and byte equality, as in SQLite).
-- Text here never holds U+0000 (the store refuses it before it gets here), except in the audit
-- log, whose strings are BYTEA (their UTF-8): an entry shares its append with others and must
-- not fail them, whatever a request put in its path.
ALTER TABLE tokens DROP CONSTRAINT tokens_role_check;
ALTER TABLE tokens ADD CONSTRAINT tokens_role_check
    CHECK (role IN ('admin', 'operator', 'installer', 'viewer', 'service'));
ALTER TABLE tokens
    ADD COLUMN scope           TEXT,
    ADD COLUMN expires_at_ms   BIGINT,
    ADD COLUMN last_used_at_ms BIGINT;

CREATE TABLE users (
    id                         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    email                      TEXT COLLATE "C" NOT NULL UNIQUE,
    role                       TEXT    NOT NULL
        CHECK (role IN ('admin', 'operator', 'installer', 'viewer', 'service')),
    scope                      TEXT,
    password_hash              TEXT,
    password_set_sha256        TEXT COLLATE "C" UNIQUE,
    password_set_expires_at_ms BIGINT,
    disabled                   BOOLEAN NOT NULL,
    oidc_subject               TEXT COLLATE "C" UNIQUE,
    created_at_ms              BIGINT  NOT NULL,
    updated_at_ms              BIGINT  NOT NULL
);

CREATE TABLE user_sessions (
    id_sha256       TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    user_id         TEXT COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_sha256     TEXT   NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    last_used_at_ms BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    source          TEXT   NOT NULL,
    user_agent      TEXT   NOT NULL
);
CREATE INDEX user_sessions_by_user ON user_sessions (user_id, last_used_at_ms);
CREATE INDEX user_sessions_by_last_used ON user_sessions (last_used_at_ms);
CREATE INDEX user_sessions_by_expiry ON user_sessions (expires_at_ms);

CREATE TABLE login_failures (
    key             TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    window_start_ms BIGINT NOT NULL,
    count           BIGINT NOT NULL
);
CREATE INDEX login_failures_by_window ON login_failures (window_start_ms);

CREATE TABLE audit_log (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms  BIGINT   NOT NULL,
    actor  BYTEA    NOT NULL,
    action BYTEA    NOT NULL,
    target BYTEA    NOT NULL,
    source BYTEA    NOT NULL,
    node   BYTEA    NOT NULL,
    status INTEGER  NOT NULL,
    detail BYTEA    NOT NULL
);
CREATE INDEX audit_log_by_at ON audit_log (at_ms);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX audit_log_by_action ON audit_log (action, id);
