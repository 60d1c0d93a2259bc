//! [`RuleStore`] for SQLite: rules, and alerts with at most one open per (rule, device) (the
//! partial unique index `alerts_open`).

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::tokens::opt_u64_column;
use super::{
    bound_to_sql, count_to_sql, is_constraint_violation, store_error, ts_to_sql, u64_column, Db,
    SqliteStore,
};
use crate::error::{Result, StoreError};
use crate::model::{AlertFire, AlertRecord, AlertState, RuleRecord, TicketCreate, TicketRecord};
use crate::store::{AlertFilter, RuleStore, TicketFilter};

const RULE_COLUMNS: &str = "id, name, when_text, selector, scope, then_text, enabled, created_by, \
     created_at_ms, updated_at_ms";

const ALERT_COLUMNS: &str = "id, rule_id, rule_name, device_id, severity, state, detail, count, \
     first_fired_ms, last_fired_ms, acknowledged_at_ms, acknowledged_by, resolved_at_ms, resolved_by";

fn rule_from_row(r: &Row<'_>) -> rusqlite::Result<RuleRecord> {
    Ok(RuleRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        when: r.get(2)?,
        selector: r.get(3)?,
        scope: r.get(4)?,
        then: r.get(5)?,
        enabled: r.get::<_, i64>(6)? != 0,
        created_by: r.get(7)?,
        created_at_ms: u64_column(r, 8)?,
        updated_at_ms: u64_column(r, 9)?,
    })
}

const TICKET_COLUMNS: &str =
    "id, playbook, alert_id, title, open, created_at_ms, closed_at_ms, closed_by, body";

fn ticket_from_row(r: &Row<'_>) -> rusqlite::Result<TicketRecord> {
    Ok(TicketRecord {
        id: r.get(0)?,
        playbook: r.get(1)?,
        alert_id: r.get(2)?,
        title: r.get(3)?,
        open: r.get::<_, i64>(4)? != 0,
        created_at_ms: u64_column(r, 5)?,
        closed_at_ms: opt_u64_column(r, 6)?,
        closed_by: r.get(7)?,
        body: r.get(8)?,
    })
}

fn ticket_where(conn: &Connection, id: &str) -> Result<Option<TicketRecord>> {
    conn.prepare_cached(&format!(
        "SELECT {TICKET_COLUMNS} FROM tickets WHERE id = ?1"
    ))
    .db()?
    .query_row(params![id], ticket_from_row)
    .optional()
    .db()
}

fn alert_from_row(r: &Row<'_>) -> rusqlite::Result<(AlertRecord, String)> {
    Ok((
        AlertRecord {
            id: r.get(0)?,
            rule_id: r.get(1)?,
            rule_name: r.get(2)?,
            device_id: r.get(3)?,
            severity: r.get(4)?,
            state: AlertState::Firing,
            detail: r.get(6)?,
            count: u64_column(r, 7)?,
            first_fired_ms: u64_column(r, 8)?,
            last_fired_ms: u64_column(r, 9)?,
            acknowledged_at_ms: opt_u64_column(r, 10)?,
            acknowledged_by: r.get(11)?,
            resolved_at_ms: opt_u64_column(r, 12)?,
            resolved_by: r.get(13)?,
        },
        r.get(5)?,
    ))
}

fn decode((mut a, state): (AlertRecord, String)) -> Result<AlertRecord> {
    a.state = state.parse()?;
    Ok(a)
}

