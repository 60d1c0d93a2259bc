-- Fleet history (issue 15): one sample per node per interval, summed per interval when read.
-- `ts_ms` is the start of the interval, aligned by every node, so one interval's samples share it.
CREATE TABLE fleet_samples (
    ts_ms    INTEGER NOT NULL,
    node_id  TEXT    NOT NULL,
    devices  INTEGER NOT NULL,
    online   INTEGER NOT NULL,
    points   INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    PRIMARY KEY (ts_ms, node_id)
) STRICT;

-- Device selections evaluated by the store (tag:, version= terms) use indexes instead of
-- reading every device's tags JSON: one row per device and tag, kept with `devices.tags` by
-- create_device and set_tags, deleted with the device.
CREATE TABLE device_tags (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
) STRICT, WITHOUT ROWID;
CREATE INDEX device_tags_by_value ON device_tags (key, value, device_id);
INSERT INTO device_tags (device_id, key, value)
    SELECT d.id, j.key, j.value FROM devices d, json_each(d.tags) j;

-- The firmware version a shadow reports (the server's `reported_version`), indexed: the
-- expression is exactly `sqlite/fleet.rs` VERSION_SQL, which queries must repeat to use it.
CREATE INDEX shadows_by_version ON shadows ((CASE json_type(reported, '$.version')
    WHEN 'text' THEN reported ->> '$.version'
    WHEN 'integer' THEN reported -> '$.version'
    WHEN 'real' THEN reported -> '$.version' END));
