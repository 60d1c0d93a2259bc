//! Plain records exchanged with a store: devices, tokens, telemetry. No serde on purpose.

pub use mooring_proto::DeviceId;
use std::collections::BTreeMap;
use std::str::FromStr;

pub use mooring_proto::telemetry::MetricValue;

use crate::error::{Result, StoreError};

/// Largest timestamp (unix milliseconds) a store accepts; backends keep times as signed 64 bit.
pub const TS_MS_MAX: u64 = i64::MAX as u64;

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: u64,
    /// Lowercase hex of the SHA-256 of the device certificate (DER): the certificate identity.
    pub cert_sha256: String,
    pub cert_serial: String,
    pub cert_not_after_ms: u64,
    /// Newest time the device was seen; `None` until it first connects.
    pub last_seen_ms: Option<u64>,
    /// When it first connected (the provisioning pipeline's "first connect").
    pub first_connect_ms: Option<u64>,
    /// When its first telemetry point was stored ("first telemetry").
    pub first_telemetry_ms: Option<u64>,
    /// When its newest telemetry was stored (server time; installation confirmation checks it).
    pub last_telemetry_ms: Option<u64>,
    /// Who installed it, where and when (the newest confirmed installation).
    pub installation: Option<Installation>,
    /// The last error of each provisioning step that failed for it (step name → error).
    pub provisioning_errors: BTreeMap<String, StepError>,
}

/// The provisioning funnel of a selection of devices ([`crate::DeviceStore::count_pipeline`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineCounts {
    pub devices: u64,
    pub connected: u64,
    pub reporting: u64,
    pub installed: u64,
}

/// A confirmed installation (issue 16): recorded by an installer once the device is seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    pub at_ms: u64,
    /// The user's email or the token's name that recorded it.
    pub by: String,
    pub location: String,
    pub notes: String,
}

/// The last failure of one provisioning step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub at_ms: u64,
    pub message: String,
}

/// What presence reports about a device since its last flush (one row of
/// [`crate::DeviceStore::record_activity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceActivity {
    pub id: String,
    /// Newest time it was seen.
    pub last_seen_ms: u64,
    /// When a connection of it opened since the last flush (the earliest), if one did.
    pub connected_at_ms: Option<u64>,
    /// When it last sent telemetry that was stored, if it did since the last flush.
    pub telemetry_at_ms: Option<u64>,
}

/// A device to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub id: DeviceId,
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub cert_sha256: String,
    pub cert_serial: String,
    pub cert_not_after_ms: u64,
    /// Who issued the certificate, as the ledger names it ([`CERT_ISSUER_FLEET`],
    /// [`cert_issuer_of_fleet_ca`]).
    pub cert_issuer: String,
}

impl NewDevice {
    /// The record as stored: never seen yet.
    pub fn into_record(self) -> DeviceRecord {
        DeviceRecord {
            id: self.id,
            tags: self.tags,
            created_at_ms: self.created_at_ms,
            cert_sha256: self.cert_sha256,
            cert_serial: self.cert_serial,
            cert_not_after_ms: self.cert_not_after_ms,
            last_seen_ms: None,
            first_connect_ms: None,
            first_telemetry_ms: None,
            last_telemetry_ms: None,
            installation: None,
            provisioning_errors: BTreeMap::new(),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        check_ts("created_at_ms", self.created_at_ms)?;
        check_ts("cert_not_after_ms", self.cert_not_after_ms)
    }
}

/// What a person or an API token may do (issue 14). The server maps each role to its
/// permissions; the store only keeps the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Everything.
    Admin,
    /// Devices, commands, shadows, OTA, rollouts, rules.
    Operator,
    /// Records installations; reads the devices it is assigned (its scope).
    Installer,
    /// Reads everything its scope allows, changes nothing.
    Viewer,
    /// MQTT data access (the `service` MQTT login) and a read-only API.
    Service,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Operator,
        Role::Installer,
        Role::Viewer,
        Role::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Installer => "installer",
            Role::Viewer => "viewer",
            Role::Service => "service",
        }
    }
}

impl FromStr for Role {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                StoreError::InvalidInput(format!(
                    "unknown role {other:?} (expected one of admin, operator, installer, viewer, service)",
                    other = s
                ))
            })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API token. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Lowercase hex of the SHA-256 of the secret.
    pub token_sha256: String,
    pub created_at_ms: u64,
    /// A fleet selector limiting which devices the token reaches (`None`: all).
    pub scope: Option<String>,
    /// The token is refused from this time on (`None`: never expires).
    pub expires_at_ms: Option<u64>,
    /// Last time the token was used (recorded at most about once a minute).
    pub last_used_at_ms: Option<u64>,
}

impl TokenRecord {
    /// Whether the token still holds at `now_ms`: no expiry, or an expiry still ahead.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|e| now_ms < e)
    }

    /// Refuses U+0000 in any of its texts (see [`check_text`]).
    pub(crate) fn check_text(&self) -> Result<()> {
        check_text("token id", &self.id)?;
        check_text("token name", &self.name)?;
        check_text("token hash", &self.token_sha256)?;
        check_text("token scope", self.scope.as_deref().unwrap_or(""))
    }
}

/// A person who logs in (issue 14): by password (argon2id, PHC string) or OpenID Connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// `usr_<hex>`.
    pub id: String,
    /// Lowercase; unique.
    pub email: String,
    pub role: Role,
    /// A fleet selector limiting which devices the user reaches (`None`: all).
    pub scope: Option<String>,
    /// argon2id PHC string; `None`: no password (not set yet, or OpenID Connect only).
    pub password_hash: Option<String>,
    /// SHA-256 (hex) of the one-time password-set token, while one is outstanding; unique.
    pub password_set_sha256: Option<String>,
    pub password_set_expires_at_ms: Option<u64>,
    pub disabled: bool,
    /// `<issuer> <subject>` of the OpenID Connect identity linked to this user; unique.
    pub oidc_subject: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl UserRecord {
    /// Refuses U+0000 in any of its texts (see [`check_text`]).
    pub(crate) fn check_text(&self) -> Result<()> {
        check_text("user id", &self.id)?;
        check_text("user email", &self.email)?;
        for (what, v) in [
            ("user scope", &self.scope),
            ("user password hash", &self.password_hash),
            ("user password-set hash", &self.password_set_sha256),
            ("user OIDC subject", &self.oidc_subject),
        ] {
            check_text(what, v.as_deref().unwrap_or(""))?;
        }
        Ok(())
    }
}

