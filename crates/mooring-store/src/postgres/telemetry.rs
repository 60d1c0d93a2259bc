//! [`TelemetryStore`] for PostgreSQL: series ids, points partitioned by UTC day, dedupe keys,
//! latest values, retention by dropping partitions.
//!
//! Layout (migration 0002): `telemetry_series` names each (device, metric) with an integer id
//! (metric `''` is the device's dedupe-key series); `telemetry_points` (series id, ts, id, value)
//! is partitioned by range of `ts_ms`, one partition per UTC day (`telemetry_points_d<day>`,
//! `day = ts_ms / 86_400_000`); `telemetry_seq` holds dedupe keys and `telemetry_latest` the newest
//! point per series, both unpartitioned.
//!
//! **Partitions** are created on demand, before a batch's transaction, for the days its records
//! fall in (and tomorrow, so midnight never waits for one), if those days are within
//! [`PARTITION_DAYS_BACK`] before and [`PARTITION_DAYS_AHEAD`] after today (this server's clock);
//! points of any other day go to `telemetry_points_default`, so no device can make the store
//! create tables without bound. Creation is `CREATE TABLE` + `ATTACH PARTITION` in one short
//! transaction under an advisory lock (servers starting one together create it once; the one
//! that finds it there does nothing), which first moves the day's points out of the default
//! partition. It is best effort: if it fails (a lock not granted within [`DDL_LOCK_TIMEOUT`], a
//! race), the day's points go to the default partition until a later attempt succeeds — no
//! batch ever fails or waits long for a partition (a batch creates at most
//! [`PARTITIONS_CREATED_PER_BATCH_MAX`]; the nearest days to today first).
//!
//! **Retention** ([`TelemetryStore::delete_older_than`]) drops each day partition wholly older
//! than the cutoff (`DROP TABLE`, after counting its rows, which is what the call returns for
//! it), and deletes rows, at most `max_rows` per call, only where a partition straddles the
//! cutoff (and in the default partition); then the dedupe keys older than the cutoff, which
//! share that budget. Dropping needs an `ACCESS EXCLUSIVE` lock on `telemetry_points` for a
//! moment; it waits at most [`DDL_LOCK_TIMEOUT`] for it (so ingest queued behind it waits at
//! most that long), and if it is not granted the partition's rows are deleted in bounded chunks
//! instead (and the drop is tried again after [`PARTITION_RETRY_PAUSE`]), so retention always
//! progresses. While a partition is counted before its drop, a late point into that (expired)
//! day waits for it; nothing else does.
//!
//! Retention is exact, as the trait requires: with a cutoff that moves continuously (the
//! server's `now - retention`, every hour), each pass deletes the rows that aged out of the
//! partition straddling the cutoff, so a partition is mostly empty by the time it is wholly
//! older. Dropping whole days is what happens when the cutoff is a day boundary.
//!
//! **Dedupe keys** live in `telemetry_seq`, keyed by (series, seq) across all time, so dropping
//! a partition never lets a seq through twice; as in SQLite, a key goes when retention passes its
//! record's timestamp (the conformance suite requires that a pruned seq is accepted again).
//!
//! **The metric bound** (`metrics_per_device_max`) is checked inside the batch's transaction
//! after it has taken a transaction advisory lock per device of the batch ([`device_lock_key`],
//! in key order, so concurrent batches cannot deadlock): batches of one device, from any number
//! of servers, are serialised, so two of them cannot both see room for the last metric. The
//! same lock makes series ids follow first-seen order and the dedupe check exact.
//!
//! A batch is one transaction of a few bulk statements (`unnest` arrays): the device locks,
//! the lookups of its series and stored keys, the new series, then the keys, points and latest
//! values, whatever its size.
//!
//! **Compaction** ([`TelemetryStore::compact`]) keeps the trait's default (nothing to do): on
//! PostgreSQL retention is partitions dropped whole, and a point stays a row (about 60 bytes with
//! its tuple header and two index entries, where a SQLite chunk takes a few bytes a point).
//! Compressing closed days into chunk rows is a possible later step, not needed for retention.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mooring_proto::sync::lock;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::{
    bound_to_sql, column, count_to_sql, pg_error, seq_to_sql, ts_to_sql, u64_column, PgStore,
};
use crate::error::{Result, StoreError};
use crate::model::{AppendOutcome, MetricValue, Point, TelemetryQuery, TelemetryRecord};
use crate::store::TelemetryStore;

