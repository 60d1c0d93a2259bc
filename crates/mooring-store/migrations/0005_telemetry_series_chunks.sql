-- Telemetry layout v2: integer series ids, a compact table of recent points, compressed chunks of
-- closed windows (written by the compaction pass; the format is `mooring_store::chunk`, v1).
-- Existing points and dedupe keys move into the recent tables here, in insertion order; the
-- first compaction passes after the upgrade compress them.

-- One row per (device, metric). The metric '' (never a valid metric name) is the device's
-- dedupe-key series. Ids are given in first-seen order, which orders ties between metrics.
CREATE TABLE telemetry_series (
    id        INTEGER NOT NULL PRIMARY KEY,
    device_id TEXT    NOT NULL,
    metric    TEXT    NOT NULL,
    UNIQUE (device_id, metric)
) STRICT;

INSERT INTO telemetry_series (device_id, metric)
SELECT device_id, metric FROM (
    SELECT device_id, metric, MIN(id) AS first FROM telemetry GROUP BY device_id, metric
    UNION ALL
    SELECT device_id, metric, NULL FROM telemetry_latest
    UNION ALL
    SELECT DISTINCT device_id, '', NULL FROM telemetry_seq
)
GROUP BY device_id, metric
ORDER BY MIN(first) IS NULL, MIN(first), device_id, metric;

-- Recent (not yet compacted) points. The rowid orders ties at one timestamp (insertion order).
-- Booleans are 0.0 / 1.0 with is_bool = 1. No foreign key, as before: an in-flight point of a
-- deleted device must not fail its group-commit batch; retention removes such orphans.
CREATE TABLE telemetry_points (
    id        INTEGER NOT NULL PRIMARY KEY,
    series_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    value     REAL    NOT NULL,
    is_bool   INTEGER NOT NULL CHECK (is_bool IN (0, 1))
) STRICT;

INSERT INTO telemetry_points (series_id, ts_ms, value, is_bool)
SELECT s.id, t.ts_ms, t.value, t.is_bool
FROM telemetry t JOIN telemetry_series s ON s.device_id = t.device_id AND s.metric = t.metric
ORDER BY t.id;

-- Compressed chunks: the points (or dedupe keys) of one series in one window
-- [window_start_ms, window_start_ms + 1 h). ts_min_ms/ts_max_ms bound its points; seq_min/seq_max
-- (dedupe-key chunks only, `seq` bit-cast to i64) bound its keys.
CREATE TABLE telemetry_chunks (
    id              INTEGER NOT NULL PRIMARY KEY,
    series_id       INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    ts_min_ms       INTEGER NOT NULL,
    ts_max_ms       INTEGER NOT NULL,
    points          INTEGER NOT NULL,
    seq_min         INTEGER,
    seq_max         INTEGER,
    data            BLOB    NOT NULL,
    UNIQUE (series_id, window_start_ms)
) STRICT;

-- Dedupe keys not yet compacted, now by series id (the device's '' series).
ALTER TABLE telemetry_seq RENAME TO telemetry_seq_v1;
CREATE TABLE telemetry_seq (
    series_id INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    PRIMARY KEY (series_id, seq)
) STRICT, WITHOUT ROWID;
INSERT INTO telemetry_seq (series_id, seq, ts_ms)
SELECT s.id, k.seq, k.ts_ms
FROM telemetry_seq_v1 k JOIN telemetry_series s ON s.device_id = k.device_id AND s.metric = '';

-- Newest point per series, maintained with every insert, so `latest` is O(metrics).
ALTER TABLE telemetry_latest RENAME TO telemetry_latest_v1;
CREATE TABLE telemetry_latest (
    series_id INTEGER NOT NULL PRIMARY KEY,
    ts_ms     INTEGER NOT NULL,
    value     REAL    NOT NULL,
    is_bool   INTEGER NOT NULL CHECK (is_bool IN (0, 1))
) STRICT, WITHOUT ROWID;
INSERT INTO telemetry_latest (series_id, ts_ms, value, is_bool)
SELECT s.id, l.ts_ms, l.value, l.is_bool
FROM telemetry_latest_v1 l JOIN telemetry_series s ON s.device_id = l.device_id AND s.metric = l.metric;

DROP TABLE telemetry;
DROP TABLE telemetry_seq_v1;
DROP TABLE telemetry_latest_v1;

CREATE INDEX telemetry_points_by_series_ts ON telemetry_points (series_id, ts_ms);
CREATE INDEX telemetry_points_by_ts ON telemetry_points (ts_ms);
CREATE INDEX telemetry_seq_by_ts_v2 ON telemetry_seq (ts_ms);
CREATE INDEX telemetry_chunks_by_ts_min ON telemetry_chunks (ts_min_ms);
CREATE INDEX telemetry_chunks_by_seq_max ON telemetry_chunks (series_id, seq_max)
    WHERE seq_max IS NOT NULL;
