-- Commands executed on a device's local API (issue 20) are recorded when their result syncs;
-- synced_at_ms is when it reached the server (NULL: a command the server sent).
-- Never edit a shipped migration: add 0023_*.sql instead.
ALTER TABLE commands ADD COLUMN synced_at_ms BIGINT;
