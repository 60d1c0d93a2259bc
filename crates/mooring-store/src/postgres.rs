//! The PostgreSQL backend, [`PgStore`] (feature `postgres`): a pool of `tokio-postgres`
//! connections, numbered migrations under an advisory lock, and the type mapping.
//!
//! It is a full [`Store`](crate::Store), one file per trait as in `sqlite/`: `devices.rs`,
//! `tokens.rs`, `telemetry.rs` (points partitioned by UTC day, retention by dropping partitions:
//! see that module), `commands.rs`, `shadows.rs`, `broker.rs`, `cluster.rs`, `accounts.rs`
//! (users, login sessions, login-failure counters), `audit.rs`. The semantics are the SQLite
//! backend's, checked by the same conformance suite (`tests/postgres.rs`): ids in byte order
//! (`COLLATE "C"`), keyset pagination, the same [`StoreError`] kinds, ties ordered the same way;
//! tags are JSONB, other JSON documents `json` (the text as written, key order included), times
//! BIGINT unix milliseconds; metric names and broker topics and keys are BYTEA (their UTF-8, so
//! U+0000, which PostgreSQL text refuses, is stored as SQLite stores it), broker values BYTEA. The
//! server does not select it yet (that wiring is a separate step).
//!
//! Every call takes a pooled connection for its duration; a write is one transaction (a
//! telemetry or broker batch too: a few bulk `unnest` statements, not one per row), answered
//! once committed. Several servers may share one database: what must not interleave across
//! them is serialised by the database (unique keys, compare-and-set updates, per-device
//! advisory locks for telemetry batches), never by a lock in this process. Durability is
//! PostgreSQL's: with `synchronous_commit` on (the default) a committed batch is on disk before
//! it is acknowledged.
//!
//! Errors: a lost connection, a server shutting down or out of resources, a serialization
//! failure or deadlock, a lock not granted in time, a read-only server are
//! [`StoreError::Unavailable`]; data the database refuses (class 22) `InvalidInput`; a stored
//! value this build cannot read (a negative time, an unknown state) `Backend`, never a panic.
//!
//! Migrations (`migrations/postgres/NNNN_*.sql`, append only) are embedded in the binary and
//! applied at [`PgStore::connect`], each in its own transaction that first takes a transaction
//! advisory lock, so several servers starting together against one database migrate it once.
//! Applied versions are rows of `schema_migrations`.

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

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::error::{Result, StoreError};
use crate::model::{check_ts, TS_MS_MAX};

/// Every schema migration, in order; migration `n` (1-based) is `MIGRATIONS[n - 1]`.
/// Append only: a shipped migration is never edited.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_devices_tokens.sql"),
    include_str!("../migrations/postgres/0002_telemetry_commands_shadows_broker.sql"),
    include_str!("../migrations/postgres/0003_cluster.sql"),
    include_str!("../migrations/postgres/0004_accounts.sql"),
    include_str!("../migrations/postgres/0005_fleet_samples.sql"),
    include_str!("../migrations/postgres/0006_jobs.sql"),
    include_str!("../migrations/postgres/0007_device_certs.sql"),
    include_str!("../migrations/postgres/0008_claims.sql"),
    include_str!("../migrations/postgres/0009_device_activity.sql"),
    include_str!("../migrations/postgres/0010_registered_cas.sql"),
    include_str!("../migrations/postgres/0011_cert_renewals.sql"),
    include_str!("../migrations/postgres/0012_revoked_certs_index.sql"),
    include_str!("../migrations/postgres/0013_ota_artifacts.sql"),
    include_str!("../migrations/postgres/0014_ota_unsent_updates.sql"),
    include_str!("../migrations/postgres/0015_ota_unanswered_updates.sql"),
    include_str!("../migrations/postgres/0016_device_health.sql"),
    include_str!("../migrations/postgres/0017_rules_alerts.sql"),
    include_str!("../migrations/postgres/0018_work_queue.sql"),
    include_str!("../migrations/postgres/0019_tickets.sql"),
    include_str!("../migrations/postgres/0020_rollouts.sql"),
    include_str!("../migrations/postgres/0021_gateways.sql"),
    include_str!("../migrations/postgres/0022_local_commands.sql"),
];

