//! [`CertStore`] for PostgreSQL: the certificate ledger (`device_certs`), as `sqlite/certs.rs`.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::{
    bound_to_sql, column, count_to_sql, device_id_column, is_foreign_key_violation,
    is_unique_violation, opt_ts_to_sql, opt_u64_column, pg_error, ts_to_sql, u64_column, PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{check_text, CertRecord, CertRenewal, CertState, CERT_ISSUER_FLEET};
use crate::store::CertStore;

const CERT_COLUMNS: &str = "serial, device_id, sha256, not_before_ms, not_after_ms, \
     issued_at_ms, issuer, state, revoked_at_ms, revoke_reason";

fn cert_from_row(row: &Row) -> Result<CertRecord> {
    let state: &str = column(row, 7)?;
    Ok(CertRecord {
        serial: column(row, 0)?,
        device_id: device_id_column(row, 1)?,
        sha256: column(row, 2)?,
        not_before_ms: u64_column(row, 3)?,
        not_after_ms: u64_column(row, 4)?,
        issued_at_ms: u64_column(row, 5)?,
        issuer: column(row, 6)?,
        state: state.parse::<CertState>()?,
        revoked_at_ms: opt_u64_column(row, 8)?,
        revoke_reason: column(row, 9)?,
    })
}

/// Inserts a ledger row on `client` (a transaction or a pooled connection): a taken serial or
/// SHA-256 is `AlreadyExists`, a missing device `NotFound`.
pub(super) async fn insert_cert<C: GenericClient + Sync>(client: &C, c: &CertRecord) -> Result<()> {
    let stmt = client
        .prepare_cached(&format!(
            "INSERT INTO device_certs ({CERT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .await
        .map_err(pg_error)?;
    let inserted = client
        .execute(
            &stmt,
            &[
                &c.serial,
                &c.device_id.as_str(),
                &c.sha256,
                &ts_to_sql("not_before_ms", c.not_before_ms)?,
                &ts_to_sql("not_after_ms", c.not_after_ms)?,
                &ts_to_sql("issued_at_ms", c.issued_at_ms)?,
                &c.issuer,
                &c.state.as_str(),
                &opt_ts_to_sql("revoked_at_ms", c.revoked_at_ms)?,
                &c.revoke_reason,
            ],
        )
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists(format!(
            "certificate {} (serial or fingerprint taken)",
            c.serial
        ))),
        Err(e) if is_foreign_key_violation(&e) => {
            Err(StoreError::NotFound(format!("device {}", c.device_id)))
        }
        Err(e) => Err(pg_error(e)),
    }
}

#[async_trait::async_trait]
impl CertStore for PgStore {
    async fn add_cert(&self, cert: CertRecord) -> Result<()> {
        cert.validate()?;
        let client = self.client().await?;
        insert_cert(&client, &cert).await
    }

    async fn find_cert_by_sha256(&self, sha256: &str) -> Result<Option<CertRecord>> {
        let sql = format!("SELECT {CERT_COLUMNS} FROM device_certs WHERE sha256 = $1");
        let row = self.query_opt(&sql, &[&sha256]).await?;
        row.as_ref().map(cert_from_row).transpose()
    }

    async fn get_cert(&self, serial: &str) -> Result<Option<CertRecord>> {
        let sql = format!("SELECT {CERT_COLUMNS} FROM device_certs WHERE serial = $1");
        let row = self.query_opt(&sql, &[&serial]).await?;
        row.as_ref().map(cert_from_row).transpose()
    }

