//! [`TelemetryStore`] for SQLite: series ids, recent points, compressed chunks, dedupe keys, compaction, retention.
//!
//! Layout (migration 0005): `telemetry_series` names each (device, metric) with an integer id
//! (metric `''` is the device's dedupe-key series); `telemetry_points` holds recent points by
//! series id and `telemetry_seq` recent dedupe keys; [`TelemetryStore::compact`] moves closed
//! windows of [`CHUNK_WINDOW_MS`] into `telemetry_chunks`, one [`crate::chunk`] blob per (series,
//! window), in short transactions on the writer connection. A point that arrives late into a
//! compacted window stays in `telemetry_points` (queries merge both) until the next pass
//! rewrites that window's chunk with it. `telemetry_latest` keeps the newest point per series.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{bound_to_sql, count_to_sql, seq_to_sql, ts_to_sql, Db, Inner, SqliteStore};
use crate::chunk::{self, CHUNK_POINTS_MAX};
use crate::error::{Result, StoreError};
use crate::model::{AppendOutcome, MetricValue, Point, TelemetryQuery, TelemetryRecord};
use crate::store::TelemetryStore;

/// Width of a compaction window: a chunk holds one series' points of `[start, start + this)`,
/// `start` a multiple of it.
pub const CHUNK_WINDOW_MS: i64 = 3_600_000;
/// The metric name of a device's dedupe-key series (never a valid metric: names are non-empty).
const KEYS_METRIC: &str = "";
/// Rows (of points, dedupe keys or chunks) removed per transaction when a device is deleted.
const DELETE_DEVICE_ROWS: i64 = 10_000;
/// Chunks removed per transaction when a device is deleted (each is up to a window of points).
const DELETE_DEVICE_CHUNKS: i64 = 500;

fn encode_value(value: MetricValue) -> (f64, i64) {
    match value {
        MetricValue::Number(n) => (n, 0),
        MetricValue::Bool(b) => (if b { 1.0 } else { 0.0 }, 1),
    }
}

fn value_columns(row: &Row<'_>, value_index: usize) -> rusqlite::Result<MetricValue> {
    let value: f64 = row.get(value_index)?;
    let is_bool: i64 = row.get(value_index + 1)?;
    Ok(if is_bool != 0 {
        MetricValue::Bool(value != 0.0)
    } else {
        MetricValue::Number(value)
    })
}

fn corrupt(series_id: i64, e: &chunk::ChunkError) -> StoreError {
    StoreError::Backend(format!("series {series_id}: {e}"))
}

fn window_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(CHUNK_WINDOW_MS) * CHUNK_WINDOW_MS
}

/// Series ids of one batch by (device, metric), borrowed from the batch's records.
type SeriesCache<'a> = HashMap<(&'a str, &'a str), i64>;

/// The id of `(device, metric)`, created if new; `cache` spans one batch.
fn series_id<'a>(
    tx: &Connection,
    cache: &mut SeriesCache<'a>,
    device_id: &'a str,
    metric: &'a str,
) -> Result<i64> {
    if let Some(id) = cache.get(&(device_id, metric)) {
        return Ok(*id);
    }
    let id = match find_series(tx, device_id, metric)? {
        Some(id) => id,
        None => {
            tx.prepare_cached("INSERT INTO telemetry_series (device_id, metric) VALUES (?1, ?2)")
                .db()?
                .execute(params![device_id, metric])
                .db()?;
            tx.last_insert_rowid()
        }
    };
    cache.insert((device_id, metric), id);
    Ok(id)
}

