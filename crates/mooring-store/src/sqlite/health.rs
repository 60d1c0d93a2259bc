//! [`HealthStore`] for SQLite: one JSON record per device, folded in the writer's transaction.

use rusqlite::{params, OptionalExtension};

use super::{bound_to_sql, Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::health::{check_batch, DeviceHealth, HealthDelta};
use crate::store::HealthStore;

#[async_trait::async_trait]
impl HealthStore for SqliteStore {
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
        self.write(move |conn| {
            let mut read = conn
                .prepare_cached(
                    "SELECT d.created_at_ms, h.signals FROM devices d
                     LEFT JOIN device_health h ON h.device_id = d.id WHERE d.id = ?1",
                )
                .db()?;
            let mut write = conn
                .prepare_cached(
                    "INSERT INTO device_health (device_id, signals, updated_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (device_id) DO UPDATE
                       SET signals = excluded.signals, updated_ms = excluded.updated_ms",
                )
                .db()?;
            let mut applied = 0;
            for d in &deltas {
                let row: Option<(i64, Option<String>)> = read
                    .query_row(params![d.device_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .db()?;
                let Some((created_at_ms, stored)) = row else {
                    continue; // the device is gone
                };
                if i64::try_from(d.first_ms).unwrap_or(i64::MAX) < created_at_ms {
                    continue; // seen of a device deleted since, whose id was registered again
                }
                let mut h = stored
                    .as_deref()
                    .map(DeviceHealth::from_json)
                    .unwrap_or_default();
                h.apply(d, gap_ms);
                write
                    .execute(params![
                        d.device_id,
                        h.to_json(),
                        bound_to_sql(h.updated_ms)
                    ])
                    .db()?;
                applied += 1;
            }
            Ok(applied)
        })
        .await
    }

    async fn get_device_health(&self, ids: &[String]) -> Result<Vec<(String, DeviceHealth)>> {
        check_batch(ids.len())?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(ids)
            .map_err(|e| StoreError::InvalidInput(format!("ids: {e}")))?;
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT device_id, signals FROM device_health
                     WHERE device_id IN (SELECT value FROM json_each(?1))",
                )
                .db()?;
            let rows = stmt
                .query_map(params![ids], |r| {
                    let id: String = r.get(0)?;
                    let signals: String = r.get(1)?;
                    Ok((id, DeviceHealth::from_json(&signals)))
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }
}