/// Width of a partition: one UTC day.
pub const DAY_MS: i64 = 86_400_000;
/// Days before today (UTC, this server's clock) for which a day partition is still created.
pub const PARTITION_DAYS_BACK: i64 = 366;
/// Days after today for which a day partition is already created.
pub const PARTITION_DAYS_AHEAD: i64 = 7;
/// The metric name of a device's dedupe-key series (never a valid metric: names are non-empty).
const KEYS_METRIC: &str = "";
/// Key of the transaction advisory lock every partition change (create, drop) takes first
/// ("mooring" in ASCII, then 2; the migrations' key ends in 1).
const PARTITION_LOCK_KEY: i64 = 0x6d6f_6f72_696e_6702;
/// First half of a device's advisory lock key ("moor"); the second is [`device_lock_key`].
const DEVICE_LOCK_CLASS: i32 = 0x6d6f_6f72;
/// Longest a partition change waits for a table lock; set in its transaction.
pub const DDL_LOCK_TIMEOUT: Duration = Duration::from_millis(500);
/// A day whose partition could not be created (or dropped) is not tried again sooner.
pub const PARTITION_RETRY_PAUSE: Duration = Duration::from_secs(10);
/// Most partitions one batch creates (each is a short DDL transaction before the batch's own).
pub const PARTITIONS_CREATED_PER_BATCH_MAX: usize = 4;
/// Rows (of points or dedupe keys) removed per transaction when a device is deleted.
const DELETE_DEVICE_ROWS: i64 = 10_000;

/// The days this store knows to have a partition, and those whose partition could not be
/// created or dropped lately. Only days of the creation window are kept, and failures only for
/// [`PARTITION_RETRY_PAUSE`], so it stays small.
#[derive(Debug, Default)]
pub(super) struct PartitionCache {
    known: BTreeSet<i64>,
    failed: HashMap<i64, Instant>,
}

impl PartitionCache {
    /// Whether a change to `day`'s partition failed within [`PARTITION_RETRY_PAUSE`].
    fn failed_lately(&mut self, day: i64) -> bool {
        self.failed
            .retain(|_, at| at.elapsed() < PARTITION_RETRY_PAUSE);
        self.failed.contains_key(&day)
    }
}

fn today() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    ms.div_euclid(DAY_MS)
}

fn day_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(DAY_MS)
}

/// `telemetry_points_d<day>`: the day's partition (days are never negative: times are).
fn partition_name(day: i64) -> String {
    format!("telemetry_points_d{day}")
}

/// The day of a partition named by [`partition_name`].
fn partition_day(name: &str) -> Option<i64> {
    name.strip_prefix("telemetry_points_d")?.parse().ok()
}

/// `[from, to)` of a day's partition; `to` is `None` (MAXVALUE) for the last storable day.
fn partition_bounds(day: i64) -> (i64, Option<i64>) {
    let from = day.saturating_mul(DAY_MS);
    (from, day.checked_add(1).and_then(|d| d.checked_mul(DAY_MS)))
}

/// The second half of a device's advisory lock key: the 32-bit FNV-1a hash of its id. Every
/// server must compute the same key for a device (the lock is how they exclude each other), so
/// this is a fixed function, never `std`'s hasher; changing it needs all servers stopped. Two
/// devices with the same key only share a lock.
fn device_lock_key(device_id: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in device_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// A metric name column. Names are BYTEA (their UTF-8): PostgreSQL text cannot hold U+0000,
/// which a JSON key can, and one device's odd name must not fail a whole batch.
fn metric_column(row: &Row, index: usize) -> Result<&str> {
    let bytes: &[u8] = column(row, index)?;
    std::str::from_utf8(bytes)
        .map_err(|e| StoreError::Backend(format!("column {index}: metric name: {e}")))
}

fn encode_value(value: MetricValue) -> (f64, bool) {
    match value {
        MetricValue::Number(n) => (n, false),
        MetricValue::Bool(b) => (if b { 1.0 } else { 0.0 }, true),
    }
}

fn value_columns(row: &Row, value_index: usize) -> Result<MetricValue> {
    let value: f64 = column(row, value_index)?;
    let is_bool: bool = column(row, value_index + 1)?;
    Ok(if is_bool {
        MetricValue::Bool(value != 0.0)
    } else {
        MetricValue::Number(value)
    })
}

/// A series of the batch: stored already, or the n-th one the batch creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SeriesRef {
    Stored(i64),
    New(usize),
}

/// What a batch writes, decided record by record exactly as `sqlite/telemetry.rs` does it.
#[derive(Default)]
struct BatchPlan<'a> {
    outcomes: Vec<AppendOutcome>,
    /// Series to create, in first-seen order (their ids follow it).
    new_series: Vec<(&'a str, &'a str)>,
    keys: Vec<(SeriesRef, i64, i64)>,
    points: Vec<(SeriesRef, i64, f64, bool)>,
    /// Newest point per series of the batch (a later one wins a tie).
    latest: HashMap<SeriesRef, (i64, f64, bool)>,
}

