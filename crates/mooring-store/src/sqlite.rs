//! Embedded SQLite backend: one writer connection, a small read pool, WAL + `synchronous=FULL`.
//!
//! Every trait method moves its work onto tokio's blocking pool (`spawn_blocking`), so the async
//! runtime never waits on disk. Writes serialise on the single writer connection (SQLite allows
//! one writer anyway; one connection keeps its statement cache hot) and are **group-committed**:
//! writes that queue up while one transaction is being written share the next one (each in its
//! own savepoint, so one failing write rolls back alone), and each caller is answered only once
//! that transaction is durable. A lone write is committed at once, so idle latency is one fsync;
//! under load many callers (command state changes, shadow updates, telemetry batches) share one.
//! Maintenance writes (retention, compaction) are committed alone and only when nothing else
//! waits. Checkpoints are SQLite's own (automatic, at 1,000 WAL pages, inside the commit that
//! crosses it): a checkpoint thread of our own was tried and made one publisher's ingest 15 %
//! slower (its passive checkpoints, racing the writer, kept the WAL from being reset).
//! Reads take one of [`READ_CONNECTIONS`] connections round-robin; WAL lets them run while a
//! write is in progress.
//!
//! Type mapping: times are `INTEGER` unix milliseconds (`u64` values above [`TS_MS_MAX`] are
//! refused); a telemetry `seq` is the device's `u64` bit-cast to `i64` (lossless, so dedupe is
//! exact); numbers are `REAL`, booleans are `0.0`/`1.0` with `is_bool = 1`; tags are a JSON
//! object in a `TEXT` column.
//!
//! This file holds what every store trait shares (connections, migrations, the type mapping and
//! error conversion); each trait's implementation is its own file under `sqlite/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, Row, TransactionBehavior};

use crate::error::{Result, StoreError};
use crate::model::{check_ts, TS_MS_MAX};

mod accounts;
mod artifacts;
mod audit;
mod broker;
mod cas;
mod certs;
mod claims;
mod cluster;
mod commands;
mod devices;
mod fleet;
mod gateways;
mod health;
mod jobs;
mod rollouts;
mod rules;
mod shadows;
mod telemetry;
mod tokens;

/// File name used when [`SqliteStore::open`] is given a directory.
pub const DB_FILE_NAME: &str = "mooring.db";
/// Read connections per store.
pub const READ_CONNECTIONS: usize = 4;
/// Most writes committed in one group transaction.
const GROUP_WRITES_MAX: usize = 256;
/// How long a connection waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Times [`backup_database`] retries a step that found the source locked, and the pause between.
const BACKUP_RETRIES_MAX: u32 = 100;
const BACKUP_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Migration `i` (0-based) brings the schema to version `i + 1` (SQLite `user_version`).
/// Append only: a shipped migration is never edited.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_commands_shadows.sql"),
    include_str!("../migrations/0003_command_result_timeout.sql"),
    include_str!("../migrations/0004_broker_state.sql"),
    include_str!("../migrations/0005_telemetry_series_chunks.sql"),
    include_str!("../migrations/0006_cluster.sql"),
    include_str!("../migrations/0007_accounts.sql"),
    include_str!("../migrations/0008_fleet_samples.sql"),
    include_str!("../migrations/0009_jobs.sql"),
    include_str!("../migrations/0010_device_certs.sql"),
    include_str!("../migrations/0011_claims.sql"),
    include_str!("../migrations/0012_device_activity.sql"),
    include_str!("../migrations/0013_registered_cas.sql"),
    include_str!("../migrations/0014_cert_renewals.sql"),
    include_str!("../migrations/0015_revoked_certs_index.sql"),
    include_str!("../migrations/0016_ota_artifacts.sql"),
    include_str!("../migrations/0017_ota_unsent_updates.sql"),
    include_str!("../migrations/0018_ota_unanswered_updates.sql"),
    include_str!("../migrations/0019_device_health.sql"),
    include_str!("../migrations/0020_rules_alerts.sql"),
    include_str!("../migrations/0021_work_queue.sql"),
    include_str!("../migrations/0022_tickets.sql"),
    include_str!("../migrations/0023_rollouts.sql"),
    include_str!("../migrations/0024_gateways.sql"),
    include_str!("../migrations/0025_local_commands.sql"),
];

