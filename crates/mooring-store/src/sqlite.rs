//! Embedded SQLite backend: one writer connection, a small read pool, WAL + `synchronous=FULL`.
//!
//! Every trait method moves its work onto tokio's blocking pool (`spawn_blocking`), so the async
//! runtime never waits on disk. Writes serialise on the single writer connection (SQLite allows
//! one writer anyway; one connection keeps its statement cache hot). Reads take one of
//! [`READ_CONNECTIONS`] connections round-robin; WAL lets them run while a write is in progress.
//!
//! Type mapping: times are `INTEGER` unix milliseconds (`u64` values above [`TS_MS_MAX`] are
//! refused); a telemetry `seq` is the device's `u64` bit-cast to `i64` (lossless, so dedupe is
//! exact); numbers are `REAL`, booleans are `0.0`/`1.0` with `is_bool = 1`; tags are a JSON
//! object in a `TEXT` column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::{Result, StoreError};
use crate::model::{
    check_ts, AppendOutcome, DeviceRecord, MetricValue, NewDevice, Point, TelemetryQuery,
    TelemetryRecord, TokenRecord, TokenRole, TS_MS_MAX,
};
use crate::store::{DeviceStore, TelemetryStore, TokenStore};

mod broker;
mod commands;
mod shadows;

/// File name used when [`SqliteStore::open`] is given a directory.
pub const DB_FILE_NAME: &str = "mooring.db";
/// Read connections per store.
pub const READ_CONNECTIONS: usize = 4;
/// How long a connection waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows deleted per transaction when a device's telemetry is removed.
const DELETE_CHUNK_ROWS: i64 = 10_000;

/// Migration `i` (0-based) brings the schema to version `i + 1` (SQLite `user_version`).
/// Append only: a shipped migration is never edited.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_commands_shadows.sql"),
    include_str!("../migrations/0003_command_result_timeout.sql"),
    include_str!("../migrations/0004_broker_state.sql"),
];

const DEVICE_COLUMNS: &str =
    "id, tags, created_at_ms, cert_sha256, cert_serial, cert_not_after_ms, last_seen_ms";
const TOKEN_COLUMNS: &str = "id, name, role, token_sha256, created_at_ms";

/// The embedded SQLite backend. Cheap to share: hold it in an `Arc`.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies pending migrations.
    ///
    /// `data_dir_or_file`: an existing directory, or a path without extension (created as a
    /// directory), holds [`DB_FILE_NAME`]; an existing file, or a path with an extension
    /// (`data/mooring.sqlite`), is the database file itself.
    ///
    /// Blocking: call it at startup, or from `spawn_blocking`.
    pub fn open(data_dir_or_file: &Path) -> Result<Self> {
        let path = resolve_db_path(data_dir_or_file)?;
        let mut writer = Connection::open(&path).db()?;
        configure(&writer, Role::Writer)?;
        migrate(&mut writer)?;
        let readers = (0..READ_CONNECTIONS)
            .map(|_| {
                let conn = Connection::open(&path).db()?;
                configure(&conn, Role::Reader)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(path = %path.display(), schema_version = schema_version(), "opened sqlite store");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    /// The database file in use.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the writer connection, on the blocking pool.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || f(&mut *inner.writer()?)).await
    }

    /// Runs `f` on one of the read connections, on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || f(&*inner.reader()?)).await
    }
}

impl Inner {
    fn writer(&self) -> Result<MutexGuard<'_, Connection>> {
        self.writer
            .lock()
            .map_err(|_| StoreError::Backend("sqlite writer connection poisoned by a panic".into()))
    }

    fn reader(&self) -> Result<MutexGuard<'_, Connection>> {
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[index]
            .lock()
            .map_err(|_| StoreError::Backend("sqlite read connection poisoned by a panic".into()))
    }
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite worker failed: {e}")))?
}

/// Schema version this build migrates to.
pub fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

fn resolve_db_path(p: &Path) -> Result<PathBuf> {
    let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", p.display()));
    if p.is_dir() {
        return Ok(p.join(DB_FILE_NAME));
    }
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if p.extension().is_some() {
        if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        return Ok(p.to_path_buf());
    }
    std::fs::create_dir_all(p).map_err(io)?;
    Ok(p.join(DB_FILE_NAME))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Writer,
    Reader,
}