/// What the store holds for a batch, read under its device locks.
struct Stored<'a> {
    series: HashMap<(&'a str, &'a str), i64>,
    /// Distinct metric names stored per device (only for devices that may get new ones).
    metrics: HashMap<&'a str, usize>,
    keys: HashSet<(&'a str, i64)>,
}

/// The batch's series while it is planned: stored ones, and those it creates.
struct SeriesMap<'a> {
    ids: HashMap<(&'a str, &'a str), SeriesRef>,
    /// Distinct metric names per device: stored (for devices that may get new ones) plus
    /// those the batch creates.
    metrics: HashMap<&'a str, usize>,
    /// Series to create, in first-seen order (their ids follow it).
    new: Vec<(&'a str, &'a str)>,
}

impl<'a> SeriesMap<'a> {
    fn get_or_create(&mut self, device: &'a str, metric: &'a str) -> SeriesRef {
        if let Some(s) = self.ids.get(&(device, metric)) {
            return *s;
        }
        if metric != KEYS_METRIC {
            *self.metrics.entry(device).or_insert(0) += 1;
        }
        self.new.push((device, metric));
        let s = SeriesRef::New(self.new.len() - 1);
        self.ids.insert((device, metric), s);
        s
    }
}

fn plan_batch<'a>(
    batch: &'a [TelemetryRecord],
    stored: Stored<'a>,
    metrics_per_device_max: usize,
) -> Result<BatchPlan<'a>> {
    let mut plan = BatchPlan::default();
    let mut series = SeriesMap {
        ids: stored
            .series
            .into_iter()
            .map(|(k, id)| (k, SeriesRef::Stored(id)))
            .collect(),
        metrics: stored.metrics,
        new: Vec::new(),
    };
    let mut batch_keys: HashSet<(&str, i64)> = HashSet::new();
    for record in batch {
        let device = record.device_id.as_str();
        let ts_ms = ts_to_sql("ts_ms", record.ts_ms)?;
        // Metric names this record would add (the bound counts everything stored before, also
        // earlier in the batch).
        let mut new: Vec<&str> = Vec::new();
        for (metric, _) in &record.points {
            let metric = metric.as_str();
            if !series.ids.contains_key(&(device, metric)) && !new.contains(&metric) {
                new.push(metric);
            }
        }
        let existing = series.metrics.get(device).copied().unwrap_or(0);
        if !new.is_empty() && existing.saturating_add(new.len()) > metrics_per_device_max {
            plan.outcomes.push(AppendOutcome::MetricsLimit);
            continue;
        }
        if let Some(seq) = record.seq {
            let seq = seq_to_sql(seq);
            if stored.keys.contains(&(device, seq)) || !batch_keys.insert((device, seq)) {
                plan.outcomes.push(AppendOutcome::Duplicate);
                continue;
            }
            let keys = series.get_or_create(device, KEYS_METRIC);
            plan.keys.push((keys, seq, ts_ms));
        }
        for (metric, value) in &record.points {
            let id = series.get_or_create(device, metric);
            let (value, is_bool) = encode_value(*value);
            plan.points.push((id, ts_ms, value, is_bool));
            match plan.latest.get_mut(&id) {
                Some(l) if ts_ms < l.0 => {}
                Some(l) => *l = (ts_ms, value, is_bool),
                None => {
                    plan.latest.insert(id, (ts_ms, value, is_bool));
                }
            }
        }
        plan.outcomes.push(AppendOutcome::Stored);
    }
    debug_assert_eq!(plan.outcomes.len(), batch.len());
    plan.new_series = series.new;
    Ok(plan)
}

type Transaction<'a> = deadpool_postgres::Transaction<'a>;

/// Takes the advisory lock of every device in `devices`, in key order.
async fn lock_devices(tx: &Transaction<'_>, devices: &BTreeSet<&str>) -> Result<()> {
    let mut keys: Vec<i32> = devices.iter().map(|d| device_lock_key(d)).collect();
    keys.sort_unstable();
    keys.dedup();
    // unnest returns the array's elements in order, and each row takes its lock in turn.
    let stmt = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k")
        .await
        .map_err(pg_error)?;
    tx.execute(&stmt, &[&DEVICE_LOCK_CLASS, &keys])
        .await
        .map_err(pg_error)?;
    Ok(())
}