/// A logged-in browser or app session: an opaque cookie whose SHA-256 is the key, so every
/// node accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// SHA-256 (hex) of the cookie's secret.
    pub id_sha256: String,
    pub user_id: String,
    /// SHA-256 (hex) of the session's CSRF token (sent back in `X-CSRF-Token` on writes).
    pub csrf_sha256: String,
    pub created_at_ms: u64,
    /// Last request (recorded at most about once a minute): idle expiry counts from here.
    pub last_used_at_ms: u64,
    /// Absolute expiry.
    pub expires_at_ms: u64,
    /// Where the login came from (remote address).
    pub source: String,
    pub user_agent: String,
}

impl SessionRecord {
    /// Refuses U+0000 in any of its texts (see [`check_text`]).
    pub(crate) fn check_text(&self) -> Result<()> {
        for (what, v) in [
            ("session id hash", &self.id_sha256),
            ("session user id", &self.user_id),
            ("session CSRF hash", &self.csrf_sha256),
            ("session source", &self.source),
            ("session user agent", &self.user_agent),
        ] {
            check_text(what, v)?;
        }
        Ok(())
    }
}

/// One entry of the audit log: who did what, when, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Assigned by the store, increasing (ignored by `append_audit`).
    pub id: u64,
    pub at_ms: u64,
    /// `user:<email>`, `token:<name> (<id>)`, `anonymous`.
    pub actor: String,
    /// What was done, e.g. `device.create`, `auth.login`.
    pub action: String,
    /// What it was done to: the request path, e.g. `/api/v1/devices/lock-1`.
    pub target: String,
    /// Remote address.
    pub source: String,
    /// The node that served it.
    pub node: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// Short extra detail (e.g. the reason of a refusal); may be empty.
    pub detail: String,
}

/// Filters of an audit log read; newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub actor: Option<String>,
    /// Exact action, or a prefix when it ends with `.` (e.g. `device.`).
    pub action: Option<String>,
    /// Target prefix (matched byte for byte: case-sensitive, `%` and `_` are plain characters).
    pub target_prefix: Option<String>,
    /// Only entries with `at_ms >= since_ms`.
    pub since_ms: Option<u64>,
    /// Only entries with `at_ms < until_ms`.
    pub until_ms: Option<u64>,
    /// Only entries with `id < before_id` (the cursor: the last id of the previous page).
    pub before_id: Option<u64>,
    pub limit: usize,
}

/// One telemetry message to store.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRecord {
    pub device_id: DeviceId,
    /// Device sequence number: a repeated `(device_id, seq)` is stored once. `None`: always stored.
    pub seq: Option<u64>,
    pub ts_ms: u64,
    pub points: Vec<(String, MetricValue)>,
}

impl TelemetryRecord {
    /// Checks what every backend must be able to store: `ts_ms <= TS_MS_MAX`, finite numbers,
    /// non-empty metric names. The writer runs this per record so one bad record cannot fail
    /// the batch it would have shared with others.
    pub fn validate(&self) -> Result<()> {
        check_ts("ts_ms", self.ts_ms)?;
        for (metric, value) in &self.points {
            if metric.is_empty() {
                return Err(StoreError::InvalidInput("empty metric name".into()));
            }
            if let MetricValue::Number(n) = value {
                if !n.is_finite() {
                    return Err(StoreError::InvalidInput(format!(
                        "metric {metric:?} is not a finite number"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Whether an appended record was stored or recognised as already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    Stored,
    /// `(device_id, seq)` was already stored; nothing was written. Acknowledge it anyway.
    Duplicate,
    /// The record names metrics its device has never sent, and storing them would give the
    /// device more distinct metrics than the bound passed to
    /// [`crate::TelemetryStore::append_batch_bounded`]; nothing of it was written (not even its
    /// dedupe key). Sending it again does not help.
    MetricsLimit,
}

/// One stored metric point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub metric: String,
    pub ts_ms: u64,
    pub value: MetricValue,
}

/// Points of one device, optionally of one metric, in `[from_ms, to_ms)`, oldest first, at most
/// `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryQuery {
    pub device_id: DeviceId,
    pub metric: Option<String>,
    /// Inclusive lower bound; `None`: from the beginning.
    pub from_ms: Option<u64>,
    /// Exclusive upper bound; `None`: no upper bound.
    pub to_ms: Option<u64>,
    pub limit: usize,
}

/// Refuses a batch of more than `max` items.
pub(crate) fn check_len(what: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(StoreError::InvalidInput(format!(
            "{len} {what} in one call; at most {max}"
        )));
    }
    Ok(())
}

/// Refuses text holding U+0000: PostgreSQL text cannot store it, so no backend takes it in an
/// account, session, token or login-failure key (a lookup by such a text finds nothing).
pub(crate) fn check_text(what: &str, s: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(StoreError::InvalidInput(format!(
            "{what} contains a NUL character (U+0000)"
        )));
    }
    Ok(())
}

/// The earliest start of a login-failure window still open at `now_ms`: a window that started
/// `window_ms` or more before `now_ms` is over, so one is open iff `start > now_ms - window_ms`,
/// i.e. `start >= now_ms - window_ms + 1` (negative when `now_ms < window_ms`).
pub(crate) fn window_open_since(now_ms: u64, window_ms: u64) -> i64 {
    let now = i64::try_from(now_ms.min(TS_MS_MAX)).unwrap_or(i64::MAX);
    let window = i64::try_from(window_ms).unwrap_or(i64::MAX);
    now.saturating_sub(window).saturating_add(1)
}

pub(crate) fn check_ts(what: &str, ts_ms: u64) -> Result<()> {
    if ts_ms > TS_MS_MAX {
        return Err(StoreError::InvalidInput(format!(
            "{what} {ts_ms} is above the largest storable time {TS_MS_MAX}"
        )));
    }
    Ok(())
}

/// Where a device command is in its life. Final states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommandState {
    Queued,
    Delivered,
    Acknowledged,
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

impl CommandState {
    pub const ALL: [CommandState; 7] = [
        CommandState::Queued,
        CommandState::Delivered,
        CommandState::Acknowledged,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Expired,
        CommandState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::Acknowledged => "acknowledged",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Canceled => "canceled",
        }
    }

    /// `succeeded`, `failed`, `expired`, `canceled`.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded
                | CommandState::Failed
                | CommandState::Expired
                | CommandState::Canceled
        )
    }
}

