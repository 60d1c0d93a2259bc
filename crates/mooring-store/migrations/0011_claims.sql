-- Claim tokens and the enrollments made with them (issue 16). A claim's token is stored only as
-- its SHA-256; `uses` counts enrollments (new keys), at most `uses_max`.
CREATE TABLE claims (
    id TEXT PRIMARY KEY NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    name TEXT,
    uses_max INTEGER NOT NULL,
    uses INTEGER NOT NULL,
    tags TEXT NOT NULL,
    assign_ids INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
) WITHOUT ROWID;

-- The live-claim bounds count per creator.
CREATE INDEX claims_by_creator ON claims (created_by, expires_at_ms) WHERE revoked_at_ms IS NULL;
CREATE INDEX claims_live ON claims (expires_at_ms) WHERE revoked_at_ms IS NULL;

-- One row per (claim, public key): the device and certificate that key got. Reserved (with the
-- claim's use) before the device is created; a retry with the same key finishes it.
CREATE TABLE claim_enrollments (
    claim_id TEXT NOT NULL REFERENCES claims (id) ON DELETE CASCADE,
    key_sha256 TEXT NOT NULL,
    device_id TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL,
    cert_not_after_ms INTEGER NOT NULL,
    cert_pem TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (claim_id, key_sha256)
) WITHOUT ROWID;
