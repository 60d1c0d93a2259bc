//! [`FleetStore`] for SQLite (fleet history samples), and the device selections
//! ([`DeviceFilter`]) the registry's `select_devices` and `count_device_versions` run.

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter};

use super::{bound_to_sql, count_to_sql, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::model::{DeviceFilter, FleetSample, FleetTotals, VersionCounts};
use crate::store::FleetStore;

/// The firmware version a shadow reports (`s` is a `shadows` row): the reported key `version`
/// if a string, or a number's JSON text (the server's `reported_version`). The same expression
/// as the index `shadows_by_version` (migration 0008), so queries grouping or filtering on it
/// read the index, not the JSON.
pub(super) const VERSION_SQL: &str = "CASE json_type(s.reported, '$.version') \
     WHEN 'text' THEN s.reported ->> '$.version' \
     WHEN 'integer' THEN s.reported -> '$.version' \
     WHEN 'real' THEN s.reported -> '$.version' END";

/// The `WHERE` conditions (joined by `AND`, `1` when none) of `f` over `devices d`, with their
/// parameters in order. Tags are looked up in `device_tags` and versions in the shadows'
/// version index, so a selective term never reads every device.
pub(super) fn filter_sql(f: &DeviceFilter) -> Result<(String, Vec<Value>)> {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    let json_list = |ids: &[String]| {
        serde_json::to_string(ids).map_err(|e| StoreError::InvalidInput(format!("ids: {e}")))
    };
    if let Some(ids) = &f.ids {
        conds.push("d.id IN (SELECT value FROM json_each(?))".into());
        params.push(Value::Text(json_list(ids)?));
    }
    for (key, value) in &f.tags {
        conds
            .push("d.id IN (SELECT device_id FROM device_tags WHERE key = ? AND value = ?)".into());
        params.push(Value::Text(key.clone()));
        params.push(Value::Text(value.clone()));
    }
    if let Some(v) = &f.version {
        conds.push(format!(
            "d.id IN (SELECT s.device_id FROM shadows s WHERE ({VERSION_SQL}) = ?)"
        ));
        params.push(Value::Text(v.clone()));
    }
    if let Some(online) = &f.online {
        let mut any = vec!["d.id IN (SELECT value FROM json_each(?))".to_owned()];
        params.push(Value::Text(json_list(&online.here)?));
        if let Some((node, alive_since_ms)) = &online.elsewhere {
            any.push(
                "EXISTS (SELECT 1 FROM device_sessions ss JOIN cluster_nodes n ON n.node_id = ss.node_id \
                 WHERE ss.device_id = d.id AND ss.node_id <> ? AND n.heartbeat_ms >= ?)"
                    .into(),
            );
            params.push(Value::Text(node.clone()));
            params.push(Value::Integer(bound_to_sql(*alive_since_ms)));
        }
        conds.push(format!("({})", any.join(" OR ")));
    }
    if conds.is_empty() {
        conds.push("1".into());
    }
    Ok((conds.join(" AND "), params))
}

/// Devices joined with their shadows (for the version), for a filter's `FROM`.
pub(super) const FROM_SQL: &str = "devices d LEFT JOIN shadows s ON s.device_id = d.id";

pub(super) async fn count_device_versions(
    store: &SqliteStore,
    filter: &DeviceFilter,
    versions_max: usize,
) -> Result<VersionCounts> {
    let (cond, mut params) = filter_sql(filter)?;
    if versions_max > 0 && filter.ids.is_none() && filter.tags.is_empty() && filter.online.is_none()
    {
        return count_all_versions(store, filter.version.clone(), versions_max).await;
    }
    if versions_max == 0 {
        // The total alone: no grouping, no shadows.
        let sql = format!("SELECT count(*) FROM devices d WHERE {cond}");
        return store
            .read(move |conn| {
                let total = conn
                    .prepare_cached(&sql)
                    .db()?
                    .query_row(params_from_iter(params), |r| u64_column(r, 0))
                    .db()?;
                Ok(VersionCounts {
                    total,
                    versions: Vec::new(),
                })
            })
            .await;
    }
    params.push(Value::Integer(count_to_sql(versions_max)));
    let sql = format!(
        "SELECT v, n, sum(n) OVER () FROM (
             SELECT {VERSION_SQL} AS v, count(*) AS n FROM {FROM_SQL} WHERE {cond} GROUP BY v
         ) ORDER BY n DESC, v IS NULL, v LIMIT ?"
    );
    store
        .read(move |conn| version_counts(conn, &sql, params_from_iter(params)))
        .await
}

