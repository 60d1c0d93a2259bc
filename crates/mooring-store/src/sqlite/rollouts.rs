//! [`RolloutStore`] for SQLite: rollouts, their devices (waves, ranks, starts) and event logs
//! (issue 19).

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::artifacts::{insert_deployment, insert_update};
use super::tokens::{opt_ts_to_sql, opt_u64_column};
use super::{
    bound_to_sql, count_to_sql, is_constraint_violation, seq_to_sql, store_error, ts_to_sql,
    u64_column, Db, SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{
    check_rollout_deployment, progress_of, update_state_of, DeploymentRecord, DeviceUpdateRecord,
    ProgressRow, RolloutCreate, RolloutDeviceRecord, RolloutEventRecord, RolloutRecord,
    WaveProgress,
};
use crate::store::RolloutStore;

const COLUMNS: &str = "id, deployment_id, artifact_id, selector, spec, seed, state, wave, reason, \
     gate, window_started_at_ms, rollback_of, created_by, created_at_ms, updated_at_ms, revision";
const DEVICE_COLUMNS: &str =
    "rollout_id, device_id, wave, rank, started_at_ms, from_version, deferred, baseline";
const EVENT_COLUMNS: &str = "rollout_id, seq, at_ms, actor, kind, detail";

fn u32_column(row: &Row<'_>, index: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(index)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, v))
}

fn rollout_from_row(row: &Row<'_>) -> rusqlite::Result<RolloutRecord> {
    let seed: i64 = row.get(5)?;
    Ok(RolloutRecord {
        id: row.get(0)?,
        deployment_id: row.get(1)?,
        artifact_id: row.get(2)?,
        selector: row.get(3)?,
        spec: row.get(4)?,
        seed: u64::from_ne_bytes(seed.to_ne_bytes()),
        state: row.get(6)?,
        wave: u32_column(row, 7)?,
        reason: row.get(8)?,
        gate: row.get(9)?,
        window_started_at_ms: opt_u64_column(row, 10)?,
        rollback_of: row.get(11)?,
        created_by: row.get(12)?,
        created_at_ms: u64_column(row, 13)?,
        updated_at_ms: u64_column(row, 14)?,
        revision: u64_column(row, 15)?,
    })
}

/// [`DEVICE_COLUMNS`] from column `at` on.
fn device_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<RolloutDeviceRecord> {
    Ok(RolloutDeviceRecord {
        rollout_id: row.get(at)?,
        device_id: row.get(at + 1)?,
        wave: u32_column(row, at + 2)?,
        rank: u64_column(row, at + 3)?,
        started_at_ms: opt_u64_column(row, at + 4)?,
        from_version: row.get(at + 5)?,
        deferred: row.get(at + 6)?,
        baseline: row.get(at + 7)?,
    })
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<RolloutEventRecord> {
    Ok(RolloutEventRecord {
        rollout_id: row.get(0)?,
        seq: u64_column(row, 1)?,
        at_ms: u64_column(row, 2)?,
        by: row.get(3)?,
        kind: row.get(4)?,
        detail: row.get(5)?,
    })
}

/// A rank as stored: below 2^63 by contract, anything else is refused.
fn rank_to_sql(rank: u64) -> Result<i64> {
    i64::try_from(rank)
        .map_err(|_| StoreError::InvalidInput(format!("rollout rank {rank} is not below 2^63")))
}

/// A rollout's times and numbers as stored.
struct Encoded {
    seed: i64,
    wave: i64,
    window: Option<i64>,
    created: i64,
    updated: i64,
    revision: i64,
}

impl Encoded {
    fn of(r: &RolloutRecord) -> Result<Self> {
        Ok(Encoded {
            seed: seq_to_sql(r.seed),
            wave: i64::from(r.wave),
            window: opt_ts_to_sql("window_started_at_ms", r.window_started_at_ms)?,
            created: ts_to_sql("created_at_ms", r.created_at_ms)?,
            updated: ts_to_sql("updated_at_ms", r.updated_at_ms)?,
            revision: i64::try_from(r.revision).map_err(|_| {
                StoreError::InvalidInput(format!("rollout revision {} is too large", r.revision))
            })?,
        })
    }
}

/// A device of a rollout as stored (its rollout id is the one it is added to).
struct EncodedDevice {
    device_id: String,
    wave: i64,
    rank: i64,
    started: Option<i64>,
    from_version: Option<String>,
    deferred: Option<String>,
    baseline: Option<String>,
}

fn encode_devices(devices: Vec<RolloutDeviceRecord>) -> Result<Vec<EncodedDevice>> {
    devices
        .into_iter()
        .map(|d| {
            d.check_text()?;
            Ok(EncodedDevice {
                wave: i64::from(d.wave),
                rank: rank_to_sql(d.rank)?,
                started: opt_ts_to_sql("started_at_ms", d.started_at_ms)?,
                device_id: d.device_id,
                from_version: d.from_version,
                deferred: d.deferred,
                baseline: d.baseline,
            })
        })
        .collect()
}

/// Adds `devices` to rollout `id`: one already in it stays as it is, one whose device is gone
/// (deleted meanwhile) is skipped. How many were added.
fn insert_devices(conn: &Connection, id: &str, devices: &[EncodedDevice]) -> Result<u64> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "INSERT INTO rollout_devices ({DEVICE_COLUMNS})
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
             WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?2)
             ON CONFLICT (rollout_id, device_id) DO NOTHING"
        ))
        .db()?;
    let mut added = 0;
    for d in devices {
        added += stmt
            .execute(params![
                id,
                d.device_id,
                d.wave,
                d.rank,
                d.started,
                d.from_version,
                d.deferred,
                d.baseline
            ])
            .db()? as u64;
    }
    Ok(added)
}

