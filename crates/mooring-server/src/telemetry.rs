//! Telemetry: ingest of device messages through the group-commit writer, and queries.
//!
//! Invariants: a point is acknowledged to its device only once the writer reports it durable
//! (the hooks answer PUBACK from [`Ingest`]); `(device, seq)` is stored once (a repeat is
//! [`Ingest::Duplicate`]); retention deletes in bounded chunks so ingest never stalls; the
//! compaction pass compresses closed windows in short transactions, bounded per pass, so
//! ingest never waits behind it either.

use crate::access::Access;
use crate::app::Core;
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Counters;
use crate::registry::Registry;
use mooring_proto::DeviceId;
use mooring_store::{
    AppendOutcome, Point, StoreError, TelemetryQuery, TelemetryRecord, TelemetryWriter, WriterStats,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most points one telemetry query returns.
pub const TELEMETRY_QUERY_LEN_MAX: usize = 10_000;
pub const TELEMETRY_QUERY_LEN_DEFAULT: usize = 1000;
/// Rows deleted per retention transaction: a few milliseconds of work, the longest any ingest
/// batch waits behind retention (maintenance writes yield to every other waiting write).
const RETENTION_CHUNK_ROWS: usize = 1000;
/// How often the server compacts closed telemetry windows into chunks.
pub const COMPACTION_INTERVAL_SECS: u64 = 60;
/// A window is compacted once it closed this long ago; points arriving later still are merged
/// into its chunk by a later pass.
const COMPACTION_GRACE_MS: u64 = 10 * 60_000;
/// Recent rows moved per compaction transaction (whole windows, so a little more at times):
/// short, like retention's, for the same reason.
const COMPACTION_TX_ROWS: usize = 1000;
/// Most compaction transactions per pass (1M rows a minute, far above what 100k devices
/// reporting every minute write); what is left waits for the next pass.
const COMPACTION_TXS_MAX: usize = 1000;

/// What became of one telemetry message.
#[derive(Debug)]
pub enum Ingest {
    /// Durable now.
    Stored,
    /// Stored before (same device and seq).
    Duplicate,
    /// Not a valid telemetry payload; dropped.
    Invalid(String),
    /// It names a metric the device never sent and the device already has
    /// `telemetry.metrics_per_device_max` of them; dropped.
    MetricsLimit,
    /// The store failed; not stored, the device sends it again.
    Failed(StoreError),
}

/// The telemetry service: owns the group-commit writer's handle.
pub struct Telemetry {
    core: Arc<Core>,
    registry: Arc<Registry>,
    writer: TelemetryWriter,
}

impl Telemetry {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>, writer: TelemetryWriter) -> Self {
        Self {
            core,
            registry,
            writer,
        }
    }

    /// Parses and stores one message the device `device_id` published on its telemetry topic;
    /// returns once it is durable (or refused).
    pub async fn ingest(&self, device_id: &DeviceId, payload: &[u8], now_ms: u64) -> Ingest {
        let counters = &self.core.counters;
        let telemetry = match mooring_proto::telemetry::Telemetry::parse(payload) {
            Ok(t) => t,
            Err(e) => {
                Counters::inc(&counters.telemetry_invalid);
                return Ingest::Invalid(e.to_string());
            }
        };
        let points = telemetry.points.len() as u64;
        // The event's points, taken before the record goes to the writer.
        let event = mooring_api::EventBody::Telemetry {
            seq: telemetry.seq,
            ts: telemetry.ts_ms.unwrap_or(now_ms),
            points: telemetry
                .points
                .iter()
                .map(|(name, v)| (name.clone(), v.to_json()))
                .collect(),
        };
        let record = TelemetryRecord {
            device_id: device_id.clone(),
            seq: telemetry.seq,
            ts_ms: telemetry.ts_ms.unwrap_or(now_ms),
            points: telemetry.points,
        };
        match self.writer.append(record).await {
            Ok(AppendOutcome::Stored) => {
                Counters::inc(&counters.telemetry_messages);
                Counters::add(&counters.telemetry_points, points);
                self.core.events.publish(Some(device_id), event);
                Ingest::Stored
            }
            Ok(AppendOutcome::Duplicate) => {
                Counters::inc(&counters.telemetry_duplicates);
                Ingest::Duplicate
            }
            Ok(AppendOutcome::MetricsLimit) => {
                Counters::inc(&counters.telemetry_metrics_limited);
                Ingest::MetricsLimit
            }
            Err(e) => {
                Counters::inc(&counters.telemetry_store_errors);
                Ingest::Failed(e)
            }
        }
    }

    /// The group-commit writer's batches and latency (`/metrics`).
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    pub async fn query(
        &self,
        access: &Access,
        id: &str,
        metric: Option<String>,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        limit: Option<usize>,
    ) -> ServiceResult<Vec<Point>> {
        let view = self.registry.get_device(access, id).await?;
        let limit = limit.unwrap_or(TELEMETRY_QUERY_LEN_DEFAULT);
        if limit == 0 || limit > TELEMETRY_QUERY_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {TELEMETRY_QUERY_LEN_MAX}"),
            ));
        }
        if let (Some(f), Some(t)) = (from_ms, to_ms) {
            if f > t {
                return Err(ServiceError::invalid(
                    "invalid_range",
                    "from must not be after to",
                ));
            }
        }
        Ok(self
            .core
            .store
            .query(TelemetryQuery {
                device_id: view.record.id,
                metric,
                from_ms,
                // The API's `to` is inclusive; the store's upper bound is exclusive.
                to_ms: to_ms.map(|t| t.saturating_add(1)),
                limit,
            })
            .await?)
    }

    pub async fn latest(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<BTreeMap<String, (u64, mooring_store::MetricValue)>> {
        let view = self.registry.get_device(access, id).await?;
        Ok(self.core.store.latest(&view.record.id).await?)
    }

    /// Deletes points older than `telemetry.retention_days`, in bounded chunks; returns how
    /// many rows went.
    pub async fn retention_pass(&self) -> mooring_store::Result<usize> {
        let config = &self.core.config.telemetry;
        let retention_ms = u64::from(config.retention_days) * 86_400_000;
        // Rounded down to the store's granularity (a day on PostgreSQL: whole partitions are
        // dropped instead of rows deleted one by one), so points live at most one granule
        // longer than `retention_days`.
        let granularity = self.core.store.retention_granularity_ms().max(1);
        let cutoff = self.core.now_ms().saturating_sub(retention_ms);
        let cutoff = cutoff - cutoff % granularity;
        let rows = mooring_store::run_retention_pass(
            self.core.store.as_ref(),
            cutoff,
            RETENTION_CHUNK_ROWS,
        )
        .await?;
        let counters = &self.core.counters;
        Counters::add(&counters.telemetry_retention_rows, rows as u64);
        Counters::inc(&counters.telemetry_retention_passes);
        Ok(rows)
    }

    /// Compresses the recent points of windows closed more than [`COMPACTION_GRACE_MS`] ago into
    /// chunks, at most [`COMPACTION_TXS_MAX`] short transactions; returns how many rows moved.
    pub async fn compaction_pass(&self) -> mooring_store::Result<usize> {
        let closed_before = self.core.now_ms().saturating_sub(COMPACTION_GRACE_MS);
        mooring_store::run_compaction_pass(
            self.core.store.as_ref(),
            closed_before,
            COMPACTION_TX_ROWS,
            COMPACTION_TXS_MAX,
        )
        .await
    }
}
