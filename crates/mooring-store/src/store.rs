//! The storage traits, one per concern; every backend implements all of them.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::health::{DeviceHealth, HealthDelta};
use crate::model::{
    AlertFire, AlertRecord, AlertState, AppendOutcome, ArtifactCreate, ArtifactDelete,
    ArtifactRecord, AuditQuery, AuditRecord, BrokerOp, BrokerState, CaRecord, CertRecord,
    CertRenewal, ClaimCreate, ClaimRecord, CommandParentRecord, CommandRecord, CommandState,
    CreateOutcome, DeploymentCreate, DeploymentDelete, DeploymentRecord, DeviceActivity,
    DeviceFilter, DeviceRecord, DeviceUpdateRecord, EnrollmentRecord, EnrollmentReserve,
    FleetSample, FleetTotals, Installation, JobRecord, MetricValue, NewDevice, PipelineCounts,
    Point, RolloutCreate, RolloutDeviceRecord, RolloutEventRecord, RolloutRecord, RuleRecord,
    SessionOp, SessionRecord, ShadowRecord, StepError, StoredSession, TelemetryQuery,
    TelemetryRecord, TicketCreate, TicketRecord, TokenRecord, UserRecord, VersionCounts,
    WaveProgress,
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
    /// For every row, in one transaction: `last_seen_ms = max(old, new)`, `last_telemetry_ms`
    /// likewise, `first_connect_ms` and `first_telemetry_ms` set once (never moved). Unknown ids
    /// are skipped (the device may have been deleted meanwhile).
    async fn record_activity(&self, activity: &[DeviceActivity]) -> Result<()>;
    /// Records the newest installation of a device; `false` if there is no such device.
    async fn set_installation(&self, id: &str, installation: Installation) -> Result<bool>;
    /// Sets the last error of provisioning step `step` of a device (replacing that step's
    /// previous one; the message is clipped to [`crate::STEP_ERROR_LEN_MAX`]). Unknown ids are
    /// skipped.
    async fn record_step_error(&self, id: &str, step: &str, error: StepError) -> Result<()>;
    /// At most `limit` devices matching `filter` with `id > after_id`, ordered by id (byte
    /// order): a selection evaluated by the store, never by scanning pages in the caller.
    async fn select_devices(
        &self,
        filter: &DeviceFilter,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<DeviceRecord>>;
    /// How many devices match `filter`, and how many of them report each version (the
    /// `versions_max` most common).
    async fn count_device_versions(
        &self,
        filter: &DeviceFilter,
        versions_max: usize,
    ) -> Result<VersionCounts>;
    /// How many devices match `filter`, and how many of them have connected, have sent
    /// telemetry and have a recorded installation (the provisioning funnel).
    async fn count_pipeline(&self, filter: &DeviceFilter) -> Result<PipelineCounts>;
}

/// Most registered CAs a store keeps ([`CaStore::add_ca`] refuses more).
pub const CAS_MAX: usize = 100;

/// Registered manufacturer CAs (issue 16, just-in-time registration).
#[async_trait::async_trait]
pub trait CaStore: Send + Sync + 'static {
    /// Registers a CA. `AlreadyExists` if its id or SHA-256 is taken; `InvalidInput` if
    /// [`CAS_MAX`] CAs are registered already (decided in the same transaction).
    async fn add_ca(&self, ca: CaRecord) -> Result<()>;
    async fn get_ca(&self, id: &str) -> Result<Option<CaRecord>>;
    /// Every registered CA, oldest first (ties: by id); at most [`CAS_MAX`].
    async fn list_cas(&self) -> Result<Vec<CaRecord>>;
    /// Enables or disables a CA; `false` if there is no such CA.
    async fn set_ca_enabled(&self, id: &str, enabled: bool) -> Result<bool>;
    /// Registers a device together with its certificate's ledger row `cert` (a certificate
    /// issued outside, e.g. by a registered CA), in one transaction. `AlreadyExists` if the id,
    /// or the certificate's serial or SHA-256, is taken: nothing is stored then.
    async fn create_device_with_cert(&self, d: NewDevice, cert: CertRecord)
        -> Result<DeviceRecord>;
}

/// Most certificates one ledger query returns.
pub const CERT_PAGE_LEN_MAX: usize = 1000;