impl FromStr for CommandState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<CommandState> {
        CommandState::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| StoreError::InvalidInput(format!("unknown command state {s:?}")))
    }
}

impl std::fmt::Display for CommandState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a command ended, as reported by the device (or decided by the server, e.g. `max_attempts`).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome {
    pub succeeded: bool,
    pub output: serde_json::Value,
}

/// One command for one device, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub id: String,
    pub device_id: DeviceId,
    pub name: String,
    pub params: serde_json::Value,
    pub state: CommandState,
    /// Times the command was handed to the device's live session.
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// When an unacknowledged delivery is retried next.
    pub next_attempt_at_ms: u64,
    pub parent_id: Option<String>,
    pub idempotency_key: Option<String>,
    /// Every state entered, with its time, oldest first (starts with `queued`).
    pub history: Vec<(CommandState, u64)>,
    pub result: Option<CommandOutcome>,
    /// How long the command may stay `acknowledged` without a result (0: no limit). While it is
    /// acknowledged, `next_attempt_at_ms` is that deadline.
    pub result_timeout_ms: u64,
    /// Set only for a command executed on the device's local API (issue 20), which the server
    /// never sent: when its result reached the server. Its history holds the device's times.
    pub synced_at_ms: Option<u64>,
}

impl CommandRecord {
    pub(crate) fn validate(&self) -> Result<()> {
        check_ts("created_at_ms", self.created_at_ms)?;
        check_ts("expires_at_ms", self.expires_at_ms)?;
        check_ts("next_attempt_at_ms", self.next_attempt_at_ms)?;
        for (_, at) in &self.history {
            check_ts("history at", *at)?;
        }
        if self.id.is_empty() {
            return Err(StoreError::InvalidInput("empty command id".into()));
        }
        Ok(())
    }
}

/// A fleet command: one parent for the device commands it fanned out to.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandParentRecord {
    pub id: String,
    pub selector: String,
    pub name: String,
    pub params: serde_json::Value,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// Number of device commands created.
    pub total: u64,
}

/// The result of creating one command: stored now, or an earlier one with the same
/// `(device_id, idempotency_key)` returned instead.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    Created(CommandRecord),
    Existing(CommandRecord),
}

impl CreateOutcome {
    pub fn record(&self) -> &CommandRecord {
        match self {
            CreateOutcome::Created(r) | CreateOutcome::Existing(r) => r,
        }
    }

    pub fn into_record(self) -> CommandRecord {
        match self {
            CreateOutcome::Created(r) | CreateOutcome::Existing(r) => r,
        }
    }
}

/// A device shadow: desired and reported JSON objects and a version bumped on every change.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRecord {
    pub device_id: DeviceId,
    pub desired: serde_json::Map<String, serde_json::Value>,
    pub reported: serde_json::Map<String, serde_json::Value>,
    /// 0 for a shadow never written.
    pub version: u64,
    pub updated_at_ms: u64,
}

impl ShadowRecord {
    /// The shadow of a device never written: empty documents, version 0.
    pub fn empty(device_id: DeviceId) -> Self {
        ShadowRecord {
            device_id,
            desired: serde_json::Map::new(),
            reported: serde_json::Map::new(),
            version: 0,
            updated_at_ms: 0,
        }
    }

    /// The firmware version the device reports: reported key `version`, a string as it is or a
    /// number as its JSON text (what a selector's `version=` term and the fleet summary use).
    pub fn reported_version(&self) -> Option<String> {
        match self.reported.get("version")? {
            serde_json::Value::String(v) => Some(v.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// One change to the broker's durable state (see [`crate::BrokerStateStore`]). Values are opaque
/// bytes: the broker owns their encoding, the store only keeps them by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerOp {
    /// Insert or replace the retained message of `topic`.
    PutRetained {
        topic: String,
        value: Vec<u8>,
    },
    DeleteRetained {
        topic: String,
    },
    /// Insert or replace a persistent session (its subscriptions, expiry, inbound QoS 2 state).
    PutSession {
        key: String,
        value: Vec<u8>,
    },
    /// Delete a session and every message queued for it.
    DeleteSession {
        key: String,
    },
    /// Insert or replace a message queued (or unacknowledged) for `session`; `seq` orders a
    /// session's messages.
    PutMessage {
        session: String,
        seq: u64,
        value: Vec<u8>,
    },
    DeleteMessage {
        session: String,
        seq: u64,
    },
}

/// A stored persistent session with its messages, ascending by `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredSession {
    pub key: String,
    pub value: Vec<u8>,
    pub messages: Vec<(u64, Vec<u8>)>,
}

/// Everything [`crate::BrokerStateStore::load_broker_state`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerState {
    /// `(topic, value)`, ascending by topic.
    pub retained: Vec<(String, Vec<u8>)>,
    /// Ascending by key.
    pub sessions: Vec<StoredSession>,
}

/// One change to which node holds a device's session ([`crate::ClusterStore::apply_session_ops`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// `node_id` holds the device's session since `since_ms` (replacing any other node).
    Open {
        device_id: String,
        node_id: String,
        since_ms: u64,
    },
    /// `node_id` no longer holds it (ignored if another node took it over meanwhile).
    Close { device_id: String, node_id: String },
}

