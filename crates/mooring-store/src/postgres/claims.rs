//! [`ClaimStore`] for PostgreSQL: claim tokens (by the SHA-256 of the token) and their
//! enrollments. The live-claim bounds are counted under a transaction advisory lock, and a
//! reservation locks its claim's row, so servers sharing the database take turns.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::Row;

use super::{
    column, count_to_sql, is_unique_violation, nul_free_cursor, opt_ts_to_sql, opt_u64_column,
    pg_error, ts_to_sql, u32_column, u64_column, PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{check_text, ClaimCreate, ClaimRecord, EnrollmentRecord, EnrollmentReserve};
use crate::store::ClaimStore;

const CLAIM_COLUMNS: &str = "id, token_sha256, name, uses_max, uses, tags, assign_ids, \
     expires_at_ms, created_by, created_at_ms, revoked_at_ms";

const ENROLLMENT_COLUMNS: &str = "claim_id, key_sha256, device_id, cert_serial, cert_sha256, \
     cert_not_after_ms, cert_pem, created_at_ms";

/// Key of the transaction advisory lock claim creation takes ("mooring" in ASCII, then 0x16:
/// issue 16), so two servers cannot both take the last live claim.
const CLAIM_CREATE_LOCK_KEY: i64 = 0x6d6f_6f72_696e_6716;

fn claim_from_row(row: &Row) -> Result<ClaimRecord> {
    let Json(tags) = column::<Json<BTreeMap<String, String>>>(row, 5)?;
    Ok(ClaimRecord {
        id: column(row, 0)?,
        token_sha256: column(row, 1)?,
        name: column(row, 2)?,
        uses_max: u32_column(row, 3)?,
        uses: u32_column(row, 4)?,
        tags,
        assign_ids: column(row, 6)?,
        expires_at_ms: u64_column(row, 7)?,
        created_by: column(row, 8)?,
        created_at_ms: u64_column(row, 9)?,
        revoked_at_ms: opt_u64_column(row, 10)?,
    })
}

fn enrollment_from_row(row: &Row) -> Result<EnrollmentRecord> {
    Ok(EnrollmentRecord {
        claim_id: column(row, 0)?,
        key_sha256: column(row, 1)?,
        device_id: column(row, 2)?,
        cert_serial: column(row, 3)?,
        cert_sha256: column(row, 4)?,
        cert_not_after_ms: u64_column(row, 5)?,
        cert_pem: column(row, 6)?,
        created_at_ms: u64_column(row, 7)?,
    })
}

async fn enrollment_of(
    client: &impl GenericClient,
    claim_id: &str,
    key: &str,
) -> Result<Option<EnrollmentRecord>> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM claim_enrollments
             WHERE claim_id = $1 AND key_sha256 = $2"
        ))
        .await
        .map_err(pg_error)?;
    let row = client
        .query_opt(&stmt, &[&claim_id, &key])
        .await
        .map_err(pg_error)?;
    row.as_ref().map(enrollment_from_row).transpose()
}