/// Writes `batch` in `tx`: the device locks, the lookups, then the bulk inserts.
async fn append_in(
    tx: &Transaction<'_>,
    batch: &[TelemetryRecord],
    metrics_per_device_max: usize,
) -> Result<Vec<AppendOutcome>> {
    let devices: BTreeSet<&str> = batch.iter().map(|r| r.device_id.as_str()).collect();
    lock_devices(tx, &devices).await?;

    // Every (device, metric) of the batch, and (device, '') for records with a seq.
    let mut pairs: HashSet<(&str, &str)> = HashSet::new();
    let (mut key_devices, mut key_seqs): (Vec<&str>, Vec<i64>) = (Vec::new(), Vec::new());
    for r in batch {
        let device = r.device_id.as_str();
        for (metric, _) in &r.points {
            pairs.insert((device, metric));
        }
        if let Some(seq) = r.seq {
            pairs.insert((device, KEYS_METRIC));
            key_devices.push(device);
            key_seqs.push(seq_to_sql(seq));
        }
    }
    let (pair_devices, pair_metrics): (Vec<&str>, Vec<&[u8]>) =
        pairs.iter().map(|(d, m)| (*d, m.as_bytes())).unzip();
    let series_stmt = tx
        .prepare_cached(
            "SELECT s.id, s.device_id, s.metric FROM telemetry_series s
             JOIN unnest($1::text[], $2::bytea[]) AS u(device_id, metric)
               ON s.device_id = u.device_id AND s.metric = u.metric",
        )
        .await
        .map_err(pg_error)?;
    let keys_stmt = tx
        .prepare_cached(
            "SELECT s.device_id, k.seq FROM unnest($1::text[], $2::bigint[]) AS u(device_id, seq)
             JOIN telemetry_series s ON s.device_id = u.device_id AND s.metric = ''
             JOIN telemetry_seq k ON k.series_id = s.id AND k.seq = u.seq",
        )
        .await
        .map_err(pg_error)?;
    // Independent reads, sent together (after the locks are granted).
    let (series_rows, key_rows) = tokio::try_join!(
        async {
            tx.query(&series_stmt, &[&pair_devices, &pair_metrics])
                .await
        },
        async { tx.query(&keys_stmt, &[&key_devices, &key_seqs]).await },
    )
    .map_err(pg_error)?;
    let mut series: HashMap<(&str, &str), i64> = HashMap::with_capacity(series_rows.len());
    for row in &series_rows {
        series.insert((column(row, 1)?, metric_column(row, 2)?), column(row, 0)?);
    }
    let mut keys: HashSet<(&str, i64)> = HashSet::with_capacity(key_rows.len());
    for row in &key_rows {
        keys.insert((column(row, 0)?, column(row, 1)?));
    }
    // Devices that may get a new metric: how many they have (the bound is checked only then).
    let growing: BTreeSet<&str> = pairs
        .iter()
        .filter(|(d, m)| *m != KEYS_METRIC && !series.contains_key(&(*d, *m)))
        .map(|(d, _)| *d)
        .collect();
    let count_rows = if !growing.is_empty() && metrics_per_device_max != usize::MAX {
        let growing: Vec<&str> = growing.into_iter().collect();
        let stmt = tx
            .prepare_cached(
                "SELECT device_id, count(*) FROM telemetry_series
                 WHERE device_id = ANY($1::text[]) AND metric <> '' GROUP BY device_id",
            )
            .await
            .map_err(pg_error)?;
        tx.query(&stmt, &[&growing]).await.map_err(pg_error)?
    } else {
        Vec::new()
    };
    let mut metrics: HashMap<&str, usize> = HashMap::with_capacity(count_rows.len());
    for row in &count_rows {
        let n = usize::try_from(u64_column(row, 1)?).unwrap_or(usize::MAX);
        metrics.insert(column(row, 0)?, n);
    }

    let plan = plan_batch(
        batch,
        Stored {
            series,
            metrics,
            keys,
        },
        metrics_per_device_max,
    )?;
    let new_ids = create_series(tx, &plan.new_series).await?;
    let id_of = |s: SeriesRef| -> Result<i64> {
        match s {
            SeriesRef::Stored(id) => Ok(id),
            SeriesRef::New(i) => new_ids
                .get(i)
                .copied()
                .ok_or_else(|| StoreError::Backend("telemetry series not created".into())),
        }
    };

    let mut key_cols: (Vec<i64>, Vec<i64>, Vec<i64>) = Default::default();
    for &(s, seq, ts) in &plan.keys {
        key_cols.0.push(id_of(s)?);
        key_cols.1.push(seq);
        key_cols.2.push(ts);
    }
    let mut point_cols: (Vec<i64>, Vec<i64>, Vec<f64>, Vec<bool>) = Default::default();
    for &(s, ts, value, is_bool) in &plan.points {
        point_cols.0.push(id_of(s)?);
        point_cols.1.push(ts);
        point_cols.2.push(value);
        point_cols.3.push(is_bool);
    }
    let mut latest: Vec<(i64, (i64, f64, bool))> = plan
        .latest
        .iter()
        .map(|(s, l)| Ok((id_of(*s)?, *l)))
        .collect::<Result<_>>()?;
    latest.sort_unstable_by_key(|(id, _)| *id);
    let mut latest_cols: (Vec<i64>, Vec<i64>, Vec<f64>, Vec<bool>) = Default::default();
    for (id, (ts, value, is_bool)) in latest {
        latest_cols.0.push(id);
        latest_cols.1.push(ts);
        latest_cols.2.push(value);
        latest_cols.3.push(is_bool);
    }
    let insert_keys = tx
        .prepare_cached(
            "INSERT INTO telemetry_seq (series_id, seq, ts_ms)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])",
        )
        .await
        .map_err(pg_error)?;
    // In the batch's order: the ids (the sequence) follow it, and they order ties.
    let insert_points = tx
        .prepare_cached(
            "INSERT INTO telemetry_points (series_id, ts_ms, value, is_bool)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::float8[], $4::bool[])",
        )
        .await
        .map_err(pg_error)?;
    let upsert_latest = tx
        .prepare_cached(
            "INSERT INTO telemetry_latest (series_id, ts_ms, value, is_bool)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::float8[], $4::bool[])
             ON CONFLICT (series_id) DO UPDATE
               SET ts_ms = EXCLUDED.ts_ms, value = EXCLUDED.value, is_bool = EXCLUDED.is_bool
               WHERE EXCLUDED.ts_ms >= telemetry_latest.ts_ms",
        )
        .await
        .map_err(pg_error)?;
    // Independent writes, sent together.
    tokio::try_join!(
        async {
            if key_cols.0.is_empty() {
                return Ok(0);
            }
            tx.execute(&insert_keys, &[&key_cols.0, &key_cols.1, &key_cols.2])
                .await
        },
        async {
            if point_cols.0.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &insert_points,
                &[&point_cols.0, &point_cols.1, &point_cols.2, &point_cols.3],
            )
            .await
        },
        async {
            if latest_cols.0.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &upsert_latest,
                &[
                    &latest_cols.0,
                    &latest_cols.1,
                    &latest_cols.2,
                    &latest_cols.3,
                ],
            )
            .await
        },
    )
    .map_err(pg_error)?;
    Ok(plan.outcomes)
}

