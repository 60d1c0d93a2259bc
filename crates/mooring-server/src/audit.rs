//! The audit log (issue 14): every write through the API — who, what, when, from where and
//! how it ended — stored before the answer leaves, readable with filters, pruned after
//! `audit.retention_days`.
//!
//! Entries come from the HTTP layer (every non-GET route, with the action its route table row
//! names; refused attempts by authenticated callers too) and from the login and password
//! handlers. Unauthenticated requests refused with 401 are counted in `/metrics`, not logged:
//! an anonymous client must not be able to grow the log.

use crate::app::Core;
use crate::error::{ServiceError, ServiceResult};
use mooring_store::{AuditQuery, AuditRecord};
use std::sync::Arc;

/// Most entries one read returns.
pub const AUDIT_PAGE_LEN_MAX: usize = 1000;
pub const AUDIT_PAGE_LEN_DEFAULT: usize = 100;
/// Longest actor, target or detail kept (longer ones are cut).
const FIELD_CHARS_MAX: usize = 512;

/// One entry to record (time and node are added here).
pub struct AuditEntryIn {
    pub actor: String,
    pub action: &'static str,
    pub target: String,
    pub source: String,
    pub status: u16,
    pub detail: String,
}

/// At most [`FIELD_CHARS_MAX`] characters, control characters (newlines, terminal escapes)
/// replaced, so an entry cannot fake or garble lines where it is printed.
fn cut(s: String) -> String {
    s.chars()
        .take(FIELD_CHARS_MAX)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// The audit service.
pub struct Audit {
    core: Arc<Core>,
}

impl Audit {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Stores an entry (durably, before the caller answers). A failing store is logged, never
    /// turned into a failure of the request that already happened.
    pub async fn record(&self, e: AuditEntryIn) {
        let entry = AuditRecord {
            id: 0,
            at_ms: self.core.now_ms(),
            actor: cut(e.actor),
            action: e.action.to_owned(),
            target: cut(e.target),
            source: cut(e.source),
            node: self.core.config.node_id.clone(),
            status: e.status,
            detail: cut(e.detail),
        };
        if let Err(err) = self.core.store.append_audit(vec![entry]).await {
            crate::metrics::Counters::inc(&self.core.counters.audit_write_failures);
            tracing::error!(error = %err, action = e.action, "writing the audit log failed");
        }
    }

    /// One page, newest first; the cursor is the last id of the previous page.
    pub async fn list(
        &self,
        p: mooring_api::AuditParams,
    ) -> ServiceResult<(Vec<AuditRecord>, Option<String>)> {
        let limit = p.limit.unwrap_or(AUDIT_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > AUDIT_PAGE_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {AUDIT_PAGE_LEN_MAX}"),
            ));
        }
        let before_id = p
            .cursor
            .as_deref()
            .map(|c| {
                c.parse::<u64>()
                    .map_err(|_| ServiceError::invalid("invalid_cursor", "cursor is not valid"))
            })
            .transpose()?;
        let entries = self
            .core
            .store
            .list_audit(AuditQuery {
                actor: p.actor,
                action: p.action,
                target_prefix: p.target,
                since_ms: p.since,
                until_ms: p.until,
                before_id,
                limit,
            })
            .await?;
        let next = (entries.len() == limit)
            .then(|| entries.last().map(|e| e.id.to_string()))
            .flatten();
        Ok((entries, next))
    }

    /// Deletes entries older than `audit.retention_days` (under the retention lease).
    pub async fn prune(&self) -> mooring_store::Result<u64> {
        let keep_ms = u64::from(self.core.config.audit.retention_days) * 86_400_000;
        let before = self.core.now_ms().saturating_sub(keep_ms);
        let mut n = 0;
        loop {
            let deleted = self.core.store.prune_audit(before, 1000).await?;
            n += deleted;
            if deleted < 1000 {
                return Ok(n);
            }
        }
    }
}
