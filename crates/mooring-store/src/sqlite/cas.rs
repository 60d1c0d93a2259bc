//! [`CaStore`] for SQLite: registered manufacturer CAs (`registered_cas`).

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::{
    count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db, SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{CaRecord, CertRecord, DeviceRecord, NewDevice};
use crate::store::{CaStore, CAS_MAX};

const CA_COLUMNS: &str =
    "id, subject, cert_pem, sha256, auto_register, tags, enabled, created_at_ms, created_by";

fn ca_from_row(row: &Row<'_>) -> rusqlite::Result<CaRecord> {
    let tags: String = row.get(5)?;
    let tags = serde_json::from_str(&tags)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(5, Type::Text, Box::new(e)))?;
    Ok(CaRecord {
        id: row.get(0)?,
        subject: row.get(1)?,
        cert_pem: row.get(2)?,
        sha256: row.get(3)?,
        auto_register: row.get::<_, i64>(4)? != 0,
        tags,
        enabled: row.get::<_, i64>(6)? != 0,
        created_at_ms: u64_column(row, 7)?,
        created_by: row.get(8)?,
    })
}

#[async_trait::async_trait]
impl CaStore for SqliteStore {
    async fn add_ca(&self, ca: CaRecord) -> Result<()> {
        ca.validate()?;
        let tags = serde_json::to_string(&ca.tags)
            .map_err(|e| StoreError::InvalidInput(format!("tags: {e}")))?;
        let created_at_ms = ts_to_sql("created_at_ms", ca.created_at_ms)?;
        self.write(move |conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM registered_cas")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if n >= count_to_sql(CAS_MAX) {
                return Err(StoreError::InvalidInput(format!(
                    "{CAS_MAX} CAs are registered already (the most kept)"
                )));
            }
            let inserted = conn
                .prepare_cached(&format!(
                    "INSERT INTO registered_cas ({CA_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ))
                .db()?
                .execute(params![
                    ca.id,
                    ca.subject,
                    ca.cert_pem,
                    ca.sha256,
                    i64::from(ca.auto_register),
                    tags,
                    i64::from(ca.enabled),
                    created_at_ms,
                    ca.created_by,
                ]);
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_constraint_violation(&e) => Err(StoreError::AlreadyExists(format!(
                    "CA {} (id or fingerprint taken)",
                    ca.id
                ))),
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn get_ca(&self, id: &str) -> Result<Option<CaRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {CA_COLUMNS} FROM registered_cas WHERE id = ?1"
            ))
            .db()?
            .query_row(params![id], ca_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_cas(&self) -> Result<Vec<CaRecord>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CA_COLUMNS} FROM registered_cas ORDER BY created_at_ms, id LIMIT ?1"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![count_to_sql(CAS_MAX)], ca_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn set_ca_enabled(&self, id: &str, enabled: bool) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("UPDATE registered_cas SET enabled = ?2 WHERE id = ?1")
                .db()?
                .execute(params![id, i64::from(enabled)])
                .db()?;
            Ok(n > 0)
        })
        .await
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
