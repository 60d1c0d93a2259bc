//! [`ClaimStore`] for SQLite: claim tokens (by the SHA-256 of the token) and their enrollments.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::tokens::{opt_ts_to_sql, opt_u64_column};
use super::{
    count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db, SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{ClaimCreate, ClaimRecord, EnrollmentRecord, EnrollmentReserve};
use crate::store::ClaimStore;

const CLAIM_COLUMNS: &str = "id, token_sha256, name, uses_max, uses, tags, assign_ids, \
     expires_at_ms, created_by, created_at_ms, revoked_at_ms";

const ENROLLMENT_COLUMNS: &str = "claim_id, key_sha256, device_id, cert_serial, cert_sha256, \
     cert_not_after_ms, cert_pem, created_at_ms";

fn u32_column(row: &Row<'_>, index: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(index)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, v))
}

fn claim_from_row(row: &Row<'_>) -> rusqlite::Result<ClaimRecord> {
    let tags: String = row.get(5)?;
    let tags = serde_json::from_str(&tags).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(ClaimRecord {
        id: row.get(0)?,
        token_sha256: row.get(1)?,
        name: row.get(2)?,
        uses_max: u32_column(row, 3)?,
        uses: u32_column(row, 4)?,
        tags,
        assign_ids: row.get(6)?,
        expires_at_ms: u64_column(row, 7)?,
        created_by: row.get(8)?,
        created_at_ms: u64_column(row, 9)?,
        revoked_at_ms: opt_u64_column(row, 10)?,
    })
}

fn enrollment_from_row(row: &Row<'_>) -> rusqlite::Result<EnrollmentRecord> {
    Ok(EnrollmentRecord {
        claim_id: row.get(0)?,
        key_sha256: row.get(1)?,
        device_id: row.get(2)?,
        cert_serial: row.get(3)?,
        cert_sha256: row.get(4)?,
        cert_not_after_ms: u64_column(row, 5)?,
        cert_pem: row.get(6)?,
        created_at_ms: u64_column(row, 7)?,
    })
}

fn claim_by(conn: &Connection, column: &str, value: &str) -> Result<Option<ClaimRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {CLAIM_COLUMNS} FROM claims WHERE {column} = ?1"
    ))
    .db()?
    .query_row(params![value], claim_from_row)
    .optional()
    .db()
}

fn enrollment_of(conn: &Connection, claim_id: &str, key: &str) -> Result<Option<EnrollmentRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {ENROLLMENT_COLUMNS} FROM claim_enrollments WHERE claim_id = ?1 AND key_sha256 = ?2"
    ))
    .db()?
    .query_row(params![claim_id, key], enrollment_from_row)
    .optional()
    .db()
}