/// Conditions on devices the store evaluates itself (what a fleet selector's `id:`, `tag:`,
/// `version=` and `online` terms become), so a selection never scans the registry in the server.
/// Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// The id is one of these (`None`: any id).
    pub ids: Option<Vec<String>>,
    /// The device carries each of these tags with exactly this value.
    pub tags: Vec<(String, String)>,
    /// The device's shadow reports this firmware version: reported key `version`, a string as
    /// it is, or a number as its JSON text.
    pub version: Option<String>,
    /// The device is online (`None`: either).
    pub online: Option<OnlineFilter>,
}

impl DeviceFilter {
    /// The filter that selects exactly what `sel` matches ([`mooring_proto::selector::Selector::matches`]):
    /// `online` is how the caller knows presence (used only if `sel` has an `online` term).
    pub fn from_selector(sel: &mooring_proto::selector::Selector, online: OnlineFilter) -> Self {
        use mooring_proto::selector::Term;
        let mut f = DeviceFilter {
            ids: sel
                .id_candidates()
                .map(|ids| ids.iter().map(|i| i.as_str().to_owned()).collect()),
            ..DeviceFilter::default()
        };
        let mut online = Some(online);
        for t in &sel.terms {
            match t {
                Term::Ids(_) => {}
                Term::Tag { key, value } => f.tags.push((key.clone(), value.clone())),
                Term::Version(v) => match &f.version {
                    // Two different versions: no device reports both.
                    Some(prev) if prev != v => f.ids = Some(Vec::new()),
                    _ => f.version = Some(v.clone()),
                },
                Term::Online => f.online = online.take(),
            }
        }
        f
    }
}

/// Which devices count as online: those held by the asking node (it knows them in memory), and
/// in a cluster those whose session row names another node heard from recently.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnlineFilter {
    /// Devices with a session on the asking node.
    pub here: Vec<String>,
    /// `(node, alive_since_ms)`: devices whose session row names a node other than `node`
    /// whose heartbeat is at or after `alive_since_ms` (`None`: a single node, `here` only).
    pub elsewhere: Option<(String, u64)>,
}

/// How many of the devices a [`DeviceFilter`] selects report each firmware version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionCounts {
    /// Every device the filter selects.
    pub total: u64,
    /// The most common versions (`None`: the device reports none), most devices first, ties by
    /// version (byte order) with `None` last; at most the limit asked for.
    pub versions: Vec<(Option<String>, u64)>,
}

/// One node's counts for one sample interval (fleet history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSample {
    pub node_id: String,
    /// The start of the interval, unix ms (nodes align it to the interval, so the samples of
    /// several nodes for one interval share it).
    pub ts_ms: u64,
    /// Registered devices.
    pub devices: u64,
    /// Devices with a session on this node.
    pub online: u64,
    /// Telemetry points this node stored during the interval.
    pub points: u64,
    /// MQTT PUBLISH packets this node received during the interval.
    pub messages: u64,
}

/// The samples of every node for one `ts_ms`: `online`, `points`, `messages` summed, `devices`
/// the largest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetTotals {
    pub ts_ms: u64,
    pub devices: u64,
    pub online: u64,
    pub points: u64,
    pub messages: u64,
}

/// Where a background job (issue 15: a bulk action on a selection of devices) is in its life.
/// `succeeded`, `failed`, `canceled` and `dead` are final and never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    /// Retried `[jobs] attempts_max` times without success (the dead letter list):
    /// `last_error` says why.
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
        JobState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::Dead => "dead",
        }
    }

    /// `succeeded`, `failed`, `canceled`, `dead`.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

impl FromStr for JobState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<JobState> {
        JobState::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| StoreError::InvalidInput(format!("unknown job state {s:?}")))
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One device a job could not act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub device_id: String,
    pub message: String,
}

/// A stored background job. The store keeps it as given; the server owns what `action` and
/// `params` mean.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The server makes ids that sort by creation time (`job_<ms hex><random>`): the store lists
    /// newest first by id.
    pub id: String,
    pub action: String,
    /// The selector as applied (already narrowed by the creator's scope).
    pub selector: String,
    pub params: serde_json::Value,
    /// The creator's scope when it created the job (`None`: every device).
    pub scope: Option<String>,
    pub state: JobState,
    /// Devices matched, once counted.
    pub total: Option<u64>,
    pub done: u64,
    pub failed: u64,
    /// The first failures (the server bounds how many it keeps).
    pub errors: Vec<JobError>,
    /// Where the walk continues: the last device id handled.
    pub cursor: Option<String>,
    /// The fleet command an action `command` created.
    pub command_id: Option<String>,
    pub created_by: String,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Revision for compare-and-set: each successful [`crate::JobStore::update_job`] adds one.
    pub rev: u64,
    /// The worker holding the job's lease (running a turn of it), if any.
    pub worker: Option<String>,
    /// Until when that lease holds; after it, any worker may take the job over.
    pub lease_until_ms: Option<u64>,
    /// Turns that failed or whose worker vanished (a lease taken over), since the last
    /// success.
    pub attempts: u32,
    /// No worker claims the job before this (the next turn's time; a retry's backoff).
    pub run_after_ms: u64,
    /// Why the last failed turn failed (a dead job's reason).
    pub last_error: Option<String>,
    /// What a finished job made (a report: its format, rows and size), as the server wrote it.
    pub result: Option<serde_json::Value>,
}

/// Job errors as stored (a JSON array of `{"device_id", "message"}`), the same on every backend.
pub(crate) fn job_errors_to_json(errors: &[JobError]) -> String {
    serde_json::Value::Array(
        errors
            .iter()
            .map(|e| serde_json::json!({"device_id": e.device_id, "message": e.message}))
            .collect(),
    )
    .to_string()
}

/// The stored errors back; anything unreadable is corrupt.
pub(crate) fn job_errors_from_json(text: &str) -> Result<Vec<JobError>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| StoreError::Backend(format!("stored job errors: {e}")))?;
    let items = v
        .as_array()
        .ok_or_else(|| StoreError::Backend("stored job errors: not an array".into()))?;
    Ok(items
        .iter()
        .map(|i| JobError {
            device_id: i["device_id"].as_str().unwrap_or_default().to_owned(),
            message: i["message"].as_str().unwrap_or_default().to_owned(),
        })
        .collect())
}

