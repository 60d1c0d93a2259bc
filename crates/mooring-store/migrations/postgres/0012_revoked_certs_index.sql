-- The live-session sweep (issue 16) reads the certificates revoked since its last run, oldest
-- revocation first; only revoked rows are indexed.
CREATE INDEX device_certs_revoked ON device_certs (revoked_at_ms, serial) WHERE state = 'revoked';
