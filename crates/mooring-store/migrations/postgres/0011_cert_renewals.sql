-- Certificate rotation (issue 16): each device's pending renewal, a certificate issued for its new
-- key (active in device_certs) that it has not yet connected with. At most one per device; the row
-- goes when the device connects with it (confirmed), when another key replaces it, or with the
-- device (ON DELETE CASCADE).
CREATE TABLE cert_renewals (
    device_id       TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    key_sha256      TEXT   NOT NULL,
    serial          TEXT COLLATE "C" NOT NULL,
    cert_pem        TEXT   NOT NULL,
    requested_at_ms BIGINT NOT NULL
);