/// The embedded SQLite backend. Cheap to share: hold it in an `Arc`.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    /// Writes waiting for the next group transaction (see [`Inner::commit_group`]).
    queued: Mutex<Queues>,
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
        configure(&writer, ConnRole::Writer)?;
        migrate(&mut writer)?;
        let readers = (0..READ_CONNECTIONS)
            .map(|_| {
                let conn = Connection::open(&path).db()?;
                configure(&conn, ConnRole::Reader)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(path = %path.display(), schema_version = schema_version(), "opened sqlite store");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                queued: Mutex::new(Queues::default()),
                readers,
                next_reader: AtomicUsize::new(0),
            }),
        })
    }

    /// The database file in use.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Checkpoints the WAL into the database file and rewrites the file without free pages
    /// (`VACUUM`): what the data takes on disk. Holds the writer for the whole rewrite, so ingest
    /// waits: an offline or benchmark operation, not one the server runs.
    pub async fn vacuum(&self) -> Result<()> {
        self.write_alone(|conn| {
            conn.execute_batch(
                "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .db()
        })
        .await
    }

    /// Runs `f` on the writer connection, on the blocking pool, inside a group transaction
    /// (its own savepoint: an `Err` rolls back what `f` wrote, and only that); answers once the
    /// transaction is committed. `f` must not begin a transaction (`conn.savepoint()` nests).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.queue_write(f, false).await
    }

    /// [`SqliteStore::write`] for maintenance (retention, compaction): committed alone, and only
    /// when no other write is waiting, so what devices and users wait for never waits behind it
    /// for more than the one maintenance transaction already running.
    async fn write_background<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.queue_write(f, true).await
    }

    async fn queue_write<T, F>(&self, f: F, background: bool) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut queues = self.inner.queue()?;
            let queue = if background {
                &mut queues.background
            } else {
                &mut queues.foreground
            };
            queue.push_back(Box::new(Queued { f, tx }));
        }
        // One commit call per queued write, each after its push, each taking at least one write
        // while any waits: the calls together take every write; ours may be taken by an earlier
        // call still running, so wait for our answer.
        let inner = Arc::clone(&self.inner);
        // Not awaited: our write may be answered by an earlier call; this one may run later
        // groups (or panic on them) that are none of our business.
        drop(tokio::task::spawn_blocking(move || inner.commit_group()));
        rx.await
            .map_err(|_| StoreError::Backend("sqlite write abandoned by a panic".into()))?
    }

    /// Runs `f` on the writer connection alone, outside any transaction (`VACUUM`, checkpoints).
    async fn write_alone<T, F>(&self, f: F) -> Result<T>
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

/// Runs a transaction-control statement through the statement cache (the group commit runs
/// four of them per group or write; parsing them each time was measurable on one publisher).
fn control(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql).db()?.execute([]).db().map(|_| ())
}

/// Writes waiting for the writer, oldest first.
#[derive(Default)]
struct Queues {
    foreground: std::collections::VecDeque<Box<dyn GroupWrite>>,
    background: std::collections::VecDeque<Box<dyn GroupWrite>>,
}

/// One write waiting for a group transaction: runs, then learns whether its group committed.
trait GroupWrite: Send {
    /// Runs the write; `Some` (to be called with the commit's outcome) if it succeeded, `None`
    /// if it failed and was answered (the caller rolls back its savepoint).
    fn run(self: Box<Self>, conn: &mut Connection) -> Option<Box<dyn FnOnce(Result<()>) + Send>>;
    /// Answers without running: the group could not start.
    fn fail(self: Box<Self>, e: StoreError);
}

struct Queued<F, T> {
    f: F,
    tx: tokio::sync::oneshot::Sender<Result<T>>,
}