/// The certificate ledger (issue 16): every certificate issued to a device. Creating a device
/// ([`DeviceStore::create_device`]) adds its certificate in the same transaction; deleting it
/// deletes its certificates.
#[async_trait::async_trait]
pub trait CertStore: Send + Sync + 'static {
    /// Adds a certificate to an existing device. `NotFound` if the device does not exist,
    /// `AlreadyExists` if the serial or the SHA-256 is taken.
    async fn add_cert(&self, cert: CertRecord) -> Result<()>;
    async fn find_cert_by_sha256(&self, sha256: &str) -> Result<Option<CertRecord>>;
    async fn get_cert(&self, serial: &str) -> Result<Option<CertRecord>>;
    /// A device's certificates, newest issued first (ties: by serial), at most `limit`.
    async fn list_device_certs(&self, device_id: &str, limit: usize) -> Result<Vec<CertRecord>>;
    /// Revokes the certificate if it is active; `false` if it is unknown or already revoked
    /// (idempotent: the first revocation's time and reason stay).
    async fn revoke_cert(&self, serial: &str, at_ms: u64, reason: Option<&str>) -> Result<bool>;
    /// Revokes every active certificate of the device in one transaction; returns their
    /// serials (none if the device has none, or does not exist).
    async fn revoke_device_certs(
        &self,
        device_id: &str,
        at_ms: u64,
        reason: Option<&str>,
    ) -> Result<Vec<String>>;
    /// Active certificates with `not_after_ms < before_ms` (expired ones included), ordered by
    /// `(not_after_ms, serial)`, after `after` (the last pair of the previous page), at most
    /// `limit`.
    async fn expiring_certs(
        &self,
        before_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<CertRecord>>;
    /// How many active certificates have `not_after_ms < before_ms`.
    async fn count_expiring_certs(&self, before_ms: u64) -> Result<u64>;
    /// Active certificates from a fleet CA other than the one whose issuer is `current_issuer`
    /// (issuer `fleet` or `fleet:<hash>` but not `current_issuer`: during a fleet CA rollover,
    /// the previous CA's) with `not_after_ms > alive_at_ms` (expired ones are of no device that
    /// can still connect), ordered by `(not_after_ms, serial)` after `after`, at most `limit`.
    async fn old_fleet_certs(
        &self,
        current_issuer: &str,
        alive_at_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<CertRecord>>;
    /// How many active certificates [`CertStore::old_fleet_certs`] selects.
    async fn count_old_fleet_certs(&self, current_issuer: &str, alive_at_ms: u64) -> Result<u64>;
    /// How many certificates are revoked.
    async fn count_revoked_certs(&self) -> Result<u64>;
    /// Certificates revoked at or after `since_ms`, ordered by `(revoked_at_ms, serial)` after
    /// `after` (the last pair of the previous page), at most `limit`: what the live-session
    /// sweep re-checks.
    async fn revoked_certs_since(
        &self,
        since_ms: u64,
        limit: usize,
        after: Option<(u64, &str)>,
    ) -> Result<Vec<CertRecord>>;
    /// The device's pending renewal, if any.
    async fn get_renewal(&self, device_id: &str) -> Result<Option<CertRenewal>>;
    /// In one transaction: adds `cert` (the renewal's certificate, active) to the ledger and
    /// makes `renewal` the device's pending renewal. A previous pending renewal's certificate is
    /// revoked (`replaced_reason`, at `renewal.requested_at_ms`) and its serial returned (at
    /// most one unconfirmed certificate per device). `NotFound` if the device does not exist,
    /// `AlreadyExists` if the serial or the SHA-256 is taken.
    async fn put_renewal(
        &self,
        renewal: CertRenewal,
        cert: CertRecord,
        replaced_reason: &str,
    ) -> Result<Option<String>>;
    /// If `serial` is the device's pending renewal, in one transaction: it becomes the device's
    /// current certificate (`cert_serial`, `cert_sha256`, `cert_not_after_ms` of the device),
    /// every other active certificate of the device is revoked (`reason`, at `at_ms`), and the
    /// pending renewal is removed; returns the serials revoked (sorted). `None` if `serial` is
    /// not the pending renewal (already confirmed, replaced, or never one).
    async fn confirm_renewal(
        &self,
        device_id: &str,
        serial: &str,
        at_ms: u64,
        reason: &str,
    ) -> Result<Option<Vec<String>>>;
}

/// The fleet's history: one sample per node per interval (devices, online, points, messages).
#[async_trait::async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Stores a node's sample; a second sample of the same node and `ts_ms` replaces the first.
    async fn record_fleet_sample(&self, sample: FleetSample) -> Result<()>;
    /// The samples with `from_ms <= ts_ms < to_ms`, summed over nodes per `ts_ms` (`devices`:
    /// the largest), oldest first; at most `limit`, the newest ones if there are more.
    async fn fleet_totals(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<FleetTotals>>;
    /// Deletes samples with `ts_ms < before_ms`, at most `max_rows`; returns how many.
    async fn prune_fleet_samples(&self, before_ms: u64, max_rows: usize) -> Result<u64>;
}

/// API tokens (secrets stored hashed).
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// `AlreadyExists` if the id or the hash is taken.
    async fn create_token(&self, t: TokenRecord) -> Result<()>;
    async fn find_token(&self, token_sha256: &str) -> Result<Option<TokenRecord>>;
    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>>;
    /// At most `limit` tokens with `id > after_id`, ordered by id (keyset pagination).
    async fn list_tokens(&self, limit: usize, after_id: Option<&str>) -> Result<Vec<TokenRecord>>;
    /// Sets `last_used_at_ms = max(old, at_ms)`. Unknown ids are ignored.
    async fn touch_token(&self, id: &str, at_ms: u64) -> Result<()>;
    /// Revokes (deletes) the token. `false` if it did not exist.
    async fn delete_token(&self, id: &str) -> Result<bool>;
}

/// People (users), their login sessions and login throttling (issue 14).
#[async_trait::async_trait]
pub trait AccountStore: Send + Sync + 'static {
    /// `AlreadyExists` if the id, the email, the password-set hash or the OIDC subject is taken.
    async fn create_user(&self, u: UserRecord) -> Result<()>;
    async fn get_user(&self, id: &str) -> Result<Option<UserRecord>>;
    async fn find_user_by_email(&self, email: &str) -> Result<Option<UserRecord>>;
    async fn find_user_by_password_set(&self, sha256: &str) -> Result<Option<UserRecord>>;
    async fn find_user_by_oidc_subject(&self, subject: &str) -> Result<Option<UserRecord>>;
    /// At most `limit` users with `email > after_email`, ordered by email.
    async fn list_users(&self, limit: usize, after_email: Option<&str>) -> Result<Vec<UserRecord>>;
    /// Replaces the user's row (by id). `false` if it does not exist; `AlreadyExists` on a
    /// unique column taken by another user.
    async fn update_user(&self, u: UserRecord) -> Result<bool>;
    /// Deletes the user and all its sessions. `false` if it did not exist.
    async fn delete_user(&self, id: &str) -> Result<bool>;

    /// Stores a session; if the user then has more than `per_user_max` sessions, the ones used
    /// least recently go. `NotFound` if the user does not exist.
    async fn create_session(&self, s: SessionRecord, per_user_max: usize) -> Result<()>;
    async fn find_session(&self, id_sha256: &str) -> Result<Option<SessionRecord>>;
    /// Sets `last_used_at_ms = max(old, at_ms)`. Unknown sessions are ignored.
    async fn touch_session(&self, id_sha256: &str, at_ms: u64) -> Result<()>;
    /// `false` if it did not exist.
    async fn delete_session(&self, id_sha256: &str) -> Result<bool>;
    /// Deletes every session of the user; returns how many.
    async fn delete_user_sessions(&self, user_id: &str) -> Result<u64>;
    /// Deletes sessions last used before `idle_before_ms` or expiring at or before `now_ms`,
    /// at most `max_rows`; returns how many.
    async fn delete_expired_sessions(
        &self,
        idle_before_ms: u64,
        now_ms: u64,
        max_rows: usize,
    ) -> Result<u64>;

    /// Counts one failed login under `key` (e.g. `acct:<email>`, `addr:<ip>`) in a fixed window
    /// of `window_ms` (a window that started `window_ms` or more before `now_ms` starts again
    /// at `now_ms`) and returns the count in the current window, this one included. Atomic
    /// across nodes.
    async fn record_login_failure(&self, key: &str, now_ms: u64, window_ms: u64) -> Result<u32>;
    /// Failures under `key` in the window still open at `now_ms` (0 if none).
    async fn login_failures(&self, key: &str, now_ms: u64, window_ms: u64) -> Result<u32>;
    async fn clear_login_failures(&self, key: &str) -> Result<()>;
    /// Deletes counters whose window started before `before_ms`; returns how many.
    async fn prune_login_failures(&self, before_ms: u64) -> Result<u64>;
}

