//! [`RuleStore`] for PostgreSQL: the semantics of `sqlite/rules.rs`. Raising an alert is one
//! `INSERT ... ON CONFLICT` on the partial unique index of open alerts, so two nodes raising the
//! same (rule, device) at once count two occurrences of one alert.

use tokio_postgres::Row;

use super::{
    bound_to_sql, column, count_to_sql, nul_free_cursor, opt_u64_column, pg_error, ts_to_sql,
    u64_column, PgStore,
};
use crate::error::Result;
use crate::model::{AlertFire, AlertRecord, AlertState, RuleRecord, TicketCreate, TicketRecord};
use crate::store::{AlertFilter, RuleStore, TicketFilter};

const RULE_COLUMNS: &str = "id, name, when_text, selector, scope, then_text, enabled, created_by, \
     created_at_ms, updated_at_ms";

const ALERT_COLUMNS: &str = "id, rule_id, rule_name, device_id, severity, state, detail, count, \
     first_fired_ms, last_fired_ms, acknowledged_at_ms, acknowledged_by, resolved_at_ms, resolved_by";

fn rule_from_row(r: &Row) -> Result<RuleRecord> {
    Ok(RuleRecord {
        id: column(r, 0)?,
        name: column(r, 1)?,
        when: column(r, 2)?,
        selector: column(r, 3)?,
        scope: column(r, 4)?,
        then: column(r, 5)?,
        enabled: column(r, 6)?,
        created_by: column(r, 7)?,
        created_at_ms: u64_column(r, 8)?,
        updated_at_ms: u64_column(r, 9)?,
    })
}

const TICKET_COLUMNS: &str =
    "id, playbook, alert_id, title, open, created_at_ms, closed_at_ms, closed_by, body";

fn ticket_from_row(r: &Row) -> Result<TicketRecord> {
    Ok(TicketRecord {
        id: column(r, 0)?,
        playbook: column(r, 1)?,
        alert_id: column(r, 2)?,
        title: column(r, 3)?,
        open: column(r, 4)?,
        created_at_ms: u64_column(r, 5)?,
        closed_at_ms: opt_u64_column(r, 6)?,
        closed_by: column(r, 7)?,
        body: column(r, 8)?,
    })
}

fn alert_from_row(r: &Row) -> Result<AlertRecord> {
    let state: String = column(r, 5)?;
    Ok(AlertRecord {
        id: column(r, 0)?,
        rule_id: column(r, 1)?,
        rule_name: column(r, 2)?,
        device_id: column(r, 3)?,
        severity: column(r, 4)?,
        state: state.parse()?,
        detail: column(r, 6)?,
        count: u64_column(r, 7)?,
        first_fired_ms: u64_column(r, 8)?,
        last_fired_ms: u64_column(r, 9)?,
        acknowledged_at_ms: opt_u64_column(r, 10)?,
        acknowledged_by: column(r, 11)?,
        resolved_at_ms: opt_u64_column(r, 12)?,
        resolved_by: column(r, 13)?,
    })
}

impl PgStore {
    async fn alert(&self, id: &str) -> Result<Option<AlertRecord>> {
        self.query_opt(
            &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1"),
            &[&nul_free_cursor(id)],
        )
        .await?
        .as_ref()
        .map(alert_from_row)
        .transpose()
    }

    /// Moves alert `id` to `to` (a guarded UPDATE: only from the states `from_sql` allows);
    /// returns the alert as stored after.
    async fn alert_transition(
        &self,
        id: &str,
        set_sql: &str,
        from_sql: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = nul_free_cursor(id);
        self.execute(
            &format!("UPDATE alerts SET {set_sql} WHERE id = $1 AND state IN ({from_sql})"),
            &[&id, &at, &by],
            || "alert".to_owned(),
        )
        .await?;
        self.alert(id).await
    }
}

const ACK_SQL: &str = "state = 'acknowledged', acknowledged_at_ms = $2, acknowledged_by = $3";
const RESOLVE_SQL: &str = "state = 'resolved', resolved_at_ms = $2, resolved_by = $3";

#[async_trait::async_trait]
impl RuleStore for PgStore {
    async fn create_rule(&self, rule: RuleRecord, rules_max: usize) -> Result<bool> {
        let created = ts_to_sql("created_at_ms", rule.created_at_ms)?;
        let updated = ts_to_sql("updated_at_ms", rule.updated_at_ms)?;
        let max = count_to_sql(rules_max);
        // The bound and the insert in one statement: a concurrent create cannot pass it twice
        // by much (each sees the other's row only once committed; rules are created by people).
        let n = self
            .execute(
                &format!(
                    "INSERT INTO rules ({RULE_COLUMNS})
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
                     WHERE (SELECT count(*) FROM rules) < $11"
                ),
                &[
                    &rule.id,
                    &rule.name,
                    &rule.when,
                    &rule.selector,
                    &rule.scope,
                    &rule.then,
                    &rule.enabled,
                    &rule.created_by,
                    &created,
                    &updated,
                    &max,
                ],
                || format!("rule {} ({})", rule.name, rule.id),
            )
            .await?;
        Ok(n == 1)
    }

