//! [`CommandStore`] for SQLite: commands, fleet-command parents, scheduler queries.

use std::collections::BTreeMap;

use rusqlite::types::Type;
use rusqlite::{params, OptionalExtension, Row};

use super::{count_to_sql, is_constraint_violation, ts_to_sql, u64_column, Db, SqliteStore};
use crate::error::{Result, StoreError};
use crate::model::{
    CommandOutcome, CommandParentRecord, CommandRecord, CommandState, CreateOutcome,
};
use crate::store::{CommandStore, COMMAND_BATCH_LEN_MAX};

const COMMAND_COLUMNS: &str = "id, device_id, name, params, state, attempts, max_attempts, \
     created_at_ms, expires_at_ms, next_attempt_at_ms, parent_id, idempotency_key, history, \
     result_succeeded, result_output, result_timeout_ms, synced_at_ms";

/// A command's columns as stored (everything after `id, device_id` that can change).
struct Encoded {
    params: String,
    state: &'static str,
    attempts: i64,
    max_attempts: i64,
    created_at_ms: i64,
    expires_at_ms: i64,
    next_attempt_at_ms: i64,
    history: String,
    result_succeeded: Option<i64>,
    result_output: Option<String>,
    result_timeout_ms: i64,
    synced_at_ms: Option<i64>,
}

fn json_text(what: &str, v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidInput(format!("{what}: {e}")))
}

fn encode(r: &CommandRecord) -> Result<Encoded> {
    r.validate()?;
    let history: Vec<(&str, u64)> = r.history.iter().map(|(s, at)| (s.as_str(), *at)).collect();
    Ok(Encoded {
        params: json_text("params", &r.params)?,
        state: r.state.as_str(),
        attempts: i64::from(r.attempts),
        max_attempts: i64::from(r.max_attempts),
        created_at_ms: ts_to_sql("created_at_ms", r.created_at_ms)?,
        expires_at_ms: ts_to_sql("expires_at_ms", r.expires_at_ms)?,
        next_attempt_at_ms: ts_to_sql("next_attempt_at_ms", r.next_attempt_at_ms)?,
        history: json_text("history", &history)?,
        result_succeeded: r.result.as_ref().map(|o| i64::from(o.succeeded)),
        result_output: r
            .result
            .as_ref()
            .map(|o| json_text("output", &o.output))
            .transpose()?,
        result_timeout_ms: ts_to_sql("result_timeout_ms", r.result_timeout_ms)?,
        synced_at_ms: r
            .synced_at_ms
            .map(|at| ts_to_sql("synced_at_ms", at))
            .transpose()?,
    })
}

fn conversion(index: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e))
}

fn json_column<T: serde::de::DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text).map_err(|e| conversion(index, e))
}

fn state_column(row: &Row<'_>, index: usize) -> rusqlite::Result<CommandState> {
    let s: String = row.get(index)?;
    s.parse().map_err(|e| conversion(index, e))
}

fn u32_column(row: &Row<'_>, index: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(index)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, v))
}

fn command_from_row(row: &Row<'_>) -> rusqlite::Result<CommandRecord> {
    command_at(row, 0)
}

/// A command whose columns ([`COMMAND_COLUMNS`]) start at column `b`.
fn command_at(row: &Row<'_>, b: usize) -> rusqlite::Result<CommandRecord> {
    let history: Vec<(String, u64)> = json_column(row, b + 12)?;
    let history = history
        .into_iter()
        .map(|(s, at)| Ok((s.parse().map_err(|e| conversion(b + 12, e))?, at)))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let result = match row.get::<_, Option<i64>>(b + 13)? {
        None => None,
        Some(succeeded) => Some(CommandOutcome {
            succeeded: succeeded != 0,
            output: match row.get::<_, Option<String>>(b + 14)? {
                Some(t) => serde_json::from_str(&t).map_err(|e| conversion(b + 14, e))?,
                None => serde_json::Value::Null,
            },
        }),
    };
    Ok(CommandRecord {
        id: row.get(b)?,
        device_id: super::device_id_column(row, b + 1)?,
        name: row.get(b + 2)?,
        params: json_column(row, b + 3)?,
        state: state_column(row, b + 4)?,
        attempts: u32_column(row, b + 5)?,
        max_attempts: u32_column(row, b + 6)?,
        created_at_ms: u64_column(row, b + 7)?,
        expires_at_ms: u64_column(row, b + 8)?,
        next_attempt_at_ms: u64_column(row, b + 9)?,
        parent_id: row.get(b + 10)?,
        idempotency_key: row.get(b + 11)?,
        history,
        result,
        result_timeout_ms: u64_column(row, b + 15)?,
        synced_at_ms: row
            .get::<_, Option<i64>>(b + 16)?
            .map(|v| {
                u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(b + 16, v))
            })
            .transpose()?,
    })
}

