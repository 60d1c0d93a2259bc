//! [`CommandStore`] for PostgreSQL: commands, fleet-command parents, scheduler queries.
//!
//! As `sqlite/commands.rs`, with every batch in bulk statements (one round trip per step, not one
//! per command) and idempotency race-safe across servers: a command whose key another server
//! stored meanwhile comes back `Existing`, as it would have from one server.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::{
    column, count_to_sql, device_id_column, is_unique_violation, pg_error, ts_to_sql, u32_column,
    u64_column, PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{
    CommandOutcome, CommandParentRecord, CommandRecord, CommandState, CreateOutcome,
};
use crate::store::{CommandStore, COMMAND_BATCH_LEN_MAX};

const COMMAND_COLUMNS: &str = "id, device_id, name, params, state, attempts, max_attempts, \
     created_at_ms, expires_at_ms, next_attempt_at_ms, parent_id, idempotency_key, history, \
     result_succeeded, result_output, result_timeout_ms, synced_at_ms";

const PARENT_COLUMNS: &str = "id, selector, name, params, created_at_ms, expires_at_ms, total";

/// A command's columns as stored (everything after `id, device_id` that can change).
struct Encoded {
    state: &'static str,
    attempts: i64,
    max_attempts: i64,
    created_at_ms: i64,
    expires_at_ms: i64,
    next_attempt_at_ms: i64,
    history: Value,
    result_succeeded: Option<bool>,
    result_output: Option<Value>,
    result_timeout_ms: i64,
    synced_at_ms: Option<i64>,
}

fn encode(r: &CommandRecord) -> Result<Encoded> {
    r.validate()?;
    let history: Vec<Value> = r
        .history
        .iter()
        .map(|(s, at)| serde_json::json!([s.as_str(), at]))
        .collect();
    Ok(Encoded {
        state: r.state.as_str(),
        attempts: i64::from(r.attempts),
        max_attempts: i64::from(r.max_attempts),
        created_at_ms: ts_to_sql("created_at_ms", r.created_at_ms)?,
        expires_at_ms: ts_to_sql("expires_at_ms", r.expires_at_ms)?,
        next_attempt_at_ms: ts_to_sql("next_attempt_at_ms", r.next_attempt_at_ms)?,
        history: Value::Array(history),
        result_succeeded: r.result.as_ref().map(|o| o.succeeded),
        result_output: r.result.as_ref().map(|o| o.output.clone()),
        result_timeout_ms: ts_to_sql("result_timeout_ms", r.result_timeout_ms)?,
        synced_at_ms: r
            .synced_at_ms
            .map(|at| ts_to_sql("synced_at_ms", at))
            .transpose()?,
    })
}

/// JSON text of a value, for the `text[]` arrays bulk statements cast to `json`.
fn json_text(what: &str, v: &Value) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidInput(format!("{what}: {e}")))
}

fn corrupt(index: usize, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("column {index}: {e}"))
}

fn state_column(row: &Row, index: usize) -> Result<CommandState> {
    let s: &str = column(row, index)?;
    s.parse().map_err(|e| corrupt(index, e))
}

fn command_from_row(row: &Row) -> Result<CommandRecord> {
    command_at(row, 0)
}

/// A command whose columns ([`COMMAND_COLUMNS`]) start at column `b`.
fn command_at(row: &Row, b: usize) -> Result<CommandRecord> {
    let Json(history) = column::<Json<Vec<(String, u64)>>>(row, b + 12)?;
    let history = history
        .into_iter()
        .map(|(s, at)| Ok((s.parse().map_err(|e| corrupt(b + 12, e))?, at)))
        .collect::<Result<Vec<_>>>()?;
    let result = match column::<Option<bool>>(row, b + 13)? {
        None => None,
        Some(succeeded) => Some(CommandOutcome {
            succeeded,
            output: column::<Option<Json<Value>>>(row, b + 14)?.map_or(Value::Null, |Json(v)| v),
        }),
    };
    let Json(params) = column::<Json<Value>>(row, b + 3)?;
    Ok(CommandRecord {
        id: column(row, b)?,
        device_id: device_id_column(row, b + 1)?,
        name: column(row, b + 2)?,
        params,
        state: state_column(row, b + 4)?,
        attempts: u32_column(row, b + 5)?,
        max_attempts: u32_column(row, b + 6)?,
        created_at_ms: u64_column(row, b + 7)?,
        expires_at_ms: u64_column(row, b + 8)?,
        next_attempt_at_ms: u64_column(row, b + 9)?,
        parent_id: column(row, b + 10)?,
        idempotency_key: column(row, b + 11)?,
        history,
        result,
        result_timeout_ms: u64_column(row, b + 15)?,
        synced_at_ms: column::<Option<i64>>(row, b + 16)?
            .map(|v| u64::try_from(v).map_err(|e| corrupt(b + 16, e)))
            .transpose()?,
    })
}