/// The audit log: every write through the API (issue 14). Append-only except for retention.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends the entries in one transaction, in order (their `id`s are assigned, increasing).
    async fn append_audit(&self, entries: Vec<AuditRecord>) -> Result<()>;
    /// Entries matching `q`, newest (highest id) first, at most `q.limit`.
    async fn list_audit(&self, q: AuditQuery) -> Result<Vec<AuditRecord>>;
    /// Deletes entries with `at_ms < before_ms`, at most `max_rows`; returns how many.
    async fn prune_audit(&self, before_ms: u64, max_rows: usize) -> Result<u64>;
}

/// Time-series telemetry.
#[async_trait::async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// One transaction (one fsync) for the whole batch; returns one outcome per record, in
    /// order. A repeated `(device_id, seq)` (within the batch or with anything stored before,
    /// also across restarts) is `Duplicate` and not stored again; `seq: None` is always stored.
    /// All-or-nothing: on `Err` nothing of the batch is stored.
    async fn append_batch(&self, batch: Vec<TelemetryRecord>) -> Result<Vec<AppendOutcome>> {
        self.append_batch_bounded(batch, usize::MAX).await
    }
    /// [`TelemetryStore::append_batch`], where a record that would give its device more than
    /// `metrics_per_device_max` distinct metric names (counting everything stored before, also
    /// earlier in the batch) is [`AppendOutcome::MetricsLimit`] and not stored. A device's
    /// metric names outlive retention (its last known values do), so this bounds what a device
    /// can make the store keep for it forever.
    async fn append_batch_bounded(
        &self,
        batch: Vec<TelemetryRecord>,
        metrics_per_device_max: usize,
    ) -> Result<Vec<AppendOutcome>>;
    /// Points matching `q`, ts ascending, at most `q.limit`. Ties at one timestamp: by metric in
    /// the order the device first sent each, then in insertion order (compaction keeps it).
    async fn query(&self, q: TelemetryQuery) -> Result<Vec<Point>>;
    /// Newest point per metric (ties: the one stored last). This is the last known value: it
    /// survives retention and is removed only with the device.
    async fn latest(&self, device_id: &str) -> Result<BTreeMap<String, (u64, MetricValue)>>;
    /// Deletes points (and dedupe keys) with `ts < cutoff_ms`, and returns how many rows it
    /// deleted: at most `max_rows` deleted one by one, or a whole time partition (of any size)
    /// dropped at once. Returns 0 only when nothing older than the cutoff remains; callers
    /// loop (see [`crate::run_retention_pass`]).
    async fn delete_older_than(&self, cutoff_ms: u64, max_rows: usize) -> Result<usize>;
    /// Retention is cheapest when its cutoff falls on a multiple of this (a partition
    /// boundary: a day on PostgreSQL, where whole partitions are dropped); callers round
    /// their cutoff down to it. 1: any cutoff is as cheap as another.
    fn retention_granularity_ms(&self) -> u64 {
        1
    }
    /// Compresses recent points (and dedupe keys) of time windows that closed at or before
    /// `closed_before_ms` into chunks, one short transaction moving about `max_rows` recent
    /// rows (whole windows; late points are merged into their window's chunk). Returns how many
    /// rows it moved, 0 when nothing is left to compact; callers loop (see
    /// [`crate::run_compaction_pass`]). Invisible to every other method. A backend without
    /// compaction keeps this default.
    async fn compact(&self, closed_before_ms: u64, max_rows: usize) -> Result<usize> {
        let _ = (closed_before_ms, max_rows);
        Ok(0)
    }
}

/// Most records one command or shadow query returns or one batch call accepts.
pub const COMMAND_BATCH_LEN_MAX: usize = 10_000;

/// Device commands and fleet-command parents. Deleting a device deletes its commands.
#[async_trait::async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Stores `parent` (if any) and every command in one transaction, returning one outcome per
    /// command, in order. A command whose `(device_id, idempotency_key)` is already stored is not
    /// stored again: the stored one comes back as `Existing`. `NotFound` (and nothing stored) if
    /// a device does not exist; at most [`COMMAND_BATCH_LEN_MAX`] commands.
    async fn create_commands(
        &self,
        parent: Option<CommandParentRecord>,
        commands: Vec<CommandRecord>,
    ) -> Result<Vec<CreateOutcome>>;
    async fn get_command(&self, id: &str) -> Result<Option<CommandRecord>>;
    /// Replaces the stored command with `record` if its stored state is still `expected`
    /// (compare-and-set); `false` if it was not (or the command is gone).
    async fn update_command(&self, record: CommandRecord, expected: CommandState) -> Result<bool>;
    /// A device's commands, newest first, optionally in one state; at most `limit`, older than
    /// the command `before_id` if given (keyset pagination).
    async fn list_commands(
        &self,
        device_id: &str,
        state: Option<CommandState>,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<CommandRecord>>;
    /// What to (re)deliver to a device now, oldest first: every `queued` command, plus
    /// `delivered` ones whose `next_attempt_at_ms <= now_ms` (all `delivered` and all
    /// `acknowledged` ones if `all_delivered`, which the server passes when the device has just
    /// (re)subscribed: an acknowledged command without a result may have been interrupted, and
    /// the device answers a redelivery from its own record). At most `limit`.
    async fn pending_commands(
        &self,
        device_id: &str,
        now_ms: u64,
        all_delivered: bool,
        limit: usize,
    ) -> Result<Vec<CommandRecord>>;
    /// Work for the scheduler, oldest first, at most `limit`: `queued`/`delivered` commands with
    /// `expires_at_ms <= now_ms`, `delivered` ones with `next_attempt_at_ms <= now_ms`, and
    /// `acknowledged` ones with a result timeout whose deadline (`next_attempt_at_ms`) passed.
    async fn due_commands(&self, now_ms: u64, limit: usize) -> Result<Vec<CommandRecord>>;
    async fn get_command_parent(&self, id: &str) -> Result<Option<CommandParentRecord>>;
    /// How many children of `parent_id` are in each state (states with none are absent).
    async fn count_children(&self, parent_id: &str) -> Result<BTreeMap<CommandState, u64>>;
}