    async fn get_rule(&self, id: &str) -> Result<Option<RuleRecord>> {
        self.query_opt(
            &format!("SELECT {RULE_COLUMNS} FROM rules WHERE id = $1"),
            &[&nul_free_cursor(id)],
        )
        .await?
        .as_ref()
        .map(rule_from_row)
        .transpose()
    }

    async fn list_rules(&self) -> Result<Vec<RuleRecord>> {
        self.query(
            &format!("SELECT {RULE_COLUMNS} FROM rules ORDER BY name COLLATE \"C\""),
            &[],
        )
        .await?
        .iter()
        .map(rule_from_row)
        .collect()
    }

    async fn set_rule_enabled(
        &self,
        id: &str,
        enabled: bool,
        at_ms: u64,
    ) -> Result<Option<RuleRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = nul_free_cursor(id);
        self.execute(
            "UPDATE rules SET enabled = $2, updated_at_ms = $3 WHERE id = $1",
            &[&id, &enabled, &at],
            || "rule".to_owned(),
        )
        .await?;
        self.get_rule(id).await
    }

    async fn delete_rule(&self, id: &str, at_ms: u64) -> Result<bool> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = nul_free_cursor(id);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let n = tx
            .execute("DELETE FROM rules WHERE id = $1", &[&id])
            .await
            .map_err(pg_error)?;
        tx.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at_ms = $2, resolved_by = 'rule_deleted'
             WHERE rule_id = $1 AND state <> 'resolved'",
            &[&id, &at],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(n > 0)
    }

    async fn fire_alert(
        &self,
        fire: AlertFire,
        open_max: usize,
    ) -> Result<Option<(AlertRecord, bool)>> {
        let at = ts_to_sql("at_ms", fire.at_ms)?;
        let max = count_to_sql(open_max);
        let counted = self
            .query_opt(
                &format!(
                    "UPDATE alerts SET count = count + 1, last_fired_ms = GREATEST(last_fired_ms, $3),
                       detail = $4
                     WHERE rule_id = $1 AND device_id = $2 AND state <> 'resolved'
                     RETURNING {ALERT_COLUMNS}"
                ),
                &[&fire.rule_id, &fire.device_id, &at, &fire.detail],
            )
            .await?;
        if let Some(row) = counted {
            return Ok(Some((alert_from_row(&row)?, false)));
        }
        let row = self
            .query_opt(
                &format!(
                    "INSERT INTO alerts ({ALERT_COLUMNS})
                     SELECT $1, $2, $3, $4, $5, 'firing', $6, 1, $7, $7, NULL, NULL, NULL, NULL
                     WHERE (SELECT count(*) FROM alerts WHERE state <> 'resolved') < $8
                       AND (NOT $9 OR EXISTS (SELECT 1 FROM rules WHERE id = $2 AND enabled))
                     ON CONFLICT (rule_id, device_id) WHERE state <> 'resolved' DO UPDATE
                       SET count = alerts.count + 1,
                           last_fired_ms = GREATEST(alerts.last_fired_ms, EXCLUDED.last_fired_ms),
                           detail = EXCLUDED.detail
                     RETURNING {ALERT_COLUMNS}, (xmax = 0) AS inserted"
                ),
                &[
                    &fire.id,
                    &fire.rule_id,
                    &fire.rule_name,
                    &fire.device_id,
                    &fire.severity,
                    &fire.detail,
                    &at,
                    &max,
                    &fire.rule_must_exist,
                ],
            )
            .await?;
        row.map(|r| Ok((alert_from_row(&r)?, column::<bool>(&r, 14)?)))
            .transpose()
    }

    async fn resolve_open_alert(
        &self,
        rule_id: &str,
        device_id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        self.query_opt(
            &format!(
                "UPDATE alerts SET {RESOLVE_SQL}
                 WHERE rule_id = $1 AND device_id = $4 AND state <> 'resolved'
                 RETURNING {ALERT_COLUMNS}"
            ),
            &[&rule_id, &at, &by, &device_id],
        )
        .await?
        .as_ref()
        .map(alert_from_row)
        .transpose()
    }

    async fn acknowledge_alert(
        &self,
        id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>> {
        self.alert_transition(id, ACK_SQL, "'firing'", by, at_ms)
            .await
    }

    async fn resolve_alert(&self, id: &str, by: &str, at_ms: u64) -> Result<Option<AlertRecord>> {
        self.alert_transition(id, RESOLVE_SQL, "'firing', 'acknowledged'", by, at_ms)
            .await
    }

    async fn get_alert(&self, id: &str) -> Result<Option<AlertRecord>> {
        self.alert(id).await
    }

    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<AlertRecord>> {
        let state = filter.state.map(AlertState::as_str);
        let rule = filter.rule_id.as_deref().map(nul_free_cursor);
        let device = filter.device_id.as_deref().map(nul_free_cursor);
        let before = before_id.map(nul_free_cursor);
        let limit = count_to_sql(limit);
        self.query(
            &format!(
                "SELECT {ALERT_COLUMNS} FROM alerts
                 WHERE ($1::TEXT IS NULL OR state = $1) AND ($2::TEXT IS NULL OR rule_id = $2)
                   AND ($3::TEXT IS NULL OR device_id = $3) AND ($4::TEXT IS NULL OR id < $4)
                   AND (NOT $6 OR state <> 'resolved')
                 ORDER BY id DESC LIMIT $5"
            ),
            &[&state, &rule, &device, &before, &limit, &filter.open],
        )
        .await?
        .iter()
        .map(alert_from_row)
        .collect()
    }

    async fn prune_alerts(&self, resolved_before_ms: u64, keep_max: usize) -> Result<u64> {
        let before = bound_to_sql(resolved_before_ms);
        let keep = count_to_sql(keep_max);
        let old = self
            .execute(
                "DELETE FROM alerts WHERE state = 'resolved' AND resolved_at_ms < $1",
                &[&before],
                || "alert".to_owned(),
            )
            .await?;
        let over = self
            .execute(
                "DELETE FROM alerts WHERE state = 'resolved' AND id NOT IN
                   (SELECT id FROM alerts ORDER BY id DESC LIMIT $1)",
                &[&keep],
                || "alert".to_owned(),
            )
            .await?;
        Ok(old + over)
    }

    async fn create_ticket(&self, t: TicketRecord, open_max: usize) -> Result<TicketCreate> {
        let created = ts_to_sql("created_at_ms", t.created_at_ms)?;
        let max = count_to_sql(open_max);
        // One statement: the count and the insert see one snapshot; two nodes opening tickets
        // at once may pass the bound by one each, never without bound.
        let row = self
            .query_opt(
                "WITH n AS (SELECT count(*) AS open FROM tickets WHERE open AND playbook = $2)
                 INSERT INTO tickets (id, playbook, alert_id, title, open, created_at_ms, body)
                 SELECT $1, $2, $3, $4, TRUE, $5, $6 FROM n WHERE n.open < $7
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
                &[
                    &nul_free_cursor(&t.id),
                    &t.playbook,
                    &t.alert_id,
                    &t.title,
                    &created,
                    &t.body,
                    &max,
                ],
            )
            .await?;
        if row.is_some() {
            return Ok(TicketCreate::Created);
        }
        Ok(if self.get_ticket(&t.id).await?.is_some() {
            TicketCreate::Exists
        } else {
            TicketCreate::Full
        })
    }

    async fn get_ticket(&self, id: &str) -> Result<Option<TicketRecord>> {
        self.query_opt(
            &format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE id = $1"),
            &[&nul_free_cursor(id)],
        )
        .await?
        .as_ref()
        .map(ticket_from_row)
        .transpose()
    }

    async fn list_tickets(
        &self,
        filter: &TicketFilter,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<TicketRecord>> {
        let playbook = filter.playbook.as_deref().map(nul_free_cursor);
        let alert = filter.alert_id.as_deref().map(nul_free_cursor);
        let before = before_id.map(nul_free_cursor);
        let limit = count_to_sql(limit);
        self.query(
            &format!(
                "SELECT {TICKET_COLUMNS} FROM tickets
                 WHERE ($1::BOOLEAN IS NULL OR open = $1) AND ($2::TEXT IS NULL OR playbook = $2)
                   AND ($3::TEXT IS NULL OR alert_id = $3) AND ($4::TEXT IS NULL OR id < $4)
                 ORDER BY id DESC LIMIT $5"
            ),
            &[&filter.open, &playbook, &alert, &before, &limit],
        )
        .await?
        .iter()
        .map(ticket_from_row)
        .collect()
    }

    async fn close_ticket(&self, id: &str, by: &str, at_ms: u64) -> Result<Option<TicketRecord>> {
        let at = ts_to_sql("at_ms", at_ms)?;
        let id = nul_free_cursor(id);
        self.execute(
            "UPDATE tickets SET open = FALSE, closed_at_ms = $2, closed_by = $3
             WHERE id = $1 AND open",
            &[&id, &at, &by],
            || "ticket".to_owned(),
        )
        .await?;
        self.get_ticket(id).await
    }

    async fn prune_tickets(&self, closed_before_ms: u64, keep_max: usize) -> Result<u64> {
        let before = bound_to_sql(closed_before_ms);
        let keep = count_to_sql(keep_max);
        let old = self
            .execute(
                "DELETE FROM tickets WHERE NOT open AND closed_at_ms < $1",
                &[&before],
                || "ticket".to_owned(),
            )
            .await?;
        let over = self
            .execute(
                "DELETE FROM tickets WHERE NOT open AND id NOT IN
                   (SELECT id FROM tickets ORDER BY id DESC LIMIT $1)",
                &[&keep],
                || "ticket".to_owned(),
            )
            .await?;
        Ok(old + over)
    }
}
