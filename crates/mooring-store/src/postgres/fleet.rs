//! [`FleetStore`] for PostgreSQL (fleet history samples), and the device selections
//! ([`DeviceFilter`]) `select_devices` and `count_device_versions` run; the same semantics as
//! `sqlite/fleet.rs`.

use tokio_postgres::types::{Json, ToSql};

use super::{bound_to_sql, count_to_sql, ts_to_sql, u64_column, PgStore};
use crate::error::Result;
use crate::model::{DeviceFilter, FleetSample, FleetTotals, VersionCounts};
use crate::store::FleetStore;

/// The firmware version a shadow reports (`s` is the joined `shadows` row; `reported` is JSON,
/// which keeps a number's text as written): a string as it is, a number as its JSON text.
pub(super) const VERSION_SQL: &str = "CASE json_typeof(s.reported -> 'version') \
     WHEN 'string' THEN s.reported ->> 'version' \
     WHEN 'number' THEN (s.reported -> 'version')::text END";

/// Devices joined with their shadows (for the version), for a filter's `FROM`.
pub(super) const FROM_SQL: &str = "devices d LEFT JOIN shadows s ON s.device_id = d.id";

pub(super) type Param = Box<dyn ToSql + Sync + Send>;

/// The `WHERE` conditions of `f` over `devices d` (and `shadows s` when it names a version),
/// numbering parameters from `$first`, with the parameters in order. PostgreSQL text holds no
/// U+0000, so no stored tag or version contains one: a filter asking for one matches nothing.
pub(super) fn filter_sql(f: &DeviceFilter, first: usize) -> (String, Vec<Param>) {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    let next = |params: &mut Vec<Param>, p: Param| {
        params.push(p);
        format!("${}", first + params.len() - 1)
    };
    let nul_free = |ids: &[String]| -> Vec<String> {
        ids.iter().filter(|i| !i.contains('\0')).cloned().collect()
    };
    if let Some(ids) = &f.ids {
        let p = next(&mut params, Box::new(nul_free(ids)));
        conds.push(format!("d.id = ANY({p}::text[])"));
    }
    let mut impossible = false;
    for (key, value) in &f.tags {
        if key.contains('\0') || value.contains('\0') {
            impossible = true;
            continue;
        }
        let mut obj = serde_json::Map::new();
        obj.insert(key.clone(), serde_json::Value::String(value.clone()));
        let p = next(&mut params, Box::new(Json(serde_json::Value::Object(obj))));
        conds.push(format!("d.tags @> {p}::jsonb"));
    }
    if let Some(v) = &f.version {
        if v.contains('\0') {
            impossible = true;
        } else {
            let p = next(&mut params, Box::new(v.clone()));
            conds.push(format!("({VERSION_SQL}) = {p}"));
        }
    }
    if let Some(online) = &f.online {
        let p = next(&mut params, Box::new(nul_free(&online.here)));
        let mut any = vec![format!("d.id = ANY({p}::text[])")];
        if let Some((node, alive_since_ms)) = &online.elsewhere {
            let pn = next(&mut params, Box::new(node.replace('\0', "")));
            let pt = next(&mut params, Box::new(bound_to_sql(*alive_since_ms)));
            any.push(format!(
                "EXISTS (SELECT 1 FROM device_sessions ss JOIN cluster_nodes n ON n.node_id = ss.node_id \
                 WHERE ss.device_id = d.id AND ss.node_id <> {pn} AND n.heartbeat_ms >= {pt})"
            ));
        }
        conds.push(format!("({})", any.join(" OR ")));
    }
    if impossible {
        conds.push("FALSE".into());
    }
    if conds.is_empty() {
        conds.push("TRUE".into());
    }
    (conds.join(" AND "), params)
}

pub(super) fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
}

pub(super) async fn count_device_versions(
    store: &PgStore,
    filter: &DeviceFilter,
    versions_max: usize,
) -> Result<VersionCounts> {
    let (cond, mut params) = filter_sql(filter, 1);
    if versions_max == 0 {
        // The total alone: no grouping, and the shadows only if the filter names a version.
        let from = if filter.version.is_some() {
            FROM_SQL
        } else {
            "devices d"
        };
        let sql = format!("SELECT count(*) FROM {from} WHERE {cond}");
        let total = match store.query_opt(&sql, &refs(&params)).await? {
            Some(r) => u64_column(&r, 0)?,
            None => 0,
        };
        return Ok(VersionCounts {
            total,
            versions: Vec::new(),
        });
    }
    params.push(Box::new(count_to_sql(versions_max)));
    let limit = format!("${}", params.len());
    let sql = format!(
        "SELECT v, n, (sum(n) OVER ())::BIGINT FROM (
             SELECT {VERSION_SQL} AS v, count(*) AS n FROM {FROM_SQL} WHERE {cond} GROUP BY 1
         ) g ORDER BY n DESC, v IS NULL, v COLLATE \"C\" LIMIT {limit}"
    );
    let rows = store.query(&sql, &refs(&params)).await?;
    let mut out = VersionCounts::default();
    for r in &rows {
        out.total = u64_column(r, 2)?;
        out.versions
            .push((super::column::<Option<String>>(r, 0)?, u64_column(r, 1)?));
    }
    Ok(out)
}

#[async_trait::async_trait]
impl FleetStore for PgStore {
    async fn record_fleet_sample(&self, s: FleetSample) -> Result<()> {
        let ts = ts_to_sql("ts_ms", s.ts_ms)?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let node = s.node_id.replace('\0', "");
        self.execute(
            "INSERT INTO fleet_samples (ts_ms, node_id, devices, online, points, messages)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (ts_ms, node_id) DO UPDATE SET devices = excluded.devices,
               online = excluded.online, points = excluded.points, messages = excluded.messages",
            &[
                &ts,
                &node,
                &n(s.devices),
                &n(s.online),
                &n(s.points),
                &n(s.messages),
            ],
            || format!("fleet sample {node}"),
        )
        .await?;
        Ok(())
    }

    async fn fleet_totals(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<FleetTotals>> {
        let rows = self
            .query(
                "SELECT ts_ms, max(devices), sum(online)::BIGINT, sum(points)::BIGINT,
                        sum(messages)::BIGINT
                 FROM fleet_samples WHERE ts_ms >= $1 AND ts_ms < $2
                 GROUP BY ts_ms ORDER BY ts_ms DESC LIMIT $3",
                &[
                    &bound_to_sql(from_ms),
                    &bound_to_sql(to_ms),
                    &count_to_sql(limit),
                ],
            )
            .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(FleetTotals {
                    ts_ms: u64_column(r, 0)?,
                    devices: u64_column(r, 1)?,
                    online: u64_column(r, 2)?,
                    points: u64_column(r, 3)?,
                    messages: u64_column(r, 4)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    async fn prune_fleet_samples(&self, before_ms: u64, max_rows: usize) -> Result<u64> {
        self.execute(
            "DELETE FROM fleet_samples WHERE (ts_ms, node_id) IN (
                 SELECT ts_ms, node_id FROM fleet_samples WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2)",
            &[&bound_to_sql(before_ms), &count_to_sql(max_rows)],
            String::new,
        )
        .await
    }
}
