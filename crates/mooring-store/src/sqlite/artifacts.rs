//! [`ArtifactStore`], the chunk-table [`ArtifactBlobs`] and [`DeploymentStore`] for SQLite: OTA
//! artifacts and deployments (issue 17).

use rusqlite::{params, Connection, OptionalExtension, Row};

use std::collections::BTreeMap;

use super::tokens::opt_u64_column;
use super::{
    bound_to_sql, count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db,
    SqliteStore,
};
use crate::blobs::append_range;
use crate::error::{Result, StoreError};
use crate::model::{
    final_update_states_sql, update_state_of, updates_holding_deployment_sql, ArtifactCreate,
    ArtifactDelete, ArtifactRecord, ArtifactState, DeploymentCreate, DeploymentDelete,
    DeploymentRecord, DeviceUpdateRecord,
};
use crate::store::{ArtifactBlobs, ArtifactStore, DeploymentStore};

const COLUMNS: &str = "id, version, sha256, size, compatible, notes, manifest, signature, state, \
     stored_bytes, created_at_ms, created_by";

fn artifact_from_row(row: &Row<'_>) -> rusqlite::Result<ArtifactRecord> {
    let conversion = |i: usize, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
    };
    let compatible: String = row.get(4)?;
    let compatible = serde_json::from_str(&compatible).map_err(|e| conversion(4, Box::new(e)))?;
    let state: String = row.get(8)?;
    let state = ArtifactState::parse(&state)
        .ok_or_else(|| conversion(8, format!("unknown artifact state {state:?}").into()))?;
    Ok(ArtifactRecord {
        id: row.get(0)?,
        version: row.get(1)?,
        sha256: row.get(2)?,
        size: u64_column(row, 3)?,
        compatible,
        notes: row.get(5)?,
        manifest: row.get(6)?,
        signature: row.get(7)?,
        state,
        stored_bytes: u64_column(row, 9)?,
        created_at_ms: u64_column(row, 10)?,
        created_by: row.get(11)?,
    })
}

fn get(conn: &Connection, id: &str) -> Result<Option<ArtifactRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM ota_artifacts WHERE id = ?1"
    ))
    .db()?
    .query_row(params![id], artifact_from_row)
    .optional()
    .db()
}

fn in_use(conn: &Connection, id: &str) -> Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM ota_deployments WHERE artifact_id = ?1)")
        .db()?
        .query_row(params![id], |r| r.get(0))
        .db()
}

fn size_to_sql(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| StoreError::InvalidInput(format!("{what} {n} is too large")))
}