/// Device shadows. Deleting a device deletes its shadow.
#[async_trait::async_trait]
pub trait ShadowStore: Send + Sync + 'static {
    async fn get_shadow(&self, device_id: &str) -> Result<Option<ShadowRecord>>;
    /// Writes `record` if the stored version is `expected_version` (0: no shadow stored yet);
    /// `false` otherwise. `NotFound` if the device does not exist.
    async fn save_shadow(&self, record: ShadowRecord, expected_version: u64) -> Result<bool>;
    /// The stored shadows of these devices (absent ones are skipped); at most
    /// [`COMMAND_BATCH_LEN_MAX`] ids.
    async fn get_shadows(&self, device_ids: &[String]) -> Result<Vec<ShadowRecord>>;
    /// At most `limit` shadows with `device_id > after_device_id`, ordered by device id.
    async fn list_shadows(
        &self,
        limit: usize,
        after_device_id: Option<&str>,
    ) -> Result<Vec<ShadowRecord>>;
}

/// The MQTT broker's durable state: retained messages and persistent sessions with their
/// messages, as opaque values by key. Writes come in batches from [`crate::BrokerStateWriter`]
/// (group commit), so a batch is one transaction.
#[async_trait::async_trait]
pub trait BrokerStateStore: Send + Sync + 'static {
    /// Applies `ops` in order, in one transaction (one fsync): all or nothing. Deleting what
    /// does not exist is not an error.
    async fn apply_broker_ops(&self, ops: Vec<BrokerOp>) -> Result<()>;
    /// Everything stored. Messages whose session is not stored are not returned (and are
    /// deleted).
    async fn load_broker_state(&self) -> Result<BrokerState>;
    /// One stored session with its messages (ascending by seq), if stored: what a cluster node
    /// takes over when the session's client connects to it after another node held it.
    async fn load_broker_session(&self, key: &str) -> Result<Option<StoredSession>>;
}

/// Most device ids one [`ClusterStore::session_nodes`] call takes.
pub const SESSION_LOOKUP_LEN_MAX: usize = 10_000;

