-- Provisioning pipeline and installations (issue 16): see the SQLite migration 0012.
ALTER TABLE devices ADD COLUMN first_connect_ms BIGINT;
ALTER TABLE devices ADD COLUMN first_telemetry_ms BIGINT;
ALTER TABLE devices ADD COLUMN last_telemetry_ms BIGINT;
ALTER TABLE devices ADD COLUMN installed_at_ms BIGINT;
ALTER TABLE devices ADD COLUMN installed_by TEXT;
ALTER TABLE devices ADD COLUMN installed_location TEXT;
ALTER TABLE devices ADD COLUMN installed_notes TEXT;
ALTER TABLE devices ADD COLUMN provisioning_errors JSONB;
UPDATE devices SET first_connect_ms = last_seen_ms WHERE last_seen_ms IS NOT NULL;