#[async_trait::async_trait]
impl ArtifactStore for SqliteStore {
    async fn create_artifact(&self, a: ArtifactRecord, count_max: u32) -> Result<ArtifactCreate> {
        a.check_text()?;
        let size = size_to_sql("artifact size", a.size)?;
        let stored = size_to_sql("stored bytes", a.stored_bytes)?;
        let created = ts_to_sql("created_at_ms", a.created_at_ms)?;
        let compatible = serde_json::to_string(&a.compatible)
            .map_err(|e| StoreError::InvalidInput(format!("compatible: {e}")))?;
        self.write(move |conn| {
            let count: i64 = conn
                .prepare_cached("SELECT count(*) FROM ota_artifacts")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if count >= i64::from(count_max) {
                return Ok(ArtifactCreate::Full);
            }
            let taken: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM ota_artifacts WHERE version = ?1)")
                .db()?
                .query_row(params![a.version], |r| r.get(0))
                .db()?;
            if taken {
                return Ok(ArtifactCreate::VersionTaken);
            }
            let inserted = conn.execute(
                &format!(
                    "INSERT INTO ota_artifacts ({COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ),
                params![
                    a.id,
                    a.version,
                    a.sha256,
                    size,
                    compatible,
                    a.notes,
                    a.manifest,
                    a.signature,
                    a.state.as_str(),
                    stored,
                    created,
                    a.created_by
                ],
            );
            match inserted {
                Ok(_) => Ok(ArtifactCreate::Created),
                Err(e) if is_constraint_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("artifact {}", a.id)))
                }
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn get_artifact(&self, id: &str) -> Result<Option<ArtifactRecord>> {
        let id = id.to_owned();
        self.read(move |conn| get(conn, &id)).await
    }

    async fn list_artifacts(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<ArtifactRecord>> {
        let after = after_id.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM ota_artifacts WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![after, limit], artifact_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn advance_artifact(&self, id: &str, from: u64, to: u64) -> Result<bool> {
        let (from, to) = (
            size_to_sql("stored bytes", from)?,
            size_to_sql("stored bytes", to)?,
        );
        let id = id.to_owned();
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE ota_artifacts SET stored_bytes = ?3
                     WHERE id = ?1 AND stored_bytes = ?2 AND state = 'uploading' AND ?3 <= size",
                )
                .db()?
                .execute(params![id, from, to])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn mark_artifact_ready(&self, id: &str, signature: &str) -> Result<bool> {
        crate::model::check_text("artifact signature", signature)?;
        let (id, signature) = (id.to_owned(), signature.to_owned());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE ota_artifacts SET state = 'ready', signature = ?2
                     WHERE id = ?1 AND state = 'uploading'",
                )
                .db()?
                .execute(params![id, signature])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn artifact_in_use(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.read(move |conn| in_use(conn, &id)).await
    }

    async fn delete_artifact(&self, id: &str) -> Result<ArtifactDelete> {
        let id = id.to_owned();
        self.write(move |conn| {
            if in_use(conn, &id)? {
                return Ok(ArtifactDelete::InUse);
            }
            // Its chunks go with it (foreign key, ON DELETE CASCADE).
            let n = conn
                .prepare_cached("DELETE FROM ota_artifacts WHERE id = ?1")
                .db()?
                .execute(params![id])
                .db()?;
            Ok(if n == 1 {
                ArtifactDelete::Deleted
            } else {
                ArtifactDelete::NotFound
            })
        })
        .await
    }

    async fn expire_uploads(&self, created_before_ms: u64, limit: usize) -> Result<Vec<String>> {
        let before = bound_to_sql(created_before_ms);
        let limit = count_to_sql(limit);
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "DELETE FROM ota_artifacts WHERE id IN (
                         SELECT id FROM ota_artifacts
                         WHERE state = 'uploading' AND created_at_ms < ?1 ORDER BY id LIMIT ?2)
                     RETURNING id",
                )
                .db()?;
            let rows = stmt.query_map(params![before, limit], |r| r.get(0)).db()?;
            rows.collect::<rusqlite::Result<Vec<String>>>().db()
        })
        .await
    }
}

#[async_trait::async_trait]
impl ArtifactBlobs for SqliteStore {
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
        let id = id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM ota_artifact_chunks WHERE artifact_id = ?1")
                .db()?
                .execute(params![id])
                .db()?;
            Ok(())
        })
        .await
    }
}

/// A table of byte chunks keyed by (owner id, offset), the owner's rows going with it (a
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
    /// Writes `data` at `offset`, replacing everything from `offset` on; with `rev`, only
    /// while the owner's `rev` is still that (`false`, nothing written, if not).
    pub(super) async fn write(
        &self,
        store: &SqliteStore,
        id: &str,
        rev: Option<u64>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<bool> {
        let offset = size_to_sql("offset", offset)?;
        let id = id.to_owned();
        let (table, key, what, owner) = (self.table, self.key, self.what, self.owner);
        let rev = rev.map(|r| i64::try_from(r).unwrap_or(i64::MAX));
        store
            .write(move |conn| {
                if let Some(rev) = rev {
                    // One writer connection: nothing changes the rev between this and the write.
                    let held = conn
                        .prepare_cached(&format!(
                            "SELECT 1 FROM {owner} WHERE id = ?1 AND rev = ?2"
                        ))
                        .db()?
                        .query_row(params![id, rev], |_| Ok(()))
                        .optional()
                        .db()?;
                    if held.is_none() {
                        return Ok(false);
                    }
                }
                // Replace everything from `offset` on: later chunks go, one spanning it is cut.
                conn.prepare_cached(&format!(
                    "DELETE FROM {table} WHERE {key} = ?1 AND offset_bytes >= ?2"
                ))
                .db()?
                .execute(params![id, offset])
                .db()?;
                conn.prepare_cached(&format!(
                    "UPDATE {table} SET data = substr(data, 1, ?2 - offset_bytes)
                     WHERE {key} = ?1 AND offset_bytes < ?2 AND offset_bytes + length(data) > ?2"
                ))
                .db()?
                .execute(params![id, offset])
                .db()?;
                match conn
                    .prepare_cached(&format!(
                        "INSERT INTO {table} ({key}, offset_bytes, data) VALUES (?1, ?2, ?3)"
                    ))
                    .db()?
                    .execute(params![id, offset, data])
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_constraint_violation(&e) => {
                        Err(StoreError::NotFound(format!("{what} {id}")))
                    }
                    Err(e) => Err(store_error(e)),
                }
            })
            .await
    }

    /// Up to `len` bytes from `offset`.
    pub(super) async fn read(
        &self,
        store: &SqliteStore,
        id: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let start = size_to_sql("offset", offset)?;
        let end = start.saturating_add(count_to_sql(len));
        let id = id.to_owned();
        let (table, key) = (self.table, self.key);
        store
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        // Only the asked part of each chunk is read out.
                        "SELECT max(offset_bytes, ?2),
                                substr(data, max(?2 - offset_bytes, 0) + 1,
                                       min(offset_bytes + length(data), ?3) - max(offset_bytes, ?2))
                         FROM {table}
                         WHERE {key} = ?1 AND offset_bytes < ?3
                           AND offset_bytes + length(data) > ?2
                         ORDER BY offset_bytes"
                    ))
                    .db()?;
                let rows = stmt
                    .query_map(params![id, start, end], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })
                    .db()?;
                let mut out = Vec::new();
                for row in rows {
                    let (at, data) = row.db()?;
                    append_range(&mut out, at, &data, start, end);
                }
                Ok(out)
            })
            .await
    }
}