fn configure(conn: &Connection, role: Role) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT).db()?;
    conn.pragma_update(None, "foreign_keys", true).db()?;
    // FULL: the WAL is fsynced at every commit, so a committed (acknowledged) batch survives
    // power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL").db()?;
    match role {
        Role::Writer => {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .db()?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(format!(
                    "could not enable WAL journal mode (got {mode:?}); is the file on a network filesystem?"
                )));
            }
        }
        Role::Reader => conn.pragma_update(None, "query_only", true).db()?,
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let supported = schema_version();
    let found = user_version(conn)?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = i64::try_from(index + 1).unwrap_or(i64::MAX);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db()?;
        // Re-read under the write lock: another process may have migrated meanwhile.
        if user_version(&tx)? >= version {
            continue;
        }
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Backend(format!("migration {version} failed: {e}")))?;
        tx.pragma_update(None, "user_version", version).db()?;
        tx.commit().db()?;
        tracing::info!(version, "applied sqlite migration");
    }
    Ok(())
}

fn user_version(conn: &Connection) -> Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
        .db()
}

/// Maps rusqlite errors into [`StoreError::Backend`] without a public `From` impl (which would
/// make rusqlite part of this crate's API).
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(store_error)
    }
}

/// A rusqlite error as a [`StoreError`]: conditions that pass (disk full, I/O errors, a busy or
/// locked database, a read-only file) are [`StoreError::Unavailable`], the rest `Backend`.
pub(crate) fn store_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(
            C::DiskFull
            | C::SystemIoFailure
            | C::DatabaseBusy
            | C::DatabaseLocked
            | C::ReadOnly
            | C::CannotOpen
            | C::OutOfMemory,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

fn is_constraint_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
}

/// A caller-supplied time as stored; refuses values above [`TS_MS_MAX`].
fn ts_to_sql(what: &str, ts_ms: u64) -> Result<i64> {
    check_ts(what, ts_ms)?;
    Ok(i64::try_from(ts_ms).unwrap_or(i64::MAX))
}

/// A query bound: anything above the storable range means "no bound".
fn bound_to_sql(ts_ms: u64) -> i64 {
    i64::try_from(ts_ms.min(TS_MS_MAX)).unwrap_or(i64::MAX)
}

fn count_to_sql(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Lossless bijection u64 -> i64, so every device `seq` dedupes exactly.
fn seq_to_sql(seq: u64) -> i64 {
    i64::from_ne_bytes(seq.to_ne_bytes())
}

fn u64_column(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(index)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, v))
}

fn encode_value(value: MetricValue) -> (f64, i64) {
    match value {
        MetricValue::Number(n) => (n, 0),
        MetricValue::Bool(b) => (if b { 1.0 } else { 0.0 }, 1),
    }
}

fn value_columns(row: &Row<'_>, value_index: usize) -> rusqlite::Result<MetricValue> {
    let value: f64 = row.get(value_index)?;
    let is_bool: i64 = row.get(value_index + 1)?;
    Ok(if is_bool != 0 {
        MetricValue::Bool(value != 0.0)
    } else {
        MetricValue::Number(value)
    })
}

fn tags_to_sql(tags: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(tags).map_err(|e| StoreError::InvalidInput(format!("tags: {e}")))
}

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let tags: String = row.get(1)?;
    let tags = serde_json::from_str(&tags)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, Type::Text, Box::new(e)))?;
    Ok(DeviceRecord {
        id: row.get(0)?,
        tags,
        created_at_ms: u64_column(row, 2)?,
        cert_sha256: row.get(3)?,
        cert_serial: row.get(4)?,
        cert_not_after_ms: u64_column(row, 5)?,
        last_seen_ms: match row.get::<_, Option<i64>>(6)? {
            None => None,
            Some(_) => Some(u64_column(row, 6)?),
        },
    })
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = row.get(2)?;
    let role = role
        .parse::<TokenRole>()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, Type::Text, Box::new(e)))?;
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        role,
        token_sha256: row.get(3)?,
        created_at_ms: u64_column(row, 4)?,
    })
}

