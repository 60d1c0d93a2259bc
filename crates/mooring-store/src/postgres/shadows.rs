//! [`ShadowStore`] for PostgreSQL: one row per device, compare-and-set on `version`.

use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::{column, count_to_sql, device_id_column, pg_error, ts_to_sql, u64_column, PgStore};
use crate::error::{Result, StoreError};
use crate::model::ShadowRecord;
use crate::store::{ShadowStore, COMMAND_BATCH_LEN_MAX};

const SHADOW_COLUMNS: &str = "device_id, desired, reported, version, updated_at_ms";

fn shadow_from_row(row: &Row) -> Result<ShadowRecord> {
    let Json(desired) = column::<Json<Map<String, Value>>>(row, 1)?;
    let Json(reported) = column::<Json<Map<String, Value>>>(row, 2)?;
    Ok(ShadowRecord {
        device_id: device_id_column(row, 0)?,
        desired,
        reported,
        version: u64_column(row, 3)?,
        updated_at_ms: u64_column(row, 4)?,
    })
}

#[async_trait::async_trait]
impl ShadowStore for PgStore {
    async fn get_shadow(&self, device_id: &str) -> Result<Option<ShadowRecord>> {
        let sql = format!("SELECT {SHADOW_COLUMNS} FROM shadows WHERE device_id = $1");
        let row = self.query_opt(&sql, &[&device_id]).await?;
        row.as_ref().map(shadow_from_row).transpose()
    }

    async fn save_shadow(&self, record: ShadowRecord, expected_version: u64) -> Result<bool> {
        let version = ts_to_sql("version", record.version)?;
        let expected = ts_to_sql("expected_version", expected_version)?;
        let updated_at_ms = ts_to_sql("updated_at_ms", record.updated_at_ms)?;
        let device = record.device_id.as_str();
        let not_found = || StoreError::NotFound(format!("device {device}"));
        let client = self.client().await?;
        // One statement on the happy path; the device is looked up only when nothing was
        // written (a missing device is NotFound, a stale version `false`), or named by the
        // foreign key.
        let stmt = if expected == 0 {
            client
                .prepare_cached(
                    "INSERT INTO shadows (device_id, desired, reported, version, updated_at_ms)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .await
        } else {
            client
                .prepare_cached(
                    "UPDATE shadows SET desired = $2, reported = $3, version = $4, updated_at_ms = $5
                     WHERE device_id = $1 AND version = $6",
                )
                .await
        }
        .map_err(pg_error)?;
        let desired = Json(&record.desired);
        let reported = Json(&record.reported);
        let written = if expected == 0 {
            client
                .execute(
                    &stmt,
                    &[&device, &desired, &reported, &version, &updated_at_ms],
                )
                .await
        } else {
            client
                .execute(
                    &stmt,
                    &[
                        &device,
                        &desired,
                        &reported,
                        &version,
                        &updated_at_ms,
                        &expected,
                    ],
                )
                .await
        };
        let written = match written {
            Ok(n) => n,
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => return Err(not_found()),
            Err(e) => return Err(pg_error(e)),
        };
        if written > 0 {
            return Ok(true);
        }
        let stmt = client
            .prepare_cached("SELECT 1 FROM devices WHERE id = $1")
            .await
            .map_err(pg_error)?;
        match client
            .query_opt(&stmt, &[&device])
            .await
            .map_err(pg_error)?
        {
            Some(_) => Ok(false),
            None => Err(not_found()),
        }
    }

    async fn get_shadows(&self, device_ids: &[String]) -> Result<Vec<ShadowRecord>> {
        if device_ids.len() > COMMAND_BATCH_LEN_MAX {
            return Err(StoreError::InvalidInput(format!(
                "at most {COMMAND_BATCH_LEN_MAX} ids per call"
            )));
        }
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {SHADOW_COLUMNS} FROM shadows WHERE device_id = ANY($1::text[])
             ORDER BY device_id"
        );
        let rows = self.query(&sql, &[&device_ids]).await?;
        rows.iter().map(shadow_from_row).collect()
    }

    async fn list_shadows(
        &self,
        limit: usize,
        after_device_id: Option<&str>,
    ) -> Result<Vec<ShadowRecord>> {
        let limit = count_to_sql(limit.min(COMMAND_BATCH_LEN_MAX));
        // Every id sorts after "" (ids are never empty), so "" means "from the start".
        let after = after_device_id.unwrap_or("");
        let sql = format!(
            "SELECT {SHADOW_COLUMNS} FROM shadows WHERE device_id > $1 ORDER BY device_id LIMIT $2"
        );
        let rows = self.query(&sql, &[&after, &limit]).await?;
        rows.iter().map(shadow_from_row).collect()
    }
}