const DEPLOYMENT_COLUMNS: &str =
    "id, artifact_id, selector, allow_downgrade, created_by, created_at_ms, canceled_at_ms";
const UPDATE_COLUMNS: &str = "deployment_id, device_id, artifact_id, version, command_id, state, \
     reason, progress_pct, running_version, seq, updated_at_ms";

fn deployment_from_row(row: &Row<'_>) -> rusqlite::Result<DeploymentRecord> {
    Ok(DeploymentRecord {
        id: row.get(0)?,
        artifact_id: row.get(1)?,
        selector: row.get(2)?,
        allow_downgrade: row.get(3)?,
        created_by: row.get(4)?,
        created_at_ms: u64_column(row, 5)?,
        canceled_at_ms: opt_u64_column(row, 6)?,
    })
}

fn update_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceUpdateRecord> {
    let state: String = row.get(5)?;
    let state = update_state_of(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            5,
            rusqlite::types::Type::Text,
            format!("unknown update state {state:?}").into(),
        )
    })?;
    let progress: Option<i64> = row.get(7)?;
    Ok(DeviceUpdateRecord {
        deployment_id: row.get(0)?,
        device_id: row.get(1)?,
        artifact_id: row.get(2)?,
        version: row.get(3)?,
        command_id: row.get(4)?,
        state,
        reason: row.get(6)?,
        progress_pct: progress.and_then(|p| u8::try_from(p).ok()),
        running_version: row.get(8)?,
        seq: row.get::<_, Option<i64>>(9)?.map(seq_from_sql),
        updated_at_ms: u64_column(row, 10)?,
    })
}

/// `seq` stored as the i64 with the same bits (every u64 orders... only among non-negative
/// ones, which is every seq a device counts up from 0 to 2^63).
fn seq_to_sql_ord(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn get_update(conn: &Connection, dep: &str, device: &str) -> Result<Option<DeviceUpdateRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {UPDATE_COLUMNS} FROM ota_device_updates WHERE deployment_id = ?1 AND device_id = ?2"
    ))
    .db()?
    .query_row(params![dep, device], update_from_row)
    .optional()
    .db()
}

/// Inserts a deployment (not canceled) created at `created` (its `created_at_ms` as stored);
/// a taken id is `AlreadyExists`. The caller checked that its artifact exists.
pub(super) fn insert_deployment(
    conn: &Connection,
    d: &DeploymentRecord,
    created: i64,
) -> Result<()> {
    match conn.execute(
        &format!(
            "INSERT INTO ota_deployments ({DEPLOYMENT_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)"
        ),
        params![
            d.id,
            d.artifact_id,
            d.selector,
            d.allow_downgrade,
            d.created_by,
            created
        ],
    ) {
        Ok(_) => Ok(()),
        Err(e) if is_constraint_violation(&e) => {
            Err(StoreError::AlreadyExists(format!("deployment {}", d.id)))
        }
        Err(e) => Err(store_error(e)),
    }
}