impl<F, T> GroupWrite for Queued<F, T>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &mut Connection) -> Option<Box<dyn FnOnce(Result<()>) + Send>> {
        let Queued { f, tx } = *self;
        match f(conn) {
            Ok(value) => Some(Box::new(move |committed: Result<()>| {
                // The caller may have given up (cancelled); what it wrote is committed anyway.
                let _ = tx.send(committed.map(|()| value));
            })),
            Err(e) => {
                let _ = tx.send(Err(e));
                None
            }
        }
    }

    fn fail(self: Box<Self>, e: StoreError) {
        let _ = self.tx.send(Err(e));
    }
}

impl Inner {
    /// The writer connection, out of any transaction a panic may have left open.
    fn writer(&self) -> Result<MutexGuard<'_, Connection>> {
        let conn = self.writer.lock().map_err(|_| {
            StoreError::Backend("sqlite writer connection poisoned by a panic".into())
        })?;
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").db()?;
        }
        Ok(conn)
    }

    fn queue(&self) -> Result<MutexGuard<'_, Queues>> {
        self.queued
            .lock()
            .map_err(|_| StoreError::Backend("sqlite write queue poisoned by a panic".into()))
    }

    /// Takes up to [`GROUP_WRITES_MAX`] waiting writes, or else one background write (none if
    /// earlier calls took them all), and commits them in one transaction, each in a savepoint;
    /// answers every one.
    fn commit_group(&self) {
        let conn = self.writer();
        let writes: Vec<Box<dyn GroupWrite>> = match self.queue() {
            Ok(mut queues) => {
                let n = queues.foreground.len().min(GROUP_WRITES_MAX);
                if n > 0 {
                    queues.foreground.drain(..n).collect()
                } else {
                    queues.background.pop_front().into_iter().collect()
                }
            }
            Err(_) => return,
        };
        if writes.is_empty() {
            return;
        }
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => return writes.into_iter().for_each(|w| w.fail(e.clone())),
        };
        if let Err(e) = control(&conn, "BEGIN IMMEDIATE") {
            return writes.into_iter().for_each(|w| w.fail(e.clone()));
        }
        let mut done = Vec::with_capacity(writes.len());
        let mut writes = writes.into_iter();
        let mut aborted = None;
        for write in writes.by_ref() {
            if let Err(e) = control(&conn, "SAVEPOINT write") {
                write.fail(e);
                continue;
            }
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write.run(&mut conn)));
            // A panicking write was answered (its sender dropped): rolled back alone.
            // If the savepoint cannot be released or rolled back, what this write did cannot be
            // kept apart from the others: the whole group fails.
            match ran.unwrap_or(None) {
                Some(answer) => match control(&conn, "RELEASE write") {
                    Ok(()) => done.push(answer),
                    Err(e) => {
                        answer(Err(e.clone()));
                        aborted = Some(e);
                        break;
                    }
                },
                None => {
                    if let Err(e) = conn.execute_batch("ROLLBACK TO write; RELEASE write").db() {
                        if !conn.is_autocommit() {
                            aborted = Some(e);
                            break;
                        }
                    }
                }
            }
            // Some errors (disk full, I/O) make SQLite roll the whole transaction back.
            if conn.is_autocommit() {
                aborted = Some(StoreError::Backend(
                    "sqlite rolled back the group transaction after an error".into(),
                ));
                break;
            }
        }
        let committed = match aborted {
            Some(e) => Err(e),
            None => control(&conn, "COMMIT"),
        };
        if let Err(e) = &committed {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            writes.for_each(|w| w.fail(e.clone()));
        }
        for answer in done {
            answer(committed.clone());
        }
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

/// What [`backup_database`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Schema version (`user_version`) of the copy: the one of the database backed up.
    pub schema_version: i64,
    /// Size of the copy in bytes.
    pub bytes: u64,
}