    async fn list_device_certs(&self, device_id: &str, limit: usize) -> Result<Vec<CertRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {CERT_COLUMNS} FROM device_certs WHERE device_id = $1
             ORDER BY issued_at_ms DESC, serial LIMIT $2"
        );
        let rows = self
            .query(&sql, &[&device_id, &count_to_sql(limit)])
            .await?;
        rows.iter().map(cert_from_row).collect()
    }

    async fn revoke_cert(&self, serial: &str, at_ms: u64, reason: Option<&str>) -> Result<bool> {
        check_text("revoke reason", reason.unwrap_or(""))?;
        let at_ms = ts_to_sql("revoked_at_ms", at_ms)?;
        let changed = self
            .execute(
                "UPDATE device_certs SET state = 'revoked', revoked_at_ms = $2, revoke_reason = $3
                 WHERE serial = $1 AND state = 'active'",
                &[&serial, &at_ms, &reason],
                || format!("certificate {serial}"),
            )
            .await?;
        Ok(changed > 0)
    }

    async fn revoke_device_certs(
        &self,
        device_id: &str,
        at_ms: u64,
        reason: Option<&str>,
    ) -> Result<Vec<String>> {
        check_text("revoke reason", reason.unwrap_or(""))?;
        let at_ms = ts_to_sql("revoked_at_ms", at_ms)?;
        let rows = self
            .query(
                "UPDATE device_certs SET state = 'revoked', revoked_at_ms = $2, revoke_reason = $3
                 WHERE device_id = $1 AND state = 'active' RETURNING serial",
                &[&device_id, &at_ms, &reason],
            )
            .await?;
        let mut serials = rows
            .iter()
            .map(|r| column::<String>(r, 0))
            .collect::<Result<Vec<_>>>()?;
        serials.sort();
        Ok(serials)
    }

    async fn expiring_certs(
        &self,
        before_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<CertRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (after_ms, after_serial) = match after {
            Some((ms, serial)) => (bound_to_sql(ms), super::nul_free_cursor(serial)),
            None => (-1, ""),
        };
        let sql = format!(
            "SELECT {CERT_COLUMNS} FROM device_certs
             WHERE state = 'active' AND not_after_ms < $1
               AND (not_after_ms, serial) > ($2, $3)
             ORDER BY not_after_ms, serial LIMIT $4"
        );
        let rows = self
            .query(
                &sql,
                &[
                    &bound_to_sql(before_ms),
                    &after_ms,
                    &after_serial,
                    &count_to_sql(limit),
                ],
            )
            .await?;
        rows.iter().map(cert_from_row).collect()
    }

    async fn count_expiring_certs(&self, before_ms: u64) -> Result<u64> {
        let row = self
            .query_opt(
                "SELECT count(*) FROM device_certs WHERE state = 'active' AND not_after_ms < $1",
                &[&bound_to_sql(before_ms)],
            )
            .await?
            .ok_or_else(|| StoreError::Backend("count returned no row".into()))?;
        u64_column(&row, 0)
    }

    async fn old_fleet_certs(
        &self,
        current_issuer: &str,
        alive_at_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<CertRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (after_ms, after_serial) = match after {
            Some((ms, serial)) => (bound_to_sql(ms), super::nul_free_cursor(serial)),
            None => (-1, ""),
        };
        let sql = format!(
            "SELECT {CERT_COLUMNS} FROM device_certs
             WHERE state = 'active' AND (issuer = $1 OR issuer LIKE $2) AND issuer <> $3
               AND not_after_ms > $7 AND (not_after_ms, serial) > ($4, $5)
             ORDER BY not_after_ms, serial LIMIT $6"
        );
        let like = format!("{CERT_ISSUER_FLEET}:%");
        let rows = self
            .query(
                &sql,
                &[
                    &CERT_ISSUER_FLEET,
                    &like,
                    &super::nul_free_cursor(current_issuer),
                    &after_ms,
                    &after_serial,
                    &count_to_sql(limit),
                    &bound_to_sql(alive_at_ms),
                ],
            )
            .await?;
        rows.iter().map(cert_from_row).collect()
    }

    async fn count_old_fleet_certs(&self, current_issuer: &str, alive_at_ms: u64) -> Result<u64> {
        let like = format!("{CERT_ISSUER_FLEET}:%");
        let row = self
            .query_opt(
                "SELECT count(*) FROM device_certs
                 WHERE state = 'active' AND (issuer = $1 OR issuer LIKE $2) AND issuer <> $3
                   AND not_after_ms > $4",
                &[
                    &CERT_ISSUER_FLEET,
                    &like,
                    &super::nul_free_cursor(current_issuer),
                    &bound_to_sql(alive_at_ms),
                ],
            )
            .await?
            .ok_or_else(|| StoreError::Backend("count returned no row".into()))?;
        u64_column(&row, 0)
    }

    async fn revoked_certs_since(
        &self,
        since_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<CertRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (after_ms, after_serial) = match after {
            Some((ms, serial)) => (bound_to_sql(ms), super::nul_free_cursor(serial)),
            None => (-1, ""),
        };
        let sql = format!(
            "SELECT {CERT_COLUMNS} FROM device_certs
             WHERE state = 'revoked' AND revoked_at_ms >= $1
               AND (revoked_at_ms, serial) > ($2, $3)
             ORDER BY revoked_at_ms, serial LIMIT $4"
        );
        let rows = self
            .query(
                &sql,
                &[
                    &bound_to_sql(since_ms),
                    &after_ms,
                    &after_serial,
                    &count_to_sql(limit),
                ],
            )
            .await?;
        rows.iter().map(cert_from_row).collect()
    }

    async fn count_revoked_certs(&self) -> Result<u64> {
        let row = self
            .query_opt(
                "SELECT count(*) FROM device_certs WHERE state = 'revoked'",
                &[],
            )
            .await?
            .ok_or_else(|| StoreError::Backend("count returned no row".into()))?;
        u64_column(&row, 0)
    }

    async fn get_renewal(&self, device_id: &str) -> Result<Option<CertRenewal>> {
        let row = self
            .query_opt(
                "SELECT device_id, key_sha256, serial, cert_pem, requested_at_ms
                 FROM cert_renewals WHERE device_id = $1",
                &[&device_id],
            )
            .await?;
        row.map(|row| {
            Ok(CertRenewal {
                device_id: device_id_column(&row, 0)?,
                key_sha256: column(&row, 1)?,
                serial: column(&row, 2)?,
                cert_pem: column(&row, 3)?,
                requested_at_ms: u64_column(&row, 4)?,
            })
        })
        .transpose()
    }

    /// Locks the device's row first (`FOR NO KEY UPDATE`): two nodes renewing one device at
    /// once take turns, so at most one renewal stays pending.
    async fn put_renewal(
        &self,
        renewal: CertRenewal,
        cert: CertRecord,
        replaced_reason: &str,
    ) -> Result<Option<String>> {
        renewal.validate()?;
        cert.validate()?;
        check_text("revoke reason", replaced_reason)?;
        let at_ms = ts_to_sql("requested_at_ms", renewal.requested_at_ms)?;
        let device_id = renewal.device_id.as_str();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let locked = tx
            .query_opt(
                "SELECT 1 FROM devices WHERE id = $1 FOR NO KEY UPDATE",
                &[&device_id],
            )
            .await
            .map_err(pg_error)?;
        if locked.is_none() {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
        let previous: Option<String> = tx
            .query_opt(
                "SELECT serial FROM cert_renewals WHERE device_id = $1",
                &[&device_id],
            )
            .await
            .map_err(pg_error)?
            .map(|r| column(&r, 0))
            .transpose()?;
        insert_cert(&tx, &cert).await?;
        let mut replaced = None;
        if let Some(old) = previous.filter(|s| *s != renewal.serial) {
            let changed = tx
                .execute(
                    "UPDATE device_certs SET state = 'revoked', revoked_at_ms = $2, revoke_reason = $3
                     WHERE serial = $1 AND state = 'active'",
                    &[&old, &at_ms, &replaced_reason],
                )
                .await
                .map_err(pg_error)?;
            if changed > 0 {
                replaced = Some(old);
            }
        }
        tx.execute(
            "INSERT INTO cert_renewals (device_id, key_sha256, serial, cert_pem, requested_at_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (device_id) DO UPDATE SET key_sha256 = excluded.key_sha256,
                 serial = excluded.serial, cert_pem = excluded.cert_pem,
                 requested_at_ms = excluded.requested_at_ms",
            &[
                &device_id,
                &renewal.key_sha256,
                &renewal.serial,
                &renewal.cert_pem,
                &at_ms,
            ],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(replaced)
    }

    async fn confirm_renewal(
        &self,
        device_id: &str,
        serial: &str,
        at_ms: u64,
        reason: &str,
    ) -> Result<Option<Vec<String>>> {
        check_text("revoke reason", reason)?;
        let at_ms = ts_to_sql("revoked_at_ms", at_ms)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let removed = tx
            .execute(
                "DELETE FROM cert_renewals WHERE device_id = $1 AND serial = $2",
                &[&device_id, &serial],
            )
            .await
            .map_err(pg_error)?;
        if removed == 0 {
            return Ok(None);
        }
        let sql =
            format!("SELECT {CERT_COLUMNS} FROM device_certs WHERE serial = $1 AND device_id = $2");
        let Some(row) = tx
            .query_opt(&sql, &[&serial, &device_id])
            .await
            .map_err(pg_error)?
        else {
            return Ok(None);
        };
        let cert = cert_from_row(&row)?;
        tx.execute(
            "UPDATE devices SET cert_serial = $2, cert_sha256 = $3, cert_not_after_ms = $4
             WHERE id = $1",
            &[
                &device_id,
                &cert.serial,
                &cert.sha256,
                &ts_to_sql("not_after_ms", cert.not_after_ms)?,
            ],
        )
        .await
        .map_err(pg_error)?;
        let rows = tx
            .query(
                "UPDATE device_certs SET state = 'revoked', revoked_at_ms = $3, revoke_reason = $4
                 WHERE device_id = $1 AND serial <> $2 AND state = 'active' RETURNING serial",
                &[&device_id, &serial, &at_ms, &reason],
            )
            .await
            .map_err(pg_error)?;
        let mut serials = rows
            .iter()
            .map(|r| column::<String>(r, 0))
            .collect::<Result<Vec<_>>>()?;
        serials.sort();
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(serials))
    }
}
