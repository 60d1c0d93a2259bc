-- Provisioning pipeline and installations (issue 16): when a device first connected and first
-- sent telemetry, when it last sent telemetry, its confirmed installation, and the last error of
-- each provisioning step (JSON object: step -> {at_ms, message}).
ALTER TABLE devices ADD COLUMN first_connect_ms INTEGER;
ALTER TABLE devices ADD COLUMN first_telemetry_ms INTEGER;
ALTER TABLE devices ADD COLUMN last_telemetry_ms INTEGER;
ALTER TABLE devices ADD COLUMN installed_at_ms INTEGER;
ALTER TABLE devices ADD COLUMN installed_by TEXT;
ALTER TABLE devices ADD COLUMN installed_location TEXT;
ALTER TABLE devices ADD COLUMN installed_notes TEXT;
ALTER TABLE devices ADD COLUMN provisioning_errors TEXT;
-- Devices seen before this migration: the newest sighting is the best known bound.
UPDATE devices SET first_connect_ms = last_seen_ms WHERE last_seen_ms IS NOT NULL;