/// Copies the database file `src` into the new file `dest` (created 0600; it must not exist)
/// with SQLite's online backup API, in one step: the copy is the consistent snapshot of one read
/// transaction, taken while a server may be writing to `src` (WAL mode lets the reader and the
/// writer run side by side; committed transactions still in the `-wal` file are included).
///
/// `src` is opened read-only and never migrated, so a server of any version may be running on
/// it. The copy is one self-contained file (rollback journal, no `-wal` to carry along; the next
/// [`SqliteStore::open`] puts it back into WAL mode), checked with `PRAGMA quick_check`.
///
/// Blocking: call it from a CLI, or from `spawn_blocking`.
pub fn backup_database(src: &Path, dest: &Path) -> Result<BackupInfo> {
    use rusqlite::OpenFlags;
    use std::os::unix::fs::OpenOptionsExt;
    if !src.is_file() {
        return Err(StoreError::NotFound(format!("database {}", src.display())));
    }
    let source = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .db()?;
    source.busy_timeout(BUSY_TIMEOUT).db()?;
    // Created here, 0600 and exclusively, before SQLite opens it: SQLite would create it with
    // the umask's mode, and must not write over an existing file.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(StoreError::AlreadyExists(format!("{}", dest.display())));
        }
        Err(e) => return Err(StoreError::Backend(format!("{}: {e}", dest.display()))),
    }
    let mut target = Connection::open(dest).db()?;
    {
        let backup = rusqlite::backup::Backup::new(&source, &mut target).db()?;
        // -1: every page in one step, so one read transaction: a writer committing meanwhile
        // cannot restart the copy (it would with several steps, forever under steady ingest).
        // Busy/Locked (another connection holds a lock the step needs) is retried, boundedly.
        let mut retries = 0;
        while backup.step(-1).db()? != rusqlite::backup::StepResult::Done {
            retries += 1;
            if retries > BACKUP_RETRIES_MAX {
                return Err(StoreError::Unavailable(format!(
                    "{} stayed locked; try again",
                    src.display()
                )));
            }
            std::thread::sleep(BACKUP_RETRY_PAUSE);
        }
    }
    drop(source);
    let _: String = target
        .pragma_update_and_check(None, "journal_mode", "DELETE", |row| row.get(0))
        .db()?;
    let check: String = target
        .pragma_query_value(None, "quick_check", |row| row.get(0))
        .db()?;
    if check != "ok" {
        return Err(StoreError::Backend(format!(
            "the copy in {} failed its integrity check: {check}",
            dest.display()
        )));
    }
    let schema_version = user_version(&target)?;
    target.close().map_err(|(_, e)| store_error(e))?;
    let bytes = std::fs::metadata(dest)
        .map_err(|e| StoreError::Backend(format!("{}: {e}", dest.display())))?
        .len();
    Ok(BackupInfo {
        schema_version,
        bytes,
    })
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
enum ConnRole {
    Writer,
    Reader,
}

fn configure(conn: &Connection, role: ConnRole) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT).db()?;
    conn.pragma_update(None, "foreign_keys", true).db()?;
    // FULL: the WAL is fsynced at every commit, so a committed (acknowledged) batch survives
    // power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL").db()?;
    match role {
        ConnRole::Writer => {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .db()?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(format!(
                    "could not enable WAL journal mode (got {mode:?}); is the file on a network filesystem?"
                )));
            }
        }
        ConnRole::Reader => conn.pragma_update(None, "query_only", true).db()?,
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