/// Key of the transaction advisory lock every migration transaction takes first ("mooring" in
/// ASCII, then 1): two processes starting together migrate one after the other.
const MIGRATION_LOCK_KEY: i64 = 0x6d6f_6f72_696e_6701;

/// Most connections one store keeps open, unless [`PgStore::connect_sized`] says otherwise.
pub const POOL_SIZE_MAX: usize = 16;
/// How long opening one connection may take (unless the URL sets `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a free connection before the call is `Unavailable`.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Schema version this build migrates to.
pub fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// A store on a PostgreSQL database. Cheap to share behind an `Arc`; every call takes a pooled
/// connection for its duration.
pub struct PgStore {
    pool: Pool,
    /// Which telemetry day partitions exist (`postgres/telemetry.rs`).
    partitions: std::sync::Mutex<telemetry::PartitionCache>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, any libpq-style URL or key=value
    /// string) and applies pending migrations. `Unavailable` if the server cannot be reached,
    /// `SchemaTooNew` if a newer Mooring migrated the database.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_sized(url, POOL_SIZE_MAX).await
    }

    /// [`PgStore::connect`] keeping at most `pool_size` connections open (at least 1): several
    /// servers share the database's `max_connections`.
    pub async fn connect_sized(url: &str, pool_size: usize) -> Result<Self> {
        let config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| StoreError::InvalidInput(format!("postgres url: {e}")))?;
        Self::connect_with_pool(config, pool_size).await
    }

    /// [`PgStore::connect`] with a parsed configuration.
    pub async fn connect_with(config: tokio_postgres::Config) -> Result<Self> {
        Self::connect_with_pool(config, POOL_SIZE_MAX).await
    }

    async fn connect_with_pool(
        mut config: tokio_postgres::Config,
        pool_size: usize,
    ) -> Result<Self> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))?;
        let store = PgStore {
            pool,
            partitions: std::sync::Mutex::default(),
        };
        let mut client = store.client().await?;
        migrate(&mut client).await?;
        Ok(store)
    }

    /// A pooled connection.
    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// `sql` (a cached statement on a pooled connection) with `params`: every row.
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query(&stmt, params).await.map_err(pg_error)
    }

    /// Like [`PgStore::query`], for at most one row.
    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        client.query_opt(&stmt, params).await.map_err(pg_error)
    }

    /// Like [`PgStore::query`], for a statement without rows: how many rows it changed. A
    /// unique violation is `AlreadyExists(taken())`.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        taken: impl FnOnce() -> String,
    ) -> Result<u64> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_error)?;
        match client.execute(&stmt, params).await {
            Ok(n) => Ok(n),
            Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists(taken())),
            Err(e) => Err(pg_error(e)),
        }
    }
}

/// Applies pending migrations, one transaction each, every one under the advisory lock and
/// re-reading the applied version once it holds it (another process may have migrated).
async fn migrate(client: &mut Object) -> Result<()> {
    let supported = schema_version();
    loop {
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(pg_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version       BIGINT NOT NULL PRIMARY KEY,
                 applied_at_ms BIGINT NOT NULL
             )",
        )
        .await
        .map_err(pg_error)?;
        let found: i64 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_error)?
            .try_get(0)
            .map_err(pg_error)?;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        let version = found + 1;
        let Some(sql) = usize::try_from(found)
            .ok()
            .and_then(|applied| MIGRATIONS.get(applied))
        else {
            tx.commit().await.map_err(pg_error)?;
            return Ok(());
        };
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Backend(format!("migration {version} failed: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms)
             VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT)",
            &[&version],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(version, "applied postgres migration");
    }
}