/// Whether a certificate of the ledger is still accepted (issue 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertState {
    Active,
    Revoked,
}

impl CertState {
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Active => "active",
            CertState::Revoked => "revoked",
        }
    }
}

impl FromStr for CertState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(CertState::Active),
            "revoked" => Ok(CertState::Revoked),
            other => Err(StoreError::Backend(format!(
                "unknown certificate state {other:?}"
            ))),
        }
    }
}

/// Who issued a certificate of the ledger: the fleet CA (which one unrecorded: certificates
/// issued before fleet CA rollovers existed, and the simulator's).
pub const CERT_ISSUER_FLEET: &str = "fleet";

/// The issuer a ledger row of a certificate from the fleet CA with SHA-256 `ca_sha256_hex` names:
/// `fleet:<first 16 hex digits>`, so a fleet CA rollover knows which certificates the previous
/// CA issued.
pub fn cert_issuer_of_fleet_ca(ca_sha256_hex: &str) -> String {
    format!(
        "{CERT_ISSUER_FLEET}:{}",
        &ca_sha256_hex[..ca_sha256_hex.len().min(16)]
    )
}

/// One certificate issued to a device (the ledger, issue 16). MQTT authentication accepts a
/// certificate only while it is `Active` and `now < not_after_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    /// Lowercase hex of the serial number; unique.
    pub serial: String,
    pub device_id: DeviceId,
    /// Lowercase hex of the SHA-256 of the certificate (DER); unique.
    pub sha256: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    pub issued_at_ms: u64,
    /// `fleet` ([`CERT_ISSUER_FLEET`]), `fleet:<CA hash prefix>` ([`cert_issuer_of_fleet_ca`])
    /// or `ca:<id>` ([`cert_issuer_of_ca`]).
    pub issuer: String,
    pub state: CertState,
    pub revoked_at_ms: Option<u64>,
    pub revoke_reason: Option<String>,
}

impl CertRecord {
    /// The ledger row of a device's certificate as registered with the device.
    pub fn of_new_device(d: &NewDevice) -> CertRecord {
        CertRecord {
            serial: d.cert_serial.clone(),
            device_id: d.id.clone(),
            sha256: d.cert_sha256.clone(),
            not_before_ms: d.created_at_ms,
            not_after_ms: d.cert_not_after_ms,
            issued_at_ms: d.created_at_ms,
            issuer: d.cert_issuer.clone(),
            state: CertState::Active,
            revoked_at_ms: None,
            revoke_reason: None,
        }
    }

    /// Refuses U+0000 in its texts and times beyond [`TS_MS_MAX`].
    pub(crate) fn validate(&self) -> Result<()> {
        check_text("certificate serial", &self.serial)?;
        check_text("certificate sha256", &self.sha256)?;
        check_text("certificate issuer", &self.issuer)?;
        check_text("revoke reason", self.revoke_reason.as_deref().unwrap_or(""))?;
        check_ts("not_before_ms", self.not_before_ms)?;
        check_ts("not_after_ms", self.not_after_ms)?;
        check_ts("issued_at_ms", self.issued_at_ms)?;
        check_ts("revoked_at_ms", self.revoked_at_ms.unwrap_or(0))
    }
}

/// A device's pending certificate renewal (issue 16): a certificate issued for the device's new
/// key, active in the ledger, that the device has not yet connected with. At most one per device;
/// confirmed ([`crate::CertStore::confirm_renewal`]) when the device connects with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRenewal {
    pub device_id: DeviceId,
    /// SHA-256 (lowercase hex) of the new key's SubjectPublicKeyInfo: the same key asked again
    /// gets the same certificate.
    pub key_sha256: String,
    /// The renewal certificate's serial (its ledger row).
    pub serial: String,
    /// The certificate (PEM), to answer a repeated request with.
    pub cert_pem: String,
    pub requested_at_ms: u64,
}

impl CertRenewal {
    pub(crate) fn validate(&self) -> Result<()> {
        check_text("key hash", &self.key_sha256)?;
        check_text("certificate serial", &self.serial)?;
        check_text("certificate", &self.cert_pem)?;
        check_ts("requested_at_ms", self.requested_at_ms)
    }
}

/// Longest step-error message a store keeps (longer ones are cut at a character boundary).
pub const STEP_ERROR_LEN_MAX: usize = 512;

/// The provisioning step errors as stored (a JSON object: step → `{at_ms, message}`); entries
/// it cannot read are skipped.
pub(crate) fn step_errors_from_json(text: Option<&str>) -> BTreeMap<String, StepError> {
    let Some(serde_json::Value::Object(map)) = text.and_then(|t| serde_json::from_str(t).ok())
    else {
        return BTreeMap::new();
    };
    map.into_iter()
        .filter_map(|(step, v)| {
            Some((
                step,
                StepError {
                    at_ms: v.get("at_ms")?.as_u64()?,
                    message: v.get("message")?.as_str()?.to_owned(),
                },
            ))
        })
        .collect()
}

/// `message` cut to [`STEP_ERROR_LEN_MAX`] bytes at a character boundary.
pub(crate) fn clip_step_error(message: &str) -> String {
    message[..message.floor_char_boundary(STEP_ERROR_LEN_MAX)].to_owned()
}

/// A claim token (issue 16): a secret a device enrolls with. Only the token's SHA-256 is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    /// `clm_<hex>`.
    pub id: String,
    /// Lowercase hex of the SHA-256 of the token; unique.
    pub token_sha256: String,
    pub name: Option<String>,
    /// How many keys (devices) may enroll with it.
    pub uses_max: u32,
    /// How many have (reservations included).
    pub uses: u32,
    /// Tags every device enrolled with it gets.
    pub tags: BTreeMap<String, String>,
    /// The server chooses device ids (a proposed id is ignored).
    pub assign_ids: bool,
    /// Refused from this time on.
    pub expires_at_ms: u64,
    /// Who created it (a token or user id).
    pub created_by: String,
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

