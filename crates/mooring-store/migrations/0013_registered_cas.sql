-- Registered manufacturer CAs (issue 16, just-in-time registration): the MQTT listener trusts
-- client certificates chained to an enabled one; with auto_register a device presenting such a
-- certificate is registered on its first connection, with the CA's tags (a JSON object).
CREATE TABLE registered_cas (
    id            TEXT    NOT NULL PRIMARY KEY,
    subject       TEXT    NOT NULL,
    cert_pem      TEXT    NOT NULL,
    sha256        TEXT    NOT NULL UNIQUE,
    auto_register INTEGER NOT NULL CHECK (auto_register IN (0, 1)),
    tags          TEXT    NOT NULL,
    enabled       INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    created_at_ms INTEGER NOT NULL,
    created_by    TEXT    NOT NULL
) STRICT, WITHOUT ROWID;
