//! [`DeviceStore`] for SQLite: devices, their tags, pinned certificates (and their ledger rows)
//! and last-seen times.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};

use super::{
    blocking, count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db,
    SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{
    clip_step_error, step_errors_from_json, CertRecord, DeviceActivity, DeviceFilter, DeviceRecord,
    Installation, NewDevice, PipelineCounts, StepError, VersionCounts,
};
use crate::store::DeviceStore;

const DEVICE_COLUMNS: &str =
    "id, tags, created_at_ms, cert_sha256, cert_serial, cert_not_after_ms, \
    last_seen_ms, first_connect_ms, first_telemetry_ms, last_telemetry_ms, installed_at_ms, \
    installed_by, installed_location, installed_notes, provisioning_errors";

fn opt_u64_column(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<u64>> {
    match row.get::<_, Option<i64>>(index)? {
        None => Ok(None),
        Some(_) => u64_column(row, index).map(Some),
    }
}

fn tags_to_sql(tags: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(tags).map_err(|e| StoreError::InvalidInput(format!("tags: {e}")))
}

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let tags: String = row.get(1)?;
    let tags = serde_json::from_str(&tags)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, Box::new(e)))?;
    Ok(DeviceRecord {
        id: super::device_id_column(row, 0)?,
        tags,
        created_at_ms: u64_column(row, 2)?,
        cert_sha256: row.get(3)?,
        cert_serial: row.get(4)?,
        cert_not_after_ms: u64_column(row, 5)?,
        last_seen_ms: opt_u64_column(row, 6)?,
        first_connect_ms: opt_u64_column(row, 7)?,
        first_telemetry_ms: opt_u64_column(row, 8)?,
        last_telemetry_ms: opt_u64_column(row, 9)?,
        installation: match opt_u64_column(row, 10)? {
            None => None,
            Some(at_ms) => Some(Installation {
                at_ms,
                by: row.get::<_, Option<String>>(11)?.unwrap_or_default(),
                location: row.get::<_, Option<String>>(12)?.unwrap_or_default(),
                notes: row.get::<_, Option<String>>(13)?.unwrap_or_default(),
            }),
        },
        provisioning_errors: step_errors_from_json(row.get::<_, Option<String>>(14)?.as_deref()),
    })
}

/// The `device_tags` rows of a device (what selections look tags up in), replacing its old
/// ones when `replace`; in the caller's transaction, with the `devices.tags` write.
fn write_tags(
    conn: &rusqlite::Connection,
    id: &str,
    tags: &BTreeMap<String, String>,
    replace: bool,
) -> Result<()> {
    if replace {
        conn.prepare_cached("DELETE FROM device_tags WHERE device_id = ?1")
            .db()?
            .execute(params![id])
            .db()?;
    }
    let mut insert = conn
        .prepare_cached("INSERT INTO device_tags (device_id, key, value) VALUES (?1, ?2, ?3)")
        .db()?;
    for (k, v) in tags {
        insert.execute(params![id, k, v]).db()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Inserts a device and its certificate's ledger row in one transaction.
    pub(super) async fn insert_device(
        &self,
        d: NewDevice,
        cert: CertRecord,
    ) -> Result<DeviceRecord> {
        d.validate()?;
        cert.validate()?;
        let record = d.into_record();
        let tags = tags_to_sql(&record.tags)?;
        let created_at_ms = ts_to_sql("created_at_ms", record.created_at_ms)?;
        let not_after_ms = ts_to_sql("cert_not_after_ms", record.cert_not_after_ms)?;
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO devices (id, tags, created_at_ms, cert_sha256, cert_serial, cert_not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![record.id.as_str(), tags, created_at_ms, record.cert_sha256, record.cert_serial, not_after_ms],
            );
            match inserted {
                Ok(_) => {
                    write_tags(conn, record.id.as_str(), &record.tags, false)?;
                    super::certs::insert_cert(conn, &cert)?;
                    Ok(record)
                }
                Err(e) if is_constraint_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("device {}", record.id)))
                }
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }
}

