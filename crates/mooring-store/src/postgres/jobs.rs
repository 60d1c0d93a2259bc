//! [`JobStore`] for PostgreSQL: background jobs with compare-and-set updates.

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::artifacts::ChunkTable;
use super::{
    bound_to_sql, column, count_to_sql, nul_free_cursor, opt_u64_column, ts_to_sql, u64_column,
    PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{check_text, job_errors_from_json, job_errors_to_json, JobRecord, JobState};
use crate::store::JobStore;

const JOB_COLUMNS: &str =
    "id, action, selector, params, scope, state, total, done, failed, errors, \
     cursor, command_id, created_by, created_ms, started_ms, finished_ms, rev, \
     worker, lease_until_ms, attempts, run_after_ms, last_error, result";

fn job_from_row(row: &Row) -> Result<JobRecord> {
    let params: String = column(row, 3)?;
    let state: String = column(row, 5)?;
    let errors: String = column(row, 9)?;
    Ok(JobRecord {
        id: column(row, 0)?,
        action: column(row, 1)?,
        selector: column(row, 2)?,
        params: serde_json::from_str(&params)
            .map_err(|e| StoreError::Backend(format!("stored job params: {e}")))?,
        scope: column(row, 4)?,
        state: state
            .parse::<JobState>()
            .map_err(|e| StoreError::Backend(format!("stored job state: {e}")))?,
        total: opt_u64_column(row, 6)?,
        done: u64_column(row, 7)?,
        failed: u64_column(row, 8)?,
        errors: job_errors_from_json(&errors)?,
        cursor: column(row, 10)?,
        command_id: column(row, 11)?,
        created_by: column(row, 12)?,
        created_ms: u64_column(row, 13)?,
        started_ms: opt_u64_column(row, 14)?,
        finished_ms: opt_u64_column(row, 15)?,
        rev: u64_column(row, 16)?,
        worker: column(row, 17)?,
        lease_until_ms: opt_u64_column(row, 18)?,
        attempts: u32::try_from(u64_column(row, 19)?).unwrap_or(u32::MAX),
        run_after_ms: u64_column(row, 20)?,
        last_error: column(row, 21)?,
        result: column::<Option<String>>(row, 22)?
            .map(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| StoreError::Backend(format!("stored job result: {e}")))
            })
            .transpose()?,
    })
}

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A job's column values in [`JOB_COLUMNS`] order.
struct Encoded {
    id: String,
    action: String,
    selector: String,
    params: String,
    scope: Option<String>,
    state: &'static str,
    total: Option<i64>,
    done: i64,
    failed: i64,
    errors: String,
    cursor: Option<String>,
    command_id: Option<String>,
    created_by: String,
    created_ms: i64,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    rev: i64,
    worker: Option<String>,
    lease_until_ms: Option<i64>,
    attempts: i64,
    run_after_ms: i64,
    last_error: Option<String>,
    result: Option<String>,
}

