//! [`HealthStore`] for PostgreSQL: the semantics of `sqlite/health.rs`. A merge creates the
//! missing records first, then locks every record it folds into (in id order, so concurrent
//! merges from several nodes cannot deadlock) and writes them back in the same transaction.

use std::collections::HashMap;

use super::{bound_to_sql, column, pg_error, PgStore};
use crate::error::Result;
use crate::health::{check_batch, DeviceHealth, HealthDelta};
use crate::store::HealthStore;

#[async_trait::async_trait]
impl HealthStore for PgStore {
    async fn merge_device_health(
        &self,
        mut deltas: Vec<HealthDelta>,
        gap_ms: u64,
    ) -> Result<usize> {
        check_batch(deltas.len())?;
        if deltas.is_empty() {
            return Ok(0);
        }
        deltas.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let mut ids: Vec<&str> = deltas.iter().map(|d| d.device_id.as_str()).collect();
        ids.dedup();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let created: HashMap<String, i64> = tx
            .query(
                "SELECT id, created_at_ms FROM devices WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| Ok((column::<String>(r, 0)?, column::<i64>(r, 1)?)))
            .collect::<Result<_>>()?;
        // Seen of a device deleted since, whose id was registered again: not its record.
        deltas.retain(|d| {
            let first = i64::try_from(d.first_ms).unwrap_or(i64::MAX);
            created.get(&d.device_id).is_some_and(|c| first >= *c)
        });
        let mut ids: Vec<&str> = deltas.iter().map(|d| d.device_id.as_str()).collect();
        ids.dedup();
        tx.execute(
            "INSERT INTO device_health (device_id, signals, updated_ms)
             SELECT id, '{}', 0 FROM devices WHERE id = ANY($1) ORDER BY id
             ON CONFLICT (device_id) DO NOTHING",
            &[&ids],
        )
        .await
        .map_err(pg_error)?;
        let rows = tx
            .query(
                "SELECT device_id, signals FROM device_health WHERE device_id = ANY($1)
                 ORDER BY device_id FOR UPDATE",
                &[&ids],
            )
            .await
            .map_err(pg_error)?;
        let mut records: HashMap<String, DeviceHealth> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: String = column(row, 0)?;
            let signals: String = column(row, 1)?;
            records.insert(id, DeviceHealth::from_json(&signals));
        }
        let mut applied = 0;
        for d in &deltas {
            if let Some(h) = records.get_mut(&d.device_id) {
                h.apply(d, gap_ms);
                applied += 1;
            }
        }
        let stmt = tx
            .prepare_cached(
                "UPDATE device_health SET signals = $2, updated_ms = $3 WHERE device_id = $1",
            )
            .await
            .map_err(pg_error)?;
        let mut written: Vec<(&String, &DeviceHealth)> = records.iter().collect();
        written.sort_by(|a, b| a.0.cmp(b.0));
        for (id, h) in written {
            tx.execute(&stmt, &[id, &h.to_json(), &bound_to_sql(h.updated_ms)])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(applied)
    }

    async fn get_device_health(&self, ids: &[String]) -> Result<Vec<(String, DeviceHealth)>> {
        check_batch(ids.len())?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                "SELECT device_id, signals FROM device_health WHERE device_id = ANY($1)",
                &[&ids],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = column(row, 0)?;
                let signals: String = column(row, 1)?;
                Ok((id, DeviceHealth::from_json(&signals)))
            })
            .collect()
    }
}
