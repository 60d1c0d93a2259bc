//! [`ArtifactStore`], the chunk-table [`ArtifactBlobs`] and [`DeploymentStore`] for PostgreSQL:
//! OTA artifacts and deployments (issue 17). The bytes are `bytea` chunks (not large objects: rows written in ordinary
//! transactions, deleted with their artifact by the foreign key, dumped by `pg_dump`).

use std::collections::BTreeMap;

use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{Row, Transaction};

use super::{
    bound_to_sql, column, count_to_sql, is_foreign_key_violation, is_unique_violation,
    nul_free_cursor, opt_u64_column, pg_error, ts_to_sql, u64_column, PgStore,
};
use crate::blobs::append_range;
use crate::error::{Result, StoreError};
use crate::model::{
    check_text, final_update_states_sql, update_state_of, updates_holding_deployment_sql,
    ArtifactCreate, ArtifactDelete, ArtifactRecord, ArtifactState, DeploymentCreate,
    DeploymentDelete, DeploymentRecord, DeviceUpdateRecord,
};
use crate::store::{ArtifactBlobs, ArtifactStore, DeploymentStore};

const COLUMNS: &str = "id, version, sha256, size, compatible, notes, manifest, signature, state, \
     stored_bytes, created_at_ms, created_by";

/// Key of the transaction advisory lock artifact creation takes ("mooring" in ASCII, then
/// 0x17: issue 17), so two servers cannot both take the last place.
const ARTIFACT_CREATE_LOCK_KEY: i64 = 0x6d6f_6f72_696e_6717;
/// Key of the transaction advisory lock a deployment's creation takes, so two creations never
/// both pass the count bound.
const DEPLOYMENT_CREATE_LOCK_KEY: i64 = 0x6d6f_6f72_696e_6718;

fn artifact_from_row(row: &Row) -> Result<ArtifactRecord> {
    let Json(compatible) = column::<Json<Vec<String>>>(row, 4)?;
    let state: String = column(row, 8)?;
    let state = ArtifactState::parse(&state)
        .ok_or_else(|| StoreError::Backend(format!("unknown artifact state {state:?}")))?;
    Ok(ArtifactRecord {
        id: column(row, 0)?,
        version: column(row, 1)?,
        sha256: column(row, 2)?,
        size: u64_column(row, 3)?,
        compatible,
        notes: column(row, 5)?,
        manifest: column(row, 6)?,
        signature: column(row, 7)?,
        state,
        stored_bytes: u64_column(row, 9)?,
        created_at_ms: u64_column(row, 10)?,
        created_by: column(row, 11)?,
    })
}

fn size_to_sql(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::InvalidInput(format!("{what} {n} is too large")))
}

