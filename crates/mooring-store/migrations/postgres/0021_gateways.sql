-- Gateways and their children (issue 20): which gateway may act for which device. A child has
-- at most one gateway (the primary key); deleting either device deletes the attachment. No
-- chains (a gateway is never a child, a child never a gateway) is the store's check, in the
-- attaching transaction, which locks both devices' rows first.
CREATE TABLE device_gateways (
    child_id       TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    gateway_id     TEXT COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    attached_at_ms BIGINT NOT NULL
);
-- A gateway's children by id (`children_of`, the children count), and the gateway's deletion
-- (the foreign key).
CREATE INDEX device_gateways_by_gateway ON device_gateways (gateway_id, child_id);
