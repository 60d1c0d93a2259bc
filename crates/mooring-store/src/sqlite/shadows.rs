//! [`ShadowStore`] for SQLite: one row per device, compare-and-set on `version`.

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::{count_to_sql, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::model::ShadowRecord;
use crate::store::{ShadowStore, COMMAND_BATCH_LEN_MAX};

const SHADOW_COLUMNS: &str = "device_id, desired, reported, version, updated_at_ms";
/// Ids per `IN (...)` query (SQLite's default variable limit is 32766).
const IDS_PER_QUERY_MAX: usize = 500;

fn object_column(
    row: &Row<'_>,
    index: usize,
) -> rusqlite::Result<serde_json::Map<String, serde_json::Value>> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e)))
}

fn shadow_from_row(row: &Row<'_>) -> rusqlite::Result<ShadowRecord> {
    Ok(ShadowRecord {
        device_id: super::device_id_column(row, 0)?,
        desired: object_column(row, 1)?,
        reported: object_column(row, 2)?,
        version: u64_column(row, 3)?,
        updated_at_ms: u64_column(row, 4)?,
    })
}

fn to_text(v: &serde_json::Map<String, serde_json::Value>) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidInput(format!("shadow: {e}")))
}

#[async_trait::async_trait]
impl ShadowStore for SqliteStore {
    async fn get_shadow(&self, device_id: &str) -> Result<Option<ShadowRecord>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SHADOW_COLUMNS} FROM shadows WHERE device_id = ?1"
            ))
            .db()?
            .query_row(params![device_id], shadow_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn save_shadow(&self, record: ShadowRecord, expected_version: u64) -> Result<bool> {
        let desired = to_text(&record.desired)?;
        let reported = to_text(&record.reported)?;
        let version = ts_to_sql("version", record.version)?;
        let expected = ts_to_sql("expected_version", expected_version)?;
        let updated_at_ms = ts_to_sql("updated_at_ms", record.updated_at_ms)?;
        self.write(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
                .db()?
                .query_row(params![record.device_id.as_str()], |_| Ok(()))
                .optional()
                .db()?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("device {}", record.device_id)));
            }
            let written = if expected == 0 {
                conn.prepare_cached(
                    "INSERT INTO shadows (device_id, desired, reported, version, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )
                .db()?
                .execute(params![record.device_id.as_str(), desired, reported, version, updated_at_ms])
                .db()?
            } else {
                conn.prepare_cached(
                    "UPDATE shadows SET desired = ?2, reported = ?3, version = ?4, updated_at_ms = ?5
                     WHERE device_id = ?1 AND version = ?6",
                )
                .db()?
                .execute(params![
                    record.device_id.as_str(),
                    desired,
                    reported,
                    version,
                    updated_at_ms,
                    expected
                ])
                .db()?
            };
            Ok(written > 0)
        })
        .await
    }

    async fn get_shadows(&self, device_ids: &[String]) -> Result<Vec<ShadowRecord>> {
        if device_ids.len() > COMMAND_BATCH_LEN_MAX {
            return Err(StoreError::InvalidInput(format!(
                "at most {COMMAND_BATCH_LEN_MAX} ids per call"
            )));
        }
        let ids = device_ids.to_vec();
        self.read(move |conn| {
            let mut out = Vec::new();
            for chunk in ids.chunks(IDS_PER_QUERY_MAX) {
                let marks = vec!["?"; chunk.len()].join(",");
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {SHADOW_COLUMNS} FROM shadows WHERE device_id IN ({marks})"
                    ))
                    .db()?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(chunk.iter()), shadow_from_row)
                    .db()?;
                for r in rows {
                    out.push(r.db()?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_shadows(
        &self,
        limit: usize,
        after_device_id: Option<&str>,
    ) -> Result<Vec<ShadowRecord>> {
        let limit = count_to_sql(limit.min(COMMAND_BATCH_LEN_MAX));
        let after = after_device_id.unwrap_or("").to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SHADOW_COLUMNS} FROM shadows WHERE device_id > ?1 ORDER BY device_id LIMIT ?2"
            ))
            .db()?
            .query_map(params![after, limit], shadow_from_row)
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }
}