impl ClaimRecord {
    /// Not revoked and not expired at `now_ms`: devices may enroll with it.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && now_ms < self.expires_at_ms
    }

    /// Refuses U+0000 in any of its texts (see [`check_text`]).
    pub(crate) fn check_text(&self) -> Result<()> {
        check_text("claim id", &self.id)?;
        check_text("claim hash", &self.token_sha256)?;
        check_text("claim name", self.name.as_deref().unwrap_or(""))?;
        check_text("claim creator", &self.created_by)?;
        for (k, v) in &self.tags {
            check_text("claim tag", k)?;
            check_text("claim tag", v)?;
        }
        Ok(())
    }
}

/// What [`crate::ClaimStore::create_claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimCreate {
    Created,
    /// The creator already holds its maximum of live claims; nothing stored.
    CreatorFull,
    /// The store holds its maximum of live claims; nothing stored.
    TotalFull,
}

/// One key's enrollment with a claim: the device and certificate it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentRecord {
    pub claim_id: String,
    /// Lowercase hex of the SHA-256 of the key's DER SubjectPublicKeyInfo.
    pub key_sha256: String,
    pub device_id: String,
    pub cert_serial: String,
    pub cert_sha256: String,
    pub cert_not_after_ms: u64,
    pub cert_pem: String,
    pub created_at_ms: u64,
}

impl EnrollmentRecord {
    pub(crate) fn check_text(&self) -> Result<()> {
        check_text("claim id", &self.claim_id)?;
        check_text("key hash", &self.key_sha256)?;
        check_text("device id", &self.device_id)?;
        check_text("certificate serial", &self.cert_serial)?;
        check_text("certificate hash", &self.cert_sha256)?;
        check_text("certificate", &self.cert_pem)
    }
}

/// What [`crate::ClaimStore::reserve_enrollment`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentReserve {
    /// Stored, and one use of the claim taken.
    Reserved,
    /// This key already has an enrollment with this claim (no use taken): it.
    Existing(EnrollmentRecord),
    /// No such claim, or it is revoked or expired; nothing stored.
    ClaimInvalid,
    /// Every use of the claim is taken; nothing stored.
    Exhausted,
}
/// The issuer a ledger row of a certificate from registered CA `ca_id` names (`ca:<id>`).
pub fn cert_issuer_of_ca(ca_id: &str) -> String {
    format!("ca:{ca_id}")
}

/// A registered manufacturer CA (issue 16, just-in-time registration): the MQTT listener
/// trusts client certificates chained to it while it is enabled, and with `auto_register` a
/// device presenting one is registered on its first connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRecord {
    /// `ca_<hex>`.
    pub id: String,
    /// The certificate's subject, as people read it.
    pub subject: String,
    pub cert_pem: String,
    /// Lowercase hex of the SHA-256 of the certificate (DER); unique.
    pub sha256: String,
    pub auto_register: bool,
    /// Given to every device it registers.
    pub tags: BTreeMap<String, String>,
    pub enabled: bool,
    pub created_at_ms: u64,
    /// Who registered it (the audit log's name of the caller).
    pub created_by: String,
}

impl CaRecord {
    /// Refuses U+0000 in its texts and times beyond [`TS_MS_MAX`].
    pub(crate) fn validate(&self) -> Result<()> {
        check_text("CA id", &self.id)?;
        check_text("CA subject", &self.subject)?;
        check_text("CA certificate", &self.cert_pem)?;
        check_text("CA sha256", &self.sha256)?;
        check_text("CA creator", &self.created_by)?;
        for (k, v) in &self.tags {
            check_text("CA tag", k)?;
            check_text("CA tag", v)?;
        }
        check_ts("created_at_ms", self.created_at_ms)
    }
}

/// Where an OTA artifact's upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactState {
    /// Created; its bytes are being uploaded.
    Uploading,
    /// Every byte stored, size and hash checked, the manifest signed: devices may get it.
    Ready,
}

impl ArtifactState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uploading => "uploading",
            Self::Ready => "ready",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "uploading" => Some(Self::Uploading),
            "ready" => Some(Self::Ready),
            _ => None,
        }
    }
}

/// An OTA artifact (issue 17): the file's facts and its manifest, as stored. The bytes live
/// behind [`crate::ArtifactBlobs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// `art_<hex>`.
    pub id: String,
    pub version: String,
    /// Lowercase hex SHA-256 of the whole file (as announced; checked at completion).
    pub sha256: String,
    pub size: u64,
    pub compatible: Vec<String>,
    pub notes: Option<String>,
    /// The manifest's JSON bytes, exactly as signed.
    pub manifest: Vec<u8>,
    /// Hex Ed25519 signature over `manifest` (set when the artifact becomes ready).
    pub signature: Option<String>,
    pub state: ArtifactState,
    /// How many bytes of the file are stored (from the start; the next chunk goes here).
    pub stored_bytes: u64,
    pub created_at_ms: u64,
    pub created_by: String,
}

impl ArtifactRecord {
    /// Refuses U+0000 in any of its texts (see [`check_text`]).
    pub(crate) fn check_text(&self) -> Result<()> {
        check_text("artifact id", &self.id)?;
        check_text("artifact version", &self.version)?;
        check_text("artifact sha256", &self.sha256)?;
        check_text("artifact notes", self.notes.as_deref().unwrap_or(""))?;
        check_text("artifact creator", &self.created_by)?;
        for c in &self.compatible {
            check_text("artifact hardware revision", c)?;
        }
        Ok(())
    }
}

/// What [`crate::ArtifactStore::create_artifact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactCreate {
    Created,
    /// Another artifact has this version; nothing stored.
    VersionTaken,
    /// The store holds its maximum of artifacts; nothing stored.
    Full,
}

/// What [`crate::ArtifactStore::delete_artifact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactDelete {
    Deleted,
    NotFound,
    /// A deployment names it; nothing deleted.
    InUse,
}