/// Whether storing `record` would give its device more than `max` distinct metric names. Looks
/// at the store only when the record names a metric not already in this batch's `cache`, and
/// caches what it finds there, so [`series_id`] does not look again.
fn over_metrics_bound<'a>(
    tx: &Connection,
    cache: &mut SeriesCache<'a>,
    record: &'a TelemetryRecord,
    max: usize,
) -> Result<bool> {
    let device = record.device_id.as_str();
    let mut new: Vec<&str> = Vec::new();
    for (metric, _) in &record.points {
        let metric = metric.as_str();
        if cache.contains_key(&(device, metric)) || new.contains(&metric) {
            continue;
        }
        match find_series(tx, device, metric)? {
            Some(id) => {
                cache.insert((device, metric), id);
            }
            None => new.push(metric),
        }
    }
    if new.is_empty() {
        return Ok(false);
    }
    let existing: i64 = tx
        .prepare_cached(
            "SELECT count(*) FROM telemetry_series WHERE device_id = ?1 AND metric != ?2",
        )
        .db()?
        .query_row(params![device, KEYS_METRIC], |row| row.get(0))
        .db()?;
    let existing = usize::try_from(existing).unwrap_or(usize::MAX);
    Ok(existing.saturating_add(new.len()) > max)
}

fn find_series(conn: &Connection, device_id: &str, metric: &str) -> Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM telemetry_series WHERE device_id = ?1 AND metric = ?2")
        .db()?
        .query_row(params![device_id, metric], |row| row.get(0))
        .optional()
        .db()
}

/// Whether a compacted dedupe-key chunk of `keys_series` holds `seq`. A chunk that cannot be
/// decoded is logged and treated as not holding it: one device's corrupt chunk must not fail
/// the whole group-commit batch (at worst a resent point is stored twice).
fn seq_in_chunks(tx: &Connection, keys_series: i64, seq: i64) -> Result<bool> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT data FROM telemetry_chunks INDEXED BY telemetry_chunks_by_seq_max
             WHERE series_id = ?1 AND seq_max IS NOT NULL AND seq_max >= ?2 AND seq_min <= ?2",
        )
        .db()?;
    let mut rows = stmt.query(params![keys_series, seq]).db()?;
    while let Some(row) = rows.next().db()? {
        let data: Vec<u8> = row.get(0).db()?;
        match chunk::decode_keys(&data) {
            Ok(keys) => {
                if keys.iter().any(|(_, s)| seq_to_sql(*s) == seq) {
                    return Ok(true);
                }
            }
            Err(e) => {
                tracing::warn!(series = keys_series, error = %e, "dedupe-key chunk unreadable")
            }
        }
    }
    Ok(false)
}

/// Points of one series in `[from_ms, to_ms]`, oldest first (ties: compacted before recent, each
/// in insertion order), at most `limit`.
fn series_points(
    conn: &Connection,
    series_id: i64,
    from_ms: i64,
    to_ms: i64,
    limit: usize,
) -> Result<Vec<(i64, MetricValue)>> {
    let mut compacted = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT data FROM telemetry_chunks
                 WHERE series_id = ?1 AND window_start_ms > ?2 AND window_start_ms <= ?3
                 ORDER BY window_start_ms",
            )
            .db()?;
        let mut rows = stmt
            .query(params![
                series_id,
                from_ms.saturating_sub(CHUNK_WINDOW_MS),
                to_ms
            ])
            .db()?;
        while compacted.len() < limit {
            let Some(row) = rows.next().db()? else { break };
            let data: Vec<u8> = row.get(0).db()?;
            let points = chunk::decode_points(&data).map_err(|e| corrupt(series_id, &e))?;
            compacted.extend(
                points
                    .into_iter()
                    .filter(|(ts, _)| (from_ms..=to_ms).contains(ts)),
            );
        }
    }
    compacted.truncate(limit);
    let recent = conn
        .prepare_cached(
            "SELECT ts_ms, value, is_bool FROM telemetry_points
             INDEXED BY telemetry_points_by_series_ts
             WHERE series_id = ?1 AND ts_ms BETWEEN ?2 AND ?3
             ORDER BY ts_ms, id LIMIT ?4",
        )
        .db()?
        .query_map(
            params![series_id, from_ms, to_ms, count_to_sql(limit)],
            |row| Ok((row.get::<_, i64>(0)?, value_columns(row, 1)?)),
        )
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;
    if recent.is_empty() {
        return Ok(compacted);
    }
    if compacted.is_empty() {
        return Ok(recent);
    }
    let mut merged = Vec::with_capacity(limit.min(compacted.len() + recent.len()));
    let (mut a, mut b) = (
        compacted.into_iter().peekable(),
        recent.into_iter().peekable(),
    );
    while merged.len() < limit {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 <= y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        merged.extend(if take_a { a.next() } else { b.next() });
    }
    Ok(merged)
}