fn parent_from_row(row: &Row) -> Result<CommandParentRecord> {
    let Json(params) = column::<Json<Value>>(row, 3)?;
    Ok(CommandParentRecord {
        id: column(row, 0)?,
        selector: column(row, 1)?,
        name: column(row, 2)?,
        params,
        created_at_ms: u64_column(row, 4)?,
        expires_at_ms: u64_column(row, 5)?,
        total: u64_column(row, 6)?,
    })
}

fn check_limit(limit: usize) -> Result<i64> {
    if limit > COMMAND_BATCH_LEN_MAX {
        return Err(StoreError::InvalidInput(format!(
            "limit {limit} is above {COMMAND_BATCH_LEN_MAX}"
        )));
    }
    Ok(count_to_sql(limit))
}

/// What [`CommandStore::create_commands`] decided for one command before writing.
enum Plan {
    /// Stored now (index into the rows inserted).
    Insert,
    /// An earlier command of this batch has its `(device, key)`: that one is the answer.
    SameAsEarlier(usize),
    /// Stored before (or by another server while this batch was planned).
    Existing(Box<CommandRecord>),
}

/// The bulk insert of a batch's new commands, in batch order (so `seq` follows it). Rows that
/// hit a unique index (id or idempotency key, stored meanwhile by another server) are skipped
/// and found by their absence from the returned ids.
const INSERT_COMMANDS_SQL: &str =
    "INSERT INTO commands (id, device_id, name, params, state, attempts,
       max_attempts, created_at_ms, expires_at_ms, next_attempt_at_ms, parent_id, idempotency_key,
       history, result_succeeded, result_output, result_timeout_ms, synced_at_ms)
     SELECT id, device_id, name, params::json, state, attempts, max_attempts, created_at_ms,
       expires_at_ms, next_attempt_at_ms, parent_id, idempotency_key, history::json,
       result_succeeded, result_output::json, result_timeout_ms, synced_at_ms
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
       $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::text[],
       $13::text[], $14::bool[], $15::text[], $16::bigint[], $17::bigint[])
       WITH ORDINALITY AS u(id, device_id, name, params, state, attempts, max_attempts,
         created_at_ms, expires_at_ms, next_attempt_at_ms, parent_id, idempotency_key, history,
         result_succeeded, result_output, result_timeout_ms, synced_at_ms, n)
     ORDER BY n
     ON CONFLICT DO NOTHING
     RETURNING id";

/// The column arrays of [`INSERT_COMMANDS_SQL`].
#[derive(Default)]
struct CommandColumns {
    id: Vec<String>,
    device_id: Vec<String>,
    name: Vec<String>,
    params: Vec<String>,
    state: Vec<&'static str>,
    attempts: Vec<i64>,
    max_attempts: Vec<i64>,
    created_at_ms: Vec<i64>,
    expires_at_ms: Vec<i64>,
    next_attempt_at_ms: Vec<i64>,
    parent_id: Vec<Option<String>>,
    idempotency_key: Vec<Option<String>>,
    history: Vec<String>,
    result_succeeded: Vec<Option<bool>>,
    result_output: Vec<Option<String>>,
    result_timeout_ms: Vec<i64>,
    synced_at_ms: Vec<Option<i64>>,
}

impl CommandColumns {
    fn push(&mut self, c: &CommandRecord, e: &Encoded) -> Result<()> {
        self.id.push(c.id.clone());
        self.device_id.push(c.device_id.to_string());
        self.name.push(c.name.clone());
        self.params.push(json_text("params", &c.params)?);
        self.state.push(e.state);
        self.attempts.push(e.attempts);
        self.max_attempts.push(e.max_attempts);
        self.created_at_ms.push(e.created_at_ms);
        self.expires_at_ms.push(e.expires_at_ms);
        self.next_attempt_at_ms.push(e.next_attempt_at_ms);
        self.parent_id.push(c.parent_id.clone());
        self.idempotency_key.push(c.idempotency_key.clone());
        self.history.push(json_text("history", &e.history)?);
        self.result_succeeded.push(e.result_succeeded);
        self.result_output.push(
            e.result_output
                .as_ref()
                .map(|o| json_text("output", o))
                .transpose()?,
        );
        self.result_timeout_ms.push(e.result_timeout_ms);
        self.synced_at_ms.push(e.synced_at_ms);
        Ok(())
    }
}