/// What [`crate::DeploymentStore::create_deployment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentCreate {
    Created,
    /// The store holds its maximum of deployments; nothing stored.
    Full,
}

/// What [`crate::DeploymentStore::delete_deployment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentDelete {
    Deleted,
    NotFound,
    /// Not canceled and a device's update is not final yet; nothing deleted.
    Active,
}

/// A deployment (issue 17): one artifact to the devices a selector matched when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRecord {
    /// `dep_<hex>`.
    pub id: String,
    pub artifact_id: String,
    /// The selector as given (narrowed by the creator's scope).
    pub selector: String,
    pub allow_downgrade: bool,
    pub created_by: String,
    pub created_at_ms: u64,
    pub canceled_at_ms: Option<u64>,
}

/// One device's update in a deployment, as its reports tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUpdateRecord {
    pub deployment_id: String,
    pub device_id: String,
    pub artifact_id: String,
    pub version: String,
    /// The `mooring.update` command carrying it (once created).
    pub command_id: Option<String>,
    pub state: mooring_proto::ota::UpdateState,
    pub reason: Option<String>,
    pub progress_pct: Option<u8>,
    pub running_version: Option<String>,
    /// The newest report's `seq` (`None`: no report yet).
    pub seq: Option<u64>,
    pub updated_at_ms: u64,
}

impl DeviceUpdateRecord {
    pub(crate) fn check_text(&self) -> Result<()> {
        for (what, v) in [
            ("deployment id", self.deployment_id.as_str()),
            ("device id", &self.device_id),
            ("artifact id", &self.artifact_id),
            ("version", &self.version),
            ("command id", self.command_id.as_deref().unwrap_or("")),
            ("reason", self.reason.as_deref().unwrap_or("")),
            (
                "running version",
                self.running_version.as_deref().unwrap_or(""),
            ),
        ] {
            check_text(what, v)?;
        }
        Ok(())
    }
}

/// The condition on `state` of the updates that keep a deployment from being deleted: any not
/// final, or once it is canceled, any the device started (not final and not `pending`): it
/// stops at the cancel or finishes, and either way its report must land.
pub(crate) fn updates_holding_deployment_sql(canceled: bool) -> String {
    let pending = if canceled {
        format!(", '{}'", mooring_proto::ota::UpdateState::Pending.as_str())
    } else {
        String::new()
    };
    format!("state NOT IN ({}{pending})", final_update_states_sql())
}

/// The final update states as an SQL list (`'committed', 'rolled_back', 'failed'`), from
/// [`mooring_proto::ota::UpdateState::is_final`].
pub(crate) fn final_update_states_sql() -> String {
    mooring_proto::ota::UpdateState::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An update state from its stored name.
pub(crate) fn update_state_of(s: &str) -> Option<mooring_proto::ota::UpdateState> {
    mooring_proto::ota::UpdateState::ALL
        .into_iter()
        .find(|x| x.as_str() == s)
}

/// A stored rule (issue 18; docs/health.md "Rules"): the texts as given, checked by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRecord {
    pub id: String,
    /// Unique.
    pub name: String,
    /// The condition (`--when`).
    pub when: String,
    /// The devices it applies to (`None`: every device the creator may see).
    pub selector: Option<String>,
    /// The creator's scope when it was created: the rule never reaches beyond it.
    pub scope: Option<String>,
    /// The actions (`--then`).
    pub then: String,
    pub enabled: bool,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertState {
    Firing,
    Acknowledged,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }
}

impl FromStr for AlertState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "firing" => Ok(AlertState::Firing),
            "acknowledged" => Ok(AlertState::Acknowledged),
            "resolved" => Ok(AlertState::Resolved),
            other => Err(StoreError::Backend(format!(
                "unknown alert state {other:?}"
            ))),
        }
    }
}

/// An alert: one per rule and device while open (firing or acknowledged); a rule that fires
/// again for the device while its alert is open counts one more occurrence of that alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRecord {
    pub id: String,
    pub rule_id: String,
    pub rule_name: String,
    /// The device (empty: an alert about the fleet, not one device).
    pub device_id: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    pub state: AlertState,
    /// What was seen when it last fired.
    pub detail: String,
    /// Times it fired while open.
    pub count: u64,
    pub first_fired_ms: u64,
    pub last_fired_ms: u64,
    pub acknowledged_at_ms: Option<u64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at_ms: Option<u64>,
    /// Who resolved it: a user or token, or `auto` (the condition cleared), `rule_deleted`.
    pub resolved_by: Option<String>,
}

/// A field-service ticket a playbook opened (issue 18): the devices to visit and the parts to
/// bring. Ids sort by creation time (the server makes them so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketRecord {
    pub id: String,
    /// The `[[playbook]]` that opened it.
    pub playbook: String,
    /// The alert that ran the playbook (empty: a rule's `job:` action did).
    pub alert_id: String,
    pub title: String,
    /// `open` or `closed`.
    pub open: bool,
    pub created_at_ms: u64,
    pub closed_at_ms: Option<u64>,
    /// Who closed it (a user's email or a token's name).
    pub closed_by: Option<String>,
    /// The ticket's devices, sites, installation records and parts, as the server's JSON
    /// (`mooring_api::Ticket`): the store keeps it as it is.
    pub body: String,
}

/// What [`crate::RuleStore::create_ticket`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketCreate {
    Created,
    /// A ticket with that id exists already (a retried playbook opens nothing twice).
    Exists,
    /// `open_max` tickets are open already.
    Full,
}

/// An alert to raise ([`crate::RuleStore::fire_alert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertFire {
    /// The id a new alert gets (unused when an open one counts the occurrence).
    pub id: String,
    pub rule_id: String,
    pub rule_name: String,
    pub device_id: String,
    pub severity: String,
    pub detail: String,
    pub at_ms: u64,
    /// A new alert only if `rule_id` names an enabled rule (rules' alerts; not the cohort
    /// sweeper's, which have no rule row).
    pub rule_must_exist: bool,
}