#[async_trait::async_trait]
impl ClaimStore for PgStore {
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
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&CLAIM_CREATE_LOCK_KEY],
        )
        .await
        .map_err(pg_error)?;
        let of_creator: i64 = tx
            .query_one(
                "SELECT count(*) FROM claims
                 WHERE created_by = $1 AND revoked_at_ms IS NULL AND expires_at_ms > $2",
                &[&c.created_by, &now],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if of_creator >= i64::from(per_creator_max) {
            return Ok(ClaimCreate::CreatorFull);
        }
        let live: i64 = tx
            .query_one(
                "SELECT count(*) FROM claims WHERE revoked_at_ms IS NULL AND expires_at_ms > $1",
                &[&now],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if live >= i64::from(total_max) {
            return Ok(ClaimCreate::TotalFull);
        }
        let uses_max = i64::from(c.uses_max);
        let uses = i64::from(c.uses);
        let params: [&(dyn ToSql + Sync); 11] = [
            &c.id,
            &c.token_sha256,
            &c.name,
            &uses_max,
            &uses,
            &Json(&c.tags),
            &c.assign_ids,
            &expires_at_ms,
            &c.created_by,
            &created_at_ms,
            &revoked_at_ms,
        ];
        match tx
            .execute(
                &format!(
                    "INSERT INTO claims ({CLAIM_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ),
                &params,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!(
                    "claim {} (or its token)",
                    c.id
                )))
            }
            Err(e) => return Err(pg_error(e)),
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(ClaimCreate::Created)
    }

    async fn get_claim(&self, id: &str) -> Result<Option<ClaimRecord>> {
        if check_text("claim id", id).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {CLAIM_COLUMNS} FROM claims WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(claim_from_row).transpose()
    }

    async fn find_claim(&self, token_sha256: &str) -> Result<Option<ClaimRecord>> {
        if check_text("claim hash", token_sha256).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {CLAIM_COLUMNS} FROM claims WHERE token_sha256 = $1");
        let row = self.query_opt(&sql, &[&token_sha256]).await?;
        row.as_ref().map(claim_from_row).transpose()
    }

    async fn list_claims(&self, limit: usize, after_id: Option<&str>) -> Result<Vec<ClaimRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after_id = nul_free_cursor(after_id.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql = format!("SELECT {CLAIM_COLUMNS} FROM claims WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = self.query(&sql, &[&after_id, &limit]).await?;
        rows.iter().map(claim_from_row).collect()
    }

    async fn revoke_claim(&self, id: &str, at_ms: u64) -> Result<Option<ClaimRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        if check_text("claim id", id).is_err() {
            return Ok(None);
        }
        let sql = format!(
            "UPDATE claims SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1
             RETURNING {CLAIM_COLUMNS}"
        );
        let row = self.query_opt(&sql, &[&id, &at]).await?;
        row.as_ref().map(claim_from_row).transpose()
    }

    async fn get_enrollment(
        &self,
        claim_id: &str,
        key_sha256: &str,
    ) -> Result<Option<EnrollmentRecord>> {
        if check_text("claim id", claim_id).is_err() || check_text("key hash", key_sha256).is_err()
        {
            return Ok(None);
        }
        let client = self.client().await?;
        enrollment_of(&client, claim_id, key_sha256).await
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
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // The claim's row lock: reservations of one claim (from any server) take turns.
        let row = tx
            .query_opt(
                &format!("SELECT {CLAIM_COLUMNS} FROM claims WHERE id = $1 FOR UPDATE"),
                &[&e.claim_id],
            )
            .await
            .map_err(pg_error)?;
        let Some(claim) = row
            .as_ref()
            .map(claim_from_row)
            .transpose()?
            .filter(|c| c.is_live(now_ms))
        else {
            return Ok(EnrollmentReserve::ClaimInvalid);
        };
        if let Some(existing) = enrollment_of(&tx, &e.claim_id, &e.key_sha256).await? {
            return Ok(EnrollmentReserve::Existing(existing));
        }
        if claim.uses >= claim.uses_max {
            return Ok(EnrollmentReserve::Exhausted);
        }
        tx.execute(
            &format!(
                "INSERT INTO claim_enrollments ({ENROLLMENT_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            &[
                &e.claim_id,
                &e.key_sha256,
                &e.device_id,
                &e.cert_serial,
                &e.cert_sha256,
                &not_after,
                &e.cert_pem,
                &created,
            ],
        )
        .await
        .map_err(pg_error)?;
        tx.execute(
            "UPDATE claims SET uses = uses + 1 WHERE id = $1",
            &[&e.claim_id],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(EnrollmentReserve::Reserved)
    }

    async fn release_enrollment(&self, claim_id: &str, key_sha256: &str) -> Result<bool> {
        if check_text("claim id", claim_id).is_err() || check_text("key hash", key_sha256).is_err()
        {
            return Ok(false);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let n = tx
            .execute(
                "DELETE FROM claim_enrollments WHERE claim_id = $1 AND key_sha256 = $2",
                &[&claim_id, &key_sha256],
            )
            .await
            .map_err(pg_error)?;
        if n > 0 {
            tx.execute(
                "UPDATE claims SET uses = GREATEST(uses - 1, 0) WHERE id = $1",
                &[&claim_id],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(n > 0)
    }

    async fn list_enrollments(
        &self,
        claim_id: &str,
        limit: usize,
    ) -> Result<Vec<EnrollmentRecord>> {
        if limit == 0 || check_text("claim id", claim_id).is_err() {
            return Ok(Vec::new());
        }
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM claim_enrollments WHERE claim_id = $1
             ORDER BY created_at_ms, key_sha256 LIMIT $2"
        );
        let rows = self.query(&sql, &[&claim_id, &limit]).await?;
        rows.iter().map(enrollment_from_row).collect()
    }
}
