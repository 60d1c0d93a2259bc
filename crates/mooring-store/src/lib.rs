//! # mooring-store: where Mooring keeps its state
//!
//! No SQL appears outside this crate. The rest of Mooring sees one trait per concern,
//! all `async` and object safe:
//!
//! * [`DeviceStore`]: the device registry (certificate identity, tags, last seen).
//! * [`TokenStore`]: API tokens; only SHA-256 hashes of secrets are stored.
//! * [`TelemetryStore`]: time-series points with per-device `seq` dedupe, a cheap "latest value
//!   per metric" view and chunked retention.
//! * [`CommandStore`]: device commands (state, attempts, history, result) with idempotency keys,
//!   fleet-command parents, and the bounded queries the delivery scheduler runs.
//! * [`ShadowStore`]: device shadows (desired, reported, version) with compare-and-set writes.
//! * [`BrokerStateStore`]: the MQTT broker's retained messages and persistent sessions (opaque
//!   values by key; the broker owns the encoding), written through [`BrokerStateWriter`], the
//!   same group commit as telemetry: one transaction per batch, tickets answered once durable.
//! * [`ClusterStore`]: what a cluster's nodes coordinate through the database: heartbeats,
//!   leases for once-only work, which node holds each device's session, values created once.
//! * [`AccountStore`]: people (users), their login sessions (by the SHA-256 of the cookie) and
//!   login-failure counters, atomic across nodes.
//! * [`AuditStore`]: the append-only audit log of API writes, filtered reads, retention.
//! * [`FleetStore`]: the fleet's history, one sample per node per interval, summed per interval.
//! * [`JobStore`]: background jobs (bulk actions on devices) with progress, compare-and-set
//!   updates and pruning of finished ones.
//! * [`ClaimStore`]: claim tokens (by the SHA-256 of the token) with their live-claim bounds,
//!   and the enrollments made with them (one per claim and public key), uses taken atomically.
//!
//! [`Store`] is all of them at once (blanket impl); the server holds an `Arc<dyn Store>`.
//!
//! ## Backends
//!
//! [`SqliteStore`] (module [`sqlite`]) is the embedded backend: one file, WAL,
//! `synchronous=FULL` so acknowledged telemetry survives kill -9 and power loss. All writes go
//! through one writer connection; reads use a small pool of read connections, so API reads never
//! wait behind ingest. Every call runs on tokio's blocking pool, never on the async runtime.
//! Numbered migrations (`migrations/NNNN_*.sql`) are embedded in the binary and applied at open,
//! tracked by SQLite's `user_version`.
//!
//! `PgStore` (module `postgres`, cargo feature `postgres`, off by default) is the PostgreSQL
//! backend, a full [`Store`] for several servers sharing one database: a pool of
//! `tokio-postgres` connections, its own numbered migrations (`migrations/postgres/`) applied at
//! connect under an advisory lock, telemetry points partitioned by UTC day (retention drops
//! whole days). The server does not select it yet.
//!
//! ## Durability before acknowledgement: the group-commit writer
//!
//! Devices publish telemetry one message at a time; an fsync per message would cap ingest at a
//! few hundred messages per second. [`TelemetryWriter`] (module [`writer`]) is a bounded queue in
//! front of any [`TelemetryStore`]: one task takes everything queued (up to `batch_len_max`),
//! writes it with one [`TelemetryStore::append_batch`] (one transaction, one fsync), then answers
//! every waiter. The MQTT layer acknowledges a message only after its `append` returned `Ok`.
//! [`run_retention_pass`] deletes old points in small chunks so ingest never stalls behind it.
//!
//! ## Telemetry layout: recent rows, then compressed chunks
//!
//! A point is first a small row keyed by an integer series id (one per device and metric), so
//! the acknowledged write is one short transaction as before. [`run_compaction_pass`] later moves
//! each closed window (an hour) of a series into one chunk, a versioned Gorilla-style blob
//! (module [`chunk`]), in short transactions that ingest interleaves with. Queries, `latest`,
//! retention and device deletion see both layers as one.
//!
//! ## One behaviour, every backend
//!
//! [`conformance`] holds the behavioural contract as async test functions taking a `&dyn Store`,
//! and [`conformance_tests!`] expands them into one `#[tokio::test]` each. `tests/sqlite.rs`
//! runs it against SQLite and `tests/postgres.rs` against PostgreSQL (a throwaway database per
//! case); a new backend runs the same macro and must pass unchanged. Both exist
//! only with the `conformance` feature, which this crate's dev-dependencies turn on (test code
//! stays out of the production build).

pub mod blobs;
pub mod broker_writer;
pub mod chunk;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod health;
pub mod model;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;
pub mod store;
pub mod writer;

pub use blobs::{FileBlobs, StoreBlobs};
pub use broker_writer::{BrokerStateWriter, BrokerWriterStats, BROKER_BATCH_OPS_MAX};
pub use error::{Result, StoreError};
pub use model::{
    cert_issuer_of_ca, cert_issuer_of_fleet_ca, AlertFire, AlertRecord, AlertState, AppendOutcome,
    ArtifactCreate, ArtifactDelete, ArtifactRecord, ArtifactState, AuditQuery, AuditRecord,
    BrokerOp, BrokerState, CaRecord, CertRecord, CertRenewal, CertState, ClaimCreate, ClaimRecord,
    CommandOutcome, CommandParentRecord, CommandRecord, CommandState, CreateOutcome,
    DeploymentCreate, DeploymentDelete, DeploymentRecord, DeviceActivity, DeviceFilter, DeviceId,
    DeviceRecord, DeviceUpdateRecord, EnrollmentRecord, EnrollmentReserve, FleetSample,
    FleetTotals, Installation, JobError, JobRecord, JobState, MetricValue, NewDevice, OnlineFilter,
    PipelineCounts, Point, Role, RolloutCreate, RolloutDeviceRecord, RolloutEventRecord,
    RolloutRecord, RuleRecord, SessionOp, SessionRecord, ShadowRecord, StepError, StoredSession,
    TelemetryQuery, TelemetryRecord, TicketCreate, TicketRecord, TokenRecord, UserRecord,
    VersionCounts, WaveProgress, CERT_ISSUER_FLEET, STEP_ERROR_LEN_MAX, TS_MS_MAX,
};
#[cfg(feature = "postgres")]
pub use postgres::PgStore;
pub use sqlite::{backup_database, BackupInfo, SqliteStore, DB_FILE_NAME};
pub use store::{
    AccountStore, AlertFilter, ArtifactBlobs, ArtifactStore, AttachOutcome, AuditStore,
    BrokerStateStore, CaStore, CertStore, ClaimStore, ClusterStore, CommandStore, DeploymentStore,
    DeviceStore, FleetStore, GatewayStore, HealthStore, JobStore, RolloutStore, RuleStore,
    ShadowStore, Store, TelemetryStore, TicketFilter, TokenStore, CAS_MAX, CERT_PAGE_LEN_MAX,
    COMMAND_BATCH_LEN_MAX, GATEWAY_PAGE_LEN_MAX, HEALTH_BATCH_LEN_MAX, SESSION_LOOKUP_LEN_MAX,
};
pub use writer::{
    run_compaction_pass, run_retention_pass, TelemetryWriter, TelemetryWriterConfig, WriterStats,
    METRICS_PER_DEVICE_MAX_DEFAULT,
};