/// What the nodes of a cluster coordinate through the database (issue 13): node liveness,
/// leases for work that must run once, which node holds each device's session (presence), and
/// cluster-wide values created once (the fleet CA). A single node uses it too, with itself as
/// the only node. Times are the callers' unix milliseconds: every node passes its own clock,
/// so leases assume clocks agree to well within a lease (NTP).
#[async_trait::async_trait]
pub trait ClusterStore: Send + Sync + 'static {
    /// Records that `node_id` is alive at `now_ms` (its first heartbeat registers it).
    async fn heartbeat(&self, node_id: &str, now_ms: u64) -> Result<()>;
    /// Nodes heard from at or after `alive_since_ms`, with their last heartbeat, by id.
    async fn live_nodes(&self, alive_since_ms: u64) -> Result<Vec<(String, u64)>>;
    /// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`, if it is free,
    /// expired (its deadline `<= now_ms`) or already `holder`'s. `true` if `holder` holds it now.
    /// Atomic: of several nodes asking for a free lease at once, exactly one gets it.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool>;
    /// Gives up `name` if `holder` holds it (so another node may take it at once).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
    /// Applies session changes in order, in one transaction. `Open` makes the node the
    /// device's session holder, replacing one that opened at the same time or earlier (an
    /// `Open` older than the stored one, arriving late, changes nothing); `Close` removes the
    /// row only if that node still holds it (a later `Open` elsewhere wins). Unknown devices
    /// are skipped.
    async fn apply_session_ops(&self, ops: Vec<SessionOp>) -> Result<()>;
    /// For each of `device_ids` (at most [`SESSION_LOOKUP_LEN_MAX`]) whose session is held by
    /// a node heard from at or after `alive_since_ms`: that node. Others are absent.
    async fn session_nodes(
        &self,
        device_ids: &[String],
        alive_since_ms: u64,
    ) -> Result<BTreeMap<String, String>>;
    /// How many devices have a session on a node heard from at or after `alive_since_ms`.
    async fn count_sessions(&self, alive_since_ms: u64) -> Result<u64>;
    /// Removes the session rows of `node_id` (a node starting again: whatever it held before
    /// is gone) and returns how many it removed.
    async fn clear_node_sessions(&self, node_id: &str) -> Result<u64>;
    /// Removes the session rows of nodes last heard from before `alive_since_ms` (and of nodes
    /// never heard from), and those nodes' heartbeat rows, at most `max_rows` sessions; returns
    /// the devices whose row it removed.
    async fn reap_dead_sessions(&self, alive_since_ms: u64, max_rows: usize)
        -> Result<Vec<String>>;
    /// Stores `value` under `key` unless a value is stored there already, and returns the
    /// stored one: of several nodes creating the same value at once, one wins and all get
    /// its value. Values are never replaced.
    async fn put_value_once(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>>;
    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Replaces the value under `key` with `value` if it is still `expected` (compare and
    /// set); `true` if it was replaced. Of several callers replacing the same value at once,
    /// exactly one succeeds.
    async fn replace_value(&self, key: &str, expected: &[u8], value: Vec<u8>) -> Result<bool>;
}

/// Background jobs (issue 15): bulk actions on a selection of devices, with their progress.
/// Writes are compare-and-set on the job's `rev`, so a runner and a cancel never overwrite
/// each other.
#[async_trait::async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job (its `rev` as given). `AlreadyExists` if the id is taken.
    async fn create_job(&self, job: JobRecord) -> Result<()>;
    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>>;
    /// Newest first (by id descending), at most `limit`, with ids below `before_id` if given
    /// (keyset pagination: pass the last id of a page).
    async fn list_jobs(&self, limit: usize, before_id: Option<&str>) -> Result<Vec<JobRecord>>;
    /// Replaces the stored job with `job` if the stored `rev` is still `job.rev`, storing
    /// `rev + 1` (compare-and-set); `false` if it was not (or the job is gone): how a worker
    /// finds out it lost the job (canceled, or taken over by [`JobStore::claim_job`]).
    async fn update_job(&self, job: JobRecord) -> Result<bool>;
    /// How many of `created_by`'s jobs are not final.
    async fn count_unfinished_jobs(&self, created_by: &str) -> Result<u64>;
    /// Deletes the job `id` (and its result) if it is still at `rev`; `false` if it changed
    /// or is gone.
    async fn delete_job(&self, id: &str, rev: u64) -> Result<bool>;
    /// Deletes final jobs that finished before `finished_before_ms`, and final jobs beyond
    /// the newest `keep_max` jobs (by id); never a job that is not final. Returns how many.
    async fn prune_jobs(&self, finished_before_ms: u64, keep_max: usize) -> Result<u64>;
    /// Deletes `created_by`'s final jobs beyond its newest `keep_max` jobs (by id); never a
    /// job that is not final, nor another creator's. Returns how many. (The bound per creator:
    /// one creator's many jobs never push out the others'.)
    async fn prune_jobs_of(&self, created_by: &str, keep_max: usize) -> Result<u64>;
    /// The work queue: takes the unfinished job waiting longest (`run_after_ms`, then id) whose
    /// `run_after_ms` has come and whose lease is free or expired at `now_ms`, and leases it to
    /// `worker` until `now_ms + lease_ms` (`rev + 1`, returned as stored). Taking over a lease
    /// that expired (its worker vanished mid-turn) adds one to `attempts` and says so in
    /// `last_error` (`worker <w> stopped mid-turn (its lease ran out)`). Two workers never
    /// hold one job: a claim is atomic, and a worker that lost its lease finds out at its next
    /// [`JobStore::update_job`] (the rev moved).
    async fn claim_job(
        &self,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<JobRecord>>;
    /// Writes `data` at `offset` of job `id`'s result, replacing whatever was stored from
    /// `offset` on (a turn retried from its stored progress writes again where it left off),
    /// if the job's rev is still `rev` (else `false` and nothing written: a worker that lost
    /// the job never overwrites its new holder's bytes). Durable when it returns; the bytes go
    /// with the job.
    async fn write_job_result(
        &self,
        id: &str,
        rev: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<bool>;
    /// Up to `len` bytes of job `id`'s result from `offset` (fewer at the end; none past it).
    async fn read_job_result(&self, id: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
}

/// Claim tokens and the enrollments made with them (issue 16). Whatever must hold across
/// servers (the live-claim bounds, a claim's uses) is decided inside one transaction here.
#[async_trait::async_trait]
pub trait ClaimStore: Send + Sync + 'static {
    /// Stores a new claim unless its creator already holds `per_creator_max` live claims (not
    /// revoked, not expired at `now_ms`) or the store holds `total_max`. `AlreadyExists` if
    /// the id or the token hash is taken.
    async fn create_claim(
        &self,
        claim: ClaimRecord,
        now_ms: u64,
        per_creator_max: u32,
        total_max: u32,
    ) -> Result<ClaimCreate>;
    async fn get_claim(&self, id: &str) -> Result<Option<ClaimRecord>>;
    async fn find_claim(&self, token_sha256: &str) -> Result<Option<ClaimRecord>>;
    /// At most `limit` claims with `id > after_id`, ordered by id (keyset pagination).
    async fn list_claims(&self, limit: usize, after_id: Option<&str>) -> Result<Vec<ClaimRecord>>;
    /// Revokes the claim at `at_ms` (a revoked one keeps its first time) and returns it as
    /// stored now; `None` if there is no such claim.
    async fn revoke_claim(&self, id: &str, at_ms: u64) -> Result<Option<ClaimRecord>>;
    async fn get_enrollment(
        &self,
        claim_id: &str,
        key_sha256: &str,
    ) -> Result<Option<EnrollmentRecord>>;
    /// In one transaction: if the claim is live at `now_ms` and has no enrollment for this key
    /// and a use left, stores `e` and takes one use. Of concurrent reservations for the last
    /// use, exactly one wins.
    async fn reserve_enrollment(
        &self,
        e: EnrollmentRecord,
        now_ms: u64,
    ) -> Result<EnrollmentReserve>;
    /// The newest enrollment that named device `device_id` (which claim enrolled it, when).
    async fn enrollment_of_device(&self, device_id: &str) -> Result<Option<EnrollmentRecord>>;
    /// Undoes a reservation (its device could not be created): deletes the enrollment and
    /// gives its use back, in one transaction. `false` if there was none.
    async fn release_enrollment(&self, claim_id: &str, key_sha256: &str) -> Result<bool>;
    /// Deletes claims revoked or expired before `dead_before_ms` (with their enrollments), at
    /// most `max_rows`; returns how many.
    async fn prune_claims(&self, dead_before_ms: u64, max_rows: usize) -> Result<u64>;
    /// A claim's enrollments, oldest first, at most `limit`.
    async fn list_enrollments(&self, claim_id: &str, limit: usize)
        -> Result<Vec<EnrollmentRecord>>;
}

/// OTA artifacts (issue 17): what each uploaded file is, its manifest and how far its upload
/// got. The bytes are an [`ArtifactBlobs`]' concern.
#[async_trait::async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Stores a new artifact unless another has its version or the store holds `count_max`.
    /// `AlreadyExists` if the id is taken.
    async fn create_artifact(&self, a: ArtifactRecord, count_max: u32) -> Result<ArtifactCreate>;
    async fn get_artifact(&self, id: &str) -> Result<Option<ArtifactRecord>>;
    /// At most `limit` artifacts with `id > after_id`, ordered by id (keyset pagination).
    async fn list_artifacts(
        &self,
        limit: usize,
        after_id: Option<&str>,
    ) -> Result<Vec<ArtifactRecord>>;
    /// Moves an uploading artifact's `stored_bytes` from `from` to `to` (compare-and-set: two
    /// uploaders of one artifact never both advance it); `false` if it was not at `from`, is
    /// not uploading, or is gone.
    async fn advance_artifact(&self, id: &str, from: u64, to: u64) -> Result<bool>;
    /// Marks an uploading artifact ready with its signature; `false` if it was not uploading.
    async fn mark_artifact_ready(&self, id: &str, signature: &str) -> Result<bool>;
    /// Whether a deployment names the artifact (it may not be deleted then).
    async fn artifact_in_use(&self, id: &str) -> Result<bool>;
    /// Deletes the artifact (and the chunks the database holds of it) unless a deployment
    /// names it, in one transaction.
    async fn delete_artifact(&self, id: &str) -> Result<ArtifactDelete>;
    /// Deletes up to `limit` artifacts still `uploading` that were created before
    /// `created_before_ms` (abandoned uploads), with the chunks the database holds of them, in
    /// one statement (an upload completed meanwhile stays); their ids.
    async fn expire_uploads(&self, created_before_ms: u64, limit: usize) -> Result<Vec<String>>;
}

/// The bytes of artifacts, chunked: the data dir's files ([`crate::FileBlobs`]) for the
/// embedded server, the database's chunk table (every [`Store`]) for a cluster.
#[async_trait::async_trait]
pub trait ArtifactBlobs: Send + Sync + 'static {
    /// Writes `data` at `offset`; whatever was stored from `offset` on is replaced. Durable when
    /// it returns.
    async fn write_blob(&self, id: &str, offset: u64, data: Vec<u8>) -> Result<()>;
    /// Up to `len` bytes from `offset` (fewer at the end; none past it).
    async fn read_blob(&self, id: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Deletes every byte of the artifact (nothing to delete is fine).
    async fn delete_blob(&self, id: &str) -> Result<()>;
}

/// OTA deployments (issue 17): which devices get which artifact, and where each device's
/// update is as its reports tell it.
#[async_trait::async_trait]
pub trait DeploymentStore: Send + Sync + 'static {
    /// Stores the deployment and its devices' updates (pending) in one transaction, unless
    /// `count_max` deployments are stored (`Full`); `NotFound` if the artifact is gone,
    /// `AlreadyExists` if the id is taken.
    async fn create_deployment(
        &self,
        d: DeploymentRecord,
        updates: Vec<DeviceUpdateRecord>,
        count_max: u32,
    ) -> Result<DeploymentCreate>;
    /// Deletes a deployment with its devices' updates, in one transaction, if every update is
    /// final (`committed`, `rolled_back`, `failed`), or it is canceled and every update is final
    /// or still `pending` (the device never started it); else `Active`.
    async fn delete_deployment(&self, id: &str) -> Result<DeploymentDelete>;
    async fn get_deployment(&self, id: &str) -> Result<Option<DeploymentRecord>>;
    /// Newest first (by creation time, then id), at most `limit`, those after `before` (the
    /// creation time and id of the last one of the previous page) if given.
    async fn list_deployments(
        &self,
        before: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<DeploymentRecord>>;
    /// Sets the cancel time (the first one stays); the deployment as stored now.
    async fn cancel_deployment(&self, id: &str, at_ms: u64) -> Result<Option<DeploymentRecord>>;
    /// Records which command carries a device's update.
    async fn set_update_command(
        &self,
        deployment_id: &str,
        device_id: &str,
        command_id: &str,
    ) -> Result<bool>;
    /// Stores a device's report unless the stored one has a `seq` at or above `u.seq`, or is a
    /// final state the device reported (final is sticky: a late or replayed report changes
    /// nothing; a final state the server wrote, `seq` None, yields to the device's word);
    /// `false` if ignored (older, final, or no such update).
    async fn apply_update_report(&self, u: DeviceUpdateRecord) -> Result<bool>;
    async fn get_update(
        &self,
        deployment_id: &str,
        device_id: &str,
    ) -> Result<Option<DeviceUpdateRecord>>;
    /// A deployment's updates by device id, after `after_device`, at most `limit`.
    async fn list_updates(
        &self,
        deployment_id: &str,
        after_device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeviceUpdateRecord>>;
    /// Updates still `pending` without a command, of deployments not canceled, by deployment
    /// then device, after `after` (a `(deployment, device)` cursor), at most `limit`: what a
    /// crash cut short of sending.
    async fn unsent_updates(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>>;
    /// Updates still `pending` that the device never reported on (no `seq`) whose command
    /// ended without success (`failed`, `expired`, `canceled`), as (deployment, device, command),
    /// by deployment then device, after `after`, at most `limit`: what a crash kept from being
    /// failed when its command ended.
    async fn ended_update_commands(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>>;
    /// How many of a deployment's updates are in each state.
    async fn count_updates(&self, deployment_id: &str) -> Result<BTreeMap<String, u64>>;
    /// A device's updates, newest first, at most `limit`.
    async fn device_updates(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<DeviceUpdateRecord>>;
}

/// What [`GatewayStore::attach_child`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    /// Attached; the gateway it had before, if any.
    Attached(Option<String>),
    /// The gateway has its maximum of children already; nothing changed.
    GatewayFull,
}

/// Most rows one [`GatewayStore::children_of`] or [`GatewayStore::list_attachments`] call
/// returns: a larger `limit` is cut to it (page on from the last row until a page is empty).
pub const GATEWAY_PAGE_LEN_MAX: usize = 10_000;

/// Gateways and their children (issue 20): which gateway may act for which device. A child has
/// at most one gateway; a gateway is never itself a child, and a child is never a gateway (no
/// chains). Deleting either device deletes the attachment.
#[async_trait::async_trait]
pub trait GatewayStore: Send + Sync + 'static {
    /// Attaches `child` to `gateway` at `at_ms`, replacing an earlier gateway of the child, in
    /// one transaction. `Attached(previous)`: the gateway the child had before, if any
    /// (`Some(gateway)` itself when it was attached there already: nothing changes then,
    /// `attached_at_ms` included). `GatewayFull`: `gateway` already has `children_max` children
    /// (the child not counted if it is one), nothing changed.
    /// Errors: `NotFound` if either device does not exist; `InvalidInput` if `child == gateway`,
    /// if `gateway` is attached to a gateway itself, or if `child` has children.
    async fn attach_child(
        &self,
        child: &str,
        gateway: &str,
        at_ms: u64,
        children_max: usize,
    ) -> Result<AttachOutcome>;
    /// Detaches `child`; returns the gateway it was attached to (`None`: it was not).
    async fn detach_child(&self, child: &str) -> Result<Option<String>>;
    /// The gateway `child` is attached to and since when (Unix ms).
    async fn gateway_of(&self, child: &str) -> Result<Option<(String, u64)>>;
    /// The children of `gateway` with the time each was attached, by child id ascending, after
    /// `after` (exclusive), at most `limit` (and [`GATEWAY_PAGE_LEN_MAX`]).
    async fn children_of(
        &self,
        gateway: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>>;
    /// Every attachment as `(child, gateway)`, by child id ascending, after `after`
    /// (exclusive), at most `limit` (and [`GATEWAY_PAGE_LEN_MAX`]; a node loads them all at
    /// start, page by page).
    async fn list_attachments(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>>;
}

/// Rollouts (issue 19): which device is in which wave, when each started (its update added to
/// the rollout's deployment), and the rollout's event log.
#[async_trait::async_trait]
pub trait RolloutStore: Send + Sync + 'static {
    /// Stores the rollout, its deployment (with no updates) and its devices in one transaction,
    /// unless `count_max` rollouts are stored (`Full`) or the artifact is gone
    /// (`ArtifactNotFound`); an id taken is [`crate::StoreError::AlreadyExists`].
    async fn create_rollout(
        &self,
        r: RolloutRecord,
        deployment: DeploymentRecord,
        devices: Vec<RolloutDeviceRecord>,
        count_max: u32,
    ) -> Result<RolloutCreate>;
    async fn get_rollout(&self, id: &str) -> Result<Option<RolloutRecord>>;
    /// Newest first (by creation time, then id), those after `before` (the creation time and
    /// id of the last one of the previous page) if given, at most `limit`.
    async fn list_rollouts(
        &self,
        before: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>>;
    /// Rollouts `running` or `paused`, by id, after `after_id`, at most `limit`.
    async fn active_rollouts(
        &self,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>>;
    /// Compare-and-set: stores `r` with `revision + 1` if the stored rollout's revision is
    /// `r.revision`; `false` if it moved meanwhile (or is gone), and nothing changes.
    async fn update_rollout(&self, r: &RolloutRecord) -> Result<bool>;
    /// Adds devices to a rollout (one already in it stays as it is); how many were added.
    async fn add_rollout_devices(&self, id: &str, devices: Vec<RolloutDeviceRecord>)
        -> Result<u64>;
    /// Devices of waves `<= wave` not started yet, by (rank, device id), after `after` (the
    /// rank and id of the last one of the previous page), at most `limit`.
    async fn waiting_rollout_devices(
        &self,
        id: &str,
        wave: u32,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<RolloutDeviceRecord>>;
    /// Starts devices, in one transaction: each of `starts` (device id, the version it runs)
    /// that is in the rollout and not started yet gets `started_at_ms = at_ms`, its
    /// `from_version`, no deferral, and a copy of `update` (a `pending` update of the rollout's
    /// deployment) with its device id added to the deployment. Returns the devices started;
    /// those started already (or not in the rollout) are skipped, so no device starts twice,
    /// and none starts unless the rollout is `running` and its deployment not canceled (a
    /// pause or abort stored meanwhile stops a start pass at once).
    async fn start_rollout_devices(
        &self,
        id: &str,
        starts: Vec<(String, Option<String>)>,
        update: DeviceUpdateRecord,
        at_ms: u64,
    ) -> Result<Vec<String>>;
    /// Sets why devices not started yet were not started (a device started is left alone).
    async fn defer_rollout_devices(&self, id: &str, deferred: Vec<(String, String)>) -> Result<()>;
    /// Every wave with a device in it, by wave: its devices not started, deferred, and by
    /// their update's state.
    async fn rollout_progress(&self, id: &str) -> Result<Vec<WaveProgress>>;
    /// How many of the rollout's devices started at or after `since_ms`.
    async fn count_rollout_started_since(&self, id: &str, since_ms: u64) -> Result<u64>;
    /// The rollout's devices by device id, after `after_device`, at most `limit`, each with
    /// its update's state once started.
    async fn list_rollout_devices(
        &self,
        id: &str,
        after_device: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RolloutDeviceRecord, Option<mooring_proto::ota::UpdateState>)>>;
    /// The rollouts `device_id` is in, by id, at most `limit`.
    async fn device_rollouts(&self, device_id: &str, limit: usize) -> Result<Vec<String>>;
    /// Sets (or with `None` clears) devices' health baselines.
    async fn set_rollout_baselines(
        &self,
        id: &str,
        baselines: Vec<(String, Option<String>)>,
    ) -> Result<()>;
    /// Appends an event with the next `seq` of its rollout (`e.seq` is ignored) and keeps the
    /// rollout's newest `keep_max`; the `seq` given.
    async fn append_rollout_event(&self, e: RolloutEventRecord, keep_max: usize) -> Result<u64>;
    /// A rollout's events with `seq > after_seq`, oldest first, at most `limit`.
    async fn list_rollout_events(
        &self,
        id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<RolloutEventRecord>>;
}

/// Per-device health records (issue 18; [`crate::health`]).
#[async_trait::async_trait]
pub trait HealthStore: Send + Sync + 'static {
    /// Folds each delta into its device's record ([`DeviceHealth::apply`]; a record is
    /// created for a device with none), all in one transaction; a delta of a device that does
    /// not exist (any more), or that began before the device was registered (an id deleted and
    /// registered again), is dropped. At most [`HEALTH_BATCH_LEN_MAX`] deltas. Returns how
    /// many were applied.
    async fn merge_device_health(&self, deltas: Vec<HealthDelta>, gap_ms: u64) -> Result<usize>;
    /// The records of those of `ids` that have one, in no particular order. At most
    /// [`HEALTH_BATCH_LEN_MAX`] ids.
    async fn get_device_health(&self, ids: &[String]) -> Result<Vec<(String, DeviceHealth)>>;
}

/// Rules and the alerts they raise (issue 18).
#[async_trait::async_trait]
pub trait RuleStore: Send + Sync + 'static {
    /// Stores a new rule unless the store holds `rules_max` already (`Ok(false)`).
    /// `AlreadyExists` if the id or the name is taken.
    async fn create_rule(&self, rule: RuleRecord, rules_max: usize) -> Result<bool>;
    async fn get_rule(&self, id: &str) -> Result<Option<RuleRecord>>;
    /// Every rule, by name (at most the `rules_max` that could be created).
    async fn list_rules(&self) -> Result<Vec<RuleRecord>>;
    /// Sets `enabled` (and `updated_at_ms`); the rule as stored after, `None` if there is none.
    async fn set_rule_enabled(
        &self,
        id: &str,
        enabled: bool,
        at_ms: u64,
    ) -> Result<Option<RuleRecord>>;
    /// Deletes the rule and resolves its open alerts (`resolved_by` `rule_deleted`), in one
    /// transaction; `false` if there was no such rule.
    async fn delete_rule(&self, id: &str, at_ms: u64) -> Result<bool>;

    /// Raises an alert for (rule, device): the open one (firing or acknowledged) counts one more
    /// occurrence (`count`, `last_fired_ms`, `detail`), else a new firing alert is stored unless
    /// `open_max` alerts are open already, or `fire.rule_must_exist` and the rule is gone or
    /// disabled (`None`: a rule deleted while an evaluator still held it raises nothing). The bool: whether it is new.
    async fn fire_alert(
        &self,
        fire: AlertFire,
        open_max: usize,
    ) -> Result<Option<(AlertRecord, bool)>>;
    /// Resolves the open alert of (rule, device), if any, as `by` at `at_ms`.
    async fn resolve_open_alert(
        &self,
        rule_id: &str,
        device_id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>>;
    /// Firing -> acknowledged by `by`; an alert in another state is returned unchanged.
    async fn acknowledge_alert(
        &self,
        id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Option<AlertRecord>>;
    /// Firing or acknowledged -> resolved by `by`; a resolved alert is returned unchanged.
    async fn resolve_alert(&self, id: &str, by: &str, at_ms: u64) -> Result<Option<AlertRecord>>;
    async fn get_alert(&self, id: &str) -> Result<Option<AlertRecord>>;
    /// Newest first (by id descending), at most `limit`, filtered by any of `state`, `rule_id`,
    /// `device_id`, with ids below `before_id` if given.
    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<AlertRecord>>;
    /// Deletes resolved alerts resolved before `resolved_before_ms`, and resolved alerts beyond
    /// the newest `keep_max` alerts (by id); never an open one. Returns how many.
    async fn prune_alerts(&self, resolved_before_ms: u64, keep_max: usize) -> Result<u64>;

    /// Stores a new open ticket unless one with its id exists (`Exists`, unchanged) or
    /// `open_max` tickets of its playbook are open (`Full`).
    async fn create_ticket(&self, ticket: TicketRecord, open_max: usize) -> Result<TicketCreate>;
    async fn get_ticket(&self, id: &str) -> Result<Option<TicketRecord>>;
    /// Newest first (by id descending), at most `limit`, filtered by any of `open`, `playbook`
    /// and `alert_id`, with ids below `before_id` if given.
    async fn list_tickets(
        &self,
        filter: &TicketFilter,
        limit: usize,
        before_id: Option<&str>,
    ) -> Result<Vec<TicketRecord>>;
    /// Open -> closed by `by`; a closed ticket is returned unchanged.
    async fn close_ticket(&self, id: &str, by: &str, at_ms: u64) -> Result<Option<TicketRecord>>;
    /// Deletes closed tickets closed before `closed_before_ms`, and closed tickets beyond the
    /// newest `keep_max` (by id); never an open one. Returns how many.
    async fn prune_tickets(&self, closed_before_ms: u64, keep_max: usize) -> Result<u64>;
}

/// What [`RuleStore::list_tickets`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TicketFilter {
    /// `Some(true)`: open ones only; `Some(false)`: closed ones only.
    pub open: Option<bool>,
    pub playbook: Option<String>,
    pub alert_id: Option<String>,
}

/// What [`RuleStore::list_alerts`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFilter {
    pub state: Option<AlertState>,
    /// Only open alerts (firing or acknowledged).
    pub open: bool,
    pub rule_id: Option<String>,
    pub device_id: Option<String>,
}

/// Most deltas one merge, or ids one read, takes.
pub const HEALTH_BATCH_LEN_MAX: usize = 1000;

/// Everything a Mooring server needs from storage.
pub trait Store:
    DeviceStore
    + TokenStore
    + TelemetryStore
    + CommandStore
    + ShadowStore
    + BrokerStateStore
    + ClusterStore
    + AccountStore
    + AuditStore
    + FleetStore
    + JobStore
    + CertStore
    + ClaimStore
    + CaStore
    + ArtifactStore
    + ArtifactBlobs
    + DeploymentStore
    + RolloutStore
    + GatewayStore
    + HealthStore
    + RuleStore
{
}

impl<T> Store for T where
    T: DeviceStore
        + TokenStore
        + TelemetryStore
        + CommandStore
        + ShadowStore
        + BrokerStateStore
        + ClusterStore
        + AccountStore
        + AuditStore
        + FleetStore
        + JobStore
        + CertStore
        + ClaimStore
        + CaStore
        + ArtifactStore
        + ArtifactBlobs
        + DeploymentStore
        + RolloutStore
        + GatewayStore
        + HealthStore
        + RuleStore
{
}