#[async_trait::async_trait]
impl CommandStore for PgStore {
    async fn create_commands(
        &self,
        parent: Option<CommandParentRecord>,
        commands: Vec<CommandRecord>,
    ) -> Result<Vec<CreateOutcome>> {
        if commands.len() > COMMAND_BATCH_LEN_MAX {
            return Err(StoreError::InvalidInput(format!(
                "at most {COMMAND_BATCH_LEN_MAX} commands per batch"
            )));
        }
        let encoded = commands.iter().map(encode).collect::<Result<Vec<_>>>()?;
        let parent = match parent {
            Some(p) => Some((
                ts_to_sql("created_at_ms", p.created_at_ms)?,
                ts_to_sql("expires_at_ms", p.expires_at_ms)?,
                count_to_sql(usize::try_from(p.total).unwrap_or(usize::MAX)),
                p,
            )),
            None => None,
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        if let Some((created, expires, total, p)) = &parent {
            let stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO command_parents ({PARENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                ))
                .await
                .map_err(pg_error)?;
            let inserted = tx
                .execute(
                    &stmt,
                    &[
                        &p.id,
                        &p.selector,
                        &p.name,
                        &Json(&p.params),
                        created,
                        expires,
                        total,
                    ],
                )
                .await;
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::AlreadyExists(format!("command {}", p.id)))
                }
                Err(e) => return Err(pg_error(e)),
            }
        }
        if commands.is_empty() {
            tx.commit().await.map_err(pg_error)?;
            return Ok(Vec::new());
        }

        // What is stored already: commands under the batch's keys, the batch's devices, ids.
        let (key_devices, keys): (Vec<&str>, Vec<&str>) = commands
            .iter()
            .filter_map(|c| Some((c.device_id.as_str(), c.idempotency_key.as_deref()?)))
            .unzip();
        let devices: Vec<&str> = commands.iter().map(|c| c.device_id.as_str()).collect();
        let ids: Vec<&str> = commands.iter().map(|c| c.id.as_str()).collect();
        let by_key_sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands
             WHERE (device_id, idempotency_key) IN
               (SELECT * FROM unnest($1::text[], $2::text[]))"
        );
        let by_key_stmt = tx.prepare_cached(&by_key_sql).await.map_err(pg_error)?;
        let devices_stmt = tx
            .prepare_cached("SELECT id FROM devices WHERE id = ANY($1::text[])")
            .await
            .map_err(pg_error)?;
        let ids_stmt = tx
            .prepare_cached("SELECT id FROM commands WHERE id = ANY($1::text[])")
            .await
            .map_err(pg_error)?;
        let (by_key, found_devices, taken_ids) = tokio::try_join!(
            async { tx.query(&by_key_stmt, &[&key_devices, &keys]).await },
            async { tx.query(&devices_stmt, &[&devices]).await },
            async { tx.query(&ids_stmt, &[&ids]).await },
        )
        .map_err(pg_error)?;
        let mut stored_by_key: HashMap<(String, String), CommandRecord> = HashMap::new();
        for row in &by_key {
            let c = command_from_row(row)?;
            if let Some(key) = c.idempotency_key.clone() {
                stored_by_key.insert((c.device_id.to_string(), key), c);
            }
        }
        let found_devices = found_devices
            .iter()
            .map(|r| column::<String>(r, 0))
            .collect::<Result<HashSet<_>>>()?;
        let mut taken_ids = taken_ids
            .iter()
            .map(|r| column::<String>(r, 0))
            .collect::<Result<HashSet<_>>>()?;

        // In batch order, as SQLite decides one command at a time: the key first, then the
        // device, then the id.
        let mut plans = Vec::with_capacity(commands.len());
        let mut batch_keys: HashMap<(&str, &str), usize> = HashMap::new();
        let mut rows = CommandColumns::default();
        for (i, (c, e)) in commands.iter().zip(&encoded).enumerate() {
            if let Some(key) = c.idempotency_key.as_deref() {
                let device = c.device_id.as_str();
                if let Some(existing) = stored_by_key.get(&(device.to_owned(), key.to_owned())) {
                    plans.push(Plan::Existing(Box::new(existing.clone())));
                    continue;
                }
                if let Some(&earlier) = batch_keys.get(&(device, key)) {
                    plans.push(Plan::SameAsEarlier(earlier));
                    continue;
                }
                batch_keys.insert((device, key), i);
            }
            if !found_devices.contains(c.device_id.as_str()) {
                return Err(StoreError::NotFound(format!("device {}", c.device_id)));
            }
            if !taken_ids.insert(c.id.clone()) {
                return Err(StoreError::AlreadyExists(format!("command {}", c.id)));
            }
            rows.push(c, e)?;
            plans.push(Plan::Insert);
        }

        let inserted: HashSet<String> = if rows.id.is_empty() {
            HashSet::new()
        } else {
            let stmt = tx
                .prepare_cached(INSERT_COMMANDS_SQL)
                .await
                .map_err(pg_error)?;
            tx.query(
                &stmt,
                &[
                    &rows.id,
                    &rows.device_id,
                    &rows.name,
                    &rows.params,
                    &rows.state,
                    &rows.attempts,
                    &rows.max_attempts,
                    &rows.created_at_ms,
                    &rows.expires_at_ms,
                    &rows.next_attempt_at_ms,
                    &rows.parent_id,
                    &rows.idempotency_key,
                    &rows.history,
                    &rows.result_succeeded,
                    &rows.result_output,
                    &rows.result_timeout_ms,
                    &rows.synced_at_ms,
                ],
            )
            .await
            .map_err(|e| match e.code() {
                // A device deleted since it was looked up.
                Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                    StoreError::NotFound("a device of the batch (deleted meanwhile)".into())
                }
                _ => pg_error(e),
            })?
            .iter()
            .map(|r| column::<String>(r, 0))
            .collect::<Result<_>>()?
        };

        let mut outcomes: Vec<CreateOutcome> = Vec::with_capacity(commands.len());
        for (c, plan) in commands.iter().zip(plans) {
            let outcome = match plan {
                Plan::Insert if inserted.contains(&c.id) => CreateOutcome::Created(c.clone()),
                // Skipped by the insert: another server stored this id or this key meanwhile.
                Plan::Insert => match c.idempotency_key.as_deref() {
                    Some(key) => CreateOutcome::Existing(
                        stored_under_key(&tx, c.device_id.as_str(), key)
                            .await?
                            .ok_or_else(|| {
                                StoreError::AlreadyExists(format!("command {}", c.id))
                            })?,
                    ),
                    None => return Err(StoreError::AlreadyExists(format!("command {}", c.id))),
                },
                Plan::SameAsEarlier(i) => CreateOutcome::Existing(
                    outcomes
                        .get(i)
                        .map(|o| o.record().clone())
                        .ok_or_else(|| StoreError::Backend("command plan out of order".into()))?,
                ),
                Plan::Existing(existing) => CreateOutcome::Existing(*existing),
            };
            outcomes.push(outcome);
        }
        tx.commit().await.map_err(pg_error)?;
        Ok(outcomes)
    }

    async fn get_command(&self, id: &str) -> Result<Option<CommandRecord>> {
        let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(command_from_row).transpose()
    }

    async fn update_command(&self, record: CommandRecord, expected: CommandState) -> Result<bool> {
        let e = encode(&record)?;
        let updated = self
            .execute(
                "UPDATE commands SET state = $3, attempts = $4, max_attempts = $5,
                   expires_at_ms = $6, next_attempt_at_ms = $7, history = $8,
                   result_succeeded = $9, result_output = $10
                 WHERE id = $1 AND state = $2",
                &[
                    &record.id,
                    &expected.as_str(),
                    &e.state,
                    &e.attempts,
                    &e.max_attempts,
                    &e.expires_at_ms,
                    &e.next_attempt_at_ms,
                    &Json(&e.history),
                    &e.result_succeeded,
                    &e.result_output.as_ref().map(Json),
                ],
                || format!("command {}", record.id),
            )
            .await?;
        Ok(updated > 0)
    }

    async fn list_commands(
        &self,
        device_id: &str,
        state: Option<CommandState>,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<CommandRecord>> {
        let limit = check_limit(limit)?;
        let before_seq: i64 = match before_id {
            None => i64::MAX,
            Some(id) => {
                let row = self
                    .query_opt(
                        "SELECT seq FROM commands WHERE id = $1 AND device_id = $2",
                        &[&id, &device_id],
                    )
                    .await?
                    .ok_or_else(|| StoreError::InvalidInput(format!("unknown cursor {id:?}")))?;
                column(&row, 0)?
            }
        };
        let rows = match state {
            None => {
                let sql = format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands
                     WHERE device_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
                );
                self.query(&sql, &[&device_id, &before_seq, &limit]).await?
            }
            Some(s) => {
                let sql = format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands
                     WHERE device_id = $1 AND state = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
                );
                self.query(&sql, &[&device_id, &s.as_str(), &before_seq, &limit])
                    .await?
            }
        };
        rows.iter().map(command_from_row).collect()
    }

    async fn pending_commands(
        &self,
        device_id: &str,
        now_ms: u64,
        all_delivered: bool,
        limit: usize,
    ) -> Result<Vec<CommandRecord>> {
        let limit = check_limit(limit)?;
        let due = if all_delivered {
            i64::MAX
        } else {
            ts_to_sql("now_ms", now_ms)?
        };
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands
             WHERE device_id = $1 AND (state = 'queued'
                OR (state = 'delivered' AND next_attempt_at_ms <= $2)
                OR ($4 AND state = 'acknowledged'))
             ORDER BY seq LIMIT $3"
        );
        let rows = self
            .query(&sql, &[&device_id, &due, &limit, &all_delivered])
            .await?;
        rows.iter().map(command_from_row).collect()
    }

    async fn due_commands(&self, now_ms: u64, limit: usize) -> Result<Vec<CommandRecord>> {
        let limit = check_limit(limit)?;
        let now = ts_to_sql("now_ms", now_ms)?;
        // Each kind of due command by its own index, at most `limit` of each (the same rows
        // SQLite's index scans take), then the oldest `limit` of them all.
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE seq IN (
               (SELECT seq FROM commands WHERE state = 'queued' AND expires_at_ms <= $1
                ORDER BY expires_at_ms, seq LIMIT $2)
               UNION
               (SELECT seq FROM commands WHERE state = 'delivered' AND expires_at_ms <= $1
                ORDER BY expires_at_ms, seq LIMIT $2)
               UNION
               (SELECT seq FROM commands WHERE state = 'delivered' AND next_attempt_at_ms <= $1
                ORDER BY next_attempt_at_ms, seq LIMIT $2)
               UNION
               -- Acknowledged with a result timeout: next_attempt_at_ms is the deadline.
               (SELECT seq FROM commands WHERE state = 'acknowledged' AND next_attempt_at_ms <= $1
                  AND result_timeout_ms > 0
                ORDER BY next_attempt_at_ms, seq LIMIT $2))
             ORDER BY seq LIMIT $2"
        );
        let rows = self.query(&sql, &[&now, &limit]).await?;
        rows.iter().map(command_from_row).collect()
    }

    async fn get_command_parent(&self, id: &str) -> Result<Option<CommandParentRecord>> {
        let sql = format!("SELECT {PARENT_COLUMNS} FROM command_parents WHERE id = $1");
        let row = self.query_opt(&sql, &[&id]).await?;
        row.as_ref().map(parent_from_row).transpose()
    }

    async fn count_children(&self, parent_id: &str) -> Result<BTreeMap<CommandState, u64>> {
        let rows = self
            .query(
                "SELECT state, count(*) FROM commands WHERE parent_id = $1 GROUP BY state",
                &[&parent_id],
            )
            .await?;
        rows.iter()
            .map(|row| Ok((state_column(row, 0)?, u64_column(row, 1)?)))
            .collect()
    }
}

/// The command stored under `(device_id, key)`, read in `tx` (after a skipped insert: another
/// server's command, committed meanwhile).
async fn stored_under_key(
    tx: &deadpool_postgres::Transaction<'_>,
    device_id: &str,
    key: &str,
) -> Result<Option<CommandRecord>> {
    let sql = format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = $1 AND idempotency_key = $2"
    );
    let stmt = tx.prepare_cached(&sql).await.map_err(pg_error)?;
    let row = tx
        .query_opt(&stmt, &[&device_id, &key])
        .await
        .map_err(pg_error)?;
    row.as_ref().map(command_from_row).transpose()
}