#[async_trait::async_trait]
impl TelemetryStore for SqliteStore {
    async fn append_batch_bounded(
        &self,
        batch: Vec<TelemetryRecord>,
        metrics_per_device_max: usize,
    ) -> Result<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for record in &batch {
            record.validate()?;
        }
        self.write(move |conn| {
            // The group commit runs this write in a savepoint of its own.
            let tx: &Connection = conn;
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut series = HashMap::new();
            let mut latest: HashMap<i64, (i64, f64, i64)> = HashMap::new();
            for record in &batch {
                let device = record.device_id.as_str();
                let ts_ms = ts_to_sql("ts_ms", record.ts_ms)?;
                if over_metrics_bound(tx, &mut series, record, metrics_per_device_max)? {
                    outcomes.push(AppendOutcome::MetricsLimit);
                    continue;
                }
                if let Some(seq) = record.seq {
                    let keys = series_id(tx, &mut series, device, KEYS_METRIC)?;
                    let seq = seq_to_sql(seq);
                    let fresh = !seq_in_chunks(tx, keys, seq)?
                        && tx
                            .prepare_cached(
                                "INSERT INTO telemetry_seq (series_id, seq, ts_ms) VALUES (?1, ?2, ?3)
                                 ON CONFLICT DO NOTHING",
                            )
                            .db()?
                            .execute(params![keys, seq, ts_ms])
                            .db()?
                            == 1;
                    if !fresh {
                        outcomes.push(AppendOutcome::Duplicate);
                        continue;
                    }
                }
                for (metric, value) in &record.points {
                    let id = series_id(tx, &mut series, device, metric)?;
                    let (value, is_bool) = encode_value(*value);
                    let row = params![id, ts_ms, value, is_bool];
                    tx.prepare_cached(
                        "INSERT INTO telemetry_points (series_id, ts_ms, value, is_bool)
                         VALUES (?1, ?2, ?3, ?4)",
                    )
                    .db()?
                    .execute(row)
                    .db()?;
                    // The batch's newest point per series (a later one wins a tie, as a later
                    // upsert would): one `latest` write per series per batch, not per point.
                    match latest.get_mut(&id) {
                        Some(l) if ts_ms < l.0 => {}
                        Some(l) => *l = (ts_ms, value, is_bool),
                        None => {
                            latest.insert(id, (ts_ms, value, is_bool));
                        }
                    }
                }
                outcomes.push(AppendOutcome::Stored);
            }
            for (id, (ts_ms, value, is_bool)) in latest {
                tx.prepare_cached(
                    "INSERT INTO telemetry_latest (series_id, ts_ms, value, is_bool)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (series_id) DO UPDATE
                       SET ts_ms = excluded.ts_ms, value = excluded.value, is_bool = excluded.is_bool
                       WHERE excluded.ts_ms >= telemetry_latest.ts_ms",
                )
                .db()?
                .execute(params![id, ts_ms, value, is_bool])
                .db()?;
            }
            debug_assert_eq!(outcomes.len(), batch.len());
            Ok(outcomes)
        })
        .await
    }

    async fn query(&self, q: TelemetryQuery) -> Result<Vec<Point>> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let from_ms = bound_to_sql(q.from_ms.unwrap_or(0));
        // [from, to) as an inclusive range; `to_ms: Some(0)` selects nothing.
        let to_ms = match q.to_ms {
            None => i64::MAX,
            Some(0) => return Ok(Vec::new()),
            Some(to) => bound_to_sql(to - 1),
        };
        self.read(move |conn| {
            let device = q.device_id.as_str();
            let series: Vec<(i64, String)> = match &q.metric {
                Some(metric) if metric.as_str() != KEYS_METRIC => {
                    find_series(conn, device, metric)?
                        .map(|id| (id, metric.clone()))
                        .into_iter()
                        .collect()
                }
                Some(_) => Vec::new(),
                None => conn
                    .prepare_cached(
                        "SELECT id, metric FROM telemetry_series
                         WHERE device_id = ?1 AND metric <> '' ORDER BY id",
                    )
                    .db()?
                    .query_map(params![device], |row| Ok((row.get(0)?, row.get(1)?)))
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .db()?,
            };
            // Ties at one timestamp: by series (first-seen order), then within the series.
            let mut all: Vec<(i64, usize, MetricValue)> = Vec::new();
            for (index, (id, _)) in series.iter().enumerate() {
                let points = series_points(conn, *id, from_ms, to_ms, q.limit)?;
                all.extend(points.into_iter().map(|(ts, v)| (ts, index, v)));
            }
            all.sort_by_key(|(ts, index, _)| (*ts, *index));
            all.truncate(q.limit);
            all.into_iter()
                .map(|(ts, index, value)| {
                    Ok(Point {
                        metric: series[index].1.clone(),
                        ts_ms: u64::try_from(ts).map_err(|_| {
                            StoreError::Backend(format!("negative stored timestamp {ts}"))
                        })?,
                        value,
                    })
                })
                .collect()
        })
        .await
    }

    async fn latest(&self, device_id: &str) -> Result<BTreeMap<String, (u64, MetricValue)>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT s.metric, l.ts_ms, l.value, l.is_bool
                     FROM telemetry_series s JOIN telemetry_latest l ON l.series_id = s.id
                     WHERE s.device_id = ?1",
                )
                .db()?;
            let rows = stmt
                .query_map(params![device_id], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        (super::u64_column(row, 1)?, value_columns(row, 2)?),
                    ))
                })
                .db()?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().db()
        })
        .await
    }

    async fn delete_older_than(&self, cutoff_ms: u64, max_rows: usize) -> Result<usize> {
        if max_rows == 0 {
            return Ok(0);
        }
        let cutoff_ms = bound_to_sql(cutoff_ms);
        let max_rows = count_to_sql(max_rows);
        self.write_background(move |conn| {
            // The group commit runs this write in a savepoint of its own.
            let tx: &Connection = conn;
            let points = tx
                .prepare_cached(
                    "DELETE FROM telemetry_points WHERE id IN
                       (SELECT id FROM telemetry_points WHERE ts_ms < ?1 LIMIT ?2)",
                )
                .db()?
                .execute(params![cutoff_ms, max_rows])
                .db()?;
            // Dedupe keys share the budget, after the points; then chunks, one row each.
            let mut budget = max_rows - count_to_sql(points);
            let keys = if budget > 0 {
                tx.prepare_cached(
                    "DELETE FROM telemetry_seq WHERE (series_id, seq) IN
                       (SELECT series_id, seq FROM telemetry_seq WHERE ts_ms < ?1 LIMIT ?2)",
                )
                .db()?
                .execute(params![cutoff_ms, budget])
                .db()?
            } else {
                0
            };
            budget -= count_to_sql(keys);
            let chunks = if budget > 0 {
                expire_chunks(tx, cutoff_ms, budget)?
            } else {
                0
            };
            Ok(points + keys + chunks)
        })
        .await
    }

    async fn compact(&self, closed_before_ms: u64, max_rows: usize) -> Result<usize> {
        if max_rows == 0 {
            return Ok(0);
        }
        // Only whole windows that end at or before `closed_before_ms`.
        let boundary = window_of(bound_to_sql(closed_before_ms));
        self.write_background(move |conn| {
            // The group commit runs this write in a savepoint of its own.
            let tx: &Connection = conn;
            let mut moved = 0usize;
            while moved < max_rows {
                let oldest = |sql: &str| -> Result<Option<(i64, i64)>> {
                    tx.prepare_cached(sql)
                        .db()?
                        .query_row(params![boundary], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()
                        .db()
                };
                if let Some((series, ts)) = oldest(
                    "SELECT series_id, ts_ms FROM telemetry_points INDEXED BY telemetry_points_by_ts
                     WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT 1",
                )? {
                    moved += compact_points(tx, series, window_of(ts))?;
                } else if let Some((series, ts)) = oldest(
                    "SELECT series_id, ts_ms FROM telemetry_seq INDEXED BY telemetry_seq_by_ts_v2
                     WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT 1",
                )? {
                    moved += compact_keys(tx, series, window_of(ts))?;
                } else {
                    break;
                }
            }
            Ok(moved)
        })
        .await
    }
}

