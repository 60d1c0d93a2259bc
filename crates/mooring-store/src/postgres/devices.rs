//! [`DeviceStore`] for PostgreSQL: devices, their tags (JSONB), pinned certificates and last-seen
//! times.

use std::collections::BTreeMap;

use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::{
    column, count_to_sql, device_id_column, opt_u64_column, pg_error, ts_to_sql, u64_column,
    PgStore,
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
    installed_by, installed_location, installed_notes, provisioning_errors::text";

fn device_from_row(row: &Row) -> Result<DeviceRecord> {
    let Json(tags) = column::<Json<BTreeMap<String, String>>>(row, 1)?;
    Ok(DeviceRecord {
        id: device_id_column(row, 0)?,
        tags,
        created_at_ms: u64_column(row, 2)?,
        cert_sha256: column(row, 3)?,
        cert_serial: column(row, 4)?,
        cert_not_after_ms: u64_column(row, 5)?,
        last_seen_ms: opt_u64_column(row, 6)?,
        first_connect_ms: opt_u64_column(row, 7)?,
        first_telemetry_ms: opt_u64_column(row, 8)?,
        last_telemetry_ms: opt_u64_column(row, 9)?,
        installation: match opt_u64_column(row, 10)? {
            None => None,
            Some(at_ms) => Some(Installation {
                at_ms,
                by: column::<Option<String>>(row, 11)?.unwrap_or_default(),
                location: column::<Option<String>>(row, 12)?.unwrap_or_default(),
                notes: column::<Option<String>>(row, 13)?.unwrap_or_default(),
            }),
        },
        provisioning_errors: step_errors_from_json(column::<Option<String>>(row, 14)?.as_deref()),
    })
}

impl PgStore {
    /// Inserts a device and its certificate's ledger row in one transaction.
    pub(super) async fn insert_device(
        &self,
        d: NewDevice,
        cert: CertRecord,
    ) -> Result<DeviceRecord> {
        d.validate()?;
        cert.validate()?;
        let record = d.into_record();
        let created_at_ms = ts_to_sql("created_at_ms", record.created_at_ms)?;
        let not_after_ms = ts_to_sql("cert_not_after_ms", record.cert_not_after_ms)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let stmt = tx
            .prepare_cached(
                "INSERT INTO devices (id, tags, created_at_ms, cert_sha256, cert_serial, cert_not_after_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(pg_error)?;
        let inserted = tx
            .execute(
                &stmt,
                &[
                    &record.id.as_str(),
                    &Json(&record.tags),
                    &created_at_ms,
                    &record.cert_sha256,
                    &record.cert_serial,
                    &not_after_ms,
                ],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if super::is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!("device {}", record.id)))
            }
            Err(e) => return Err(pg_error(e)),
        }
        super::certs::insert_cert(&tx, &cert).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(record)
    }
}

#[async_trait::async_trait]
impl DeviceStore for PgStore {
    /// The device row, its tags and its certificate's ledger row, in one transaction.
    async fn create_device(&self, d: NewDevice) -> Result<DeviceRecord> {
        let cert = CertRecord::of_new_device(&d);
        self.insert_device(d, cert).await
    }

    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn find_device_by_cert(&self, cert_sha256: &str) -> Result<Option<DeviceRecord>> {
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE cert_sha256 = $1 ORDER BY id LIMIT 1"
        );
        let row = self.query_opt(&sql, &[&cert_sha256]).await?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn list_devices(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<DeviceRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Every id sorts after "" (ids are never empty), so "" means "from the start". Ids
        // are COLLATE "C": byte order, as in SQLite.
        let after_id = after_id.unwrap_or("");
        let limit = count_to_sql(limit);
        let sql =
            format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = self.query(&sql, &[&after_id, &limit]).await?;
        rows.iter().map(device_from_row).collect()
    }

    /// Deletes the device row (its commands and shadow go with it: `ON DELETE CASCADE`) and its
    /// latest values in one transaction, then its telemetry in bounded transactions
    /// (`postgres/telemetry.rs`), as `sqlite/devices.rs` does.
    async fn delete_device(&self, id: &str) -> Result<bool> {
        let existed = {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(pg_error)?;
            let device = tx
                .prepare_cached("DELETE FROM devices WHERE id = $1")
                .await
                .map_err(pg_error)?;
            let deleted = tx.execute(&device, &[&id]).await.map_err(pg_error)?;
            let latest = tx
                .prepare_cached(super::telemetry::DELETE_DEVICE_LATEST_SQL)
                .await
                .map_err(pg_error)?;
            tx.execute(&latest, &[&id]).await.map_err(pg_error)?;
            // Its claim enrollments too (see sqlite/devices.rs).
            let enrollments = tx
                .prepare_cached("DELETE FROM claim_enrollments WHERE device_id = $1")
                .await
                .map_err(pg_error)?;
            tx.execute(&enrollments, &[&id]).await.map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
            deleted > 0
        };
        super::telemetry::delete_device_telemetry(self, id).await?;
        Ok(existed)
    }

    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<()> {
        let updated = self
            .execute(
                "UPDATE devices SET tags = $2 WHERE id = $1",
                &[&id, &Json(&tags)],
                || format!("device {id}"),
            )
            .await?;
        if updated == 0 {
            return Err(StoreError::NotFound(format!("device {id}")));
        }
        Ok(())
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
        let (cond, mut params) = super::fleet::filter_sql(filter, 1);
        params.push(Box::new(
            super::nul_free_cursor(after_id.unwrap_or("")).to_owned(),
        ));
        let after = format!("${}", params.len());
        params.push(Box::new(count_to_sql(limit)));
        let lim = format!("${}", params.len());
        let columns = DEVICE_COLUMNS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let from = if filter.version.is_some() {
            super::fleet::FROM_SQL
        } else {
            "devices d"
        };
        let sql = format!(
            "SELECT {columns} FROM {from} WHERE {cond} AND d.id > {after} ORDER BY d.id LIMIT {lim}"
        );
        let rows = self.query(&sql, &super::fleet::refs(&params)).await?;
        rows.iter().map(device_from_row).collect()
    }

