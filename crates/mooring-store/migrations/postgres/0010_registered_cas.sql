-- Registered manufacturer CAs (issue 16, just-in-time registration): the MQTT listener trusts
-- client certificates chained to an enabled one; with auto_register a device presenting such a
-- certificate is registered on its first connection, with the CA's tags.
CREATE TABLE registered_cas (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    subject       TEXT    NOT NULL,
    cert_pem      TEXT    NOT NULL,
    sha256        TEXT    NOT NULL UNIQUE,
    auto_register BOOLEAN NOT NULL,
    tags          JSONB   NOT NULL,
    enabled       BOOLEAN NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    created_by    TEXT    NOT NULL
);