/// The chunk of `(series, window)` if there is one: `(id, data)`.
fn existing_chunk(tx: &Connection, series: i64, window: i64) -> Result<Option<Vec<u8>>> {
    tx.prepare_cached(
        "SELECT data FROM telemetry_chunks WHERE series_id = ?1 AND window_start_ms = ?2",
    )
    .db()?
    .query_row(params![series, window], |row| row.get(0))
    .optional()
    .db()
}

#[allow(clippy::too_many_arguments)]
fn put_chunk(
    tx: &Connection,
    series: i64,
    window: i64,
    ts_min_ms: i64,
    ts_max_ms: i64,
    points: usize,
    seq_range: Option<(i64, i64)>,
    data: &[u8],
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO telemetry_chunks
           (series_id, window_start_ms, ts_min_ms, ts_max_ms, points, seq_min, seq_max, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (series_id, window_start_ms) DO UPDATE SET
           ts_min_ms = excluded.ts_min_ms, ts_max_ms = excluded.ts_max_ms,
           points = excluded.points, seq_min = excluded.seq_min, seq_max = excluded.seq_max,
           data = excluded.data",
    )
    .db()?
    .execute(params![
        series,
        window,
        ts_min_ms,
        ts_max_ms,
        count_to_sql(points),
        seq_range.map(|r| r.0),
        seq_range.map(|r| r.1),
        data
    ])
    .db()?;
    Ok(())
}