impl Encoded {
    fn new(j: JobRecord) -> Result<Self> {
        Ok(Encoded {
            params: serde_json::to_string(&j.params)
                .map_err(|e| StoreError::InvalidInput(format!("job params: {e}")))?,
            state: j.state.as_str(),
            total: j.total.map(count),
            done: count(j.done),
            failed: count(j.failed),
            errors: job_errors_to_json(&j.errors),
            created_ms: ts_to_sql("created_ms", j.created_ms)?,
            started_ms: j
                .started_ms
                .map(|t| ts_to_sql("started_ms", t))
                .transpose()?,
            finished_ms: j
                .finished_ms
                .map(|t| ts_to_sql("finished_ms", t))
                .transpose()?,
            rev: count(j.rev),
            lease_until_ms: j
                .lease_until_ms
                .map(|t| ts_to_sql("lease_until_ms", t))
                .transpose()?,
            attempts: i64::from(j.attempts),
            run_after_ms: ts_to_sql("run_after_ms", j.run_after_ms)?,
            result: j.result.map(|r| r.to_string()),
            worker: j.worker,
            last_error: j.last_error,
            id: j.id,
            action: j.action,
            selector: j.selector,
            scope: j.scope,
            cursor: j.cursor,
            command_id: j.command_id,
            created_by: j.created_by,
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 23] {
        [
            &self.id,
            &self.action,
            &self.selector,
            &self.params,
            &self.scope,
            &self.state,
            &self.total,
            &self.done,
            &self.failed,
            &self.errors,
            &self.cursor,
            &self.command_id,
            &self.created_by,
            &self.created_ms,
            &self.started_ms,
            &self.finished_ms,
            &self.rev,
            &self.worker,
            &self.lease_until_ms,
            &self.attempts,
            &self.run_after_ms,
            &self.last_error,
            &self.result,
        ]
    }
}

#[async_trait::async_trait]
impl JobStore for PgStore {
    async fn create_job(&self, job: JobRecord) -> Result<()> {
        let id = job.id.clone();
        let e = Encoded::new(job)?;
        self.execute(
            &format!(
                "INSERT INTO jobs ({JOB_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17, $18, $19, $20, $21, $22, $23)"
            ),
            &e.params(),
            || format!("job {id}"),
        )
        .await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        if id.contains('\0') {
            return Ok(None);
        }
        self.query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()
    }

    async fn list_jobs(&self, limit: usize, before_id: Option<&str>) -> Result<Vec<JobRecord>> {
        let limit = count_to_sql(limit);
        let before = before_id.map(nul_free_cursor);
        let rows = self
            .query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE $1::TEXT IS NULL OR id < $1 ORDER BY id DESC LIMIT $2"
                ),
                &[&before, &limit],
            )
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn update_job(&self, job: JobRecord) -> Result<bool> {
        let e = Encoded::new(job)?;
        let n = self
            .execute(
                "UPDATE jobs SET action = $2, selector = $3, params = $4, scope = $5,
                     state = $6, total = $7, done = $8, failed = $9, errors = $10,
                     cursor = $11, command_id = $12, created_by = $13, created_ms = $14,
                     started_ms = $15, finished_ms = $16, worker = $18,
                     lease_until_ms = $19, attempts = $20, run_after_ms = $21,
                     last_error = $22, result = $23, rev = rev + 1
                 WHERE id = $1 AND rev = $17",
                &e.params(),
                || "job".to_owned(),
            )
            .await?;
        Ok(n == 1)
    }

    async fn count_unfinished_jobs(&self, created_by: &str) -> Result<u64> {
        if created_by.contains('\0') {
            return Ok(0);
        }
        let row = self
            .query_opt(
                "SELECT count(*) FROM jobs WHERE created_by = $1 AND state IN ('queued', 'running')",
                &[&created_by],
            )
            .await?;
        match row {
            Some(r) => u64_column(&r, 0),
            None => Ok(0),
        }
    }

    async fn delete_job(&self, id: &str, rev: u64) -> Result<bool> {
        if id.contains('\0') {
            return Ok(false);
        }
        let rev = bound_to_sql(rev);
        let n = self
            .execute(
                "DELETE FROM jobs WHERE id = $1 AND rev = $2",
                &[&id, &rev],
                || "job".to_owned(),
            )
            .await?;
        Ok(n == 1)
    }

    async fn prune_jobs(&self, finished_before_ms: u64, keep_max: usize) -> Result<u64> {
        let before = bound_to_sql(finished_before_ms);
        let keep = count_to_sql(keep_max);
        let old = self
            .execute(
                "DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms < $1
                     AND state NOT IN ('queued', 'running')",
                &[&before],
                || "job".to_owned(),
            )
            .await?;
        let beyond = self
            .execute(
                "DELETE FROM jobs WHERE state NOT IN ('queued', 'running') AND id IN (
                     SELECT id FROM jobs ORDER BY id DESC OFFSET $1)",
                &[&keep],
                || "job".to_owned(),
            )
            .await?;
        Ok(old + beyond)
    }

    async fn prune_jobs_of(&self, created_by: &str, keep_max: usize) -> Result<u64> {
        if created_by.contains('\0') {
            return Ok(0);
        }
        let keep = count_to_sql(keep_max);
        self.execute(
            "DELETE FROM jobs WHERE created_by = $1 AND state NOT IN ('queued', 'running')
                 AND id IN (SELECT id FROM jobs WHERE created_by = $1 ORDER BY id DESC OFFSET $2)",
            &[&created_by, &keep],
            || "job".to_owned(),
        )
        .await
    }

    async fn claim_job(
        &self,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<JobRecord>> {
        check_text("worker", worker)?;
        let now = bound_to_sql(now_ms);
        let until = bound_to_sql(now_ms.saturating_add(lease_ms));
        // SKIP LOCKED: workers claiming at once take different jobs instead of queueing on one.
        self.query_opt(
            &format!(
                "UPDATE jobs SET worker = $1, lease_until_ms = $3, rev = rev + 1,
                     attempts = attempts + (CASE WHEN worker IS NULL THEN 0 ELSE 1 END),
                     last_error = (CASE WHEN worker IS NULL THEN last_error
                         ELSE 'worker ' || worker || ' stopped mid-turn (its lease ran out)' END)
                 WHERE id = (SELECT id FROM jobs WHERE state IN ('queued', 'running')
                                 AND run_after_ms <= $2
                                 AND (lease_until_ms IS NULL OR lease_until_ms <= $2)
                             ORDER BY run_after_ms, id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING {JOB_COLUMNS}"
            ),
            &[&worker, &now, &until],
        )
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()
    }

    async fn write_job_result(
        &self,
        id: &str,
        rev: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<bool> {
        JOB_RESULT_CHUNKS
            .write(self, id, Some(rev), offset, data)
            .await
    }

    async fn read_job_result(&self, id: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        JOB_RESULT_CHUNKS.read(self, id, offset, len).await
    }
}

const JOB_RESULT_CHUNKS: ChunkTable = ChunkTable {
    table: "job_result_chunks",
    key: "job_id",
    what: "job",
    owner: "jobs",
};