fn parent_from_row(row: &Row<'_>) -> rusqlite::Result<CommandParentRecord> {
    Ok(CommandParentRecord {
        id: row.get(0)?,
        selector: row.get(1)?,
        name: row.get(2)?,
        params: json_column(row, 3)?,
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

#[async_trait::async_trait]
impl CommandStore for SqliteStore {
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
                json_text("params", &p.params)?,
                ts_to_sql("created_at_ms", p.created_at_ms)?,
                ts_to_sql("expires_at_ms", p.expires_at_ms)?,
                count_to_sql(usize::try_from(p.total).unwrap_or(usize::MAX)),
                p,
            )),
            None => None,
        };
        self.write(move |conn| {
            // The group commit runs this write in a savepoint of its own.
            let tx: &rusqlite::Connection = conn;
            if let Some((params_text, created, expires, total, p)) = &parent {
                let inserted = tx.execute(
                    "INSERT INTO command_parents (id, selector, name, params, created_at_ms, expires_at_ms, total)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![p.id, p.selector, p.name, params_text, created, expires, total],
                );
                match inserted {
                    Ok(_) => {}
                    Err(e) if is_constraint_violation(&e) => {
                        return Err(StoreError::AlreadyExists(format!("command {}", p.id)))
                    }
                    Err(e) => return Err(super::store_error(e)),
                }
            }
            let mut outcomes = Vec::with_capacity(commands.len());
            {
                let mut find_key = tx
                    .prepare_cached(&format!(
                        "SELECT {COMMAND_COLUMNS} FROM commands
                         WHERE device_id = ?1 AND idempotency_key = ?2"
                    ))
                    .db()?;
                let mut device_exists = tx
                    .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")
                    .db()?;
                let mut insert = tx
                    .prepare_cached(&format!(
                        "INSERT INTO commands ({COMMAND_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
                    ))
                    .db()?;
                for (c, e) in commands.into_iter().zip(encoded) {
                    if let Some(key) = &c.idempotency_key {
                        let existing = find_key
                            .query_row(params![c.device_id.as_str(), key], command_from_row)
                            .optional()
                            .db()?;
                        if let Some(existing) = existing {
                            outcomes.push(CreateOutcome::Existing(existing));
                            continue;
                        }
                    }
                    let exists = device_exists
                        .query_row(params![c.device_id.as_str()], |_| Ok(()))
                        .optional()
                        .db()?;
                    if exists.is_none() {
                        return Err(StoreError::NotFound(format!("device {}", c.device_id)));
                    }
                    let inserted = insert.execute(params![
                        c.id,
                        c.device_id.as_str(),
                        c.name,
                        e.params,
                        e.state,
                        e.attempts,
                        e.max_attempts,
                        e.created_at_ms,
                        e.expires_at_ms,
                        e.next_attempt_at_ms,
                        c.parent_id,
                        c.idempotency_key,
                        e.history,
                        e.result_succeeded,
                        e.result_output,
                        e.result_timeout_ms,
                        e.synced_at_ms
                    ]);
                    match inserted {
                        Ok(_) => outcomes.push(CreateOutcome::Created(c)),
                        Err(err) if is_constraint_violation(&err) => {
                            return Err(StoreError::AlreadyExists(format!("command {}", c.id)))
                        }
                        Err(err) => return Err(super::store_error(err)),
                    }
                }
            }
            Ok(outcomes)
        })
        .await
    }

    async fn get_command(&self, id: &str) -> Result<Option<CommandRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?1"
            ))
            .db()?
            .query_row(params![id], command_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn update_command(&self, record: CommandRecord, expected: CommandState) -> Result<bool> {
        let e = encode(&record)?;
        self.write(move |conn| {
            let updated = conn
                .prepare_cached(
                    "UPDATE commands SET state = ?3, attempts = ?4, max_attempts = ?5,
                       expires_at_ms = ?6, next_attempt_at_ms = ?7, history = ?8,
                       result_succeeded = ?9, result_output = ?10
                     WHERE id = ?1 AND state = ?2",
                )
                .db()?
                .execute(params![
                    record.id,
                    expected.as_str(),
                    e.state,
                    e.attempts,
                    e.max_attempts,
                    e.expires_at_ms,
                    e.next_attempt_at_ms,
                    e.history,
                    e.result_succeeded,
                    e.result_output
                ])
                .db()?;
            Ok(updated > 0)
        })
        .await
    }

    async fn list_commands(
        &self,
        device_id: &str,
        state: Option<CommandState>,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<CommandRecord>> {
        let limit = check_limit(limit)?;
        let device_id = device_id.to_owned();
        let before_id = before_id.map(str::to_owned);
        self.read(move |conn| {
            let before_seq: i64 = match &before_id {
                None => i64::MAX,
                Some(id) => conn
                    .prepare_cached("SELECT seq FROM commands WHERE id = ?1 AND device_id = ?2")
                    .db()?
                    .query_row(params![id, device_id], |r| r.get(0))
                    .optional()
                    .db()?
                    .ok_or_else(|| StoreError::InvalidInput(format!("unknown cursor {id:?}")))?,
            };
            let rows = match state {
                None => conn
                    .prepare_cached(&format!(
                        "SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY commands_by_device_seq
                         WHERE device_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
                    ))
                    .db()?
                    .query_map(params![device_id, before_seq, limit], command_from_row)
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>(),
                Some(s) => conn
                    .prepare_cached(&format!(
                        "SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY commands_by_device_state_seq
                         WHERE device_id = ?1 AND state = ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4"
                    ))
                    .db()?
                    .query_map(
                        params![device_id, s.as_str(), before_seq, limit],
                        command_from_row,
                    )
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>(),
            };
            rows.db()
        })
        .await
    }

    async fn pending_commands(
        &self,
        device_id: &str,
        now_ms: u64,
        all_delivered: bool,
        limit: usize,
    ) -> Result<Vec<CommandRecord>> {
        let limit = check_limit(limit)?;
        let device_id = device_id.to_owned();
        let due = if all_delivered {
            i64::MAX
        } else {
            ts_to_sql("now_ms", now_ms)?
        };
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY commands_by_device_state_seq
                 WHERE device_id = ?1 AND (state = 'queued'
                    OR (state = 'delivered' AND next_attempt_at_ms <= ?2)
                    OR (?4 AND state = 'acknowledged'))
                 ORDER BY seq LIMIT ?3"
            ))
            .db()?
            .query_map(
                params![device_id, due, limit, all_delivered],
                command_from_row,
            )
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn due_commands(&self, now_ms: u64, limit: usize) -> Result<Vec<CommandRecord>> {
        let limit = check_limit(limit)?;
        let now = ts_to_sql("now_ms", now_ms)?;
        self.read(move |conn| {
            let mut out: BTreeMap<i64, CommandRecord> = BTreeMap::new();
            for sql in [
                "FROM commands INDEXED BY commands_by_state_expiry
                 WHERE state = 'queued' AND expires_at_ms <= ?1",
                "FROM commands INDEXED BY commands_by_state_expiry
                 WHERE state = 'delivered' AND expires_at_ms <= ?1",
                "FROM commands INDEXED BY commands_by_state_next_attempt
                 WHERE state = 'delivered' AND next_attempt_at_ms <= ?1",
                // Acknowledged with a result timeout: next_attempt_at_ms is the deadline.
                "FROM commands INDEXED BY commands_by_state_next_attempt
                 WHERE state = 'acknowledged' AND next_attempt_at_ms <= ?1
                   AND result_timeout_ms > 0",
            ] {
                let mut stmt = conn
                    .prepare_cached(&format!("SELECT seq, {COMMAND_COLUMNS} {sql} LIMIT ?2"))
                    .db()?;
                let rows = stmt
                    .query_map(params![now, limit], |row| {
                        let seq: i64 = row.get(0)?;
                        Ok((seq, command_at(row, 1)?))
                    })
                    .db()?;
                for r in rows {
                    let (seq, c) = r.db()?;
                    out.insert(seq, c);
                }
            }
            Ok(out
                .into_values()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .collect())
        })
        .await
    }

    async fn get_command_parent(&self, id: &str) -> Result<Option<CommandParentRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, selector, name, params, created_at_ms, expires_at_ms, total
                 FROM command_parents WHERE id = ?1",
            )
            .db()?
            .query_row(params![id], parent_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn count_children(&self, parent_id: &str) -> Result<BTreeMap<CommandState, u64>> {
        let parent_id = parent_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT state, COUNT(*) FROM commands INDEXED BY commands_by_parent_state
                 WHERE parent_id = ?1 GROUP BY state",
            )
            .db()?
            .query_map(params![parent_id], |row| {
                Ok((state_column(row, 0)?, u64_column(row, 1)?))
            })
            .db()?
            .collect::<rusqlite::Result<BTreeMap<_, _>>>()
            .db()
        })
        .await
    }
}
