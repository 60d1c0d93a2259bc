//! Group commit for telemetry: many concurrent appends, one transaction (one fsync) per batch.
//!
//! [`TelemetryWriter::append`] enqueues `(record, reply)` on a bounded channel and waits. One
//! task takes everything queued, up to `batch_len_max`, calls
//! [`TelemetryStore::append_batch`] once, then answers every waiter with its own outcome (or
//! the batch's error). Under load batches grow by themselves; when idle a lone record is written
//! at once, so latency is one fsync. When every handle is dropped the task drains the queue and
//! exits; await its `JoinHandle` at shutdown so nothing acknowledged is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, StoreError};
use crate::model::{AppendOutcome, TelemetryRecord};
use crate::store::TelemetryStore;

/// A failing batch is logged at most this often (with how many failed since the last line).
pub const FAILED_BATCH_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Default of [`TelemetryWriterConfig::metrics_per_device_max`]: ten times what a busy device
/// sends (a few dozen gauges), far below what would let one device fill the series table.
pub const METRICS_PER_DEVICE_MAX_DEFAULT: usize = 256;

/// Bounds of the group-commit writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryWriterConfig {
    /// Records that may wait in the queue; `append` waits for room when it is full
    /// (backpressure onto the MQTT sessions).
    pub queue_len_max: usize,
    /// Most records written by one `append_batch` (one transaction).
    pub batch_len_max: usize,
    /// Most distinct metric names one device may have stored; a record over it is
    /// [`AppendOutcome::MetricsLimit`] (see [`TelemetryStore::append_batch_bounded`]).
    pub metrics_per_device_max: usize,
}

impl Default for TelemetryWriterConfig {
    fn default() -> Self {
        TelemetryWriterConfig {
            queue_len_max: 65_536,
            batch_len_max: 1024,
            metrics_per_device_max: METRICS_PER_DEVICE_MAX_DEFAULT,
        }
    }
}

/// Counters for `/metrics`. Monotonic except the `last_*` latencies and `queue_len`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// `append_batch` calls that succeeded (group-commit transactions written).
    pub batches: u64,
    /// Records acknowledged as stored or duplicate.
    pub records: u64,
    /// Records found to be duplicates (included in `records`).
    pub duplicates: u64,
    /// `append_batch` calls that failed (their records were answered with the error).
    pub batches_failed: u64,
    /// Records answered with an error.
    pub records_failed: u64,
    /// Duration of the most recent `append_batch`, in microseconds.
    pub last_batch_latency_us: u64,
    /// Sum of all `append_batch` durations, in microseconds.
    pub total_batch_latency_us: u64,
    /// `last_batch_latency_us` in whole milliseconds.
    pub last_batch_latency_ms: u64,
    /// `total_batch_latency_us` in whole milliseconds.
    pub total_batch_latency_ms: u64,
    /// Records waiting in the queue right now.
    pub queue_len: usize,
}

#[derive(Default)]
struct Counters {
    batches_written: AtomicU64,
    records_written: AtomicU64,
    duplicates: AtomicU64,
    batches_failed: AtomicU64,
    records_failed: AtomicU64,
    last_batch_latency_us: AtomicU64,
    total_batch_latency_us: AtomicU64,
}

type Request = (TelemetryRecord, oneshot::Sender<Result<AppendOutcome>>);

/// Handle to the group-commit writer task. Clone it freely; the task stops once every clone
/// is dropped and the queue is drained.
#[derive(Clone)]
pub struct TelemetryWriter {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for TelemetryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryWriter")
            .field("stats", &self.stats())
            .finish()
    }
}

