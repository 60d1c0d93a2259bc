//! [`RolloutStore`] for PostgreSQL: rollouts, their devices (waves, ranks, starts) and event
//! logs (issue 19). Writes to a rollout's devices or events first lock its row (`FOR NO KEY
//! UPDATE`), so they run one at a time per rollout (no two servers start a device twice, bulk
//! statements never deadlock each other); devices go in bulk `unnest` statements.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Transaction};

use super::artifacts::{insert_deployment, seq_to_sql_ord, UPDATE_COLUMNS};
use super::{
    bound_to_sql, column, count_to_sql, is_foreign_key_violation, is_unique_violation,
    nul_free_cursor, opt_ts_to_sql, opt_u64_column, pg_error, seq_to_sql, ts_to_sql, u32_column,
    u64_column, PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{
    check_rollout_deployment, check_text, progress_of, update_state_of, DeploymentRecord,
    DeviceUpdateRecord, ProgressRow, RolloutCreate, RolloutDeviceRecord, RolloutEventRecord,
    RolloutRecord, WaveProgress,
};
use crate::store::RolloutStore;

const COLUMNS: &str = "id, deployment_id, artifact_id, selector, spec, seed, state, wave, reason, \
     gate, window_started_at_ms, rollback_of, created_by, created_at_ms, updated_at_ms, revision";
const DEVICE_COLUMNS: &str =
    "rollout_id, device_id, wave, rank, started_at_ms, from_version, deferred, baseline";
const EVENT_COLUMNS: &str = "rollout_id, seq, at_ms, actor, kind, detail";

/// Key of the transaction advisory lock a rollout's creation takes ("mooring" in ASCII, then
/// 0x19: issue 19), so two creations never both pass the count bound.
const ROLLOUT_CREATE_LOCK_KEY: i64 = 0x6d6f_6f72_696e_6719;

/// Most devices one insert statement carries (a rollout may have 100,000).
const DEVICE_BATCH_LEN_MAX: usize = 5_000;

/// Adds rows of the column arrays, skipping devices already in the rollout and devices that are
/// gone (deleted meanwhile); how many were added.
const INSERT_DEVICES_SQL: &str = "INSERT INTO rollout_devices
       (rollout_id, device_id, wave, rank, started_at_ms, from_version, deferred, baseline)
     SELECT $1, u.device_id, u.wave, u.rank, u.started_at_ms, u.from_version, u.deferred,
            u.baseline
     FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
                 $8::text[])
          AS u(device_id, wave, rank, started_at_ms, from_version, deferred, baseline)
     WHERE EXISTS (SELECT 1 FROM devices d WHERE d.id = u.device_id)
     ON CONFLICT (rollout_id, device_id) DO NOTHING";

fn rollout_from_row(row: &Row) -> Result<RolloutRecord> {
    let seed: i64 = column(row, 5)?;
    Ok(RolloutRecord {
        id: column(row, 0)?,
        deployment_id: column(row, 1)?,
        artifact_id: column(row, 2)?,
        selector: column(row, 3)?,
        spec: column(row, 4)?,
        seed: u64::from_ne_bytes(seed.to_ne_bytes()),
        state: column(row, 6)?,
        wave: u32_column(row, 7)?,
        reason: column(row, 8)?,
        gate: column(row, 9)?,
        window_started_at_ms: opt_u64_column(row, 10)?,
        rollback_of: column(row, 11)?,
        created_by: column(row, 12)?,
        created_at_ms: u64_column(row, 13)?,
        updated_at_ms: u64_column(row, 14)?,
        revision: u64_column(row, 15)?,
    })
}

/// [`DEVICE_COLUMNS`] from column `at` on.
fn device_from_row(row: &Row, at: usize) -> Result<RolloutDeviceRecord> {
    Ok(RolloutDeviceRecord {
        rollout_id: column(row, at)?,
        device_id: column(row, at + 1)?,
        wave: u32_column(row, at + 2)?,
        rank: u64_column(row, at + 3)?,
        started_at_ms: opt_u64_column(row, at + 4)?,
        from_version: column(row, at + 5)?,
        deferred: column(row, at + 6)?,
        baseline: column(row, at + 7)?,
    })
}