#[async_trait::async_trait]
impl DeviceStore for SqliteStore {
    async fn create_device(&self, d: NewDevice) -> Result<DeviceRecord> {
        let cert = CertRecord::of_new_device(&d);
        self.insert_device(d, cert).await
    }

    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
            ))
            .db()?
            .query_row(params![id], device_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn find_device_by_cert(&self, cert_sha256: &str) -> Result<Option<DeviceRecord>> {
        let cert_sha256 = cert_sha256.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE cert_sha256 = ?1 ORDER BY id LIMIT 1"
            ))
            .db()?
            .query_row(params![cert_sha256], device_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_devices(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<DeviceRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Every id sorts after "" (ids are never empty), so "" means "from the start".
        let after_id = after_id.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![after_id, limit], device_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn delete_device(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let existed = {
                let mut conn = inner.writer()?;
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .db()?;
                let deleted = tx
                    .execute("DELETE FROM devices WHERE id = ?1", params![id])
                    .db()?;
                tx.execute(super::telemetry::DELETE_DEVICE_LATEST_SQL, params![id])
                    .db()?;
                tx.execute(
                    "DELETE FROM cert_renewals WHERE device_id = ?1",
                    params![id],
                )
                .db()?;
                tx.execute("DELETE FROM device_certs WHERE device_id = ?1", params![id])
                    .db()?;
                // Its claim enrollments too: a stored enrollment is answered again (and its
                // device re-created) for the same key, which must not bring a deleted device
                // back with its old certificate.
                tx.execute(
                    "DELETE FROM claim_enrollments WHERE device_id = ?1",
                    params![id],
                )
                .db()?;
                tx.commit().db()?;
                deleted > 0
            };
            // Telemetry (points, dedupe keys, chunks) goes in bounded transactions.
            super::telemetry::delete_device_telemetry(&inner, &id)?;
            Ok(existed)
        })
        .await
    }

    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<()> {
        let id = id.to_owned();
        let tags_json = tags_to_sql(&tags)?;
        self.write(move |conn| {
            let updated = conn
                .execute(
                    "UPDATE devices SET tags = ?2 WHERE id = ?1",
                    params![id, tags_json],
                )
                .db()?;
            if updated == 0 {
                return Err(StoreError::NotFound(format!("device {id}")));
            }
            write_tags(conn, &id, &tags, true)?;
            Ok(())
        })
        .await
    }

    async fn select_devices(
        &self,
        filter: &DeviceFilter,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<DeviceRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (cond, mut params) = super::fleet::filter_sql(filter)?;
        params.push(rusqlite::types::Value::Text(
            after_id.unwrap_or("").to_owned(),
        ));
        params.push(rusqlite::types::Value::Integer(count_to_sql(limit)));
        let columns = DEVICE_COLUMNS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM devices d WHERE {cond} AND d.id > ? ORDER BY d.id LIMIT ?"
        );
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(params), device_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn count_device_versions(
        &self,
        filter: &DeviceFilter,
        versions_max: usize,
    ) -> Result<VersionCounts> {
        super::fleet::count_device_versions(self, filter, versions_max).await
    }

    async fn count_pipeline(&self, filter: &DeviceFilter) -> Result<PipelineCounts> {
        let (cond, params) = super::fleet::filter_sql(filter)?;
        let sql = format!(
            "SELECT count(*), count(d.first_connect_ms), count(d.first_telemetry_ms),
                    count(d.installed_at_ms)
             FROM devices d WHERE {cond}"
        );
        self.read(move |conn| {
            conn.prepare_cached(&sql)
                .db()?
                .query_row(rusqlite::params_from_iter(params), |r| {
                    Ok(PipelineCounts {
                        devices: u64_column(r, 0)?,
                        connected: u64_column(r, 1)?,
                        reporting: u64_column(r, 2)?,
                        installed: u64_column(r, 3)?,
                    })
                })
                .db()
        })
        .await
    }

    async fn record_activity(&self, activity: &[DeviceActivity]) -> Result<()> {
        if activity.is_empty() {
            return Ok(());
        }
        let opt = |what: &str, ts: Option<u64>| ts.map(|t| ts_to_sql(what, t)).transpose();
        let rows = activity
            .iter()
            .map(|a| {
                Ok((
                    a.id.clone(),
                    ts_to_sql("last_seen_ms", a.last_seen_ms)?,
                    opt("connected_at_ms", a.connected_at_ms)?,
                    opt("telemetry_at_ms", a.telemetry_at_ms)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(move |conn| {
            // The group commit runs this write in a savepoint of its own.
            let tx: &rusqlite::Connection = conn;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE devices SET
                           last_seen_ms = max(COALESCE(last_seen_ms, ?2), ?2),
                           first_connect_ms = COALESCE(first_connect_ms, ?3),
                           first_telemetry_ms = COALESCE(first_telemetry_ms, ?4),
                           last_telemetry_ms = CASE WHEN ?4 IS NULL THEN last_telemetry_ms
                             ELSE max(COALESCE(last_telemetry_ms, ?4), ?4) END
                         WHERE id = ?1",
                    )
                    .db()?;
                for (id, seen, connected, telemetry) in &rows {
                    stmt.execute(params![id, seen, connected, telemetry]).db()?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn set_installation(&self, id: &str, i: Installation) -> Result<bool> {
        let id = id.to_owned();
        let at_ms = ts_to_sql("installation at_ms", i.at_ms)?;
        self.write(move |conn| {
            let n = conn
                .execute(
                    "UPDATE devices SET installed_at_ms = ?2, installed_by = ?3,
                       installed_location = ?4, installed_notes = ?5
                     WHERE id = ?1",
                    params![id, at_ms, i.by, i.location, i.notes],
                )
                .db()?;
            Ok(n > 0)
        })
        .await
    }

    async fn record_step_error(&self, id: &str, step: &str, error: StepError) -> Result<()> {
        let id = id.to_owned();
        let path = format!("$.\"{}\"", step.replace(['"', '\\'], ""));
        let at_ms = ts_to_sql("step error at_ms", error.at_ms)?;
        let message = clip_step_error(&error.message);
        self.write(move |conn| {
            conn.execute(
                "UPDATE devices SET provisioning_errors = json_set(
                   COALESCE(provisioning_errors, '{}'), ?2,
                   json_object('at_ms', ?3, 'message', ?4))
                 WHERE id = ?1",
                params![id, path, at_ms, message],
            )
            .db()?;
            Ok(())
        })
        .await
    }
}
