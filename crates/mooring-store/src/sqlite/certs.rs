//! [`CertStore`] for SQLite: the certificate ledger (`device_certs`).

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::tokens::{opt_ts_to_sql, opt_u64_column};
use super::{
    bound_to_sql, count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db,
    SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{check_text, CertRecord, CertRenewal, CertState, CERT_ISSUER_FLEET};
use crate::store::CertStore;

pub(super) const CERT_COLUMNS: &str = "serial, device_id, sha256, not_before_ms, not_after_ms, \
     issued_at_ms, issuer, state, revoked_at_ms, revoke_reason";

fn cert_from_row(row: &Row<'_>) -> rusqlite::Result<CertRecord> {
    let state: String = row.get(7)?;
    let state = state
        .parse::<CertState>()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(7, Type::Text, Box::new(e)))?;
    Ok(CertRecord {
        serial: row.get(0)?,
        device_id: super::device_id_column(row, 1)?,
        sha256: row.get(2)?,
        not_before_ms: u64_column(row, 3)?,
        not_after_ms: u64_column(row, 4)?,
        issued_at_ms: u64_column(row, 5)?,
        issuer: row.get(6)?,
        state,
        revoked_at_ms: opt_u64_column(row, 8)?,
        revoke_reason: row.get(9)?,
    })
}