fn event_from_row(row: &Row) -> Result<RolloutEventRecord> {
    Ok(RolloutEventRecord {
        rollout_id: column(row, 0)?,
        seq: u64_column(row, 1)?,
        at_ms: u64_column(row, 2)?,
        by: column(row, 3)?,
        kind: column(row, 4)?,
        detail: column(row, 5)?,
    })
}

/// A rank as stored: below 2^63 by contract, anything else is refused.
fn rank_to_sql(rank: u64) -> Result<i64> {
    i64::try_from(rank)
        .map_err(|_| StoreError::InvalidInput(format!("rollout rank {rank} is not below 2^63")))
}

/// Devices as the column arrays of [`INSERT_DEVICES_SQL`].
#[derive(Default)]
struct DeviceColumns {
    device_id: Vec<String>,
    wave: Vec<i64>,
    rank: Vec<i64>,
    started_at_ms: Vec<Option<i64>>,
    from_version: Vec<Option<String>>,
    deferred: Vec<Option<String>>,
    baseline: Vec<Option<String>>,
}

impl DeviceColumns {
    /// Checks and encodes `devices`, in batches of at most [`DEVICE_BATCH_LEN_MAX`].
    fn batches(devices: Vec<RolloutDeviceRecord>) -> Result<Vec<DeviceColumns>> {
        let mut batches = Vec::new();
        let mut cols = DeviceColumns::default();
        for d in devices {
            d.check_text()?;
            cols.wave.push(i64::from(d.wave));
            cols.rank.push(rank_to_sql(d.rank)?);
            cols.started_at_ms
                .push(opt_ts_to_sql("started_at_ms", d.started_at_ms)?);
            cols.device_id.push(d.device_id);
            cols.from_version.push(d.from_version);
            cols.deferred.push(d.deferred);
            cols.baseline.push(d.baseline);
            if cols.device_id.len() == DEVICE_BATCH_LEN_MAX {
                batches.push(std::mem::take(&mut cols));
            }
        }
        if !cols.device_id.is_empty() {
            batches.push(cols);
        }
        Ok(batches)
    }
}

/// Inserts the batches into rollout `id`; how many devices were added.
async fn insert_devices(tx: &Transaction<'_>, id: &str, batches: &[DeviceColumns]) -> Result<u64> {
    if batches.is_empty() {
        return Ok(0);
    }
    let stmt = tx.prepare(INSERT_DEVICES_SQL).await.map_err(pg_error)?;
    let mut added = 0;
    for b in batches {
        let params: [&(dyn ToSql + Sync); 8] = [
            &id,
            &b.device_id,
            &b.wave,
            &b.rank,
            &b.started_at_ms,
            &b.from_version,
            &b.deferred,
            &b.baseline,
        ];
        added += match tx.execute(&stmt, &params).await {
            Ok(n) => n,
            // The rollout went (its deployment deleted) or a device went as it was added.
            Err(e) if is_foreign_key_violation(&e) => {
                return Err(StoreError::NotFound(format!(
                    "rollout {id} or one of its devices"
                )))
            }
            Err(e) => return Err(pg_error(e)),
        };
    }
    Ok(added)
}

/// Locks rollout `id`'s row until the transaction ends; its deployment id, `None` if there is
/// no such rollout.
async fn lock_rollout(tx: &Transaction<'_>, id: &str) -> Result<Option<String>> {
    let row = tx
        .query_opt(
            "SELECT deployment_id FROM rollouts WHERE id = $1 FOR NO KEY UPDATE",
            &[&id],
        )
        .await
        .map_err(pg_error)?;
    row.as_ref().map(|r| column(r, 0)).transpose()
}