#[async_trait::async_trait]
impl ArtifactStore for PgStore {
    async fn create_artifact(&self, a: ArtifactRecord, count_max: u32) -> Result<ArtifactCreate> {
        a.check_text()?;
        let size = size_to_sql("artifact size", a.size)?;
        let stored = size_to_sql("stored bytes", a.stored_bytes)?;
        let created = ts_to_sql("created_at_ms", a.created_at_ms)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&ARTIFACT_CREATE_LOCK_KEY],
        )
        .await
        .map_err(pg_error)?;
        let count: i64 = tx
            .query_one("SELECT count(*) FROM ota_artifacts", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        if count >= i64::from(count_max) {
            return Ok(ArtifactCreate::Full);
        }
        let taken: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM ota_artifacts WHERE version = $1)",
                &[&a.version],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if taken {
            return Ok(ArtifactCreate::VersionTaken);
        }
        let state = a.state.as_str();
        let params: [&(dyn ToSql + Sync); 12] = [
            &a.id,
            &a.version,
            &a.sha256,
            &size,
            &Json(&a.compatible),
            &a.notes,
            &a.manifest,
            &a.signature,
            &state,
            &stored,
            &created,
            &a.created_by,
        ];
        match tx
            .execute(
                &format!(
                    "INSERT INTO ota_artifacts ({COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                ),
                &params,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::AlreadyExists(format!("artifact {}", a.id)))
            }
            Err(e) => return Err(pg_error(e)),
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(ArtifactCreate::Created)
    }

    async fn get_artifact(&self, id: &str) -> Result<Option<ArtifactRecord>> {
        if check_text("artifact id", id).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {COLUMNS} FROM ota_artifacts WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    async fn list_artifacts(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<ArtifactRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after_id = nul_free_cursor(after_id.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql = format!("SELECT {COLUMNS} FROM ota_artifacts WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = self.query(&sql, &[&after_id, &limit]).await?;
        rows.iter().map(artifact_from_row).collect()
    }

    async fn advance_artifact(&self, id: &str, from: u64, to: u64) -> Result<bool> {
        let (from, to) = (
            size_to_sql("stored bytes", from)?,
            size_to_sql("stored bytes", to)?,
        );
        if check_text("artifact id", id).is_err() {
            return Ok(false);
        }
        let n = self
            .execute(
                "UPDATE ota_artifacts SET stored_bytes = $3
                 WHERE id = $1 AND stored_bytes = $2 AND state = 'uploading' AND $3 <= size",
                &[&id, &from, &to],
                || format!("artifact {id}"),
            )
            .await?;
        Ok(n == 1)
    }

    async fn mark_artifact_ready(&self, id: &str, signature: &str) -> Result<bool> {
        check_text("artifact signature", signature)?;
        if check_text("artifact id", id).is_err() {
            return Ok(false);
        }
        let n = self
            .execute(
                "UPDATE ota_artifacts SET state = 'ready', signature = $2
                 WHERE id = $1 AND state = 'uploading'",
                &[&id, &signature],
                || format!("artifact {id}"),
            )
            .await?;
        Ok(n == 1)
    }

    async fn artifact_in_use(&self, id: &str) -> Result<bool> {
        if check_text("artifact id", id).is_err() {
            return Ok(false);
        }
        let row = self
            .query_opt(
                "SELECT EXISTS (SELECT 1 FROM ota_deployments WHERE artifact_id = $1)",
                &[&id],
            )
            .await?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn delete_artifact(&self, id: &str) -> Result<ArtifactDelete> {
        if check_text("artifact id", id).is_err() {
            return Ok(ArtifactDelete::NotFound);
        }
        let client = self.client().await?;
        // One statement: the foreign key of ota_deployments refuses the delete of an artifact
        // in use, however the deployment raced in; chunks go by ON DELETE CASCADE.
        match client
            .execute("DELETE FROM ota_artifacts WHERE id = $1", &[&id])
            .await
        {
            Ok(1) => Ok(ArtifactDelete::Deleted),
            Ok(_) => Ok(ArtifactDelete::NotFound),
            Err(e) if is_foreign_key_violation(&e) => Ok(ArtifactDelete::InUse),
            Err(e) => Err(pg_error(e)),
        }
    }

    async fn expire_uploads(&self, created_before_ms: u64, limit: usize) -> Result<Vec<String>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let before = bound_to_sql(created_before_ms);
        let limit = count_to_sql(limit);
        let rows = self
            .query(
                "DELETE FROM ota_artifacts WHERE id IN (
                     SELECT id FROM ota_artifacts
                     WHERE state = 'uploading' AND created_at_ms < $1 ORDER BY id LIMIT $2)
                 RETURNING id",
                &[&before, &limit],
            )
            .await?;
        rows.iter().map(|r| column::<String>(r, 0)).collect()
    }
}

#[async_trait::async_trait]
impl ArtifactBlobs for PgStore {
    async fn write_blob(&self, id: &str, offset: u64, data: Vec<u8>) -> Result<()> {
        ARTIFACT_CHUNKS
            .write(self, id, None, offset, data)
            .await
            .map(|_| ())
    }

    async fn read_blob(&self, id: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        ARTIFACT_CHUNKS.read(self, id, offset, len).await
    }

    async fn delete_blob(&self, id: &str) -> Result<()> {
        if check_text("artifact id", id).is_err() {
            return Ok(());
        }
        self.execute(
            "DELETE FROM ota_artifact_chunks WHERE artifact_id = $1",
            &[&id],
            || format!("artifact {id}"),
        )
        .await
        .map(|_| ())
    }
}

/// A table of `bytea` chunks keyed by (owner id, offset), the owner's rows going with it (a
/// foreign key): an artifact's bytes, a job's result.
pub(super) struct ChunkTable {
    pub table: &'static str,
    /// The owner's id column.
    pub key: &'static str,
    /// The owner, for a `NotFound` ("artifact", "job").
    pub what: &'static str,
    /// The owners' table (with `id` and, for a guarded write, `rev`).
    pub owner: &'static str,
}

pub(super) const ARTIFACT_CHUNKS: ChunkTable = ChunkTable {
    table: "ota_artifact_chunks",
    key: "artifact_id",
    what: "artifact",
    owner: "ota_artifacts",
};

impl ChunkTable {
    /// Writes `data` at `offset` in one transaction, replacing everything from `offset` on;
    /// with `rev`, only while the owner's `rev` is still that (`false`, nothing written, if
    /// not).
    pub(super) async fn write(
        &self,
        store: &PgStore,
        id: &str,
        rev: Option<u64>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<bool> {
        let offset = size_to_sql("offset", offset)?;
        let (table, key, what, owner) = (self.table, self.key, self.what, self.owner);
        check_text(what, id)?;
        let mut client = store.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if let Some(rev) = rev {
            // The owner's row stays locked (its rev unchanged) until this commits.
            let rev = i64::try_from(rev).unwrap_or(i64::MAX);
            let held = tx
                .query_opt(
                    &format!("SELECT 1 FROM {owner} WHERE id = $1 AND rev = $2 FOR UPDATE"),
                    &[&id, &rev],
                )
                .await
                .map_err(pg_error)?;
            if held.is_none() {
                return Ok(false);
            }
        }
        // Replace everything from `offset` on: later chunks go, one spanning it is cut.
        tx.execute(
            &format!("DELETE FROM {table} WHERE {key} = $1 AND offset_bytes >= $2"),
            &[&id, &offset],
        )
        .await
        .map_err(pg_error)?;
        tx.execute(
            &format!(
                "UPDATE {table}
                 SET data = substring(data FROM 1 FOR ($2 - offset_bytes)::INTEGER)
                 WHERE {key} = $1 AND offset_bytes < $2 AND offset_bytes + length(data) > $2"
            ),
            &[&id, &offset],
        )
        .await
        .map_err(pg_error)?;
        match tx
            .execute(
                &format!("INSERT INTO {table} ({key}, offset_bytes, data) VALUES ($1, $2, $3)"),
                &[&id, &offset, &data],
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_foreign_key_violation(&e) => {
                return Err(StoreError::NotFound(format!("{what} {id}")))
            }
            Err(e) => return Err(pg_error(e)),
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(true)
    }

    /// Up to `len` bytes from `offset`.
    pub(super) async fn read(
        &self,
        store: &PgStore,
        id: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let start = size_to_sql("offset", offset)?;
        let end = start.saturating_add(count_to_sql(len));
        let (table, key) = (self.table, self.key);
        if check_text(self.what, id).is_err() {
            return Ok(Vec::new());
        }
        let rows = store
            .query(
                // Only the asked part of each chunk leaves the database (a 1 MiB read of 8 MiB
                // chunks reads 1 MiB, not 8 or 16).
                &format!(
                    "SELECT GREATEST(offset_bytes, $2),
                            substring(data FROM (GREATEST($2 - offset_bytes, 0) + 1)::int
                                           FOR (LEAST(offset_bytes + length(data), $3)
                                                - GREATEST(offset_bytes, $2))::int)
                     FROM {table}
                     WHERE {key} = $1 AND offset_bytes < $3
                       AND offset_bytes + length(data) > $2
                     ORDER BY offset_bytes"
                ),
                &[&id, &start, &end],
            )
            .await?;
        let mut out = Vec::new();
        for row in &rows {
            let at: i64 = column(row, 0)?;
            let data: Vec<u8> = column(row, 1)?;
            append_range(&mut out, at, &data, start, end);
        }
        Ok(out)
    }
}

const DEPLOYMENT_COLUMNS: &str =
    "id, artifact_id, selector, allow_downgrade, created_by, created_at_ms, canceled_at_ms";
pub(super) const UPDATE_COLUMNS: &str =
    "deployment_id, device_id, artifact_id, version, command_id, state, \
     reason, progress_pct, running_version, seq, updated_at_ms";

fn deployment_from_row(row: &Row) -> Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        id: column(row, 0)?,
        artifact_id: column(row, 1)?,
        selector: column(row, 2)?,
        allow_downgrade: column(row, 3)?,
        created_by: column(row, 4)?,
        created_at_ms: u64_column(row, 5)?,
        canceled_at_ms: opt_u64_column(row, 6)?,
    })
}