fn alert_where(
    conn: &Connection,
    cond: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Option<AlertRecord>> {
    conn.prepare_cached(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE {cond}"))
        .db()?
        .query_row(args, alert_from_row)
        .optional()
        .db()?
        .map(decode)
        .transpose()
}

/// Moves the alert `id` to `to` if it is in one of `from`; returns it as stored after.
fn transition(
    conn: &Connection,
    id: &str,
    from: &[AlertState],
    to: AlertState,
    by: &str,
    at_ms: i64,
) -> Result<Option<AlertRecord>> {
    let Some(a) = alert_where(conn, "id = ?1", &[&id])? else {
        return Ok(None);
    };
    if !from.contains(&a.state) {
        return Ok(Some(a));
    }
    let sql = match to {
        AlertState::Acknowledged => {
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at_ms = ?2, acknowledged_by = ?3 WHERE id = ?1"
        }
        _ => "UPDATE alerts SET state = 'resolved', resolved_at_ms = ?2, resolved_by = ?3 WHERE id = ?1",
    };
    conn.prepare_cached(sql)
        .db()?
        .execute(params![id, at_ms, by])
        .db()?;
    alert_where(conn, "id = ?1", &[&id])
}

#[async_trait::async_trait]
impl RuleStore for SqliteStore {
    async fn create_rule(&self, rule: RuleRecord, rules_max: usize) -> Result<bool> {
        let created = ts_to_sql("created_at_ms", rule.created_at_ms)?;
        let updated = ts_to_sql("updated_at_ms", rule.updated_at_ms)?;
        let max = count_to_sql(rules_max);
        self.write(move |conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM rules")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if n >= max {
                return Ok(false);
            }
            conn.prepare_cached(&format!(
                "INSERT INTO rules ({RULE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ))
            .db()?
            .execute(params![
                rule.id,
                rule.name,
                rule.when,
                rule.selector,
                rule.scope,
                rule.then,
                i64::from(rule.enabled),
                rule.created_by,
                created,
                updated
            ])
            .map_err(|e| {
                if is_constraint_violation(&e) {
                    StoreError::AlreadyExists(format!("rule {} ({})", rule.name, rule.id))
                } else {
                    store_error(e)
                }
            })?;
            Ok(true)
        })
        .await
    }

    async fn get_rule(&self, id: &str) -> Result<Option<RuleRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM rules WHERE id = ?1"))
                .db()?
                .query_row(params![id], rule_from_row)
                .optional()
                .db()
        })
        .await
    }

    async fn list_rules(&self) -> Result<Vec<RuleRecord>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM rules ORDER BY name"))
                .db()?;
            let rows = stmt.query_map([], rule_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn set_rule_enabled(
        &self,
        id: &str,
        enabled: bool,
        at_ms: u64,
    ) -> Result<Option<RuleRecord>> {
        let id = id.to_owned();
        let at = ts_to_sql("at_ms", at_ms)?;
        self.write(move |conn| {
            conn.prepare_cached("UPDATE rules SET enabled = ?2, updated_at_ms = ?3 WHERE id = ?1")
                .db()?
                .execute(params![id, i64::from(enabled), at])
                .db()?;
            conn.prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM rules WHERE id = ?1"))
                .db()?
                .query_row(params![id], rule_from_row)
                .optional()
                .db()
        })
        .await
    }

    async fn delete_rule(&self, id: &str, at_ms: u64) -> Result<bool> {
        let id = id.to_owned();
        let at = ts_to_sql("at_ms", at_ms)?;
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM rules WHERE id = ?1")
                .db()?
                .execute(params![id])
                .db()?;
            conn.prepare_cached(
                "UPDATE alerts SET state = 'resolved', resolved_at_ms = ?2, resolved_by = 'rule_deleted'
                 WHERE rule_id = ?1 AND state <> 'resolved'",
            )
            .db()?
            .execute(params![id, at])
            .db()?;
            Ok(n > 0)
        })
        .await
    }

    async fn fire_alert(
        &self,
        fire: AlertFire,
        open_max: usize,
    ) -> Result<Option<(AlertRecord, bool)>> {
        let at = ts_to_sql("at_ms", fire.at_ms)?;
        let max = count_to_sql(open_max);
        self.write(move |conn| {
            let open = "rule_id = ?1 AND device_id = ?2 AND state <> 'resolved'";
            let n = conn
                .prepare_cached(&format!(
                    "UPDATE alerts SET count = count + 1, last_fired_ms = max(last_fired_ms, ?3),
                       detail = ?4 WHERE {open}"
                ))
                .db()?
                .execute(params![fire.rule_id, fire.device_id, at, fire.detail])
                .db()?;
            if n > 0 {
                let a = alert_where(conn, open, &[&fire.rule_id, &fire.device_id])?;
                return Ok(a.map(|a| (a, false)));
            }
            let open_now: i64 = conn
                .prepare_cached("SELECT count(*) FROM alerts WHERE state <> 'resolved'")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if open_now >= max {
                return Ok(None);
            }
            if fire.rule_must_exist {
                let live: Option<i64> = conn
                    .prepare_cached("SELECT 1 FROM rules WHERE id = ?1 AND enabled <> 0")
                    .db()?
                    .query_row(params![fire.rule_id], |r| r.get(0))
                    .optional()
                    .db()?;
                if live.is_none() {
                    return Ok(None);
                }
            }
            conn.prepare_cached(&format!(
                "INSERT INTO alerts ({ALERT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, 'firing', ?6, 1, ?7, ?7, NULL, NULL, NULL, NULL)"
            ))
            .db()?
            .execute(params![
                fire.id,
                fire.rule_id,
                fire.rule_name,
                fire.device_id,
                fire.severity,
                fire.detail,
                at
            ])
            .db()?;
            let a = alert_where(conn, "id = ?1", &[&fire.id])?;
            Ok(a.map(|a| (a, true)))
        })
        .await
    }

    async fn resolve_open_alert(
        &self,
        rule_id: &str,
        device_id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>> {
        let (rule_id, device_id, by) = (rule_id.to_owned(), device_id.to_owned(), by.to_owned());
        let at = ts_to_sql("at_ms", at_ms)?;
        self.write(move |conn| {
            let Some(open) = alert_where(
                conn,
                "rule_id = ?1 AND device_id = ?2 AND state <> 'resolved'",
                &[&rule_id, &device_id],
            )?
            else {
                return Ok(None);
            };
            transition(
                conn,
                &open.id,
                &[AlertState::Firing, AlertState::Acknowledged],
                AlertState::Resolved,
                &by,
                at,
            )
        })
        .await
    }

    async fn acknowledge_alert(
        &self,
        id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>> {
        let (id, by) = (id.to_owned(), by.to_owned());
        let at = ts_to_sql("at_ms", at_ms)?;
        self.write(move |conn| {
            transition(
                conn,
                &id,
                &[AlertState::Firing],
                AlertState::Acknowledged,
                &by,
                at,
            )
        })
        .await
    }

    async fn resolve_alert(&self, id: &str, by: &str, at_ms: u64) -> Result<Option<AlertRecord>> {
        let (id, by) = (id.to_owned(), by.to_owned());
        let at = ts_to_sql("at_ms", at_ms)?;
        self.write(move |conn| {
            transition(
                conn,
                &id,
                &[AlertState::Firing, AlertState::Acknowledged],
                AlertState::Resolved,
                &by,
                at,
            )
        })
        .await
    }

    async fn get_alert(&self, id: &str) -> Result<Option<AlertRecord>> {
        let id = id.to_owned();
        self.read(move |conn| alert_where(conn, "id = ?1", &[&id]))
            .await
    }

    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<AlertRecord>> {
        let state = filter.state.map(|s| s.as_str().to_owned());
        let rule = filter.rule_id.clone();
        let device = filter.device_id.clone();
        let open = i64::from(filter.open);
        let before = before_id.map(str::to_owned);
        let limit = count_to_sql(limit);
        let rows = self
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {ALERT_COLUMNS} FROM alerts
                         WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR rule_id = ?2)
                           AND (?3 IS NULL OR device_id = ?3) AND (?4 IS NULL OR id < ?4)
                           AND (?6 = 0 OR state <> 'resolved')
                         ORDER BY id DESC LIMIT ?5"
                    ))
                    .db()?;
                let rows = stmt
                    .query_map(
                        params![state, rule, device, before, limit, open],
                        alert_from_row,
                    )
                    .db()?;
                rows.collect::<rusqlite::Result<Vec<_>>>().db()
            })
            .await?;
        rows.into_iter().map(decode).collect()
    }

    async fn prune_alerts(&self, resolved_before_ms: u64, keep_max: usize) -> Result<u64> {
        let before = bound_to_sql(resolved_before_ms);
        let keep = count_to_sql(keep_max);
        self.write_background(move |conn| {
            let old = conn
                .prepare_cached(
                    "DELETE FROM alerts WHERE state = 'resolved' AND resolved_at_ms < ?1",
                )
                .db()?
                .execute(params![before])
                .db()?;
            let over = conn
                .prepare_cached(
                    "DELETE FROM alerts WHERE state = 'resolved' AND id NOT IN
                       (SELECT id FROM alerts ORDER BY id DESC LIMIT ?1)",
                )
                .db()?
                .execute(params![keep])
                .db()?;
            Ok((old + over) as u64)
        })
        .await
    }

    async fn create_ticket(&self, t: TicketRecord, open_max: usize) -> Result<TicketCreate> {
        let created = ts_to_sql("created_at_ms", t.created_at_ms)?;
        let max = count_to_sql(open_max);
        self.write(move |conn| {
            if ticket_where(conn, &t.id)?.is_some() {
                return Ok(TicketCreate::Exists);
            }
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM tickets WHERE open = 1 AND playbook = ?1")
                .db()?
                .query_row(params![t.playbook], |r| r.get(0))
                .db()?;
            if n >= max {
                return Ok(TicketCreate::Full);
            }
            conn.prepare_cached(&format!(
                "INSERT INTO tickets ({TICKET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, 1, ?5, NULL, NULL, ?6)"
            ))
            .db()?
            .execute(params![t.id, t.playbook, t.alert_id, t.title, created, t.body])
            .db()?;
            Ok(TicketCreate::Created)
        })
        .await
    }

    async fn get_ticket(&self, id: &str) -> Result<Option<TicketRecord>> {
        let id = id.to_owned();
        self.read(move |conn| ticket_where(conn, &id)).await
    }

    async fn list_tickets(
        &self,
        filter: &TicketFilter,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<TicketRecord>> {
        let open = filter.open.map(i64::from);
        let playbook = filter.playbook.clone();
        let alert = filter.alert_id.clone();
        let before = before_id.map(str::to_owned);
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {TICKET_COLUMNS} FROM tickets
                     WHERE (?1 IS NULL OR open = ?1) AND (?2 IS NULL OR playbook = ?2)
                       AND (?3 IS NULL OR alert_id = ?3) AND (?4 IS NULL OR id < ?4)
                     ORDER BY id DESC LIMIT ?5"
                ))
                .db()?;
            let rows = stmt
                .query_map(
                    params![open, playbook, alert, before, limit],
                    ticket_from_row,
                )
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn close_ticket(&self, id: &str, by: &str, at_ms: u64) -> Result<Option<TicketRecord>> {
        let id = id.to_owned();
        let by = by.to_owned();
        let at = ts_to_sql("at_ms", at_ms)?;
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE tickets SET open = 0, closed_at_ms = ?2, closed_by = ?3
                 WHERE id = ?1 AND open = 1",
            )
            .db()?
            .execute(params![id, at, by])
            .db()?;
            ticket_where(conn, &id)
        })
        .await
    }

    async fn prune_tickets(&self, closed_before_ms: u64, keep_max: usize) -> Result<u64> {
        let before = bound_to_sql(closed_before_ms);
        let keep = count_to_sql(keep_max);
        self.write_background(move |conn| {
            let old = conn
                .prepare_cached("DELETE FROM tickets WHERE open = 0 AND closed_at_ms < ?1")
                .db()?
                .execute(params![before])
                .db()?;
            let over = conn
                .prepare_cached(
                    "DELETE FROM tickets WHERE open = 0 AND id NOT IN
                       (SELECT id FROM tickets ORDER BY id DESC LIMIT ?1)",
                )
                .db()?
                .execute(params![keep])
                .db()?;
            Ok((old + over) as u64)
        })
        .await
    }
}