#[async_trait::async_trait]
impl ClaimStore for SqliteStore {
    async fn create_claim(
        &self,
        c: ClaimRecord,
        now_ms: u64,
        per_creator_max: u32,
        total_max: u32,
    ) -> Result<ClaimCreate> {
        c.check_text()?;
        let now = ts_to_sql("now_ms", now_ms)?;
        let expires_at_ms = ts_to_sql("expires_at_ms", c.expires_at_ms)?;
        let created_at_ms = ts_to_sql("created_at_ms", c.created_at_ms)?;
        let revoked_at_ms = opt_ts_to_sql("revoked_at_ms", c.revoked_at_ms)?;
        let tags = serde_json::to_string(&c.tags)
            .map_err(|e| StoreError::InvalidInput(format!("claim tags: {e}")))?;
        self.write(move |conn| {
            let live_of_creator: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM claims
                     WHERE created_by = ?1 AND revoked_at_ms IS NULL AND expires_at_ms > ?2",
                )
                .db()?
                .query_row(params![c.created_by, now], |r| r.get(0))
                .db()?;
            if live_of_creator >= i64::from(per_creator_max) {
                return Ok(ClaimCreate::CreatorFull);
            }
            let live: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM claims WHERE revoked_at_ms IS NULL AND expires_at_ms > ?1",
                )
                .db()?
                .query_row(params![now], |r| r.get(0))
                .db()?;
            if live >= i64::from(total_max) {
                return Ok(ClaimCreate::TotalFull);
            }
            let inserted = conn.execute(
                &format!(
                    "INSERT INTO claims ({CLAIM_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                ),
                params![
                    c.id,
                    c.token_sha256,
                    c.name,
                    i64::from(c.uses_max),
                    i64::from(c.uses),
                    tags,
                    c.assign_ids,
                    expires_at_ms,
                    c.created_by,
                    created_at_ms,
                    revoked_at_ms
                ],
            );
            match inserted {
                Ok(_) => Ok(ClaimCreate::Created),
                Err(e) if is_constraint_violation(&e) => Err(StoreError::AlreadyExists(format!(
                    "claim {} (or its token)",
                    c.id
                ))),
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn get_claim(&self, id: &str) -> Result<Option<ClaimRecord>> {
        let id = id.to_owned();
        self.read(move |conn| claim_by(conn, "id", &id)).await
    }

    async fn find_claim(&self, token_sha256: &str) -> Result<Option<ClaimRecord>> {
        let hash = token_sha256.to_owned();
        self.read(move |conn| claim_by(conn, "token_sha256", &hash))
            .await
    }

    async fn list_claims(&self, limit: usize, after_id: Option<&str>) -> Result<Vec<ClaimRecord>> {
        let after = after_id.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {CLAIM_COLUMNS} FROM claims WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .db()?;
            let rows = stmt.query_map(params![after, limit], claim_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn revoke_claim(&self, id: &str, at_ms: u64) -> Result<Option<ClaimRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE claims SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE id = ?1",
            )
            .db()?
            .execute(params![id, at])
            .db()?;
            claim_by(conn, "id", &id)
        })
        .await
    }

    async fn get_enrollment(
        &self,
        claim_id: &str,
        key_sha256: &str,
    ) -> Result<Option<EnrollmentRecord>> {
        let (claim_id, key) = (claim_id.to_owned(), key_sha256.to_owned());
        self.read(move |conn| enrollment_of(conn, &claim_id, &key))
            .await
    }

    async fn reserve_enrollment(
        &self,
        e: EnrollmentRecord,
        now_ms: u64,
    ) -> Result<EnrollmentReserve> {
        e.check_text()?;
        ts_to_sql("now_ms", now_ms)?;
        let not_after = ts_to_sql("cert_not_after_ms", e.cert_not_after_ms)?;
        let created = ts_to_sql("created_at_ms", e.created_at_ms)?;
        // The group transaction serialises every write: nothing changes between the reads and
        // the writes below.
        self.write(move |conn| {
            let Some(claim) = claim_by(conn, "id", &e.claim_id)?.filter(|c| c.is_live(now_ms))
            else {
                return Ok(EnrollmentReserve::ClaimInvalid);
            };
            if let Some(existing) = enrollment_of(conn, &e.claim_id, &e.key_sha256)? {
                return Ok(EnrollmentReserve::Existing(existing));
            }
            if claim.uses >= claim.uses_max {
                return Ok(EnrollmentReserve::Exhausted);
            }
            conn.prepare_cached(&format!(
                "INSERT INTO claim_enrollments ({ENROLLMENT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))
            .db()?
            .execute(params![
                e.claim_id,
                e.key_sha256,
                e.device_id,
                e.cert_serial,
                e.cert_sha256,
                not_after,
                e.cert_pem,
                created
            ])
            .db()?;
            conn.prepare_cached("UPDATE claims SET uses = uses + 1 WHERE id = ?1")
                .db()?
                .execute(params![e.claim_id])
                .db()?;
            Ok(EnrollmentReserve::Reserved)
        })
        .await
    }

    async fn release_enrollment(&self, claim_id: &str, key_sha256: &str) -> Result<bool> {
        let (claim_id, key) = (claim_id.to_owned(), key_sha256.to_owned());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM claim_enrollments WHERE claim_id = ?1 AND key_sha256 = ?2",
                )
                .db()?
                .execute(params![claim_id, key])
                .db()?;
            if n > 0 {
                conn.prepare_cached("UPDATE claims SET uses = max(uses - 1, 0) WHERE id = ?1")
                    .db()?
                    .execute(params![claim_id])
                    .db()?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn list_enrollments(
        &self,
        claim_id: &str,
        limit: usize,
    ) -> Result<Vec<EnrollmentRecord>> {
        let claim_id = claim_id.to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {ENROLLMENT_COLUMNS} FROM claim_enrollments WHERE claim_id = ?1
                     ORDER BY created_at_ms, key_sha256 LIMIT ?2"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![claim_id, limit], enrollment_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }
}