fn update_from_row(row: &Row) -> Result<DeviceUpdateRecord> {
    let state: String = column(row, 5)?;
    let state = update_state_of(&state)
        .ok_or_else(|| StoreError::Backend(format!("unknown update state {state:?}")))?;
    let progress: Option<i32> = column(row, 7)?;
    let seq: Option<i64> = column(row, 9)?;
    Ok(DeviceUpdateRecord {
        deployment_id: column(row, 0)?,
        device_id: column(row, 1)?,
        artifact_id: column(row, 2)?,
        version: column(row, 3)?,
        command_id: column(row, 4)?,
        state,
        reason: column(row, 6)?,
        progress_pct: progress.and_then(|p| u8::try_from(p).ok()),
        running_version: column(row, 8)?,
        seq: seq.map(|s| u64::try_from(s).unwrap_or(0)),
        updated_at_ms: u64_column(row, 10)?,
    })
}

pub(super) fn seq_to_sql_ord(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Inserts a deployment (not canceled) created at `created` (its `created_at_ms` as stored); a
/// taken id is `AlreadyExists`, a missing artifact `NotFound`.
pub(super) async fn insert_deployment(
    tx: &Transaction<'_>,
    d: &DeploymentRecord,
    created: i64,
) -> Result<()> {
    match tx
        .execute(
            &format!(
                "INSERT INTO ota_deployments ({DEPLOYMENT_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, NULL)"
            ),
            &[
                &d.id,
                &d.artifact_id,
                &d.selector,
                &d.allow_downgrade,
                &d.created_by,
                &created,
            ],
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => {
            Err(StoreError::AlreadyExists(format!("deployment {}", d.id)))
        }
        Err(e) if is_foreign_key_violation(&e) => {
            Err(StoreError::NotFound(format!("artifact {}", d.artifact_id)))
        }
        Err(e) => Err(pg_error(e)),
    }
}

#[async_trait::async_trait]
impl DeploymentStore for PgStore {
    async fn create_deployment(
        &self,
        d: DeploymentRecord,
        updates: Vec<DeviceUpdateRecord>,
        count_max: u32,
    ) -> Result<DeploymentCreate> {
        check_text("deployment selector", &d.selector)?;
        check_text("deployment creator", &d.created_by)?;
        for u in &updates {
            u.check_text()?;
        }
        let created = ts_to_sql("created_at_ms", d.created_at_ms)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&DEPLOYMENT_CREATE_LOCK_KEY],
        )
        .await
        .map_err(pg_error)?;
        let count: i64 = tx
            .query_one("SELECT count(*) FROM ota_deployments", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        if count >= i64::from(count_max) {
            return Ok(DeploymentCreate::Full);
        }
        insert_deployment(&tx, &d, created).await?;
        let stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO ota_device_updates ({UPDATE_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ))
            .await
            .map_err(pg_error)?;
        for u in updates {
            let state = u.state.as_str();
            let progress = u.progress_pct.map(i32::from);
            let seq = u.seq.map(seq_to_sql_ord);
            let at = bound_to_sql(u.updated_at_ms);
            let params: [&(dyn ToSql + Sync); 11] = [
                &u.deployment_id,
                &u.device_id,
                &u.artifact_id,
                &u.version,
                &u.command_id,
                &state,
                &u.reason,
                &progress,
                &u.running_version,
                &seq,
                &at,
            ];
            match tx.execute(&stmt, &params).await {
                Ok(_) => {}
                Err(e) if is_foreign_key_violation(&e) => {
                    return Err(StoreError::NotFound(format!("device {}", u.device_id)))
                }
                Err(e) => return Err(pg_error(e)),
            }
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(DeploymentCreate::Created)
    }

    async fn delete_deployment(&self, id: &str) -> Result<DeploymentDelete> {
        if check_text("deployment id", id).is_err() {
            return Ok(DeploymentDelete::NotFound);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // The row locked: a cancel waits for this transaction.
        let Some(row) = tx
            .query_opt(
                "SELECT canceled_at_ms FROM ota_deployments WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg_error)?
        else {
            return Ok(DeploymentDelete::NotFound);
        };
        let canceled = row.get::<_, Option<i64>>(0).is_some();
        // The updates locked too: a device's report on one waits for this transaction (and then
        // finds nothing), or committed before it and is seen by the check below.
        tx.execute(
            "SELECT 1 FROM ota_device_updates WHERE deployment_id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(pg_error)?;
        let active: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM ota_device_updates
                     WHERE deployment_id = $1 AND {})",
                    updates_holding_deployment_sql(canceled)
                ),
                &[&id],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if active {
            return Ok(DeploymentDelete::Active);
        }
        tx.execute(
            "DELETE FROM ota_device_updates WHERE deployment_id = $1",
            &[&id],
        )
        .await
        .map_err(pg_error)?;
        tx.execute("DELETE FROM ota_deployments WHERE id = $1", &[&id])
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(DeploymentDelete::Deleted)
    }

    async fn get_deployment(&self, id: &str) -> Result<Option<DeploymentRecord>> {
        if check_text("deployment id", id).is_err() {
            return Ok(None);
        }
        let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM ota_deployments WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    async fn list_deployments(
        &self,
        before: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<DeploymentRecord>> {
        let limit = count_to_sql(limit);
        let rows = match before {
            None => {
                let sql = format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM ota_deployments
                     ORDER BY created_at_ms DESC, id DESC LIMIT $1"
                );
                self.query(&sql, &[&limit]).await?
            }
            Some((at, id)) => {
                check_text("cursor", id)?;
                let at = bound_to_sql(at);
                let sql = format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM ota_deployments
                     WHERE (created_at_ms, id) < ($2, $3)
                     ORDER BY created_at_ms DESC, id DESC LIMIT $1"
                );
                self.query(&sql, &[&limit, &at, &id]).await?
            }
        };
        rows.iter().map(deployment_from_row).collect()
    }

    async fn cancel_deployment(&self, id: &str, at_ms: u64) -> Result<Option<DeploymentRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        if check_text("deployment id", id).is_err() {
            return Ok(None);
        }
        let sql = format!(
            "UPDATE ota_deployments SET canceled_at_ms = COALESCE(canceled_at_ms, $2) WHERE id = $1
             RETURNING {DEPLOYMENT_COLUMNS}"
        );
        let row = self.query_opt(&sql, &[&id, &at]).await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    async fn set_update_command(
        &self,
        deployment_id: &str,
        device_id: &str,
        command_id: &str,
    ) -> Result<bool> {
        check_text("command id", command_id)?;
        if check_text("deployment id", deployment_id).is_err()
            || check_text("device id", device_id).is_err()
        {
            return Ok(false);
        }
        let n = self
            .execute(
                "UPDATE ota_device_updates SET command_id = $3
                 WHERE deployment_id = $1 AND device_id = $2",
                &[&deployment_id, &device_id, &command_id],
                || "update".to_owned(),
            )
            .await?;
        Ok(n == 1)
    }

    async fn apply_update_report(&self, u: DeviceUpdateRecord) -> Result<bool> {
        u.check_text()?;
        let state = u.state.as_str();
        let progress = u.progress_pct.map(i32::from);
        let seq = u.seq.map(seq_to_sql_ord);
        let at = bound_to_sql(u.updated_at_ms);
        let n = self
            .execute(
                &format!(
                    "UPDATE ota_device_updates
                     SET state = $3, reason = $4, progress_pct = $5, running_version = $6,
                         seq = $7, updated_at_ms = $8
                     WHERE deployment_id = $1 AND device_id = $2
                       AND (seq IS NULL OR (seq < $7 AND state NOT IN ({})))",
                    final_update_states_sql()
                ),
                &[
                    &u.deployment_id,
                    &u.device_id,
                    &state,
                    &u.reason,
                    &progress,
                    &u.running_version,
                    &seq,
                    &at,
                ],
                || "update".to_owned(),
            )
            .await?;
        Ok(n == 1)
    }

    async fn get_update(
        &self,
        deployment_id: &str,
        device_id: &str,
    ) -> Result<Option<DeviceUpdateRecord>> {
        if check_text("deployment id", deployment_id).is_err()
            || check_text("device id", device_id).is_err()
        {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {UPDATE_COLUMNS} FROM ota_device_updates
             WHERE deployment_id = $1 AND device_id = $2"
        );
        let row = self.query_opt(&sql, &[&deployment_id, &device_id]).await?;
        row.as_ref().map(update_from_row).transpose()
    }

    async fn list_updates(
        &self,
        deployment_id: &str,
        after_device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeviceUpdateRecord>> {
        if limit == 0 || check_text("deployment id", deployment_id).is_err() {
            return Ok(Vec::new());
        }
        let after = nul_free_cursor(after_device.unwrap_or(""));
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT {UPDATE_COLUMNS} FROM ota_device_updates
             WHERE deployment_id = $1 AND device_id > $2 ORDER BY device_id LIMIT $3"
        );
        let rows = self.query(&sql, &[&deployment_id, &after, &limit]).await?;
        rows.iter().map(update_from_row).collect()
    }

    async fn unsent_updates(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (dep, dev) = after.unwrap_or(("", ""));
        let (dep, dev) = (nul_free_cursor(dep), nul_free_cursor(dev));
        let limit = count_to_sql(limit);
        let rows = self
            .query(
                "SELECT u.deployment_id, u.device_id FROM ota_device_updates u
                 JOIN ota_deployments d ON d.id = u.deployment_id
                 WHERE u.command_id IS NULL AND u.state = 'pending'
                   AND d.canceled_at_ms IS NULL
                   AND (u.deployment_id, u.device_id) > ($1, $2)
                 ORDER BY u.deployment_id, u.device_id LIMIT $3",
                &[&dep, &dev, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((column::<String>(r, 0)?, column::<String>(r, 1)?)))
            .collect()
    }

    async fn ended_update_commands(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (dep, dev) = after.unwrap_or(("", ""));
        let (dep, dev) = (nul_free_cursor(dep), nul_free_cursor(dev));
        let limit = count_to_sql(limit);
        let rows = self
            .query(
                "SELECT u.deployment_id, u.device_id, u.command_id FROM ota_device_updates u
                 JOIN commands c ON c.id = u.command_id
                 WHERE u.command_id IS NOT NULL AND u.seq IS NULL AND u.state = 'pending'
                   AND c.state IN ('failed', 'expired', 'canceled')
                   AND (u.deployment_id, u.device_id) > ($1, $2)
                 ORDER BY u.deployment_id, u.device_id LIMIT $3",
                &[&dep, &dev, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    column::<String>(r, 0)?,
                    column::<String>(r, 1)?,
                    column::<String>(r, 2)?,
                ))
            })
            .collect()
    }

    async fn count_updates(&self, deployment_id: &str) -> Result<BTreeMap<String, u64>> {
        if check_text("deployment id", deployment_id).is_err() {
            return Ok(BTreeMap::new());
        }
        let rows = self
            .query(
                "SELECT state, count(*) FROM ota_device_updates WHERE deployment_id = $1
                 GROUP BY state",
                &[&deployment_id],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((column::<String>(r, 0)?, u64_column(r, 1)?)))
            .collect()
    }

    async fn device_updates(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DeviceUpdateRecord>> {
        if limit == 0 || check_text("device id", device_id).is_err() {
            return Ok(Vec::new());
        }
        let limit = count_to_sql(limit);
        let sql = format!(
            "SELECT u.{} FROM ota_device_updates u
             JOIN ota_deployments d ON d.id = u.deployment_id
             WHERE u.device_id = $1 ORDER BY d.created_at_ms DESC, d.id DESC LIMIT $2",
            UPDATE_COLUMNS.replace(", ", ", u.")
        );
        let rows = self.query(&sql, &[&device_id, &limit]).await?;
        rows.iter().map(update_from_row).collect()
    }
}