impl TelemetryWriter {
    /// Starts the writer task on the current tokio runtime. The caller owns the `JoinHandle`
    /// and should await it at shutdown, after dropping every handle.
    ///
    /// # Panics
    /// If `queue_len_max` or `batch_len_max` is 0.
    pub fn spawn(
        store: Arc<dyn TelemetryStore>,
        cfg: TelemetryWriterConfig,
    ) -> (TelemetryWriter, tokio::task::JoinHandle<()>) {
        assert!(cfg.queue_len_max > 0, "queue_len_max must be positive");
        assert!(cfg.batch_len_max > 0, "batch_len_max must be positive");
        let (tx, rx) = mpsc::channel(cfg.queue_len_max);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(store, rx, cfg, Arc::clone(&counters)));
        (TelemetryWriter { tx, counters }, task)
    }

    /// Enqueues `rec` and waits until its batch is durable. `Err` means it may not be stored:
    /// the caller must not acknowledge it. An invalid record (see
    /// [`TelemetryRecord::validate`]) is refused here, alone, without failing anyone's batch.
    pub async fn append(&self, rec: TelemetryRecord) -> Result<AppendOutcome> {
        rec.validate()?;
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((rec, reply_tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        reply_rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        let last_batch_latency_us = c.last_batch_latency_us.load(Ordering::Relaxed);
        let total_batch_latency_us = c.total_batch_latency_us.load(Ordering::Relaxed);
        WriterStats {
            batches: c.batches_written.load(Ordering::Relaxed),
            records: c.records_written.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            batches_failed: c.batches_failed.load(Ordering::Relaxed),
            records_failed: c.records_failed.load(Ordering::Relaxed),
            last_batch_latency_us,
            total_batch_latency_us,
            last_batch_latency_ms: last_batch_latency_us / 1000,
            total_batch_latency_ms: total_batch_latency_us / 1000,
            queue_len: self.tx.max_capacity() - self.tx.capacity(),
        }
    }
}

async fn run(
    store: Arc<dyn TelemetryStore>,
    mut rx: mpsc::Receiver<Request>,
    cfg: TelemetryWriterConfig,
    counters: Arc<Counters>,
) {
    let batch_len_max = cfg.batch_len_max;
    let mut requests: Vec<Request> = Vec::with_capacity(batch_len_max);
    // `recv_many` returns 0 only once every sender is gone and the queue is empty.
    // Failed batches are logged at most once per FAILED_BATCH_LOG_INTERVAL, with a count (a
    // full disk fails every batch; the counters in `WriterStats` have every one).
    let mut last_failure_log: Option<Instant> = None;
    let mut failed_since_log = 0u64;
    while rx.recv_many(&mut requests, batch_len_max).await > 0 {
        let (records, waiters): (Vec<_>, Vec<_>) = requests.drain(..).unzip();
        let len = records.len();
        let started = Instant::now();
        let result = match store
            .append_batch_bounded(records, cfg.metrics_per_device_max)
            .await
        {
            Ok(outcomes) if outcomes.len() == len => Ok(outcomes),
            Ok(outcomes) => Err(StoreError::Backend(format!(
                "backend returned {} outcomes for {len} records",
                outcomes.len()
            ))),
            Err(e) => Err(e),
        };
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        counters
            .last_batch_latency_us
            .store(latency_us, Ordering::Relaxed);
        counters
            .total_batch_latency_us
            .fetch_add(latency_us, Ordering::Relaxed);
        let len_u64 = u64::try_from(len).unwrap_or(u64::MAX);
        match result {
            Ok(outcomes) => {
                let duplicates = outcomes
                    .iter()
                    .filter(|o| **o == AppendOutcome::Duplicate)
                    .count();
                counters.batches_written.fetch_add(1, Ordering::Relaxed);
                counters
                    .records_written
                    .fetch_add(len_u64, Ordering::Relaxed);
                counters.duplicates.fetch_add(
                    u64::try_from(duplicates).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                    // The waiter may have given up (cancelled); the record is stored anyway.
                    let _ = waiter.send(Ok(outcome));
                }
            }
            Err(e) => {
                failed_since_log += 1;
                if last_failure_log.is_none_or(|at| at.elapsed() >= FAILED_BATCH_LOG_INTERVAL) {
                    tracing::error!(
                        error = %e,
                        records = len,
                        batches = failed_since_log,
                        "telemetry batches failed (count since the last such line)"
                    );
                    last_failure_log = Some(Instant::now());
                    failed_since_log = 0;
                }
                counters.batches_failed.fetch_add(1, Ordering::Relaxed);
                counters
                    .records_failed
                    .fetch_add(len_u64, Ordering::Relaxed);
                for waiter in waiters {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
        }
    }
    tracing::debug!("telemetry writer drained and stopped");
}

/// Deletes every point older than `cutoff_ms`, `chunk_rows` rows per transaction, yielding to
/// the runtime between chunks so ingest batches interleave. Returns the rows deleted.
pub async fn run_retention_pass(
    store: &dyn TelemetryStore,
    cutoff_ms: u64,
    chunk_rows: usize,
) -> Result<usize> {
    if chunk_rows == 0 {
        return Err(StoreError::InvalidInput(
            "retention chunk_rows must be positive".into(),
        ));
    }
    let mut total = 0usize;
    loop {
        let deleted = store.delete_older_than(cutoff_ms, chunk_rows).await?;
        if deleted == 0 {
            return Ok(total);
        }
        total += deleted;
        tokio::task::yield_now().await;
    }
}

/// Compresses the recent telemetry of windows closed at or before `closed_before_ms` into chunks
/// ([`TelemetryStore::compact`]), about `tx_rows` recent rows per transaction and at most
/// `txs_max` transactions (bounded work per pass: what is left waits for the next pass),
/// yielding between transactions so ingest batches interleave. Returns the rows moved.
pub async fn run_compaction_pass(
    store: &dyn TelemetryStore,
    closed_before_ms: u64,
    tx_rows: usize,
    txs_max: usize,
) -> Result<usize> {
    if tx_rows == 0 {
        return Err(StoreError::InvalidInput(
            "compaction tx_rows must be positive".into(),
        ));
    }
    let mut total = 0usize;
    for _ in 0..txs_max {
        let moved = store.compact(closed_before_ms, tx_rows).await?;
        if moved == 0 {
            break;
        }
        total += moved;
        tokio::task::yield_now().await;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{MetricValue, Point, TelemetryQuery};

    /// A backend whose disk is gone: every batch fails.
    struct BrokenDisk;

    #[async_trait::async_trait]
    impl TelemetryStore for BrokenDisk {
        async fn append_batch_bounded(
            &self,
            _: Vec<TelemetryRecord>,
            _: usize,
        ) -> Result<Vec<AppendOutcome>> {
            Err(StoreError::Backend("disk I/O error".into()))
        }
        async fn query(&self, _: TelemetryQuery) -> Result<Vec<Point>> {
            Ok(Vec::new())
        }
        async fn latest(&self, _: &str) -> Result<BTreeMap<String, (u64, MetricValue)>> {
            Ok(BTreeMap::new())
        }
        async fn delete_older_than(&self, _: u64, _: usize) -> Result<usize> {
            Ok(0)
        }
    }

    fn record(seq: u64) -> TelemetryRecord {
        TelemetryRecord {
            device_id: mooring_proto::DeviceId::parse("d1").expect("test id"),
            seq: Some(seq),
            ts_ms: seq,
            points: vec![("t".into(), MetricValue::Number(1.0))],
        }
    }

    #[tokio::test]
    async fn failed_batch_is_reported_to_every_waiter_and_counted() {
        let (writer, task) = TelemetryWriter::spawn(
            Arc::new(BrokenDisk),
            TelemetryWriterConfig {
                queue_len_max: 16,
                batch_len_max: 4,
                ..TelemetryWriterConfig::default()
            },
        );
        let results = append_concurrently(&writer, 6).await;
        for result in results {
            let err = result.expect_err("must not be acknowledged");
            assert_eq!(err, StoreError::Backend("disk I/O error".into()));
        }
        let stats = writer.stats();
        assert_eq!(stats.batches, 0);
        assert_eq!(stats.records, 0);
        assert_eq!(stats.records_failed, 6);
        assert!(stats.batches_failed >= 2, "{stats:?}");
        drop(writer);
        task.await.expect("writer exits");
    }

    #[tokio::test]
    async fn append_after_writer_stopped_is_closed() {
        let (writer, task) =
            TelemetryWriter::spawn(Arc::new(BrokenDisk), TelemetryWriterConfig::default());
        task.abort();
        let _ = task.await;
        let err = writer.append(record(1)).await.expect_err("writer is gone");
        assert_eq!(err, StoreError::Closed);
        assert_eq!(err.kind(), "closed");
    }

    async fn append_concurrently(writer: &TelemetryWriter, n: u64) -> Vec<Result<AppendOutcome>> {
        let mut set = tokio::task::JoinSet::new();
        for seq in 0..n {
            let writer = writer.clone();
            set.spawn(async move { writer.append(record(seq)).await });
        }
        let mut out = Vec::new();
        while let Some(joined) = set.join_next().await {
            out.push(joined.expect("append task"));
        }
        out
    }
}
