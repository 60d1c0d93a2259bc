//! The storage traits, one per concern; every backend implements all of them.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::model::{
    AppendOutcome, DeviceRecord, MetricValue, NewDevice, Point, TelemetryQuery, TelemetryRecord,
    TokenRecord,
};

/// The device registry.
#[async_trait::async_trait]
pub trait DeviceStore: Send + Sync + 'static {
    /// Registers a device. `AlreadyExists` if the id is taken.
    async fn create_device(&self, d: NewDevice) -> Result<DeviceRecord>;
    async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>>;
    /// The device whose certificate has this SHA-256 (lowercase hex). If several devices share
    /// a certificate, the one with the smallest id.
    async fn find_device_by_cert(&self, cert_sha256: &str) -> Result<Option<DeviceRecord>>;
    /// At most `limit` devices with `id > after_id`, ordered by id (byte order), for keyset
    /// pagination: pass the last id of a page to get the next.
    async fn list_devices(&self, limit: usize, after_id: Option<&str>)
        -> Result<Vec<DeviceRecord>>;
    /// Deletes the device, its latest values, its dedupe keys and all its telemetry (the
    /// telemetry in bounded chunks, so ingest is not stalled). `false` if it did not exist.
    async fn delete_device(&self, id: &str) -> Result<bool>;
    /// Replaces all tags. `NotFound` if the device does not exist.
    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<()>;
    /// Sets `last_seen_ms = max(old, new)` for every pair, in one transaction. Unknown ids are
    /// skipped (the device may have been deleted meanwhile).
    async fn record_last_seen(&self, seen: &[(String, u64)]) -> Result<()>;
}

/// API tokens (secrets stored hashed).
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// `AlreadyExists` if the id or the hash is taken.
    async fn create_token(&self, t: TokenRecord) -> Result<()>;
    async fn find_token(&self, token_sha256: &str) -> Result<Option<TokenRecord>>;
    /// All tokens, ordered by id.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// `false` if it did not exist.
    async fn delete_token(&self, id: &str) -> Result<bool>;
}

/// Time-series telemetry.
#[async_trait::async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// One transaction (one fsync) for the whole batch; returns one outcome per record, in
    /// order. A repeated `(device_id, seq)` (within the batch or with anything stored before,
    /// also across restarts) is `Duplicate` and not stored again; `seq: None` is always stored.
    /// All-or-nothing: on `Err` nothing of the batch is stored.
    async fn append_batch(&self, batch: Vec<TelemetryRecord>) -> Result<Vec<AppendOutcome>>;
    /// Points matching `q`, ts ascending (ties in insertion order), at most `q.limit`.
    async fn query(&self, q: TelemetryQuery) -> Result<Vec<Point>>;
    /// Newest point per metric (ties: the one stored last). This is the last known value: it
    /// survives retention and is removed only with the device.
    async fn latest(&self, device_id: &str) -> Result<BTreeMap<String, (u64, MetricValue)>>;
    /// Deletes points (and dedupe keys) with `ts < cutoff_ms`, at most `max_rows` rows per call
    /// in total, and returns how many rows it deleted. Returns 0 only when nothing older than
    /// the cutoff remains; callers loop (see [`crate::run_retention_pass`]).
    async fn delete_older_than(&self, cutoff_ms: u64, max_rows: usize) -> Result<usize>;
}

/// Everything a Mooring server needs from storage.
pub trait Store: DeviceStore + TokenStore + TelemetryStore {}

impl<T: DeviceStore + TokenStore + TelemetryStore> Store for T {}
