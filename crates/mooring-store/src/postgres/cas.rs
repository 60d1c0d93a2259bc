//! [`CaStore`] for PostgreSQL: registered manufacturer CAs (`registered_cas`), as `sqlite/cas.rs`.

use std::collections::BTreeMap;

use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::{column, count_to_sql, is_unique_violation, pg_error, ts_to_sql, u64_column, PgStore};
use crate::error::{Result, StoreError};
use crate::model::{CaRecord, CertRecord, DeviceRecord, NewDevice};
use crate::store::{CaStore, CAS_MAX};

const CA_COLUMNS: &str =
    "id, subject, cert_pem, sha256, auto_register, tags, enabled, created_at_ms, created_by";

fn ca_from_row(row: &Row) -> Result<CaRecord> {
    let Json(tags) = column::<Json<BTreeMap<String, String>>>(row, 5)?;
    Ok(CaRecord {
        id: column(row, 0)?,
        subject: column(row, 1)?,
        cert_pem: column(row, 2)?,
        sha256: column(row, 3)?,
        auto_register: column(row, 4)?,
        tags,
        enabled: column(row, 6)?,
        created_at_ms: u64_column(row, 7)?,
        created_by: column(row, 8)?,
    })
}

#[async_trait::async_trait]
impl CaStore for PgStore {
    async fn add_ca(&self, ca: CaRecord) -> Result<()> {
        ca.validate()?;
        let created_at_ms = ts_to_sql("created_at_ms", ca.created_at_ms)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // One registration at a time decides the bound (the lock ends with the transaction).
        tx.batch_execute("LOCK TABLE registered_cas IN SHARE ROW EXCLUSIVE MODE")
            .await
            .map_err(pg_error)?;
        let n: i64 = column(
            &tx.query_one("SELECT count(*) FROM registered_cas", &[])
                .await
                .map_err(pg_error)?,
            0,
        )?;
        if n >= count_to_sql(CAS_MAX) {
            return Err(StoreError::InvalidInput(format!(
                "{CAS_MAX} CAs are registered already (the most kept)"
            )));
        }
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO registered_cas ({CA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ),
                &[
                    &ca.id,
                    &ca.subject,
                    &ca.cert_pem,
                    &ca.sha256,
                    &ca.auto_register,
                    &Json(&ca.tags),
                    &ca.enabled,
                    &created_at_ms,
                    &ca.created_by,
                ],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!(
                    "CA {} (id or fingerprint taken)",
                    ca.id
                )))
            }
            Err(e) => return Err(pg_error(e)),
        }
        tx.commit().await.map_err(pg_error)
    }

    async fn get_ca(&self, id: &str) -> Result<Option<CaRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {CA_COLUMNS} FROM registered_cas WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        row.as_ref().map(ca_from_row).transpose()
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {CA_COLUMNS} FROM registered_cas ORDER BY created_at_ms, id LIMIT $1"
                ),
                &[&count_to_sql(CAS_MAX)],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(ca_from_row).collect()
    }

    async fn set_ca_enabled(&self, id: &str, enabled: bool) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE registered_cas SET enabled = $2 WHERE id = $1",
                &[&id, &enabled],
            )
            .await
            .map_err(pg_error)?;
        Ok(n > 0)
    }

    async fn create_device_with_cert(
        &self,
        d: NewDevice,
        cert: CertRecord,
    ) -> Result<DeviceRecord> {
        if cert.device_id != d.id {
            return Err(StoreError::InvalidInput(format!(
                "certificate of {} given for device {}",
                cert.device_id, d.id
            )));
        }
        self.insert_device(d, cert).await
    }
}