    async fn count_device_versions(
        &self,
        filter: &DeviceFilter,
        versions_max: usize,
    ) -> Result<VersionCounts> {
        super::fleet::count_device_versions(self, filter, versions_max).await
    }

    async fn count_pipeline(&self, filter: &DeviceFilter) -> Result<PipelineCounts> {
        let (cond, params) = super::fleet::filter_sql(filter, 1);
        let from = if filter.version.is_some() {
            super::fleet::FROM_SQL
        } else {
            "devices d"
        };
        let sql = format!(
            "SELECT count(*), count(d.first_connect_ms), count(d.first_telemetry_ms),
                    count(d.installed_at_ms)
             FROM {from} WHERE {cond}"
        );
        let Some(r) = self.query_opt(&sql, &super::fleet::refs(&params)).await? else {
            return Ok(PipelineCounts::default());
        };
        Ok(PipelineCounts {
            devices: u64_column(&r, 0)?,
            connected: u64_column(&r, 1)?,
            reporting: u64_column(&r, 2)?,
            installed: u64_column(&r, 3)?,
        })
    }

    async fn record_activity(&self, activity: &[DeviceActivity]) -> Result<()> {
        if activity.is_empty() {
            return Ok(());
        }
        // One update per device (its newest sighting and telemetry, its earliest connect), in
        // id order: concurrent batches lock rows in the same order, so they cannot deadlock.
        type Row = (i64, Option<i64>, Option<i64>);
        let mut merged: BTreeMap<&str, Row> = BTreeMap::new();
        let opt = |what: &str, ts: Option<u64>| ts.map(|t| ts_to_sql(what, t)).transpose();
        for a in activity {
            let seen = ts_to_sql("last_seen_ms", a.last_seen_ms)?;
            let connected = opt("connected_at_ms", a.connected_at_ms)?;
            let telemetry = opt("telemetry_at_ms", a.telemetry_at_ms)?;
            let slot = merged
                .entry(a.id.as_str())
                .or_insert((seen, connected, telemetry));
            slot.0 = slot.0.max(seen);
            slot.1 = match (slot.1, connected) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            };
            slot.2 = slot.2.max(telemetry);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let stmt = tx
            .prepare_cached(
                "UPDATE devices SET
                   last_seen_ms = GREATEST(last_seen_ms, $2),
                   first_connect_ms = COALESCE(first_connect_ms, $3),
                   first_telemetry_ms = COALESCE(first_telemetry_ms, $4),
                   last_telemetry_ms = GREATEST(last_telemetry_ms, $4)
                 WHERE id = $1",
            )
            .await
            .map_err(pg_error)?;
        for (id, (seen, connected, telemetry)) in &merged {
            tx.execute(&stmt, &[id, seen, connected, telemetry])
                .await
                .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn set_installation(&self, id: &str, i: Installation) -> Result<bool> {
        let at_ms = ts_to_sql("installation at_ms", i.at_ms)?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE devices SET installed_at_ms = $2, installed_by = $3,
                   installed_location = $4, installed_notes = $5
                 WHERE id = $1",
            )
            .await
            .map_err(pg_error)?;
        let n = client
            .execute(&stmt, &[&id, &at_ms, &i.by, &i.location, &i.notes])
            .await
            .map_err(pg_error)?;
        Ok(n > 0)
    }

    async fn record_step_error(&self, id: &str, step: &str, error: StepError) -> Result<()> {
        let at_ms = ts_to_sql("step error at_ms", error.at_ms)?;
        let entry = serde_json::json!({
            step: {"at_ms": at_ms, "message": clip_step_error(&error.message)}
        });
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE devices SET provisioning_errors =
                   COALESCE(provisioning_errors, '{}'::jsonb) || $2
                 WHERE id = $1",
            )
            .await
            .map_err(pg_error)?;
        client
            .execute(&stmt, &[&id, &Json(&entry)])
            .await
            .map_err(pg_error)?;
        Ok(())
    }
}
