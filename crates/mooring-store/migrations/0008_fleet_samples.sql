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
