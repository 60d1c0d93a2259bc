//! [`GatewayStore`] for PostgreSQL: which gateway may act for which device (issue 20).
//! Attaching first locks both devices' rows (`FOR NO KEY UPDATE`, in id order, so two attaches
//! never deadlock each other): attaches to one gateway run one at a time (the children bound
//! holds however many servers attach at once), and so do attaches that share a device (no two
//! of them make a chain between them). Deleting either device deletes the attachment
//! (`ON DELETE CASCADE`).

use tokio_postgres::Transaction;

use super::{column, count_to_sql, nul_free_cursor, pg_error, ts_to_sql, u64_column, PgStore};
use crate::error::{Result, StoreError};
use crate::model::check_text;
use crate::store::{AttachOutcome, GatewayStore, GATEWAY_PAGE_LEN_MAX};

/// The gateway `child` is attached to.
async fn gateway_of_child(tx: &Transaction<'_>, child: &str) -> Result<Option<String>> {
    let row = tx
        .query_opt(
            "SELECT gateway_id FROM device_gateways WHERE child_id = $1",
            &[&child],
        )
        .await
        .map_err(pg_error)?;
    row.as_ref().map(|r| column(r, 0)).transpose()
}

fn page_limit(limit: usize) -> i64 {
    count_to_sql(limit.min(GATEWAY_PAGE_LEN_MAX))
}

#[async_trait::async_trait]
impl GatewayStore for PgStore {
    async fn attach_child(
        &self,
        child: &str,
        gateway: &str,
        at_ms: u64,
        children_max: usize,
    ) -> Result<AttachOutcome> {
        check_text("child device id", child)?;
        check_text("gateway device id", gateway)?;
        let at = ts_to_sql("attached_at_ms", at_ms)?;
        let max = count_to_sql(children_max);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Locked (in id order) until this commits: no attach to either device, and no
        // deletion of either, runs meanwhile.
        let locked: Vec<String> = tx
            .query(
                "SELECT id FROM devices WHERE id IN ($1, $2) ORDER BY id FOR NO KEY UPDATE",
                &[&child, &gateway],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| column(r, 0))
            .collect::<Result<_>>()?;
        for id in [child, gateway] {
            if !locked.iter().any(|l| l == id) {
                return Err(StoreError::NotFound(format!("device {id}")));
            }
        }
        if child == gateway {
            return Err(StoreError::InvalidInput(format!(
                "device {child} cannot be its own gateway"
            )));
        }
        if let Some(parent) = gateway_of_child(&tx, gateway).await? {
            return Err(StoreError::InvalidInput(format!(
                "device {gateway} is a child of gateway {parent}: it cannot be a gateway"
            )));
        }
        let has_children: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM device_gateways WHERE gateway_id = $1)",
                &[&child],
            )
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?;
        if has_children {
            return Err(StoreError::InvalidInput(format!(
                "device {child} is a gateway with children: it cannot be a child"
            )));
        }
        let previous = gateway_of_child(&tx, child).await?;
        if previous.as_deref() == Some(gateway) {
            return Ok(AttachOutcome::Attached(previous));
        }
        let children: i64 = tx
            .query_one(
                "SELECT count(*) FROM device_gateways WHERE gateway_id = $1",
                &[&gateway],
            )
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?;
        if children >= max {
            return Ok(AttachOutcome::GatewayFull);
        }
        tx.execute(
            "INSERT INTO device_gateways (child_id, gateway_id, attached_at_ms)
             VALUES ($1, $2, $3)
             ON CONFLICT (child_id) DO UPDATE
             SET gateway_id = excluded.gateway_id, attached_at_ms = excluded.attached_at_ms",
            &[&child, &gateway, &at],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(AttachOutcome::Attached(previous))
    }

    async fn detach_child(&self, child: &str) -> Result<Option<String>> {
        if check_text("child device id", child).is_err() {
            return Ok(None);
        }
        let row = self
            .query_opt(
                "DELETE FROM device_gateways WHERE child_id = $1 RETURNING gateway_id",
                &[&child],
            )
            .await?;
        row.as_ref().map(|r| column(r, 0)).transpose()
    }

    async fn gateway_of(&self, child: &str) -> Result<Option<(String, u64)>> {
        if check_text("child device id", child).is_err() {
            return Ok(None);
        }
        let row = self
            .query_opt(
                "SELECT gateway_id, attached_at_ms FROM device_gateways WHERE child_id = $1",
                &[&child],
            )
            .await?;
        row.as_ref()
            .map(|r| Ok((column(r, 0)?, u64_column(r, 1)?)))
            .transpose()
    }

    async fn children_of(
        &self,
        gateway: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>> {
        if limit == 0 || check_text("gateway device id", gateway).is_err() {
            return Ok(Vec::new());
        }
        let after = nul_free_cursor(after.unwrap_or(""));
        let limit = page_limit(limit);
        let rows = self
            .query(
                "SELECT child_id, attached_at_ms FROM device_gateways
                 WHERE gateway_id = $1 AND child_id > $2 ORDER BY child_id LIMIT $3",
                &[&gateway, &after, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((column(r, 0)?, u64_column(r, 1)?)))
            .collect()
    }

    async fn list_attachments(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = nul_free_cursor(after.unwrap_or(""));
        let limit = page_limit(limit);
        let rows = self
            .query(
                "SELECT child_id, gateway_id FROM device_gateways
                 WHERE child_id > $1 ORDER BY child_id LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((column(r, 0)?, column(r, 1)?)))
            .collect()
    }
}