/// Creates the batch's new series in first-seen order; their ids, in that order.
async fn create_series(tx: &Transaction<'_>, new: &[(&str, &str)]) -> Result<Vec<i64>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let (devices, metrics): (Vec<&str>, Vec<&[u8]>) =
        new.iter().map(|(d, m)| (*d, m.as_bytes())).unzip();
    // The rows are inserted (and given ids) in ORDER BY order. The device locks keep other
    // batches from creating these series; ON CONFLICT only makes a breach of that an error
    // below instead of a failed statement.
    let stmt = tx
        .prepare_cached(
            "INSERT INTO telemetry_series (device_id, metric)
             SELECT device_id, metric FROM unnest($1::text[], $2::bytea[])
               WITH ORDINALITY AS u(device_id, metric, n)
             ORDER BY n
             ON CONFLICT DO NOTHING
             RETURNING id, device_id, metric",
        )
        .await
        .map_err(pg_error)?;
    let rows = tx
        .query(&stmt, &[&devices, &metrics])
        .await
        .map_err(pg_error)?;
    let mut ids: HashMap<(&str, &str), i64> = HashMap::with_capacity(rows.len());
    for row in &rows {
        ids.insert((column(row, 1)?, metric_column(row, 2)?), column(row, 0)?);
    }
    new.iter()
        .map(|pair| {
            ids.get(pair).copied().ok_or_else(|| {
                StoreError::Backend(format!(
                    "telemetry series ({}, {:?}) was created by a batch that did not hold its device's lock",
                    pair.0, pair.1
                ))
            })
        })
        .collect()
}

impl PgStore {
    /// Makes sure the day partitions `batch` needs (and tomorrow's) exist, where they are within
    /// the creation window. Best effort: a failure is logged and the day's points go to the
    /// default partition.
    async fn ensure_partitions(&self, batch: &[TelemetryRecord]) {
        let today = today();
        let window = today.saturating_sub(PARTITION_DAYS_BACK)..=today + PARTITION_DAYS_AHEAD;
        let days: BTreeSet<i64> = batch
            .iter()
            .map(|r| day_of(bound_to_sql(r.ts_ms)))
            .chain([today + 1])
            .filter(|d| window.contains(d))
            .collect();
        let mut wanted: Vec<i64> = {
            let mut cache = lock(&self.partitions);
            days.into_iter()
                .filter(|d| !cache.known.contains(d) && !cache.failed_lately(*d))
                .collect()
        };
        wanted.sort_by_key(|d| d.abs_diff(today));
        wanted.truncate(PARTITIONS_CREATED_PER_BATCH_MAX);
        for day in wanted {
            let created = self.create_partition(day).await;
            let mut cache = lock(&self.partitions);
            match created {
                Ok(()) => {
                    cache.known.insert(day);
                    cache.known.retain(|d| window.contains(d));
                }
                Err(e) => {
                    tracing::warn!(
                        day,
                        error = %e,
                        "could not create a telemetry partition; its points go to the default partition meanwhile"
                    );
                    cache.failed.insert(day, Instant::now());
                }
            }
        }
    }