fn rollout_deployment(conn: &Connection, id: &str) -> Result<Option<String>> {
    conn.prepare_cached("SELECT deployment_id FROM rollouts WHERE id = ?1")
        .db()?
        .query_row(params![id], |r| r.get(0))
        .optional()
        .db()
}

#[async_trait::async_trait]
impl RolloutStore for SqliteStore {
    async fn create_rollout(
        &self,
        r: RolloutRecord,
        deployment: DeploymentRecord,
        devices: Vec<RolloutDeviceRecord>,
        count_max: u32,
    ) -> Result<RolloutCreate> {
        r.check_text()?;
        check_rollout_deployment(&r, &deployment)?;
        let e = Encoded::of(&r)?;
        let dep_created = ts_to_sql("created_at_ms", deployment.created_at_ms)?;
        let devices = encode_devices(devices)?;
        self.write(move |conn| {
            let count: i64 = conn
                .prepare_cached("SELECT count(*) FROM rollouts")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if count >= i64::from(count_max) {
                return Ok(RolloutCreate::Full);
            }
            let exists: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM ota_artifacts WHERE id = ?1)")
                .db()?
                .query_row(params![r.artifact_id], |r| r.get(0))
                .db()?;
            if !exists {
                return Ok(RolloutCreate::ArtifactNotFound);
            }
            insert_deployment(conn, &deployment, dep_created)?;
            let inserted = conn
                .prepare_cached(&format!(
                    "INSERT INTO rollouts ({COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                ))
                .db()?
                .execute(params![
                    r.id,
                    r.deployment_id,
                    r.artifact_id,
                    r.selector,
                    r.spec,
                    e.seed,
                    r.state,
                    e.wave,
                    r.reason,
                    r.gate,
                    e.window,
                    r.rollback_of,
                    r.created_by,
                    e.created,
                    e.updated,
                    e.revision
                ]);
            match inserted {
                Ok(_) => {}
                Err(e) if is_constraint_violation(&e) => {
                    return Err(StoreError::AlreadyExists(format!("rollout {}", r.id)))
                }
                Err(e) => return Err(store_error(e)),
            }
            insert_devices(conn, &r.id, &devices)?;
            Ok(RolloutCreate::Created)
        })
        .await
    }

    async fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM rollouts WHERE id = ?1"))
                .db()?
                .query_row(params![id], rollout_from_row)
                .optional()
                .db()
        })
        .await
    }

    async fn list_rollouts(
        &self,
        before: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>> {
        let limit = count_to_sql(limit);
        let (at, id) = match before {
            Some((at, id)) => (Some(bound_to_sql(at)), Some(id.to_owned())),
            None => (None, None),
        };
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM rollouts
                     WHERE ?2 IS NULL OR (created_at_ms, id) < (?2, ?3)
                     ORDER BY created_at_ms DESC, id DESC LIMIT ?1"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![limit, at, id], rollout_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn active_rollouts(
        &self,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>> {
        let after = after_id.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM rollouts
                     WHERE state IN ('running', 'paused') AND id > ?1 ORDER BY id LIMIT ?2"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![after, limit], rollout_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn update_rollout(&self, r: &RolloutRecord) -> Result<bool> {
        r.check_text()?;
        let Ok(revision) = i64::try_from(r.revision) else {
            // No stored revision is that large.
            return Ok(false);
        };
        let window = opt_ts_to_sql("window_started_at_ms", r.window_started_at_ms)?;
        let updated = ts_to_sql("updated_at_ms", r.updated_at_ms)?;
        let r = r.clone();
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE rollouts
                     SET state = ?3, wave = ?4, reason = ?5, gate = ?6,
                         window_started_at_ms = ?7, updated_at_ms = ?8, spec = ?9,
                         selector = ?10, revision = revision + 1
                     WHERE id = ?1 AND revision = ?2",
                )
                .db()?
                .execute(params![
                    r.id,
                    revision,
                    r.state,
                    i64::from(r.wave),
                    r.reason,
                    r.gate,
                    window,
                    updated,
                    r.spec,
                    r.selector
                ])
                .db()?;
            Ok(n == 1)
        })
        .await
    }

    async fn add_rollout_devices(
        &self,
        id: &str,
        devices: Vec<RolloutDeviceRecord>,
    ) -> Result<u64> {
        let devices = encode_devices(devices)?;
        let id = id.to_owned();
        self.write(move |conn| {
            if rollout_deployment(conn, &id)?.is_none() {
                return Err(StoreError::NotFound(format!("rollout {id}")));
            }
            insert_devices(conn, &id, &devices)
        })
        .await
    }

    async fn waiting_rollout_devices(
        &self,
        id: &str,
        wave: u32,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RolloutDeviceRecord>> {
        let id = id.to_owned();
        let (rank, device) = match after {
            // Ranks above i64::MAX are never stored: nothing is after one.
            Some((rank, device)) => (
                i64::try_from(rank).unwrap_or(i64::MAX),
                Some(device.to_owned()),
            ),
            None => (-1, None),
        };
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM rollout_devices
                     WHERE rollout_id = ?1 AND started_at_ms IS NULL AND wave <= ?2
                       AND (rank, device_id) > (?3, coalesce(?4, ''))
                     ORDER BY rank, device_id LIMIT ?5"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![id, i64::from(wave), rank, device, limit], |r| {
                    device_from_row(r, 0)
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn start_rollout_devices(
        &self,
        id: &str,
        starts: Vec<(String, Option<String>)>,
        update: DeviceUpdateRecord,
        at_ms: u64,
    ) -> Result<Vec<String>> {
        update.check_text()?;
        for (device, from) in &starts {
            crate::model::check_text("device id", device)?;
            crate::model::check_text("from version", from.as_deref().unwrap_or(""))?;
        }
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = id.to_owned();
        self.write(move |conn| {
            // Only a running rollout of a deployment not canceled starts devices.
            let startable: Option<String> = conn
                .prepare_cached(
                    "SELECT r.deployment_id FROM rollouts r
                     JOIN ota_deployments d ON d.id = r.deployment_id
                     WHERE r.id = ?1 AND r.state = 'running' AND d.canceled_at_ms IS NULL",
                )
                .db()?
                .query_row(params![id], |r| r.get(0))
                .optional()
                .db()?;
            let Some(deployment) = startable else {
                return Ok(Vec::new());
            };
            let mut update = update;
            update.deployment_id = deployment;
            let mut started = Vec::new();
            for (device, from) in starts {
                let n = conn
                    .prepare_cached(
                        "UPDATE rollout_devices SET started_at_ms = ?3, from_version = ?4,
                             deferred = NULL
                         WHERE rollout_id = ?1 AND device_id = ?2 AND started_at_ms IS NULL",
                    )
                    .db()?
                    .execute(params![id, device, at, from])
                    .db()?;
                if n == 1 {
                    update.device_id.clone_from(&device);
                    insert_update(conn, &update)?;
                    started.push(device);
                }
            }
            Ok(started)
        })
        .await
    }

    async fn defer_rollout_devices(&self, id: &str, deferred: Vec<(String, String)>) -> Result<()> {
        for (device, why) in &deferred {
            crate::model::check_text("device id", device)?;
            crate::model::check_text("deferral", why)?;
        }
        let id = id.to_owned();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE rollout_devices SET deferred = ?3
                     WHERE rollout_id = ?1 AND device_id = ?2 AND started_at_ms IS NULL",
                )
                .db()?;
            for (device, why) in deferred {
                stmt.execute(params![id, device, why]).db()?;
            }
            Ok(())
        })
        .await
    }

    async fn rollout_progress(&self, id: &str) -> Result<Vec<WaveProgress>> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT r.wave, r.started_at_ms IS NULL, r.deferred IS NOT NULL, u.state,
                            count(*)
                     FROM rollout_devices r
                     JOIN rollouts o ON o.id = r.rollout_id
                     LEFT JOIN ota_device_updates u
                       ON r.started_at_ms IS NOT NULL AND u.deployment_id = o.deployment_id
                          AND u.device_id = r.device_id
                     WHERE r.rollout_id = ?1
                     GROUP BY 1, 2, 3, 4",
                )
                .db()?;
            let rows = stmt
                .query_map(params![id], |r| {
                    Ok(ProgressRow {
                        wave: u32_column(r, 0)?,
                        waiting: r.get(1)?,
                        deferred: r.get(2)?,
                        state: r.get(3)?,
                        n: u64_column(r, 4)?,
                    })
                })
                .db()?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>().db()?;
            Ok(progress_of(rows))
        })
        .await
    }

    async fn device_rollouts(&self, device_id: &str, limit: usize) -> Result<Vec<String>> {
        let device_id = device_id.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT rollout_id FROM rollout_devices WHERE device_id = ?1
                     ORDER BY rollout_id LIMIT ?2",
                )
                .db()?;
            let rows = stmt
                .query_map(params![device_id, limit], |r| r.get(0))
                .db()?;
            rows.collect::<rusqlite::Result<Vec<String>>>().db()
        })
        .await
    }

    async fn count_rollout_started_since(&self, id: &str, since_ms: u64) -> Result<u64> {
        let id = id.to_owned();
        let since = bound_to_sql(since_ms);
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT count(*) FROM rollout_devices
                 WHERE rollout_id = ?1 AND started_at_ms IS NOT NULL AND started_at_ms >= ?2",
            )
            .db()?
            .query_row(params![id, since], |r| u64_column(r, 0))
            .db()
        })
        .await
    }

    async fn list_rollout_devices(
        &self,
        id: &str,
        after_device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RolloutDeviceRecord, Option<mooring_proto::ota::UpdateState>)>> {
        let (id, after) = (id.to_owned(), after_device.unwrap_or("").to_owned());
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT u.state, r.{} FROM rollout_devices r
                     JOIN rollouts o ON o.id = r.rollout_id
                     LEFT JOIN ota_device_updates u
                       ON r.started_at_ms IS NOT NULL AND u.deployment_id = o.deployment_id
                          AND u.device_id = r.device_id
                     WHERE r.rollout_id = ?1 AND r.device_id > ?2
                     ORDER BY r.device_id LIMIT ?3",
                    DEVICE_COLUMNS.replace(", ", ", r.")
                ))
                .db()?;
            let rows = stmt
                .query_map(params![id, after, limit], |r| {
                    let state: Option<String> = r.get(0)?;
                    let state = state
                        .map(|s| {
                            update_state_of(&s).ok_or_else(|| {
                                rusqlite::Error::FromSqlConversionFailure(
                                    0,
                                    rusqlite::types::Type::Text,
                                    format!("unknown update state {s:?}").into(),
                                )
                            })
                        })
                        .transpose()?;
                    Ok((device_from_row(r, 1)?, state))
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn set_rollout_baselines(
        &self,
        id: &str,
        baselines: Vec<(String, Option<String>)>,
    ) -> Result<()> {
        for (device, baseline) in &baselines {
            crate::model::check_text("device id", device)?;
            crate::model::check_text("baseline", baseline.as_deref().unwrap_or(""))?;
        }
        let id = id.to_owned();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE rollout_devices SET baseline = ?3
                     WHERE rollout_id = ?1 AND device_id = ?2",
                )
                .db()?;
            for (device, baseline) in baselines {
                stmt.execute(params![id, device, baseline]).db()?;
            }
            Ok(())
        })
        .await
    }

    async fn append_rollout_event(&self, e: RolloutEventRecord, keep_max: usize) -> Result<u64> {
        e.check_text()?;
        let at = ts_to_sql("at_ms", e.at_ms)?;
        // The newest is always kept, so seqs keep counting up.
        let keep = count_to_sql(keep_max.max(1));
        self.write(move |conn| {
            if rollout_deployment(conn, &e.rollout_id)?.is_none() {
                return Err(StoreError::NotFound(format!("rollout {}", e.rollout_id)));
            }
            let seq: i64 = conn
                .prepare_cached(
                    "SELECT coalesce(max(seq), 0) + 1 FROM rollout_events WHERE rollout_id = ?1",
                )
                .db()?
                .query_row(params![e.rollout_id], |r| r.get(0))
                .db()?;
            conn.prepare_cached(&format!(
                "INSERT INTO rollout_events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .db()?
            .execute(params![e.rollout_id, seq, at, e.by, e.kind, e.detail])
            .db()?;
            conn.prepare_cached("DELETE FROM rollout_events WHERE rollout_id = ?1 AND seq <= ?2")
                .db()?
                .execute(params![e.rollout_id, seq.saturating_sub(keep)])
                .db()?;
            Ok(u64::try_from(seq).unwrap_or(0))
        })
        .await
    }

    async fn list_rollout_events(
        &self,
        id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RolloutEventRecord>> {
        let id = id.to_owned();
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM rollout_events
                     WHERE rollout_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![id, after, limit], event_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::SqliteStore;

    #[test]
    fn rollout_device_queries_use_their_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let conn = store.inner.reader().expect("reader");
        let plan = |sql: &str| super::super::tests::query_plan(&conn, sql);
        let waiting = plan(&format!(
            "SELECT {} FROM rollout_devices
             WHERE rollout_id = 'r' AND started_at_ms IS NULL AND wave <= 2
               AND (rank, device_id) > (5, coalesce(NULL, ''))
             ORDER BY rank, device_id LIMIT 10",
            super::DEVICE_COLUMNS
        ));
        assert!(waiting.contains("rollout_devices_waiting"), "{waiting}");
        assert!(!waiting.contains("TEMP B-TREE"), "{waiting}");
        let since = plan(
            "SELECT count(*) FROM rollout_devices
             WHERE rollout_id = 'r' AND started_at_ms IS NOT NULL AND started_at_ms >= 5",
        );
        assert!(since.contains("rollout_devices_started"), "{since}");
    }
}