/// [`count_device_versions`] of every device (or of those reporting `version`): the versions
/// grouped from the shadows' version index alone, the devices without one by difference.
async fn count_all_versions(
    store: &SqliteStore,
    version: Option<String>,
    versions_max: usize,
) -> Result<VersionCounts> {
    let limit = count_to_sql(versions_max);
    let sql = format!(
        "WITH g AS (SELECT {VERSION_SQL} AS v, count(*) AS n FROM shadows s GROUP BY v),
              t AS (SELECT CASE WHEN ?1 IS NULL THEN (SELECT count(*) FROM devices)
                                ELSE (SELECT coalesce(sum(n), 0) FROM g WHERE v = ?1) END AS total)
         SELECT v, n, t.total FROM (
             SELECT v, n FROM g WHERE v IS NOT NULL AND (?1 IS NULL OR v = ?1)
             UNION ALL
             SELECT NULL, (SELECT total FROM t) - (SELECT coalesce(sum(n), 0) FROM g WHERE v IS NOT NULL)
             WHERE ?1 IS NULL
         ), t WHERE n > 0 ORDER BY n DESC, v IS NULL, v LIMIT ?2"
    );
    store
        .read(move |conn| {
            let mut out = version_counts(conn, &sql, params![version, limit])?;
            if out.versions.is_empty() && version.is_none() {
                // No device at all, or none listed: the total still counts.
                out.total = conn
                    .prepare_cached("SELECT count(*) FROM devices")
                    .db()?
                    .query_row([], |r| u64_column(r, 0))
                    .db()?;
            }
            Ok(out)
        })
        .await
}

/// Reads `(version, devices, total)` rows (most devices first) into [`VersionCounts`].
fn version_counts(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<VersionCounts> {
    let mut stmt = conn.prepare_cached(sql).db()?;
    let rows = stmt
        .query_map(params, |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                u64_column(r, 1)?,
                u64_column(r, 2)?,
            ))
        })
        .db()?;
    let mut out = VersionCounts::default();
    for row in rows {
        let (v, n, total) = row.db()?;
        out.total = total;
        out.versions.push((v, n));
    }
    Ok(out)
}

#[async_trait::async_trait]
impl FleetStore for SqliteStore {
    async fn record_fleet_sample(&self, s: FleetSample) -> Result<()> {
        let ts = ts_to_sql("ts_ms", s.ts_ms)?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO fleet_samples (ts_ms, node_id, devices, online, points, messages)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (ts_ms, node_id) DO UPDATE SET devices = excluded.devices,
                   online = excluded.online, points = excluded.points, messages = excluded.messages",
            )
            .db()?
            .execute(params![
                ts,
                s.node_id,
                n(s.devices),
                n(s.online),
                n(s.points),
                n(s.messages)
            ])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn fleet_totals(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<FleetTotals>> {
        let (from, to, limit) = (
            bound_to_sql(from_ms),
            bound_to_sql(to_ms),
            count_to_sql(limit),
        );
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT ts_ms, max(devices), sum(online), sum(points), sum(messages)
                     FROM fleet_samples WHERE ts_ms >= ?1 AND ts_ms < ?2
                     GROUP BY ts_ms ORDER BY ts_ms DESC LIMIT ?3",
                )
                .db()?;
            let rows = stmt
                .query_map(params![from, to, limit], |r| {
                    Ok(FleetTotals {
                        ts_ms: u64_column(r, 0)?,
                        devices: u64_column(r, 1)?,
                        online: u64_column(r, 2)?,
                        points: u64_column(r, 3)?,
                        messages: u64_column(r, 4)?,
                    })
                })
                .db()?;
            let mut out = rows.collect::<rusqlite::Result<Vec<_>>>().db()?;
            out.reverse();
            Ok(out)
        })
        .await
    }

    async fn prune_fleet_samples(&self, before_ms: u64, max_rows: usize) -> Result<u64> {
        let (before, limit) = (bound_to_sql(before_ms), count_to_sql(max_rows));
        self.write_background(move |conn| {
            let n = conn
                .prepare_cached(
                    "DELETE FROM fleet_samples WHERE rowid IN (
                         SELECT rowid FROM fleet_samples WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)",
                )
                .db()?
                .execute(params![before, limit])
                .db()?;
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        })
        .await
    }
}