    /// Creates and attaches the partition of `day` unless it exists, first moving the day's
    /// points out of the default partition (ATTACH refuses while the default holds any).
    async fn create_partition(&self, day: i64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        // Another server creating this partition: wait for it, then find it there. Every wait
        // (for this lock, for the table locks below) is bounded.
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {};",
            DDL_LOCK_TIMEOUT.as_millis()
        ))
        .await
        .map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK_KEY])
            .await
            .map_err(pg_error)?;
        let name = partition_name(day);
        if partition_attached(&tx, &name).await? {
            return tx.commit().await.map_err(pg_error);
        }
        let (from, to) = partition_bounds(day);
        let to_sql = to.map_or_else(|| "MAXVALUE".to_owned(), |t| t.to_string());
        // Names and bounds are our own integers: nothing from outside is spliced into DDL.
        tx.batch_execute(&format!(
            "CREATE TABLE {name} (LIKE telemetry_points INCLUDING DEFAULTS)"
        ))
        .await
        .map_err(pg_error)?;
        tx.execute(
            &format!(
                "WITH moved AS (
                   DELETE FROM telemetry_points_default
                   WHERE ts_ms >= $1 AND ($2::BIGINT IS NULL OR ts_ms < $2)
                   RETURNING series_id, ts_ms, id, value, is_bool)
                 INSERT INTO {name} (series_id, ts_ms, id, value, is_bool)
                 SELECT series_id, ts_ms, id, value, is_bool FROM moved"
            ),
            &[&from, &to],
        )
        .await
        .map_err(pg_error)?;
        tx.batch_execute(&format!(
            "ALTER TABLE telemetry_points ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({to_sql})"
        ))
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(day, partition = %name, "created telemetry partition");
        Ok(())
    }

    /// The days that have a partition, oldest first.
    async fn partition_days(&self) -> Result<Vec<i64>> {
        let rows = self
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'telemetry_points'::regclass",
                &[],
            )
            .await?;
        let mut days = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(day) = partition_day(column(row, 0)?) {
                days.push(day);
            }
        }
        days.sort_unstable();
        Ok(days)
    }

    /// Deletes at most `max_rows` rows of the partition (or table) `table` that match `filter`
    /// (on `$1`), by their row ids: a TID scan, so each chunk costs what it deletes, not what
    /// the partition holds. Returns how many went.
    async fn delete_chunk(
        &self,
        table: &str,
        filter: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
        max_rows: i64,
    ) -> Result<u64> {
        // Not cached: partitions come and go, and the names are many.
        let sql = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM {table} WHERE {filter} LIMIT $2))"
        );
        let client = self.client().await?;
        match client.execute(sql.as_str(), &[value, &max_rows]).await {
            Ok(n) => Ok(n),
            // A partition another server dropped meanwhile: nothing left to delete there.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(0),
            Err(e) => Err(pg_error(e)),
        }
    }

    /// Drops the partition of `day`: how many points went with it, or `None` if a lock it needs
    /// was not granted within [`DDL_LOCK_TIMEOUT`] (nothing changed then).
    async fn drop_partition(&self, day: i64) -> Result<Option<u64>> {
        let name = partition_name(day);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let dropped = async {
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = {};",
                DDL_LOCK_TIMEOUT.as_millis()
            ))
            .await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK_KEY])
                .await?;
            if !partition_attached(&tx, &name)
                .await
                .map_err(Dropped::Store)?
            {
                return Ok(0);
            }
            // SHARE: late points into this day wait (reads do not) while it is counted, so the
            // count is exactly what the drop removes.
            tx.batch_execute(&format!("LOCK TABLE {name} IN SHARE MODE"))
                .await?;
            let count = tx
                .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                .await?;
            let count = u64_column(&count, 0).map_err(Dropped::Store)?;
            tx.batch_execute(&format!("DROP TABLE {name}")).await?;
            Ok::<u64, Dropped>(count)
        }
        .await;
        match dropped {
            Ok(count) => {
                tx.commit().await.map_err(pg_error)?;
                lock(&self.partitions).known.remove(&day);
                tracing::info!(day, partition = %name, points = count, "dropped telemetry partition");
                Ok(Some(count))
            }
            Err(Dropped::Pg(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::info!(day, partition = %name, "telemetry partition busy; deleting its rows instead");
                lock(&self.partitions).failed.insert(day, Instant::now());
                Ok(None)
            }
            Err(Dropped::Pg(e)) => Err(pg_error(e)),
            Err(Dropped::Store(e)) => Err(e),
        }
    }
}

