-- Fleet history (issue 15): one sample per node per interval, summed per interval when read.
-- `ts_ms` is the start of the interval, aligned by every node, so one interval's samples share it.
CREATE TABLE fleet_samples (
    ts_ms    BIGINT NOT NULL,
    node_id  TEXT COLLATE "C" NOT NULL,
    devices  BIGINT NOT NULL,
    online   BIGINT NOT NULL,
    points   BIGINT NOT NULL,
    messages BIGINT NOT NULL,
    PRIMARY KEY (ts_ms, node_id)
);

-- Selections by tag (`tags @> '{"k":"v"}'`) use this index instead of reading every device.
CREATE INDEX devices_tags ON devices USING GIN (tags jsonb_path_ops);
