-- Mooring schema v3: how long an acknowledged command may wait for its result (0 = forever).
-- While a command is `acknowledged`, `next_attempt_at_ms` holds its result deadline.
-- Never edit a shipped migration: add 0004_*.sql instead.
ALTER TABLE commands ADD COLUMN result_timeout_ms INTEGER NOT NULL DEFAULT 0;