/// A device id column, validated as it is read: every id was validated when written, so a
/// row that fails is corrupt and answers an error, never a panic.
fn device_id_column(row: &Row<'_>, index: usize) -> rusqlite::Result<mooring_proto::DeviceId> {
    let s: String = row.get(index)?;
    mooring_proto::DeviceId::parse(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn wait_queued(store: &SqliteStore, n: usize) {
        for _ in 0..2000 {
            if store.inner.queue().expect("queue").foreground.len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{n} writes never queued");
    }

    /// A committed write must not be answered `Err` because the `commit_group` call that its own
    /// `queue_write` spawned ran (and panicked on) a later, unrelated group.
    #[test]
    fn a_committed_write_is_answered_ok_even_if_a_later_group_panics() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Arc::new(SqliteStore::open(dir.path()).expect("open"));
            store
                .write(|conn| conn.execute_batch("CREATE TABLE t (x INTEGER)").db())
                .await
                .expect("create");
            // Hold the only blocking thread so X and A are both queued before X's call runs.
            let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || {
                let _ = release_rx.recv();
            });
            let (running_tx, running_rx) = tokio::sync::oneshot::channel::<()>();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let s = Arc::clone(&store);
            let x = tokio::spawn(async move {
                s.write(move |conn| {
                    let _ = running_tx.send(());
                    let _ = go_rx.recv();
                    conn.execute("INSERT INTO t VALUES (0)", []).db()
                })
                .await
            });
            wait_queued(&store, 1).await;
            let s = Arc::clone(&store);
            let a = tokio::spawn(async move {
                s.write(|conn| conn.execute("INSERT INTO t VALUES (1)", []).db())
                    .await
            });
            wait_queued(&store, 2).await;
            release_tx.send(()).expect("release");
            blocker.await.expect("blocker");
            running_rx.await.expect("X running"); // X's call took [X, A]
            let s = Arc::clone(&store);
            let p = tokio::spawn(async move {
                s.write(|_conn| -> Result<()> { panic!("a bug in some write closure") })
                    .await
            });
            wait_queued(&store, 1).await; // P queued; A's own call will take it
            go_tx.send(()).expect("go");
            assert!(x.await.expect("x").is_ok());
            let a_result = a.await.expect("a");
            let _ = p.await;
            let committed: i64 = store
                .read(|conn| {
                    conn.query_row("SELECT count(*) FROM t WHERE x = 1", [], |r| r.get(0))
                        .db()
                })
                .await
                .expect("read");
            assert_eq!(committed, 1, "A is committed");
            assert!(
                a_result.is_ok(),
                "A is committed but was answered {a_result:?}"
            );
        });
    }

    /// One panicking write closure must not make every later write fail until restart
    /// (`Inner::writer` even has the ROLLBACK for this case, but never reaches it).
    #[tokio::test]
    async fn a_panicking_write_fails_alone_and_later_writes_still_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let r = store
            .write(|_conn| -> Result<()> { panic!("a bug in some write closure") })
            .await;
        assert!(r.is_err());
        store
            .write(|conn| conn.execute_batch("CREATE TABLE t (x INTEGER)").db())
            .await
            .expect("a later, unrelated write");
    }

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

    /// SQLite's plan for `sql`, its steps joined by `; ` (what an index test looks for).
    pub(crate) fn query_plan(conn: &rusqlite::Connection, sql: &str) -> String {
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("prepare");
        let rows = stmt
            .query_map([], |row| row.get::<_, String>(3))
            .expect("plan");
        rows.map(|r| r.expect("row")).collect::<Vec<_>>().join("; ")
    }

    #[test]
    fn queries_use_the_intended_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let conn = store.inner.reader().expect("reader");
        let plan = |sql: &str| query_plan(&conn, sql);
        let retention = plan("SELECT id FROM telemetry_points WHERE ts_ms < 5 LIMIT 10");
        assert!(retention.contains("telemetry_points_by_ts"), "{retention}");
        let chunks = plan("SELECT id FROM telemetry_chunks WHERE ts_min_ms < 5 LIMIT 10");
        assert!(chunks.contains("telemetry_chunks_by_ts_min"), "{chunks}");
        let one_series = plan(
            "SELECT ts_ms FROM telemetry_points INDEXED BY telemetry_points_by_series_ts
             WHERE series_id = 1 AND ts_ms BETWEEN 1 AND 2 ORDER BY ts_ms, id LIMIT 5",
        );
        assert!(!one_series.contains("TEMP B-TREE"), "{one_series}");
        let chunk_range = plan(
            "SELECT data FROM telemetry_chunks
             WHERE series_id = 1 AND window_start_ms > 0 AND window_start_ms <= 9
             ORDER BY window_start_ms",
        );
        assert!(!chunk_range.contains("TEMP B-TREE"), "{chunk_range}");
        let series = plan("SELECT id FROM telemetry_series WHERE device_id = 'd' AND metric = 'm'");
        assert!(series.contains("INDEX"), "{series}");
    }
}
