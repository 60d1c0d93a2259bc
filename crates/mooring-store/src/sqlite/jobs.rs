//! [`JobStore`] for SQLite: background jobs with compare-and-set updates.

use rusqlite::{params, OptionalExtension, Row};

use super::artifacts::ChunkTable;
use super::{
    bound_to_sql, count_to_sql, is_constraint_violation, store_error, ts_to_sql, Db, SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{job_errors_from_json, job_errors_to_json, JobRecord, JobState};
use crate::store::JobStore;

const JOB_COLUMNS: &str =
    "id, action, selector, params, scope, state, total, done, failed, errors, \
     cursor, command_id, created_by, created_ms, started_ms, finished_ms, rev, \
     worker, lease_until_ms, attempts, run_after_ms, last_error, result";

/// A row as read, decoded outside rusqlite's error type.
struct RawJob {
    id: String,
    action: String,
    selector: String,
    params: String,
    scope: Option<String>,
    state: String,
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

fn raw_job(row: &Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        id: row.get(0)?,
        action: row.get(1)?,
        selector: row.get(2)?,
        params: row.get(3)?,
        scope: row.get(4)?,
        state: row.get(5)?,
        total: row.get(6)?,
        done: row.get(7)?,
        failed: row.get(8)?,
        errors: row.get(9)?,
        cursor: row.get(10)?,
        command_id: row.get(11)?,
        created_by: row.get(12)?,
        created_ms: row.get(13)?,
        started_ms: row.get(14)?,
        finished_ms: row.get(15)?,
        rev: row.get(16)?,
        worker: row.get(17)?,
        lease_until_ms: row.get(18)?,
        attempts: row.get(19)?,
        run_after_ms: row.get(20)?,
        last_error: row.get(21)?,
        result: row.get(22)?,
    })
}

fn unsigned(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("stored job {what}: {v}")))
}

fn decode(r: RawJob) -> Result<JobRecord> {
    Ok(JobRecord {
        params: serde_json::from_str(&r.params)
            .map_err(|e| StoreError::Backend(format!("stored job params: {e}")))?,
        state: r
            .state
            .parse::<JobState>()
            .map_err(|e| StoreError::Backend(format!("stored job state: {e}")))?,
        total: r.total.map(|t| unsigned("total", t)).transpose()?,
        done: unsigned("done", r.done)?,
        failed: unsigned("failed", r.failed)?,
        errors: job_errors_from_json(&r.errors)?,
        created_ms: unsigned("created_ms", r.created_ms)?,
        started_ms: r
            .started_ms
            .map(|t| unsigned("started_ms", t))
            .transpose()?,
        finished_ms: r
            .finished_ms
            .map(|t| unsigned("finished_ms", t))
            .transpose()?,
        rev: unsigned("rev", r.rev)?,
        lease_until_ms: r
            .lease_until_ms
            .map(|t| unsigned("lease_until_ms", t))
            .transpose()?,
        attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
        run_after_ms: unsigned("run_after_ms", r.run_after_ms)?,
        result: r
            .result
            .map(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| StoreError::Backend(format!("stored job result: {e}")))
            })
            .transpose()?,
        worker: r.worker,
        last_error: r.last_error,
        id: r.id,
        action: r.action,
        selector: r.selector,
        scope: r.scope,
        cursor: r.cursor,
        command_id: r.command_id,
        created_by: r.created_by,
    })
}

/// The values of a job's columns, in [`JOB_COLUMNS`] order (rev as given).
type Encoded = (
    String,
    String,
    String,
    String,
    Option<String>,
    &'static str,
    Option<i64>,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    Option<String>,
    Option<i64>,
    i64,
    i64,
    Option<String>,
    Option<String>,
);

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn encode(j: JobRecord) -> Result<Encoded> {
    let params = serde_json::to_string(&j.params)
        .map_err(|e| StoreError::InvalidInput(format!("job params: {e}")))?;
    Ok((
        j.id,
        j.action,
        j.selector,
        params,
        j.scope,
        j.state.as_str(),
        j.total.map(count),
        count(j.done),
        count(j.failed),
        job_errors_to_json(&j.errors),
        j.cursor,
        j.command_id,
        j.created_by,
        ts_to_sql("created_ms", j.created_ms)?,
        j.started_ms
            .map(|t| ts_to_sql("started_ms", t))
            .transpose()?,
        j.finished_ms
            .map(|t| ts_to_sql("finished_ms", t))
            .transpose()?,
        count(j.rev),
        j.worker,
        j.lease_until_ms
            .map(|t| ts_to_sql("lease_until_ms", t))
            .transpose()?,
        i64::from(j.attempts),
        ts_to_sql("run_after_ms", j.run_after_ms)?,
        j.last_error,
        j.result.map(|r| r.to_string()),
    ))
}

#[async_trait::async_trait]
impl JobStore for SqliteStore {
    async fn create_job(&self, job: JobRecord) -> Result<()> {
        let id = job.id.clone();
        let e = encode(job)?;
        self.write(move |conn| {
            let r = conn.execute(
                &format!(
                    "INSERT INTO jobs ({JOB_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                             ?17, ?18, ?19, ?20, ?21, ?22, ?23)"
                ),
                params![
                    e.0, e.1, e.2, e.3, e.4, e.5, e.6, e.7, e.8, e.9, e.10, e.11, e.12, e.13, e.14,
                    e.15, e.16, e.17, e.18, e.19, e.20, e.21, e.22
                ],
            );
            match r {
                Ok(_) => Ok(()),
                Err(e) if is_constraint_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("job {id}")))
                }
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let id = id.to_owned();
        let raw = self
            .read(move |conn| {
                conn.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
                    .db()?
                    .query_row(params![id], raw_job)
                    .optional()
                    .db()
            })
            .await?;
        raw.map(decode).transpose()
    }

