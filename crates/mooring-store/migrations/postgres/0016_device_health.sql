-- Fleet health (issue 18): one record per device, the JSON of `health::DeviceHealth`, folded
-- from each node's deltas (`HealthStore::merge_device_health`). Deleted with the device.
CREATE TABLE device_health (
    device_id  TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    signals    TEXT   NOT NULL,
    updated_ms BIGINT NOT NULL
);
