//! [`TelemetryStore`] for SQLite: batched appends deduplicated by `(device, seq)`, queries, latest values, retention.

use std::collections::BTreeMap;

use rusqlite::{params, Row, TransactionBehavior};

use super::{bound_to_sql, count_to_sql, seq_to_sql, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::Result;
use crate::model::{AppendOutcome, MetricValue, Point, TelemetryQuery, TelemetryRecord};
use crate::store::TelemetryStore;

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

#[async_trait::async_trait]
impl TelemetryStore for SqliteStore {
    async fn append_batch(&self, batch: Vec<TelemetryRecord>) -> Result<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for record in &batch {
            record.validate()?;
        }
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let mut outcomes = Vec::with_capacity(batch.len());
            {
                let mut insert_seq = tx
                    .prepare_cached(
                        "INSERT INTO telemetry_seq (device_id, seq, ts_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT DO NOTHING",
                    )
                    .db()?;
                let mut insert_point = tx
                    .prepare_cached(
                        "INSERT INTO telemetry (device_id, metric, ts_ms, value, is_bool)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .db()?;
                let mut upsert_latest = tx
                    .prepare_cached(
                        "INSERT INTO telemetry_latest (device_id, metric, ts_ms, value, is_bool)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (device_id, metric) DO UPDATE
                           SET ts_ms = excluded.ts_ms, value = excluded.value, is_bool = excluded.is_bool
                           WHERE excluded.ts_ms >= telemetry_latest.ts_ms",
                    )
                    .db()?;
                for record in &batch {
                    let ts_ms = ts_to_sql("ts_ms", record.ts_ms)?;
                    if let Some(seq) = record.seq {
                        let fresh = insert_seq
                            .execute(params![record.device_id.as_str(), seq_to_sql(seq), ts_ms])
                            .db()?;
                        if fresh == 0 {
                            outcomes.push(AppendOutcome::Duplicate);
                            continue;
                        }
                    }
                    for (metric, value) in &record.points {
                        let (value, is_bool) = encode_value(*value);
                        let row = params![record.device_id.as_str(), metric, ts_ms, value, is_bool];
                        insert_point.execute(row).db()?;
                        upsert_latest.execute(row).db()?;
                    }
                    outcomes.push(AppendOutcome::Stored);
                }
            }
            tx.commit().db()?;
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
        let to_ms_inclusive = match q.to_ms {
            None => i64::MAX,
            Some(0) => return Ok(Vec::new()),
            Some(to) => bound_to_sql(to - 1),
        };
        let limit = count_to_sql(q.limit);
        self.read(move |conn| {
            let to_point = |row: &Row<'_>| {
                Ok(Point {
                    metric: row.get(0)?,
                    ts_ms: u64_column(row, 1)?,
                    value: value_columns(row, 2)?,
                })
            };
            let points = match &q.metric {
                Some(metric) => conn
                    .prepare_cached(
                        "SELECT metric, ts_ms, value, is_bool FROM telemetry
                         INDEXED BY telemetry_by_device_metric_ts
                         WHERE device_id = ?1 AND metric = ?2 AND ts_ms BETWEEN ?3 AND ?4
                         ORDER BY ts_ms, id LIMIT ?5",
                    )
                    .db()?
                    .query_map(
                        params![
                            q.device_id.as_str(),
                            metric,
                            from_ms,
                            to_ms_inclusive,
                            limit
                        ],
                        to_point,
                    )
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>(),
                None => conn
                    .prepare_cached(
                        "SELECT metric, ts_ms, value, is_bool FROM telemetry
                         INDEXED BY telemetry_by_device_ts
                         WHERE device_id = ?1 AND ts_ms BETWEEN ?2 AND ?3
                         ORDER BY ts_ms, id LIMIT ?4",
                    )
                    .db()?
                    .query_map(
                        params![q.device_id.as_str(), from_ms, to_ms_inclusive, limit],
                        to_point,
                    )
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>(),
            };
            points.db()
        })
        .await
    }

    async fn latest(&self, device_id: &str) -> Result<BTreeMap<String, (u64, MetricValue)>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT metric, ts_ms, value, is_bool FROM telemetry_latest WHERE device_id = ?1",
                )
                .db()?;
            let rows = stmt
                .query_map(params![device_id], |row| {
                    Ok((row.get::<_, String>(0)?, (u64_column(row, 1)?, value_columns(row, 2)?)))
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
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let points = tx
                .prepare_cached(
                    "DELETE FROM telemetry WHERE id IN
                       (SELECT id FROM telemetry WHERE ts_ms < ?1 LIMIT ?2)",
                )
                .db()?
                .execute(params![cutoff_ms, max_rows])
                .db()?;
            // Dedupe keys share the budget, after the points.
            let budget = max_rows - count_to_sql(points);
            let keys = if budget > 0 {
                tx.prepare_cached(
                    "DELETE FROM telemetry_seq WHERE (device_id, seq) IN
                       (SELECT device_id, seq FROM telemetry_seq WHERE ts_ms < ?1 LIMIT ?2)",
                )
                .db()?
                .execute(params![cutoff_ms, budget])
                .db()?
            } else {
                0
            };
            tx.commit().db()?;
            Ok(points + keys)
        })
        .await
    }
}