    async fn list_jobs(&self, limit: usize, before_id: Option<&str>) -> Result<Vec<JobRecord>> {
        let before = before_id.map(str::to_owned);
        let limit = count_to_sql(limit);
        let rows = self
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {JOB_COLUMNS} FROM jobs
                         WHERE ?1 IS NULL OR id < ?1 ORDER BY id DESC LIMIT ?2"
                    ))
                    .db()?;
                let rows = stmt.query_map(params![before, limit], raw_job).db()?;
                rows.collect::<rusqlite::Result<Vec<_>>>().db()
            })
            .await?;
        rows.into_iter().map(decode).collect()
    }

    async fn update_job(&self, job: JobRecord) -> Result<bool> {
        let e = encode(job)?;
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE jobs SET action = ?2, selector = ?3, params = ?4, scope = ?5,
                         state = ?6, total = ?7, done = ?8, failed = ?9, errors = ?10,
                         cursor = ?11, command_id = ?12, created_by = ?13, created_ms = ?14,
                         started_ms = ?15, finished_ms = ?16, worker = ?18,
                         lease_until_ms = ?19, attempts = ?20, run_after_ms = ?21,
                         last_error = ?22, result = ?23, rev = rev + 1
                     WHERE id = ?1 AND rev = ?17",
                )
                .db()?
                .execute(params![
                    e.0, e.1, e.2, e.3, e.4, e.5, e.6, e.7, e.8, e.9, e.10, e.11, e.12, e.13, e.14,
                    e.15, e.16, e.17, e.18, e.19, e.20, e.21, e.22
                ])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn count_unfinished_jobs(&self, created_by: &str) -> Result<u64> {
        let created_by = created_by.to_owned();
        self.read(move |conn| {
            let n: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM jobs
                     WHERE created_by = ?1 AND state IN ('queued', 'running')",
                )
                .db()?
                .query_row(params![created_by], |r| r.get(0))
                .db()?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn delete_job(&self, id: &str, rev: u64) -> Result<bool> {
        let id = id.to_owned();
        let rev = bound_to_sql(rev);
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM jobs WHERE id = ?1 AND rev = ?2")
                .db()?
                .execute(params![id, rev])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn prune_jobs(&self, finished_before_ms: u64, keep_max: usize) -> Result<u64> {
        let before = bound_to_sql(finished_before_ms);
        let keep = count_to_sql(keep_max);
        self.write_background(move |conn| {
            let old = conn
                .execute(
                    "DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms < ?1
                         AND state NOT IN ('queued', 'running')",
                    params![before],
                )
                .db()?;
            let beyond = conn
                .execute(
                    "DELETE FROM jobs WHERE state NOT IN ('queued', 'running') AND id IN (
                         SELECT id FROM jobs ORDER BY id DESC LIMIT -1 OFFSET ?1)",
                    params![keep],
                )
                .db()?;
            Ok((old + beyond) as u64)
        })
        .await
    }

    async fn prune_jobs_of(&self, created_by: &str, keep_max: usize) -> Result<u64> {
        let created_by = created_by.to_owned();
        let keep = count_to_sql(keep_max);
        self.write_background(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM jobs WHERE created_by = ?1 AND state NOT IN ('queued', 'running')
                         AND id IN (SELECT id FROM jobs WHERE created_by = ?1
                                    ORDER BY id DESC LIMIT -1 OFFSET ?2)",
                    params![created_by, keep],
                )
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    async fn claim_job(
        &self,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<JobRecord>> {
        let worker = worker.to_owned();
        let now = bound_to_sql(now_ms);
        let until = bound_to_sql(now_ms.saturating_add(lease_ms));
        let raw = self
            .write(move |conn| {
                // One writer connection: the select and the update are one step.
                let id: Option<String> = conn
                    .prepare_cached(
                        "SELECT id FROM jobs WHERE state IN ('queued', 'running')
                             AND run_after_ms <= ?1
                             AND (lease_until_ms IS NULL OR lease_until_ms <= ?1)
                         ORDER BY run_after_ms, id LIMIT 1",
                    )
                    .db()?
                    .query_row(params![now], |r| r.get(0))
                    .optional()
                    .db()?;
                let Some(id) = id else { return Ok(None) };
                conn.prepare_cached(&format!(
                    "UPDATE jobs SET worker = ?2, lease_until_ms = ?3, rev = rev + 1,
                         attempts = attempts + (CASE WHEN worker IS NULL THEN 0 ELSE 1 END),
                         last_error = (CASE WHEN worker IS NULL THEN last_error
                             ELSE 'worker ' || worker || ' stopped mid-turn (its lease ran out)' END)
                     WHERE id = ?1 RETURNING {JOB_COLUMNS}"
                ))
                .db()?
                .query_row(params![id, worker, until], raw_job)
                .optional()
                .db()
            })
            .await?;
        raw.map(decode).transpose()
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