#[async_trait::async_trait]
impl DeviceStore for SqliteStore {
    async fn create_device(&self, d: NewDevice) -> Result<DeviceRecord> {
        d.validate()?;
        let record = d.into_record();
        let tags = tags_to_sql(&record.tags)?;
        let created_at_ms = ts_to_sql("created_at_ms", record.created_at_ms)?;
        let not_after_ms = ts_to_sql("cert_not_after_ms", record.cert_not_after_ms)?;
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO devices (id, tags, created_at_ms, cert_sha256, cert_serial, cert_not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![record.id, tags, created_at_ms, record.cert_sha256, record.cert_serial, not_after_ms],
            );
            match inserted {
                Ok(_) => Ok(record),
                Err(e) if is_constraint_violation(&e) => {
                    Err(StoreError::AlreadyExists(format!("device {}", record.id)))
                }
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        let id = id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
            ))
            .db()?
            .query_row(params![id], device_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn find_device_by_cert(&self, cert_sha256: &str) -> Result<Option<DeviceRecord>> {
        let cert_sha256 = cert_sha256.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE cert_sha256 = ?1 ORDER BY id LIMIT 1"
            ))
            .db()?
            .query_row(params![cert_sha256], device_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_devices(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<DeviceRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Every id sorts after "" (ids are never empty), so "" means "from the start".
        let after_id = after_id.unwrap_or("").to_owned();
        let limit = count_to_sql(limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .db()?;
            let rows = stmt
                .query_map(params![after_id, limit], device_from_row)
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn delete_device(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let existed = {
                let mut conn = inner.writer()?;
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .db()?;
                let deleted = tx
                    .execute("DELETE FROM devices WHERE id = ?1", params![id])
                    .db()?;
                tx.execute(
                    "DELETE FROM telemetry_latest WHERE device_id = ?1",
                    params![id],
                )
                .db()?;
                tx.commit().db()?;
                deleted > 0
            };
            // Telemetry (and dedupe keys) go in bounded chunks, each its own transaction, with
            // the writer lock released in between so ingest batches interleave.
            for sql in [
                "DELETE FROM telemetry WHERE id IN
                   (SELECT id FROM telemetry WHERE device_id = ?1 LIMIT ?2)",
                "DELETE FROM telemetry_seq WHERE device_id = ?1 AND seq IN
                   (SELECT seq FROM telemetry_seq WHERE device_id = ?1 LIMIT ?2)",
            ] {
                loop {
                    let deleted = inner
                        .writer()?
                        .prepare_cached(sql)
                        .db()?
                        .execute(params![id, DELETE_CHUNK_ROWS])
                        .db()?;
                    if count_to_sql(deleted) < DELETE_CHUNK_ROWS {
                        break;
                    }
                }
            }
            Ok(existed)
        })
        .await
    }

    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<()> {
        let id = id.to_owned();
        let tags = tags_to_sql(&tags)?;
        self.write(move |conn| {
            let updated = conn
                .execute(
                    "UPDATE devices SET tags = ?2 WHERE id = ?1",
                    params![id, tags],
                )
                .db()?;
            if updated == 0 {
                return Err(StoreError::NotFound(format!("device {id}")));
            }
            Ok(())
        })
        .await
    }

    async fn record_last_seen(&self, seen: &[(String, u64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let seen = seen
            .iter()
            .map(|(id, ts)| Ok((id.clone(), ts_to_sql("last_seen_ms", *ts)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE devices SET last_seen_ms = ?2
                         WHERE id = ?1 AND (last_seen_ms IS NULL OR last_seen_ms < ?2)",
                    )
                    .db()?;
                for (id, ts) in &seen {
                    stmt.execute(params![id, ts]).db()?;
                }
            }
            tx.commit().db()
        })
        .await
    }
}

#[async_trait::async_trait]
impl TokenStore for SqliteStore {
    async fn create_token(&self, t: TokenRecord) -> Result<()> {
        let created_at_ms = ts_to_sql("created_at_ms", t.created_at_ms)?;
        self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO tokens (id, name, role, token_sha256, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![t.id, t.name, t.role.as_str(), t.token_sha256, created_at_ms],
            );
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if is_constraint_violation(&e) => Err(StoreError::AlreadyExists(format!(
                    "token {} (or its secret)",
                    t.id
                ))),
                Err(e) => Err(store_error(e)),
            }
        })
        .await
    }

    async fn find_token(&self, token_sha256: &str) -> Result<Option<TokenRecord>> {
        let token_sha256 = token_sha256.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_sha256 = ?1"
            ))
            .db()?
            .query_row(params![token_sha256], token_from_row)
            .optional()
            .db()
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id"))
                .db()?;
            let rows = stmt.query_map([], token_from_row).db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }

    async fn delete_token(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |conn| {
            let deleted = conn
                .execute("DELETE FROM tokens WHERE id = ?1", params![id])
                .db()?;
            Ok(deleted > 0)
        })
        .await
    }
}