#[async_trait::async_trait]
impl RolloutStore for PgStore {
    async fn create_rollout(
        &self,
        r: RolloutRecord,
        deployment: DeploymentRecord,
        devices: Vec<RolloutDeviceRecord>,
        count_max: u32,
    ) -> Result<RolloutCreate> {
        r.check_text()?;
        check_rollout_deployment(&r, &deployment)?;
        check_text("deployment selector", &deployment.selector)?;
        check_text("deployment creator", &deployment.created_by)?;
        let seed = seq_to_sql(r.seed);
        let wave = i64::from(r.wave);
        let window = opt_ts_to_sql("window_started_at_ms", r.window_started_at_ms)?;
        let created = ts_to_sql("created_at_ms", r.created_at_ms)?;
        let updated = ts_to_sql("updated_at_ms", r.updated_at_ms)?;
        let revision = i64::try_from(r.revision).map_err(|_| {
            StoreError::InvalidInput(format!("rollout revision {} is too large", r.revision))
        })?;
        let dep_created = ts_to_sql("created_at_ms", deployment.created_at_ms)?;
        let batches = DeviceColumns::batches(devices)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&ROLLOUT_CREATE_LOCK_KEY],
        )
        .await
        .map_err(pg_error)?;
        let count: i64 = tx
            .query_one("SELECT count(*) FROM rollouts", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        if count >= i64::from(count_max) {
            return Ok(RolloutCreate::Full);
        }
        // Locked against deletion until this commits.
        let artifact = tx
            .query_opt(
                "SELECT 1 FROM ota_artifacts WHERE id = $1 FOR KEY SHARE",
                &[&r.artifact_id],
            )
            .await
            .map_err(pg_error)?;
        if artifact.is_none() {
            return Ok(RolloutCreate::ArtifactNotFound);
        }
        match insert_deployment(&tx, &deployment, dep_created).await {
            Ok(()) => {}
            Err(StoreError::NotFound(_)) => return Ok(RolloutCreate::ArtifactNotFound),
            Err(e) => return Err(e),
        }
        let params: [&(dyn ToSql + Sync); 16] = [
            &r.id,
            &r.deployment_id,
            &r.artifact_id,
            &r.selector,
            &r.spec,
            &seed,
            &r.state,
            &wave,
            &r.reason,
            &r.gate,
            &window,
            &r.rollback_of,
            &r.created_by,
            &created,
            &updated,
            &revision,
        ];
        match tx
            .execute(
                &format!(
                    "INSERT INTO rollouts ({COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
                ),
                &params,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!("rollout {}", r.id)))
            }
            Err(e) => return Err(pg_error(e)),
        }
        insert_devices(&tx, &r.id, &batches).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(RolloutCreate::Created)
    }

    async fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>> {
        if check_text("rollout id", id).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {COLUMNS} FROM rollouts WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(rollout_from_row).transpose()
    }

    async fn list_rollouts(
        &self,
        before: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = count_to_sql(limit);
        let rows = match before {
            None => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM rollouts ORDER BY created_at_ms DESC, id DESC LIMIT $1"
                );
                self.query(&sql, &[&limit]).await?
            }
            Some((at, id)) => {
                check_text("cursor", id)?;
                let at = bound_to_sql(at);
                let sql = format!(
                    "SELECT {COLUMNS} FROM rollouts
                     WHERE (created_at_ms, id) < ($2, $3)
                     ORDER BY created_at_ms DESC, id DESC LIMIT $1"
                );
                self.query(&sql, &[&limit, &at, &id]).await?
            }
        };
        rows.iter().map(rollout_from_row).collect()
    }

    async fn active_rollouts(
        &self,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = nul_free_cursor(after_id.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT {COLUMNS} FROM rollouts
             WHERE state IN ('running', 'paused') AND id > $1 ORDER BY id LIMIT $2"
        );
        let rows = self.query(&sql, &[&after, &limit]).await?;
        rows.iter().map(rollout_from_row).collect()
    }

    async fn update_rollout(&self, r: &RolloutRecord) -> Result<bool> {
        r.check_text()?;
        let Ok(revision) = i64::try_from(r.revision) else {
            // No stored revision is that large.
            return Ok(false);
        };
        let wave = i64::from(r.wave);
        let window = opt_ts_to_sql("window_started_at_ms", r.window_started_at_ms)?;
        let updated = ts_to_sql("updated_at_ms", r.updated_at_ms)?;
        let n = self
            .execute(
                "UPDATE rollouts
                 SET state = $3, wave = $4, reason = $5, gate = $6, window_started_at_ms = $7,
                     updated_at_ms = $8, spec = $9, selector = $10, revision = revision + 1
                 WHERE id = $1 AND revision = $2",
                &[
                    &r.id,
                    &revision,
                    &r.state,
                    &wave,
                    &r.reason,
                    &r.gate,
                    &window,
                    &updated,
                    &r.spec,
                    &r.selector,
                ],
                || format!("rollout {}", r.id),
            )
            .await?;
        Ok(n == 1)
    }

    async fn add_rollout_devices(
        &self,
        id: &str,
        devices: Vec<RolloutDeviceRecord>,
    ) -> Result<u64> {
        check_text("rollout id", id)?;
        let batches = DeviceColumns::batches(devices)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if lock_rollout(&tx, id).await?.is_none() {
            return Err(StoreError::NotFound(format!("rollout {id}")));
        }
        let added = insert_devices(&tx, id, &batches).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(added)
    }

    async fn waiting_rollout_devices(
        &self,
        id: &str,
        wave: u32,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RolloutDeviceRecord>> {
        if limit == 0 || check_text("rollout id", id).is_err() {
            return Ok(Vec::new());
        }
        let (rank, device) = match after {
            // Ranks above i64::MAX are never stored: nothing is after one.
            Some((rank, device)) => (
                i64::try_from(rank).unwrap_or(i64::MAX),
                nul_free_cursor(device),
            ),
            None => (-1, ""),
        };
        let wave = i64::from(wave);
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM rollout_devices
             WHERE rollout_id = $1 AND started_at_ms IS NULL AND wave <= $2
               AND (rank, device_id) > ($3, $4)
             ORDER BY rank, device_id LIMIT $5"
        );
        let rows = self
            .query(&sql, &[&id, &wave, &rank, &device, &limit])
            .await?;
        rows.iter().map(|r| device_from_row(r, 0)).collect()
    }

    async fn start_rollout_devices(
        &self,
        id: &str,
        starts: Vec<(String, Option<String>)>,
        update: DeviceUpdateRecord,
        at_ms: u64,
    ) -> Result<Vec<String>> {
        update.check_text()?;
        let at = ts_to_sql("at_ms", at_ms)?;
        if starts.is_empty() || check_text("rollout id", id).is_err() {
            return Ok(Vec::new());
        }
        let mut devices = Vec::with_capacity(starts.len());
        let mut froms = Vec::with_capacity(starts.len());
        for (device, from) in starts {
            check_text("device id", &device)?;
            check_text("from version", from.as_deref().unwrap_or(""))?;
            devices.push(device);
            froms.push(from);
        }
        let state = update.state.as_str();
        let progress = update.progress_pct.map(i32::from);
        let seq = update.seq.map(seq_to_sql_ord);
        let updated = bound_to_sql(update.updated_at_ms);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if lock_rollout(&tx, id).await?.is_none() {
            return Ok(Vec::new());
        }
        // Only a running rollout of a deployment not canceled starts devices (the rollout's
        // row is locked: a pause or abort waits for this transaction, or this one sees it).
        let startable = tx
            .query_opt(
                "SELECT r.deployment_id FROM rollouts r
                 JOIN ota_deployments d ON d.id = r.deployment_id
                 WHERE r.id = $1 AND r.state = 'running' AND d.canceled_at_ms IS NULL",
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        let Some(deployment) = startable
            .as_ref()
            .map(|r| column::<String>(r, 0))
            .transpose()?
        else {
            return Ok(Vec::new());
        };
        // Each device not started yet is marked started and, only then, its update (a copy of
        // `update`, in the rollout's deployment) is inserted; the ids in the order given.
        let sql = format!(
            "WITH s AS (
                 UPDATE rollout_devices d
                 SET started_at_ms = $4, from_version = u.from_version, deferred = NULL
                 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(device_id, from_version, n)
                 WHERE d.rollout_id = $1 AND d.device_id = u.device_id
                   AND d.started_at_ms IS NULL
                 RETURNING d.device_id, u.n
             ), i AS (
                 INSERT INTO ota_device_updates ({UPDATE_COLUMNS})
                 SELECT $5::text, s.device_id, $6::text, $7::text, $8::text, $9::text, $10::text,
                        $11::integer, $12::text, $13::bigint, $14::bigint
                 FROM s
             )
             SELECT device_id FROM s ORDER BY n"
        );
        let params: [&(dyn ToSql + Sync); 14] = [
            &id,
            &devices,
            &froms,
            &at,
            &deployment,
            &update.artifact_id,
            &update.version,
            &update.command_id,
            &state,
            &update.reason,
            &progress,
            &update.running_version,
            &seq,
            &updated,
        ];
        let rows = match tx.query(&sql, &params).await {
            Ok(rows) => rows,
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!(
                    "an update of deployment {deployment} for a device being started"
                )))
            }
            Err(e) => return Err(pg_error(e)),
        };
        let started = rows
            .iter()
            .map(|r| column::<String>(r, 0))
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(pg_error)?;
        Ok(started)
    }

    async fn defer_rollout_devices(&self, id: &str, deferred: Vec<(String, String)>) -> Result<()> {
        if deferred.is_empty() || check_text("rollout id", id).is_err() {
            return Ok(());
        }
        let mut devices = Vec::with_capacity(deferred.len());
        let mut whys = Vec::with_capacity(deferred.len());
        for (device, why) in deferred {
            check_text("device id", &device)?;
            check_text("deferral", &why)?;
            devices.push(device);
            whys.push(why);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if lock_rollout(&tx, id).await?.is_none() {
            return Ok(());
        }
        tx.execute(
            "UPDATE rollout_devices d SET deferred = u.why
             FROM unnest($2::text[], $3::text[]) AS u(device_id, why)
             WHERE d.rollout_id = $1 AND d.device_id = u.device_id AND d.started_at_ms IS NULL",
            &[&id, &devices, &whys],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn rollout_progress(&self, id: &str) -> Result<Vec<WaveProgress>> {
        if check_text("rollout id", id).is_err() {
            return Ok(Vec::new());
        }
        let rows = self
            .query(
                "SELECT r.wave, r.started_at_ms IS NULL, r.deferred IS NOT NULL, u.state,
                        count(*)
                 FROM rollout_devices r
                 JOIN rollouts o ON o.id = r.rollout_id
                 LEFT JOIN ota_device_updates u
                   ON r.started_at_ms IS NOT NULL AND u.deployment_id = o.deployment_id
                      AND u.device_id = r.device_id
                 WHERE r.rollout_id = $1
                 GROUP BY 1, 2, 3, 4",
                &[&id],
            )
            .await?;
        let rows = rows
            .iter()
            .map(|r| {
                Ok(ProgressRow {
                    wave: u32_column(r, 0)?,
                    waiting: column(r, 1)?,
                    deferred: column(r, 2)?,
                    state: column(r, 3)?,
                    n: u64_column(r, 4)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(progress_of(rows))
    }

    async fn device_rollouts(&self, device_id: &str, limit: usize) -> Result<Vec<String>> {
        if check_text("device id", device_id).is_err() {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT rollout_id FROM rollout_devices WHERE device_id = $1
                 ORDER BY rollout_id LIMIT $2",
                &[&device_id, &limit],
            )
            .await?;
        rows.iter().map(|r| column(r, 0)).collect()
    }

    async fn count_rollout_started_since(&self, id: &str, since_ms: u64) -> Result<u64> {
        if check_text("rollout id", id).is_err() {
            return Ok(0);
        }
        let since = bound_to_sql(since_ms);
        let row = self
            .query_opt(
                "SELECT count(*) FROM rollout_devices
                 WHERE rollout_id = $1 AND started_at_ms IS NOT NULL AND started_at_ms >= $2",
                &[&id, &since],
            )
            .await?;
        row.as_ref().map_or(Ok(0), |r| u64_column(r, 0))
    }

    async fn list_rollout_devices(
        &self,
        id: &str,
        after_device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RolloutDeviceRecord, Option<mooring_proto::ota::UpdateState>)>> {
        if limit == 0 || check_text("rollout id", id).is_err() {
            return Ok(Vec::new());
        }
        let after = nul_free_cursor(after_device.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT u.state, r.{} FROM rollout_devices r
             JOIN rollouts o ON o.id = r.rollout_id
             LEFT JOIN ota_device_updates u
               ON r.started_at_ms IS NOT NULL AND u.deployment_id = o.deployment_id
                  AND u.device_id = r.device_id
             WHERE r.rollout_id = $1 AND r.device_id > $2
             ORDER BY r.device_id LIMIT $3",
            DEVICE_COLUMNS.replace(", ", ", r.")
        );
        let rows = self.query(&sql, &[&id, &after, &limit]).await?;
        rows.iter()
            .map(|r| {
                let state: Option<String> = column(r, 0)?;
                let state = state
                    .map(|s| {
                        update_state_of(&s).ok_or_else(|| {
                            StoreError::Backend(format!("unknown update state {s:?}"))
                        })
                    })
                    .transpose()?;
                Ok((device_from_row(r, 1)?, state))
            })
            .collect()
    }

    async fn set_rollout_baselines(
        &self,
        id: &str,
        baselines: Vec<(String, Option<String>)>,
    ) -> Result<()> {
        if baselines.is_empty() || check_text("rollout id", id).is_err() {
            return Ok(());
        }
        let mut devices = Vec::with_capacity(baselines.len());
        let mut values = Vec::with_capacity(baselines.len());
        for (device, baseline) in baselines {
            check_text("device id", &device)?;
            check_text("baseline", baseline.as_deref().unwrap_or(""))?;
            devices.push(device);
            values.push(baseline);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if lock_rollout(&tx, id).await?.is_none() {
            return Ok(());
        }
        tx.execute(
            "UPDATE rollout_devices d SET baseline = u.baseline
             FROM unnest($2::text[], $3::text[]) AS u(device_id, baseline)
             WHERE d.rollout_id = $1 AND d.device_id = u.device_id",
            &[&id, &devices, &values],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn append_rollout_event(&self, e: RolloutEventRecord, keep_max: usize) -> Result<u64> {
        e.check_text()?;
        let at = ts_to_sql("at_ms", e.at_ms)?;
        // The newest is always kept, so seqs keep counting up.
        let keep = count_to_sql(keep_max.max(1));
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // The rollout's row locked: appends to one rollout take their seqs one at a time.
        if lock_rollout(&tx, &e.rollout_id).await?.is_none() {
            return Err(StoreError::NotFound(format!("rollout {}", e.rollout_id)));
        }
        let seq: i64 = tx
            .query_one(
                "SELECT COALESCE(max(seq), 0) + 1 FROM rollout_events WHERE rollout_id = $1",
                &[&e.rollout_id],
            )
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?;
        tx.execute(
            &format!(
                "INSERT INTO rollout_events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            &[&e.rollout_id, &seq, &at, &e.by, &e.kind, &e.detail],
        )
        .await
        .map_err(pg_error)?;
        tx.execute(
            "DELETE FROM rollout_events WHERE rollout_id = $1 AND seq <= $2",
            &[&e.rollout_id, &seq.saturating_sub(keep)],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    async fn list_rollout_events(
        &self,
        id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RolloutEventRecord>> {
        if limit == 0 || check_text("rollout id", id).is_err() {
            return Ok(Vec::new());
        }
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM rollout_events
             WHERE rollout_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        let rows = self.query(&sql, &[&id, &after, &limit]).await?;
        rows.iter().map(event_from_row).collect()
    }
}