/// A pool error as a [`StoreError`]: no connection to be had (timeout, closed pool) is
/// `Unavailable`; a connection that failed to open is mapped like any client error.
fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(format!("postgres pool: {other}")),
    }
}

/// A client error as a [`StoreError`]: conditions that pass (lost connection, server shutting
/// down or out of resources, serialization failure, deadlock, a lock not granted within
/// `lock_timeout`, read-only) are `Unavailable`;
/// data the database refuses (class 22: e.g. a NUL character in a text) is `InvalidInput`; the
/// rest `Backend`. Unique violations are mapped by the caller, which knows what is taken.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let message = db.to_string();
        let passing = ["08", "53", "57P", "58"]
            .iter()
            .any(|class| code.starts_with(class))
            || [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::READ_ONLY_SQL_TRANSACTION,
                SqlState::LOCK_NOT_AVAILABLE,
            ]
            .contains(db.code());
        return if passing {
            StoreError::Unavailable(message)
        } else if code.starts_with("22") {
            StoreError::InvalidInput(message)
        } else {
            StoreError::Backend(format!("{message} (SQLSTATE {code})"))
        };
    }
    let source = std::error::Error::source(&e);
    let io = source.is_some_and(|s| s.is::<std::io::Error>());
    let message = match source {
        Some(s) => format!("postgres: {e}: {s}"),
        None => format!("postgres: {e}"),
    };
    if e.is_closed() || io {
        StoreError::Unavailable(message)
    } else {
        StoreError::Backend(message)
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn is_foreign_key_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
}

/// A caller-supplied time as stored; refuses values above [`crate::TS_MS_MAX`].
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

/// Lossless bijection u64 -> i64 (a telemetry `seq` as stored), so every `seq` dedupes exactly.
fn seq_to_sql(seq: u64) -> i64 {
    i64::from_ne_bytes(seq.to_ne_bytes())
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, index: usize) -> Result<T> {
    row.try_get(index).map_err(pg_error)
}

/// A BIGINT time column; a negative value is corrupt and answers an error, never a panic.
fn u64_column(row: &Row, index: usize) -> Result<u64> {
    let v: i64 = column(row, index)?;
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("column {index}: negative value {v}")))
}

/// A keyset cursor PostgreSQL text can hold: `after` cut at its first U+0000. No stored key
/// holds U+0000, so the keys after `p\0...` (byte order) are exactly the keys after `p`.
fn nul_free_cursor(after: &str) -> &str {
    after.split('\0').next().unwrap_or("")
}

/// A nullable BIGINT time column.
fn opt_u64_column(row: &Row, index: usize) -> Result<Option<u64>> {
    match column::<Option<i64>>(row, index)? {
        None => Ok(None),
        Some(_) => u64_column(row, index).map(Some),
    }
}

/// A caller-supplied optional time as stored.
fn opt_ts_to_sql(what: &str, ts_ms: Option<u64>) -> Result<Option<i64>> {
    ts_ms.map(|t| ts_to_sql(what, t)).transpose()
}

/// A role column; an unknown name is corrupt.
fn role_column(row: &Row, index: usize) -> Result<crate::model::Role> {
    let role: &str = column(row, index)?;
    role.parse()
        .map_err(|e| StoreError::Backend(format!("stored role: {e}")))
}

/// A BIGINT count column that must fit a `u32`; anything else is corrupt.
fn u32_column(row: &Row, index: usize) -> Result<u32> {
    let v: i64 = column(row, index)?;
    u32::try_from(v)
        .map_err(|_| StoreError::Backend(format!("column {index}: value {v} out of range")))
}

/// A device id column, validated as it is read (every id was validated when written, so a row
/// that fails is corrupt).
fn device_id_column(row: &Row, index: usize) -> Result<mooring_proto::DeviceId> {
    let s: &str = column(row, index)?;
    mooring_proto::DeviceId::parse(s)
        .map_err(|e| StoreError::Backend(format!("stored device id {s:?}: {e}")))
}