/// Why [`PgStore::drop_partition`] failed: the lock timeout is told apart by its SQLSTATE.
enum Dropped {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Dropped {
    fn from(e: tokio_postgres::Error) -> Self {
        Dropped::Pg(e)
    }
}

/// Whether `name` is a partition of `telemetry_points` (read in `tx`).
async fn partition_attached(tx: &Transaction<'_>, name: &str) -> Result<bool> {
    let row = tx
        .query_opt(
            "SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'telemetry_points'::regclass AND c.relname = $1",
            &[&name],
        )
        .await
        .map_err(pg_error)?;
    Ok(row.is_some())
}

#[async_trait::async_trait]
impl TelemetryStore for PgStore {
    /// A day: the partition size; a cutoff on a day boundary drops whole partitions.
    fn retention_granularity_ms(&self) -> u64 {
        DAY_MS.unsigned_abs()
    }

    async fn append_batch_bounded(
        &self,
        batch: Vec<TelemetryRecord>,
        metrics_per_device_max: usize,
    ) -> Result<Vec<AppendOutcome>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for record in &batch {
            record.validate()?;
        }
        self.ensure_partitions(&batch).await;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let outcomes = append_in(&tx, &batch, metrics_per_device_max).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(outcomes)
    }

    async fn query(&self, q: TelemetryQuery) -> Result<Vec<Point>> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let from_ms = bound_to_sql(q.from_ms.unwrap_or(0));
        // [from, to) as an inclusive range; `to_ms: Some(0)` selects nothing.
        let to_ms = match q.to_ms {
            None => i64::MAX,
            Some(0) => return Ok(Vec::new()),
            Some(to) => bound_to_sql(to - 1),
        };
        let limit = count_to_sql(q.limit);
        let device = q.device_id.as_str();
        // Per series, its oldest `limit` points in range (an index range scan per partition,
        // merged); then the oldest `limit` of them all. Ties at one timestamp: by series (first-
        // seen order), then within the series by insertion order.
        const POINTS: &str = "SELECT s.metric, p.ts_ms, p.value, p.is_bool
             FROM telemetry_series s
             CROSS JOIN LATERAL (
               SELECT ts_ms, id, value, is_bool FROM telemetry_points
               WHERE series_id = s.id AND ts_ms >= $2 AND ts_ms <= $3
               ORDER BY ts_ms, id LIMIT $4) p
             WHERE s.device_id = $1 AND s.metric <> ''";
        let rows = match &q.metric {
            None => {
                let sql = format!("{POINTS} ORDER BY p.ts_ms, s.id, p.id LIMIT $4");
                self.query(&sql, &[&device, &from_ms, &to_ms, &limit])
                    .await?
            }
            Some(metric) => {
                let sql = format!("{POINTS} AND s.metric = $5 ORDER BY p.ts_ms, p.id LIMIT $4");
                self.query(
                    &sql,
                    &[&device, &from_ms, &to_ms, &limit, &metric.as_bytes()],
                )
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(Point {
                    metric: metric_column(row, 0)?.to_owned(),
                    ts_ms: u64_column(row, 1)?,
                    value: value_columns(row, 2)?,
                })
            })
            .collect()
    }

    async fn latest(&self, device_id: &str) -> Result<BTreeMap<String, (u64, MetricValue)>> {
        let rows = self
            .query(
                "SELECT s.metric, l.ts_ms, l.value, l.is_bool
                 FROM telemetry_series s JOIN telemetry_latest l ON l.series_id = s.id
                 WHERE s.device_id = $1",
                &[&device_id],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    metric_column(row, 0)?.to_owned(),
                    (u64_column(row, 1)?, value_columns(row, 2)?),
                ))
            })
            .collect()
    }

    async fn delete_older_than(&self, cutoff_ms: u64, max_rows: usize) -> Result<usize> {
        if max_rows == 0 {
            return Ok(0);
        }
        let cutoff_ms = bound_to_sql(cutoff_ms);
        let days = self.partition_days().await?;
        // Whole days first, one non-empty partition per call (dropping an empty one is free).
        let mut dropped = BTreeSet::new();
        for &day in &days {
            if partition_bounds(day).1.is_none_or(|to| to > cutoff_ms)
                || lock(&self.partitions).failed_lately(day)
            {
                break;
            }
            match self.drop_partition(day).await? {
                Some(0) => {
                    dropped.insert(day);
                }
                Some(points) => return Ok(usize::try_from(points).unwrap_or(usize::MAX)),
                // Busy: its rows go below, in bounded chunks like the straddling partition's.
                None => break,
            }
        }
        // Then rows: of the partition straddling the cutoff (and of any a lock kept from being
        // dropped), oldest first, then of the default partition; then dedupe keys. All share
        // the budget, in that order.
        let mut tables: Vec<String> = days
            .iter()
            .filter(|&&day| !dropped.contains(&day) && partition_bounds(day).0 < cutoff_ms)
            .map(|&day| partition_name(day))
            .collect();
        tables.push("telemetry_points_default".to_owned());
        tables.push("telemetry_seq".to_owned());
        let max_rows = count_to_sql(max_rows);
        let mut deleted = 0i64;
        for table in &tables {
            let budget = max_rows - deleted;
            if budget <= 0 {
                break;
            }
            let n = self
                .delete_chunk(table, "ts_ms < $1", &cutoff_ms, budget)
                .await?;
            deleted += i64::try_from(n).unwrap_or(i64::MAX);
        }
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }
}

