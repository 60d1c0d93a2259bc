-- The certificate ledger (issue 16): every certificate issued to a device, by serial (lowercase
-- hex). MQTT authentication accepts a certificate only while its row is `active` and unexpired.
-- Rows go with their device (deleted with it). `issuer`: `fleet` (the fleet CA) or `ca:<id>`.
CREATE TABLE device_certs (
    serial        TEXT    NOT NULL PRIMARY KEY,
    device_id     TEXT    NOT NULL,
    sha256        TEXT    NOT NULL UNIQUE,
    not_before_ms INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    issued_at_ms  INTEGER NOT NULL,
    issuer        TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('active', 'revoked')),
    revoked_at_ms INTEGER,
    revoke_reason TEXT
) STRICT, WITHOUT ROWID;
CREATE INDEX device_certs_by_device ON device_certs (device_id);
-- Expiring certificates (active only), soonest first.
CREATE INDEX device_certs_expiring ON device_certs (not_after_ms, serial) WHERE state = 'active';

-- Backfill: each existing device's current certificate (a certificate shared by several devices
-- goes to the first one; not_before is unknown and taken as the device's creation).
INSERT OR IGNORE INTO device_certs
    (serial, device_id, sha256, not_before_ms, not_after_ms, issued_at_ms, issuer, state)
SELECT lower(cert_serial), id, cert_sha256, created_at_ms, cert_not_after_ms, created_at_ms, 'fleet', 'active'
FROM devices ORDER BY id;
