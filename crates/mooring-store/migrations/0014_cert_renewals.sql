-- Certificate rotation (issue 16): each device's pending renewal, a certificate issued for its new
-- key (active in device_certs) that it has not yet connected with. At most one per device; the row
-- goes when the device connects with it (confirmed), when another key replaces it, or with the
-- device.
CREATE TABLE cert_renewals (
    device_id       TEXT    NOT NULL PRIMARY KEY,
    key_sha256      TEXT    NOT NULL,
    serial          TEXT    NOT NULL,
    cert_pem        TEXT    NOT NULL,
    requested_at_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