fn too_many(series: i64, window: i64) -> StoreError {
    StoreError::Backend(format!(
        "series {series}: window {window} holds more than {CHUNK_POINTS_MAX} points"
    ))
}

/// Moves the recent points of `(series, window)` into its chunk (merging with the chunk already
/// there, if late points arrived). Returns how many recent rows it moved.
fn compact_points(tx: &Connection, series: i64, window: i64) -> Result<usize> {
    let mut points = match existing_chunk(tx, series, window)? {
        Some(data) => chunk::decode_points(&data).map_err(|e| corrupt(series, &e))?,
        None => Vec::new(),
    };
    let end = window + CHUNK_WINDOW_MS;
    let recent = tx
        .prepare_cached(
            "SELECT ts_ms, value, is_bool FROM telemetry_points
             WHERE series_id = ?1 AND ts_ms >= ?2 AND ts_ms < ?3 ORDER BY id",
        )
        .db()?
        .query_map(params![series, window, end], |row| {
            Ok((row.get::<_, i64>(0)?, value_columns(row, 1)?))
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;
    let moved = recent.len();
    points.extend(recent);
    if points.len() > CHUNK_POINTS_MAX {
        return Err(too_many(series, window));
    }
    // Stable: ties keep compacted-then-recent, each in insertion order.
    points.sort_by_key(|(ts, _)| *ts);
    if !put_point_chunk(tx, series, window, &points)? {
        return Ok(0);
    }
    tx.prepare_cached(
        "DELETE FROM telemetry_points WHERE series_id = ?1 AND ts_ms >= ?2 AND ts_ms < ?3",
    )
    .db()?
    .execute(params![series, window, end])
    .db()?;
    Ok(moved)
}

/// Writes `points` (oldest first) as the chunk of `(series, window)`; false, writing nothing,
/// when there are none.
fn put_point_chunk(
    tx: &Connection,
    series: i64,
    window: i64,
    points: &[(i64, MetricValue)],
) -> Result<bool> {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Ok(false);
    };
    let data = chunk::encode_points(points);
    put_chunk(
        tx,
        series,
        window,
        first.0,
        last.0,
        points.len(),
        None,
        &data,
    )?;
    Ok(true)
}

/// Encodes dedupe keys sorted by seq (as stored, i64) and writes their chunk.
fn put_key_chunk(tx: &Connection, series: i64, window: i64, keys: &mut [(i64, u64)]) -> Result<()> {
    keys.sort_by_key(|(_, seq)| seq_to_sql(*seq));
    let ts_min = keys.iter().map(|k| k.0).min();
    let ts_max = keys.iter().map(|k| k.0).max();
    let (Some(ts_min), Some(ts_max), Some(first), Some(last)) =
        (ts_min, ts_max, keys.first(), keys.last())
    else {
        return Ok(());
    };
    let seq_range = (seq_to_sql(first.1), seq_to_sql(last.1));
    let data = chunk::encode_keys(keys);
    put_chunk(
        tx,
        series,
        window,
        ts_min,
        ts_max,
        keys.len(),
        Some(seq_range),
        &data,
    )
}

/// [`compact_points`] for a device's dedupe keys.
fn compact_keys(tx: &Connection, series: i64, window: i64) -> Result<usize> {
    let mut keys = match existing_chunk(tx, series, window)? {
        Some(data) => chunk::decode_keys(&data).map_err(|e| corrupt(series, &e))?,
        None => Vec::new(),
    };
    let end = window + CHUNK_WINDOW_MS;
    let recent = tx
        .prepare_cached(
            // By the primary key's series prefix: the series' recent keys are few (compaction
            // keeps up), while the ts index would walk every device's keys of the window.
            "SELECT ts_ms, seq FROM telemetry_seq
             WHERE series_id = ?1 AND +ts_ms >= ?2 AND +ts_ms < ?3",
        )
        .db()?
        .query_map(params![series, window, end], |row| {
            let seq: i64 = row.get(1)?;
            Ok((row.get::<_, i64>(0)?, u64::from_ne_bytes(seq.to_ne_bytes())))
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;
    let moved = recent.len();
    keys.extend(recent);
    if keys.len() > CHUNK_POINTS_MAX {
        return Err(too_many(series, window));
    }
    put_key_chunk(tx, series, window, &mut keys)?;
    tx.prepare_cached(
        "DELETE FROM telemetry_seq WHERE series_id = ?1 AND +ts_ms >= ?2 AND +ts_ms < ?3",
    )
    .db()?
    .execute(params![series, window, end])
    .db()?;
    Ok(moved)
}

/// Retention for chunks: deletes those wholly older than `cutoff_ms` and rewrites those that
/// straddle it without their old points; at most `budget` chunks, one row each.
fn expire_chunks(tx: &Connection, cutoff_ms: i64, budget: i64) -> Result<usize> {
    let old: Vec<(i64, i64, i64, i64, bool)> = tx
        .prepare_cached(
            "SELECT id, series_id, window_start_ms, ts_max_ms, seq_max IS NOT NULL
             FROM telemetry_chunks INDEXED BY telemetry_chunks_by_ts_min
             WHERE ts_min_ms < ?1 ORDER BY ts_min_ms LIMIT ?2",
        )
        .db()?
        .query_map(params![cutoff_ms, budget], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;
    for &(id, series, window, ts_max_ms, is_keys) in &old {
        let delete = || -> Result<()> {
            tx.prepare_cached("DELETE FROM telemetry_chunks WHERE id = ?1")
                .db()?
                .execute(params![id])
                .db()?;
            Ok(())
        };
        if ts_max_ms < cutoff_ms {
            delete()?;
            continue;
        }
        let data: Vec<u8> = tx
            .prepare_cached("SELECT data FROM telemetry_chunks WHERE id = ?1")
            .db()?
            .query_row(params![id], |row| row.get(0))
            .db()?;
        if is_keys {
            let mut keys = chunk::decode_keys(&data).map_err(|e| corrupt(series, &e))?;
            keys.retain(|(ts, _)| *ts >= cutoff_ms);
            delete()?;
            put_key_chunk(tx, series, window, &mut keys)?;
        } else {
            let mut points = chunk::decode_points(&data).map_err(|e| corrupt(series, &e))?;
            points.retain(|(ts, _)| *ts >= cutoff_ms);
            delete()?;
            put_point_chunk(tx, series, window, &points)?;
        }
    }
    Ok(old.len())
}

/// Deletes a device's latest values; run in the transaction that deletes the device.
pub(super) const DELETE_DEVICE_LATEST_SQL: &str = "DELETE FROM telemetry_latest WHERE series_id IN
   (SELECT id FROM telemetry_series WHERE device_id = ?1)";

/// Removes every point, dedupe key, chunk and series of `device_id` (after
/// [`DELETE_DEVICE_LATEST_SQL`]) in bounded transactions with the writer released in between so
/// ingest batches interleave. Series are removed last, and only when nothing refers to them.
pub(super) fn delete_device_telemetry(inner: &Inner, device_id: &str) -> Result<()> {
    for (sql, rows) in [
        (
            "DELETE FROM telemetry_points WHERE id IN
               (SELECT id FROM telemetry_points WHERE series_id IN
                  (SELECT id FROM telemetry_series WHERE device_id = ?1) LIMIT ?2)",
            DELETE_DEVICE_ROWS,
        ),
        (
            "DELETE FROM telemetry_seq WHERE (series_id, seq) IN
               (SELECT series_id, seq FROM telemetry_seq WHERE series_id IN
                  (SELECT id FROM telemetry_series WHERE device_id = ?1) LIMIT ?2)",
            DELETE_DEVICE_ROWS,
        ),
        (
            "DELETE FROM telemetry_chunks WHERE id IN
               (SELECT id FROM telemetry_chunks WHERE series_id IN
                  (SELECT id FROM telemetry_series WHERE device_id = ?1) LIMIT ?2)",
            DELETE_DEVICE_CHUNKS,
        ),
    ] {
        loop {
            let deleted = inner
                .writer()?
                .prepare_cached(sql)
                .db()?
                .execute(params![device_id, rows])
                .db()?;
            if count_to_sql(deleted) < rows {
                break;
            }
        }
    }
    inner
        .writer()?
        .prepare_cached(
            "DELETE FROM telemetry_series WHERE device_id = ?1
               AND NOT EXISTS (SELECT 1 FROM telemetry_points p WHERE p.series_id = telemetry_series.id)
               AND NOT EXISTS (SELECT 1 FROM telemetry_seq k WHERE k.series_id = telemetry_series.id)
               AND NOT EXISTS (SELECT 1 FROM telemetry_chunks c WHERE c.series_id = telemetry_series.id)
               AND NOT EXISTS (SELECT 1 FROM telemetry_latest l WHERE l.series_id = telemetry_series.id)",
        )
        .db()?
        .execute(params![device_id])
        .db()?;
    Ok(())
}