/// Deletes a device's latest values; run in the transaction that deletes the device.
pub(super) const DELETE_DEVICE_LATEST_SQL: &str = "DELETE FROM telemetry_latest WHERE series_id IN
   (SELECT id FROM telemetry_series WHERE device_id = $1)";

/// Removes every point (in every partition), dedupe key and series of `device_id` (after
/// [`DELETE_DEVICE_LATEST_SQL`]): in transactions of at most [`DELETE_DEVICE_ROWS`] rows, then
/// what an in-flight batch added meanwhile and the series themselves in one transaction that
/// holds the device's lock (so no batch of it interleaves).
pub(super) async fn delete_device_telemetry(store: &PgStore, device_id: &str) -> Result<()> {
    let series: Vec<i64> = store
        .query(
            "SELECT id FROM telemetry_series WHERE device_id = $1",
            &[&device_id],
        )
        .await?
        .iter()
        .map(|r| column(r, 0))
        .collect::<Result<_>>()?;
    if !series.is_empty() {
        let mut tables: Vec<String> = store
            .partition_days()
            .await?
            .into_iter()
            .map(partition_name)
            .collect();
        tables.push("telemetry_points_default".to_owned());
        tables.push("telemetry_seq".to_owned());
        for table in &tables {
            while store
                .delete_chunk(table, "series_id = ANY($1)", &series, DELETE_DEVICE_ROWS)
                .await?
                >= u64::try_from(DELETE_DEVICE_ROWS).unwrap_or(u64::MAX)
            {}
        }
    }
    // What a batch in flight added meanwhile, and the series, under the device's lock.
    let mut client = store.client().await?;
    let tx = client.transaction().await.map_err(pg_error)?;
    lock_devices(&tx, &BTreeSet::from([device_id])).await?;
    let stmt = tx
        .prepare_cached("SELECT id FROM telemetry_series WHERE device_id = $1")
        .await
        .map_err(pg_error)?;
    let series: Vec<i64> = tx
        .query(&stmt, &[&device_id])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| column(r, 0))
        .collect::<Result<_>>()?;
    for sql in [
        "DELETE FROM telemetry_points WHERE series_id = ANY($1)",
        "DELETE FROM telemetry_seq WHERE series_id = ANY($1)",
        "DELETE FROM telemetry_latest WHERE series_id = ANY($1)",
        "DELETE FROM telemetry_series WHERE id = ANY($1)",
    ] {
        let stmt = tx.prepare_cached(sql).await.map_err(pg_error)?;
        tx.execute(&stmt, &[&series]).await.map_err(pg_error)?;
    }
    tx.commit().await.map_err(pg_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_and_bounds_round_trip_up_to_the_last_storable_day() {
        assert_eq!(partition_name(20_454), "telemetry_points_d20454");
        assert_eq!(partition_day("telemetry_points_d20454"), Some(20_454));
        assert_eq!(partition_day("telemetry_points_default"), None);
        assert_eq!(partition_bounds(0), (0, Some(DAY_MS)));
        let last = day_of(i64::MAX);
        assert_eq!(partition_bounds(last), (last * DAY_MS, None));
        assert!(partition_bounds(last - 1).1.is_some());
    }

    #[test]
    fn device_lock_keys_are_fixed() {
        // Servers of different builds must agree: these values never change.
        assert_eq!(
            device_lock_key(""),
            i32::from_ne_bytes(0x811c_9dc5u32.to_ne_bytes())
        );
        assert_eq!(
            device_lock_key("d1"),
            i32::from_ne_bytes(0x881d_13e6u32.to_ne_bytes())
        );
    }
}