#[async_trait::async_trait]
impl TelemetryStore for SqliteStore {
    async fn append_batch(&self, batch: Vec<TelemetryRecord>) -> Result<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for record in &batch {
            record.validate()?;
        }
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let mut outcomes = Vec::with_capacity(batch.len());
            {
                let mut insert_seq = tx
                    .prepare_cached(
                        "INSERT INTO telemetry_seq (device_id, seq, ts_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT DO NOTHING",
                    )
                    .db()?;
                let mut insert_point = tx
                    .prepare_cached(
                        "INSERT INTO telemetry (device_id, metric, ts_ms, value, is_bool)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .db()?;
                let mut upsert_latest = tx
                    .prepare_cached(
                        "INSERT INTO telemetry_latest (device_id, metric, ts_ms, value, is_bool)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (device_id, metric) DO UPDATE
                           SET ts_ms = excluded.ts_ms, value = excluded.value, is_bool = excluded.is_bool
                           WHERE excluded.ts_ms >= telemetry_latest.ts_ms",
                    )
                    .db()?;
                for record in &batch {
                    let ts_ms = ts_to_sql("ts_ms", record.ts_ms)?;
                    if let Some(seq) = record.seq {
                        let fresh = insert_seq
                            .execute(params![record.device_id, seq_to_sql(seq), ts_ms])
                            .db()?;
                        if fresh == 0 {
                            outcomes.push(AppendOutcome::Duplicate);
                            continue;
                        }
                    }
                    for (metric, value) in &record.points {
                        let (value, is_bool) = encode_value(*value);
                        let row = params![record.device_id, metric, ts_ms, value, is_bool];
                        insert_point.execute(row).db()?;
                        upsert_latest.execute(row).db()?;
                    }
                    outcomes.push(AppendOutcome::Stored);
                }
            }
            tx.commit().db()?;
            debug_assert_eq!(outcomes.len(), batch.len());
            Ok(outcomes)
        })
        .await
    }

    async fn query(&self, q: TelemetryQuery) -> Result<Vec<Point>> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let from_ms = bound_to_sql(q.from_ms.unwrap_or(0));
        // [from, to) as an inclusive range; `to_ms: Some(0)` selects nothing.
        let to_ms_inclusive = match q.to_ms {
            None => i64::MAX,
            Some(0) => return Ok(Vec::new()),
            Some(to) => bound_to_sql(to - 1),
        };
        let limit = count_to_sql(q.limit);
        self.read(move |conn| {
            let to_point = |row: &Row<'_>| {
                Ok(Point {
                    metric: row.get(0)?,
                    ts_ms: u64_column(row, 1)?,
                    value: value_columns(row, 2)?,
                })
            };
            let points = match &q.metric {
                Some(metric) => conn
                    .prepare_cached(
                        "SELECT metric, ts_ms, value, is_bool FROM telemetry
                         INDEXED BY telemetry_by_device_metric_ts
                         WHERE device_id = ?1 AND metric = ?2 AND ts_ms BETWEEN ?3 AND ?4
                         ORDER BY ts_ms, id LIMIT ?5",
                    )
                    .db()?
                    .query_map(
                        params![q.device_id, metric, from_ms, to_ms_inclusive, limit],
                        to_point,
                    )
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>(),
                None => conn
                    .prepare_cached(
                        "SELECT metric, ts_ms, value, is_bool FROM telemetry
                         INDEXED BY telemetry_by_device_ts
                         WHERE device_id = ?1 AND ts_ms BETWEEN ?2 AND ?3
                         ORDER BY ts_ms, id LIMIT ?4",
                    )
                    .db()?
                    .query_map(
                        params![q.device_id, from_ms, to_ms_inclusive, limit],
                        to_point,
                    )
                    .db()?
                    .collect::<rusqlite::Result<Vec<_>>>(),
            };
            points.db()
        })
        .await
    }

    async fn latest(&self, device_id: &str) -> Result<BTreeMap<String, (u64, MetricValue)>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT metric, ts_ms, value, is_bool FROM telemetry_latest WHERE device_id = ?1",
                )
                .db()?;
            let rows = stmt
                .query_map(params![device_id], |row| {
                    Ok((row.get::<_, String>(0)?, (u64_column(row, 1)?, value_columns(row, 2)?)))
                })
                .db()?;
            rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().db()
        })
        .await
    }

    async fn delete_older_than(&self, cutoff_ms: u64, max_rows: usize) -> Result<usize> {
        if max_rows == 0 {
            return Ok(0);
        }
        let cutoff_ms = bound_to_sql(cutoff_ms);
        let max_rows = count_to_sql(max_rows);
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let points = tx
                .prepare_cached(
                    "DELETE FROM telemetry WHERE id IN
                       (SELECT id FROM telemetry WHERE ts_ms < ?1 LIMIT ?2)",
                )
                .db()?
                .execute(params![cutoff_ms, max_rows])
                .db()?;
            // Dedupe keys share the budget, after the points.
            let budget = max_rows - count_to_sql(points);
            let keys = if budget > 0 {
                tx.prepare_cached(
                    "DELETE FROM telemetry_seq WHERE (device_id, seq) IN
                       (SELECT device_id, seq FROM telemetry_seq WHERE ts_ms < ?1 LIMIT ?2)",
                )
                .db()?
                .execute(params![cutoff_ms, budget])
                .db()?
            } else {
                0
            };
            tx.commit().db()?;
            Ok(points + keys)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_mapping_is_lossless_at_the_edges() {
        assert_eq!(seq_to_sql(0), 0);
        assert_eq!(seq_to_sql(u64::MAX), -1);
        assert_ne!(seq_to_sql(u64::MAX), seq_to_sql(i64::MAX as u64));
    }

    #[test]
    fn data_dir_or_file_resolution() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            resolve_db_path(dir.path()).expect("dir"),
            dir.path().join(DB_FILE_NAME)
        );
        let fresh_dir = dir.path().join("data");
        assert_eq!(
            resolve_db_path(&fresh_dir).expect("fresh dir"),
            fresh_dir.join(DB_FILE_NAME)
        );
        assert!(fresh_dir.is_dir());
        let file = dir.path().join("sub/custom.sqlite");
        assert_eq!(resolve_db_path(&file).expect("file"), file);
    }

    #[test]
    fn connections_are_durable_wal_with_foreign_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let pragma = |conn: &Connection, name: &str| -> String {
            conn.pragma_query_value(None, name, |row| row.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .expect("pragma")
        };
        let writer = store.inner.writer().expect("writer");
        assert_eq!(pragma(&writer, "journal_mode"), "Text(\"wal\")");
        assert_eq!(pragma(&writer, "synchronous"), "Integer(2)", "FULL");
        assert_eq!(pragma(&writer, "foreign_keys"), "Integer(1)");
        assert_eq!(pragma(&writer, "busy_timeout"), "Integer(5000)");
        assert_eq!(
            pragma(&writer, "user_version"),
            format!("Integer({})", schema_version())
        );
        drop(writer);
        let reader = store.inner.reader().expect("reader");
        assert_eq!(pragma(&reader, "query_only"), "Integer(1)");
        assert_eq!(pragma(&reader, "journal_mode"), "Text(\"wal\")");
    }

    #[test]
    fn queries_use_the_intended_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let conn = store.inner.reader().expect("reader");
        let plan = |sql: &str| -> String {
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("prepare");
            let rows = stmt
                .query_map([], |row| row.get::<_, String>(3))
                .expect("plan");
            rows.map(|r| r.expect("row")).collect::<Vec<_>>().join("; ")
        };
        let retention = plan("SELECT id FROM telemetry WHERE ts_ms < 5 LIMIT 10");
        assert!(retention.contains("telemetry_by_ts"), "{retention}");
        let all_metrics = plan(
            "SELECT metric FROM telemetry INDEXED BY telemetry_by_device_ts
             WHERE device_id = 'd' AND ts_ms BETWEEN 1 AND 2 ORDER BY ts_ms, id LIMIT 5",
        );
        assert!(!all_metrics.contains("TEMP B-TREE"), "{all_metrics}");
        let one_metric = plan(
            "SELECT metric FROM telemetry INDEXED BY telemetry_by_device_metric_ts
             WHERE device_id = 'd' AND metric = 'm' AND ts_ms BETWEEN 1 AND 2 ORDER BY ts_ms, id LIMIT 5",
        );
        assert!(!one_metric.contains("TEMP B-TREE"), "{one_metric}");
    }
}