/// A rollout (issue 19): one deployment sent in waves, each gated on the health of the devices
/// already updated against a control cohort. The server owns every field's meaning; the store
/// keeps `spec` and `gate` as the server's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    /// `rol_<hex>`.
    pub id: String,
    /// The deployment carrying its devices' updates (created with it, no updates at first).
    pub deployment_id: String,
    pub artifact_id: String,
    /// The target as applied (narrowed by the creator's scope).
    pub selector: String,
    /// The checked request (waves, control, throttles, thresholds, gate, preconditions).
    pub spec: String,
    /// Seeds the random order of devices ([`RolloutDeviceRecord::rank`]).
    pub seed: u64,
    /// `running`, `paused`, `aborted` or `completed`.
    pub state: String,
    /// The wave being rolled out: 0.. for the waves, the number of waves for the control
    /// cohort (last).
    pub wave: u32,
    /// Why it is paused or aborted.
    pub reason: Option<String>,
    /// The last gate comparison (the server's JSON).
    pub gate: Option<String>,
    /// When the current wave's health window began (every device it started had ended).
    pub window_started_at_ms: Option<u64>,
    /// The rollout this one rolls back (its devices go back to what they ran).
    pub rollback_of: Option<String>,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Bumped by every [`crate::RolloutStore::update_rollout`] (compare-and-set).
    pub revision: u64,
}

impl RolloutRecord {
    pub(crate) fn check_text(&self) -> Result<()> {
        for (what, v) in [
            ("rollout id", self.id.as_str()),
            ("deployment id", &self.deployment_id),
            ("artifact id", &self.artifact_id),
            ("rollout selector", &self.selector),
            ("rollout spec", &self.spec),
            ("rollout state", &self.state),
            ("rollout reason", self.reason.as_deref().unwrap_or("")),
            ("rollout gate", self.gate.as_deref().unwrap_or("")),
            ("rollback of", self.rollback_of.as_deref().unwrap_or("")),
            ("rollout creator", &self.created_by),
        ] {
            check_text(what, v)?;
        }
        Ok(())
    }
}

/// One device of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutDeviceRecord {
    pub rollout_id: String,
    pub device_id: String,
    /// Its wave (0..); the number of waves for the control cohort.
    pub wave: u32,
    /// Its place in the rollout's random order, below 2^63 (devices of a wave start by rank).
    pub rank: u64,
    /// When its update was started (its update added to the deployment).
    pub started_at_ms: Option<u64>,
    /// What it ran when it started (what a rollback takes it back to).
    pub from_version: Option<String>,
    /// Why it was not started on the last try (a precondition unmet); `None` once started.
    pub deferred: Option<String>,
    /// Its health counts when the current health window began (the server's JSON).
    pub baseline: Option<String>,
}

impl RolloutDeviceRecord {
    pub(crate) fn check_text(&self) -> Result<()> {
        for (what, v) in [
            ("device id", self.device_id.as_str()),
            ("from version", self.from_version.as_deref().unwrap_or("")),
            ("deferral", self.deferred.as_deref().unwrap_or("")),
            ("baseline", self.baseline.as_deref().unwrap_or("")),
        ] {
            check_text(what, v)?;
        }
        Ok(())
    }
}

/// What [`crate::RolloutStore::create_rollout`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutCreate {
    Created,
    /// The store holds `count_max` rollouts; nothing stored.
    Full,
    /// The artifact is gone; nothing stored.
    ArtifactNotFound,
}

/// One wave's devices by where they are: not started (and of those, deferred), and by their
/// update's state once started (`pending`, ..., `committed`, `rolled_back`, `failed`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaveProgress {
    pub wave: u32,
    pub total: u64,
    pub waiting: u64,
    pub deferred: u64,
    pub states: BTreeMap<String, u64>,
}

/// An entry of a rollout's event log: what changed, when, and who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutEventRecord {
    pub rollout_id: String,
    /// 1, 2, ... per rollout (the store assigns it).
    pub seq: u64,
    pub at_ms: u64,
    /// A user's email, a token's name, `server` (the rollout controller) or `playbook:<name>`.
    pub by: String,
    /// `created`, `wave_started`, `gate_passed`, `gate_failed`, `paused`, `resumed`,
    /// `aborted`, `completed`, `devices_added`, ...
    pub kind: String,
    pub detail: String,
}

impl RolloutEventRecord {
    pub(crate) fn check_text(&self) -> Result<()> {
        for (what, v) in [
            ("rollout id", self.rollout_id.as_str()),
            ("event actor", &self.by),
            ("event kind", &self.kind),
            ("event detail", &self.detail),
        ] {
            check_text(what, v)?;
        }
        Ok(())
    }
}

/// The rollout's record and its deployment's must agree on what they are.
pub(crate) fn check_rollout_deployment(r: &RolloutRecord, d: &DeploymentRecord) -> Result<()> {
    if r.deployment_id != d.id || r.artifact_id != d.artifact_id {
        return Err(StoreError::InvalidInput(format!(
            "rollout {} names deployment {} of artifact {}, but the deployment is {} of {}",
            r.id, r.deployment_id, r.artifact_id, d.id, d.artifact_id
        )));
    }
    Ok(())
}

/// One group of a rollout's devices: a wave, whether not started, whether deferred, the state of
/// its update (started devices), how many.
pub(crate) struct ProgressRow {
    pub wave: u32,
    pub waiting: bool,
    pub deferred: bool,
    pub state: Option<String>,
    pub n: u64,
}

/// Every wave's counts, by wave.
pub(crate) fn progress_of(rows: Vec<ProgressRow>) -> Vec<WaveProgress> {
    let mut waves: BTreeMap<u32, WaveProgress> = BTreeMap::new();
    for row in rows {
        let w = waves.entry(row.wave).or_insert_with(|| WaveProgress {
            wave: row.wave,
            ..WaveProgress::default()
        });
        w.total += row.n;
        if row.waiting {
            w.waiting += row.n;
            if row.deferred {
                w.deferred += row.n;
            }
        } else if let Some(state) = row.state {
            *w.states.entry(state).or_default() += row.n;
        }
    }
    waves.into_values().collect()
}
