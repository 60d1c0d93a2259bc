//! Suite 6: telemetry bytes on disk per point (regular, irregular, 1 Hz) and a one-day range query, in-process.
//!
//! No server and no peer: each series kind is written into its own fresh [`SqliteStore`] in a
//! temp dir through `append_batch` (the group commit's call), in batches, with a `seq` per
//! record (so dedupe keys are counted too). Then the file is measured twice after a WAL
//! checkpoint and `VACUUM`: with every point still a recent row, and after the compaction pass the
//! server runs (windows closed 10 minutes before the last point; the open hour stays recent).

use crate::report::{Row, Table};
use crate::Bench;
use mooring_store::{
    run_compaction_pass, DeviceId, MetricValue, SqliteStore, TelemetryQuery, TelemetryRecord,
    TelemetryStore,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// 2026-01-01T00:00:00Z.
const START_MS: u64 = 1_767_225_600_000;
const DAY_MS: u64 = 86_400_000;
/// Records per `append_batch` (the writer's default `batch_len_max`).
const BATCH_LEN: usize = 1024;
/// Range queries timed for the p50/p99.
const QUERY_RUNS: usize = 100;
/// As the server: windows that closed this long before "now" (the last point) are compacted.
const COMPACTION_GRACE_MS: u64 = 10 * 60_000;

fn number(v: f64) -> MetricValue {
    MetricValue::Number(v)
}

/// Rounds to `digits` decimals, as a sensor reading printed by a device would be.
fn decimals(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

/// (a) three metrics every 60 s: temperature (0.1 °C steps), humidity (whole %), a door switch.
fn regular(days: u64) -> Vec<TelemetryRecord> {
    let mut rng = StdRng::seed_from_u64(1);
    let (mut temp, mut hum, mut door) = (21.0f64, 45.0f64, false);
    (0..days * 1440)
        .map(|i| {
            temp = decimals(temp + f64::from(rng.random_range(-2i32..=2)) / 10.0, 1);
            hum = (hum + f64::from(rng.random_range(-1i32..=1))).clamp(0.0, 100.0);
            if rng.random_range(0..30) == 0 {
                door = !door;
            }
            record(
                i,
                START_MS + i * 60_000,
                vec![
                    ("temp".into(), number(temp)),
                    ("hum".into(), number(hum)),
                    ("door".into(), MetricValue::Bool(door)),
                ],
            )
        })
        .collect()
}

/// Timestamps every 10 s ± 2 s (uniform millisecond jitter), as many as fit in `days`.
fn jittered(rng: &mut StdRng, days: u64) -> Vec<u64> {
    let mut ts = START_MS;
    let mut out = Vec::new();
    while ts < START_MS + days * DAY_MS {
        out.push(ts);
        ts += rng.random_range(8_000..=12_000);
    }
    out
}

/// (b) three metrics at jittered times: random walks at sensor precision (temperature with two
/// decimals, humidity with one, an integer level).
fn irregular(days: u64) -> Vec<TelemetryRecord> {
    let mut rng = StdRng::seed_from_u64(2);
    let (mut temp, mut hum, mut level) = (21.0f64, 45.0f64, 500i32);
    jittered(&mut rng, days)
        .into_iter()
        .zip(0..)
        .map(|(ts, i)| {
            temp = decimals(temp + rng.random_range(-0.05..=0.05), 2);
            hum = decimals(hum + rng.random_range(-0.3..=0.3), 1);
            level += rng.random_range(-3i32..=3);
            record(
                i,
                ts,
                vec![
                    ("temp".into(), number(temp)),
                    ("hum".into(), number(hum)),
                    ("level".into(), number(f64::from(level))),
                ],
            )
        })
        .collect()
}

/// (b') one metric at jittered times: a random walk at full f64 precision, whose low mantissa
/// bits are noise that no lossless codec removes (the worst case, not a typical sensor).
fn irregular_full_precision(days: u64) -> Vec<TelemetryRecord> {
    let mut rng = StdRng::seed_from_u64(4);
    let mut pressure = 1013.25f64;
    jittered(&mut rng, days)
        .into_iter()
        .zip(0..)
        .map(|(ts, i)| {
            pressure += rng.random_range(-0.5..=0.5);
            record(i, ts, vec![("pressure".into(), number(pressure))])
        })
        .collect()
}

/// (c) one metric every second: a temperature random walk (0.1 steps).
fn one_hz(days: u64) -> Vec<TelemetryRecord> {
    let mut rng = StdRng::seed_from_u64(3);
    let mut temp = 21.0f64;
    (0..days * 86_400)
        .map(|i| {
            temp = decimals(temp + f64::from(rng.random_range(-1i32..=1)) / 10.0, 1);
            record(i, START_MS + i * 1000, vec![("temp".into(), number(temp))])
        })
        .collect()
}

fn device() -> DeviceId {
    DeviceId::parse("bench-1").expect("valid id")
}

fn record(seq: u64, ts_ms: u64, points: Vec<(String, MetricValue)>) -> TelemetryRecord {
    TelemetryRecord {
        device_id: device(),
        seq: Some(seq),
        ts_ms,
        points,
    }
}

struct Measured {
    points: usize,
    recent_bytes_per_point: f64,
    bytes_per_point: f64,
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

async fn file_bytes(store: &SqliteStore) -> anyhow::Result<u64> {
    store.vacuum().await?;
    Ok(std::fs::metadata(store.path())?.len())
}

/// Writes `records` into a fresh store and measures the file before and after compaction.
async fn measure(records: Vec<TelemetryRecord>) -> anyhow::Result<Measured> {
    let dir = tempfile::Builder::new()
        .prefix("mooring-bench-tsdb-")
        .tempdir()?;
    let store = SqliteStore::open(dir.path())?;
    let empty = file_bytes(&store).await?;
    let points: usize = records.iter().map(|r| r.points.len()).sum();
    let last_ms = records.iter().map(|r| r.ts_ms).max().unwrap_or(START_MS);
    let mut records = records.into_iter().peekable();
    while records.peek().is_some() {
        let batch: Vec<_> = records.by_ref().take(BATCH_LEN).collect();
        store.append_batch(batch).await?;
    }
    #[allow(clippy::cast_precision_loss)]
    let per_point = |bytes: u64| bytes.saturating_sub(empty) as f64 / points as f64;
    let recent_bytes_per_point = per_point(file_bytes(&store).await?);
    let started = Instant::now();
    let moved = run_compaction_pass(
        &store,
        last_ms.saturating_sub(COMPACTION_GRACE_MS),
        5000,
        usize::MAX,
    )
    .await?;
    eprintln!(
        "  compacted {moved} rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bytes_per_point = per_point(file_bytes(&store).await?);
    Ok(Measured {
        points,
        recent_bytes_per_point,
        bytes_per_point,
        store,
        _dir: dir,
    })
}

/// Suite 6: bytes per stored point and the one-device-metric-day range query.
pub async fn telemetry_storage(b: &mut Bench) -> anyhow::Result<Table> {
    let days = b.args.storage_days.max(2);
    let mut table = Table::new(format!(
        "telemetry storage (in-process SQLite store; {days} days regular/irregular, 2 days at 1 Hz)"
    ));
    let kinds: [(&str, &str, Vec<TelemetryRecord>); 4] = [
        (
            "regular",
            "3 metrics every 60 s (0.1 °C walk, whole-% walk, door switch)",
            regular(days),
        ),
        (
            "irregular",
            "3 metrics every 10 s ± 2 s ms jitter (0.01 walk, 0.1 walk, integer walk)",
            irregular(days),
        ),
        (
            "irregular full-precision",
            "1 metric every 10 s ± 2 s ms jitter, full-precision f64 random walk (worst case)",
            irregular_full_precision(days),
        ),
        ("1 Hz", "1 metric every 1 s (0.1 walk)", one_hz(2)),
    ];
    let mut one_hz_store = None;
    for (name, what, records) in kinds {
        eprintln!("telemetry-storage: {name}, {} records", records.len());
        let m = measure(records).await?;
        let note = format!(
            "{what}; {} points, one seq per record; file after checkpoint + VACUUM, less the empty schema",
            m.points
        );
        table.push(
            Row::new(
                format!("bytes on disk per point, {name}, compacted (lower is better)"),
                Some(m.bytes_per_point),
                None,
            )
            .note(note),
        );
        table.push(
            Row::new(
                format!("bytes on disk per point, {name}, recent rows only (lower is better)"),
                Some(m.recent_bytes_per_point),
                None,
            )
            .note("before the compaction pass: every point a row of the write-optimised table"),
        );
        if name == "1 Hz" {
            one_hz_store = Some(m);
        }
    }
    if let Some(m) = one_hz_store {
        let mut ms = Vec::with_capacity(QUERY_RUNS);
        let mut returned = 0;
        for _ in 0..QUERY_RUNS {
            let started = Instant::now();
            let points = m
                .store
                .query(TelemetryQuery {
                    device_id: device(),
                    metric: Some("temp".into()),
                    from_ms: Some(START_MS),
                    to_ms: Some(START_MS + DAY_MS),
                    limit: 100_000,
                })
                .await?;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
            returned = points.len();
        }
        anyhow::ensure!(returned == 86_400, "day query returned {returned} points");
        ms.sort_by(f64::total_cmp);
        for (p, label) in [(0.5, "p50"), (0.99, "p99")] {
            table.push(
                Row::new(
                    format!("range query, 1 device-metric-day at 1 Hz (86,400 points), {label} ms (lower is better)"),
                    Some(super::percentile(&ms, p)),
                    None,
                )
                .note(format!("{QUERY_RUNS} runs, compacted chunks, store.query() from a read connection; goal < 20 ms")),
            );
        }
    }
    Ok(table)
}