/// Inserts a device's update (a deployment's creation, a rollout starting a device).
pub(super) fn insert_update(conn: &Connection, u: &DeviceUpdateRecord) -> Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO ota_device_updates ({UPDATE_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))
    .db()?
    .execute(params![
        u.deployment_id,
        u.device_id,
        u.artifact_id,
        u.version,
        u.command_id,
        u.state.as_str(),
        u.reason,
        u.progress_pct.map(i64::from),
        u.running_version,
        u.seq.map(seq_to_sql_ord),
        bound_to_sql(u.updated_at_ms)
    ])
    .db()?;
    Ok(())
}

#[async_trait::async_trait]
impl DeploymentStore for SqliteStore {
    async fn create_deployment(
        &self,
        d: DeploymentRecord,
        updates: Vec<DeviceUpdateRecord>,
        count_max: u32,
    ) -> Result<DeploymentCreate> {
        for u in &updates {
            u.check_text()?;
        }
        let created = ts_to_sql("created_at_ms", d.created_at_ms)?;
        self.write(move |conn| {
            let count: i64 = conn
                .prepare_cached("SELECT count(*) FROM ota_deployments")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if count >= i64::from(count_max) {
                return Ok(DeploymentCreate::Full);
            }
            let exists: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM ota_artifacts WHERE id = ?1)")
                .db()?
                .query_row(params![d.artifact_id], |r| r.get(0))
                .db()?;
            if !exists {
                return Err(StoreError::NotFound(format!("artifact {}", d.artifact_id)));
            }
            insert_deployment(conn, &d, created)?;
            for u in &updates {
                insert_update(conn, u)?;
            }
            Ok(DeploymentCreate::Created)
        })
        .await
    }

    async fn delete_deployment(&self, id: &str) -> Result<DeploymentDelete> {
        let id = id.to_owned();
        self.write(move |conn| {
            let canceled: Option<Option<i64>> = conn
                .prepare_cached("SELECT canceled_at_ms FROM ota_deployments WHERE id = ?1")
                .db()?
                .query_row(params![id], |r| r.get(0))
                .optional()
                .db()?;
            let Some(canceled) = canceled else {
                return Ok(DeploymentDelete::NotFound);
            };
            let active: bool = conn
                .prepare_cached(&format!(
                    "SELECT EXISTS (SELECT 1 FROM ota_device_updates
                     WHERE deployment_id = ?1 AND {})",
                    updates_holding_deployment_sql(canceled.is_some())
                ))
                .db()?
                .query_row(params![id], |r| r.get(0))
                .db()?;
            if active {
                return Ok(DeploymentDelete::Active);
            }
            conn.prepare_cached("DELETE FROM ota_device_updates WHERE deployment_id = ?1")
                .db()?
                .execute(params![id])
                .db()?;
            conn.prepare_cached("DELETE FROM ota_deployments WHERE id = ?1")
                .db()?
                .execute(params![id])
                .db()?;
            Ok(DeploymentDelete::Deleted)
        })
        .await
    }

    async fn get_deployment(&self, id: &str) -> Result<Option<DeploymentRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM ota_deployments WHERE id = ?1"
            ))
            .db()?
            .query_row(params![id], deployment_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_deployments(
        &self,
        before: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<DeploymentRecord>> {
        let limit = count_to_sql(limit);
        let (at, id) = match before {
            Some((at, id)) => (Some(bound_to_sql(at)), Some(id.to_owned())),
            None => (None, None),
        };
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM ota_deployments
                     WHERE ?2 IS NULL OR (created_at_ms, id) < (?2, ?3)
                     ORDER BY created_at_ms DESC, id DESC LIMIT ?1"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![limit, at, id], deployment_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn cancel_deployment(&self, id: &str, at_ms: u64) -> Result<Option<DeploymentRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = id.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE ota_deployments SET canceled_at_ms = coalesce(canceled_at_ms, ?2)
                 WHERE id = ?1",
            )
            .db()?
            .execute(params![id, at])
            .db()?;
            conn.prepare_cached(&format!(
                "SELECT {DEPLOYMENT_COLUMNS} FROM ota_deployments WHERE id = ?1"
            ))
            .db()?
            .query_row(params![id], deployment_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn set_update_command(
        &self,
        deployment_id: &str,
        device_id: &str,
        command_id: &str,
    ) -> Result<bool> {
        let (dep, dev, cmd) = (
            deployment_id.to_owned(),
            device_id.to_owned(),
            command_id.to_owned(),
        );
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE ota_device_updates SET command_id = ?3
                     WHERE deployment_id = ?1 AND device_id = ?2",
                )
                .db()?
                .execute(params![dep, dev, cmd])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn apply_update_report(&self, u: DeviceUpdateRecord) -> Result<bool> {
        u.check_text()?;
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&format!(
                    "UPDATE ota_device_updates
                     SET state = ?3, reason = ?4, progress_pct = ?5, running_version = ?6,
                         seq = ?7, updated_at_ms = ?8
                     WHERE deployment_id = ?1 AND device_id = ?2
                       AND (seq IS NULL OR (seq < ?7 AND state NOT IN ({})))",
                    final_update_states_sql()
                ))
                .db()?
                .execute(params![
                    u.deployment_id,
                    u.device_id,
                    u.state.as_str(),
                    u.reason,
                    u.progress_pct.map(i64::from),
                    u.running_version,
                    u.seq.map(seq_to_sql_ord),
                    bound_to_sql(u.updated_at_ms)
                ])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_update(
        &self,
        deployment_id: &str,
        device_id: &str,
    ) -> Result<Option<DeviceUpdateRecord>> {
        let (dep, dev) = (deployment_id.to_owned(), device_id.to_owned());
        self.read(move |conn| get_update(conn, &dep, &dev)).await
    }

    async fn list_updates(
        &self,
        deployment_id: &str,
        after_device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeviceUpdateRecord>> {
        let (dep, after) = (
            deployment_id.to_owned(),
            after_device.unwrap_or("").to_owned(),
        );
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {UPDATE_COLUMNS} FROM ota_device_updates
                     WHERE deployment_id = ?1 AND device_id > ?2 ORDER BY device_id LIMIT ?3"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![dep, after, limit], update_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn unsent_updates(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let (dep, dev) = after.unwrap_or(("", ""));
        let (dep, dev) = (dep.to_owned(), dev.to_owned());
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT u.deployment_id, u.device_id FROM ota_device_updates u
                     JOIN ota_deployments d ON d.id = u.deployment_id
                     WHERE u.command_id IS NULL AND u.state = 'pending'
                       AND d.canceled_at_ms IS NULL
                       AND (u.deployment_id, u.device_id) > (?1, ?2)
                     ORDER BY u.deployment_id, u.device_id LIMIT ?3",
                )
                .db()?;
            let rows = stmt
                .query_map(params![dep, dev, limit], |r| Ok((r.get(0)?, r.get(1)?)))
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn ended_update_commands(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>> {
        let (dep, dev) = after.unwrap_or(("", ""));
        let (dep, dev) = (dep.to_owned(), dev.to_owned());
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT u.deployment_id, u.device_id, u.command_id FROM ota_device_updates u
                     JOIN commands c ON c.id = u.command_id
                     WHERE u.command_id IS NOT NULL AND u.seq IS NULL AND u.state = 'pending'
                       AND c.state IN ('failed', 'expired', 'canceled')
                       AND (u.deployment_id, u.device_id) > (?1, ?2)
                     ORDER BY u.deployment_id, u.device_id LIMIT ?3",
                )
                .db()?;
            let rows = stmt
                .query_map(params![dep, dev, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn count_updates(&self, deployment_id: &str) -> Result<BTreeMap<String, u64>> {
        let dep = deployment_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT state, count(*) FROM ota_device_updates WHERE deployment_id = ?1
                     GROUP BY state",
                )
                .db()?;
            let rows = stmt
                .query_map(params![dep], |r| {
                    Ok((r.get::<_, String>(0)?, u64_column(r, 1)?))
                })
                .db()?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().db()
        })
        .await
    }

    async fn device_updates(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DeviceUpdateRecord>> {
        let dev = device_id.to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT u.{} FROM ota_device_updates u
                     JOIN ota_deployments d ON d.id = u.deployment_id
                     WHERE u.device_id = ?1
                     ORDER BY d.created_at_ms DESC, d.id DESC LIMIT ?2",
                    UPDATE_COLUMNS.replace(", ", ", u.")
                ))
                .db()?;
            let rows = stmt.query_map(params![dev, limit], update_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }
}