/// Inserts a ledger row in the caller's transaction; a taken serial or SHA-256 is
/// `AlreadyExists`.
pub(super) fn insert_cert(conn: &rusqlite::Connection, c: &CertRecord) -> Result<()> {
    let inserted = conn
        .prepare_cached(&format!(
            "INSERT INTO device_certs ({CERT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ))
        .db()?
        .execute(params![
            c.serial,
            c.device_id.as_str(),
            c.sha256,
            ts_to_sql("not_before_ms", c.not_before_ms)?,
            ts_to_sql("not_after_ms", c.not_after_ms)?,
            ts_to_sql("issued_at_ms", c.issued_at_ms)?,
            c.issuer,
            c.state.as_str(),
            opt_ts_to_sql("revoked_at_ms", c.revoked_at_ms)?,
            c.revoke_reason,
        ]);
    match inserted {
        Ok(_) => Ok(()),
        Err(e) if is_constraint_violation(&e) => Err(StoreError::AlreadyExists(format!(
            "certificate {} (serial or fingerprint taken)",
            c.serial
        ))),
        Err(e) => Err(store_error(e)),
    }
}

#[async_trait::async_trait]
impl CertStore for SqliteStore {
    async fn add_cert(&self, cert: CertRecord) -> Result<()> {
        cert.validate()?;
        self.write(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
                .db()?
                .query_row(params![cert.device_id.as_str()], |_| Ok(()))
                .optional()
                .db()?
                .is_some();
            if !exists {
                return Err(StoreError::NotFound(format!("device {}", cert.device_id)));
            }
            insert_cert(conn, &cert)
        })
        .await
    }

    async fn find_cert_by_sha256(&self, sha256: &str) -> Result<Option<CertRecord>> {
        let sha256 = sha256.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM device_certs WHERE sha256 = ?1"
            ))
            .db()?
            .query_row(params![sha256], cert_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn get_cert(&self, serial: &str) -> Result<Option<CertRecord>> {
        let serial = serial.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {CERT_COLUMNS} FROM device_certs WHERE serial = ?1"
            ))
            .db()?
            .query_row(params![serial], cert_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_device_certs(&self, device_id: &str, limit: usize) -> Result<Vec<CertRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let device_id = device_id.to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CERT_COLUMNS} FROM device_certs WHERE device_id = ?1
                     ORDER BY issued_at_ms DESC, serial LIMIT ?2"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![device_id, limit], cert_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn revoke_cert(&self, serial: &str, at_ms: u64, reason: Option<&str>) -> Result<bool> {
        check_text("revoke reason", reason.unwrap_or(""))?;
        let serial = serial.to_owned();
        let at_ms = ts_to_sql("revoked_at_ms", at_ms)?;
        let reason = reason.map(str::to_owned);
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE device_certs SET state = 'revoked', revoked_at_ms = ?2, revoke_reason = ?3
                     WHERE serial = ?1 AND state = 'active'",
                )
                .db()?
                .execute(params![serial, at_ms, reason])
                .db()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn revoke_device_certs(
        &self,
        device_id: &str,
        at_ms: u64,
        reason: Option<&str>,
    ) -> Result<Vec<String>> {
        check_text("revoke reason", reason.unwrap_or(""))?;
        let device_id = device_id.to_owned();
        let at_ms = ts_to_sql("revoked_at_ms", at_ms)?;
        let reason = reason.map(str::to_owned);
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE device_certs SET state = 'revoked', revoked_at_ms = ?2, revoke_reason = ?3
                     WHERE device_id = ?1 AND state = 'active' RETURNING serial",
                )
                .db()?;
            let rows = stmt
                .query_map(params![device_id, at_ms, reason], |r| r.get::<_, String>(0))
                .db()?;
            let mut serials = rows.collect::<rusqlite::Result<Vec<_>>>().db()?;
            serials.sort();
            Ok(serials)
        })
        .await
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
        let before = bound_to_sql(before_ms);
        // Every (not_after, serial) sorts after (-1, ""): times are never negative.
        let (after_ms, after_serial) = match after {
            Some((ms, serial)) => (bound_to_sql(ms), serial.to_owned()),
            None => (-1, String::new()),
        };
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CERT_COLUMNS} FROM device_certs
                     WHERE state = 'active' AND not_after_ms < ?1
                       AND (not_after_ms, serial) > (?2, ?3)
                     ORDER BY not_after_ms, serial LIMIT ?4"
                ))
                .db()?;
            let rows = stmt
                .query_map(
                    params![before, after_ms, after_serial, limit],
                    cert_from_row,
                )
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn count_expiring_certs(&self, before_ms: u64) -> Result<u64> {
        let before = bound_to_sql(before_ms);
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT count(*) FROM device_certs WHERE state = 'active' AND not_after_ms < ?1",
            )
            .db()?
            .query_row(params![before], |r| u64_column(r, 0))
            .db()
        })
        .await
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
        let alive = bound_to_sql(alive_at_ms);
        let current = current_issuer.to_owned();
        let like = format!("{CERT_ISSUER_FLEET}:%");
        let (after_ms, after_serial) = match after {
            Some((ms, serial)) => (bound_to_sql(ms), serial.to_owned()),
            None => (-1, String::new()),
        };
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CERT_COLUMNS} FROM device_certs
                     WHERE state = 'active' AND (issuer = ?1 OR issuer LIKE ?2) AND issuer <> ?3
                       AND not_after_ms > ?7 AND (not_after_ms, serial) > (?4, ?5)
                     ORDER BY not_after_ms, serial LIMIT ?6"
                ))
                .db()?;
            let rows = stmt
                .query_map(
                    params![
                        CERT_ISSUER_FLEET,
                        like,
                        current,
                        after_ms,
                        after_serial,
                        limit,
                        alive
                    ],
                    cert_from_row,
                )
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn count_old_fleet_certs(&self, current_issuer: &str, alive_at_ms: u64) -> Result<u64> {
        let alive = bound_to_sql(alive_at_ms);
        let current = current_issuer.to_owned();
        let like = format!("{CERT_ISSUER_FLEET}:%");
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT count(*) FROM device_certs
                 WHERE state = 'active' AND (issuer = ?1 OR issuer LIKE ?2) AND issuer <> ?3
                   AND not_after_ms > ?4",
            )
            .db()?
            .query_row(params![CERT_ISSUER_FLEET, like, current, alive], |r| {
                u64_column(r, 0)
            })
            .db()
        })
        .await
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
        let since = bound_to_sql(since_ms);
        let (after_ms, after_serial) = match after {
            Some((ms, serial)) => (bound_to_sql(ms), serial.to_owned()),
            None => (-1, String::new()),
        };
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CERT_COLUMNS} FROM device_certs
                     WHERE state = 'revoked' AND revoked_at_ms >= ?1
                       AND (revoked_at_ms, serial) > (?2, ?3)
                     ORDER BY revoked_at_ms, serial LIMIT ?4"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![since, after_ms, after_serial, limit], cert_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn count_revoked_certs(&self) -> Result<u64> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT count(*) FROM device_certs WHERE state = 'revoked'")
                .db()?
                .query_row([], |r| u64_column(r, 0))
                .db()
        })
        .await
    }

    async fn get_renewal(&self, device_id: &str) -> Result<Option<CertRenewal>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT device_id, key_sha256, serial, cert_pem, requested_at_ms
                 FROM cert_renewals WHERE device_id = ?1",
            )
            .db()?
            .query_row(params![device_id], |row| {
                Ok(CertRenewal {
                    device_id: super::device_id_column(row, 0)?,
                    key_sha256: row.get(1)?,
                    serial: row.get(2)?,
                    cert_pem: row.get(3)?,
                    requested_at_ms: u64_column(row, 4)?,
                })
            })
            .optional()
            .db()
        })
        .await
    }

    async fn put_renewal(
        &self,
        renewal: CertRenewal,
        cert: CertRecord,
        replaced_reason: &str,
    ) -> Result<Option<String>> {
        renewal.validate()?;
        cert.validate()?;
        check_text("revoke reason", replaced_reason)?;
        let replaced_reason = replaced_reason.to_owned();
        self.write(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
                .db()?
                .query_row(params![renewal.device_id.as_str()], |_| Ok(()))
                .optional()
                .db()?
                .is_some();
            if !exists {
                return Err(StoreError::NotFound(format!("device {}", renewal.device_id)));
            }
            let previous: Option<String> = conn
                .prepare_cached("SELECT serial FROM cert_renewals WHERE device_id = ?1")
                .db()?
                .query_row(params![renewal.device_id.as_str()], |r| r.get(0))
                .optional()
                .db()?;
            insert_cert(conn, &cert)?;
            let at_ms = ts_to_sql("requested_at_ms", renewal.requested_at_ms)?;
            let mut replaced = None;
            if let Some(old) = previous.filter(|s| *s != renewal.serial) {
                let changed = conn
                    .prepare_cached(
                        "UPDATE device_certs SET state = 'revoked', revoked_at_ms = ?2, revoke_reason = ?3
                         WHERE serial = ?1 AND state = 'active'",
                    )
                    .db()?
                    .execute(params![old, at_ms, replaced_reason])
                    .db()?;
                if changed > 0 {
                    replaced = Some(old);
                }
            }
            conn.prepare_cached(
                "INSERT INTO cert_renewals (device_id, key_sha256, serial, cert_pem, requested_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (device_id) DO UPDATE SET key_sha256 = excluded.key_sha256,
                     serial = excluded.serial, cert_pem = excluded.cert_pem,
                     requested_at_ms = excluded.requested_at_ms",
            )
            .db()?
            .execute(params![
                renewal.device_id.as_str(),
                renewal.key_sha256,
                renewal.serial,
                renewal.cert_pem,
                at_ms
            ])
            .db()?;
            Ok(replaced)
        })
        .await
    }

    async fn confirm_renewal(
        &self,
        device_id: &str,
        serial: &str,
        at_ms: u64,
        reason: &str,
    ) -> Result<Option<Vec<String>>> {
        check_text("revoke reason", reason)?;
        let device_id = device_id.to_owned();
        let serial = serial.to_owned();
        let reason = reason.to_owned();
        let at_ms = ts_to_sql("revoked_at_ms", at_ms)?;
        self.write(move |conn| {
            let removed = conn
                .prepare_cached("DELETE FROM cert_renewals WHERE device_id = ?1 AND serial = ?2")
                .db()?
                .execute(params![device_id, serial])
                .db()?;
            if removed == 0 {
                return Ok(None);
            }
            let cert = conn
                .prepare_cached(&format!(
                    "SELECT {CERT_COLUMNS} FROM device_certs WHERE serial = ?1 AND device_id = ?2"
                ))
                .db()?
                .query_row(params![serial, device_id], cert_from_row)
                .optional()
                .db()?;
            let Some(cert) = cert else {
                return Ok(None);
            };
            conn.prepare_cached(
                "UPDATE devices SET cert_serial = ?2, cert_sha256 = ?3, cert_not_after_ms = ?4
                 WHERE id = ?1",
            )
            .db()?
            .execute(params![
                device_id,
                cert.serial,
                cert.sha256,
                ts_to_sql("not_after_ms", cert.not_after_ms)?
            ])
            .db()?;
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE device_certs SET state = 'revoked', revoked_at_ms = ?3, revoke_reason = ?4
                     WHERE device_id = ?1 AND serial <> ?2 AND state = 'active' RETURNING serial",
                )
                .db()?;
            let rows = stmt
                .query_map(params![device_id, serial, at_ms, reason], |r| {
                    r.get::<_, String>(0)
                })
                .db()?;
            let mut serials = rows.collect::<rusqlite::Result<Vec<_>>>().db()?;
            serials.sort();
            Ok(Some(serials))
        })
        .await
    }
}
